"""Speed-aware pruning: channel alignment, cost model, budgets, latency tables."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from prunekit.models import default_config, get_config, ssd300_vgg16, vgg16
from prunekit.prune.budget import channels_cost_fn, param_grid, search_budget
from prunekit.prune.cost import (
    config_macs,
    cost_shares,
    layer_macs,
    layer_shapes,
    macs_per_filter,
)
from prunekit.prune.layer_costs import cost_columns, l1_layer_weights
from prunekit.prune.profile import (
    estimate_latency,
    layer_latency_estimates,
    load_latency_table,
    profile_model,
    save_latency_table,
    table_key,
)
from prunekit.prune.selection import align_counts, align_keep, aligned_count

# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("multiple", [1, 2, 4, 8, 16])
def test_align_keep_counts_are_admissible_and_least_sparse_kept(multiple: int) -> None:
    rng = random.Random(multiple)
    for trial in range(300):
        n = rng.randint(1, 96)
        keep = torch.rand(n) < rng.random()
        sparsity = torch.rand(n)
        if trial % 5 == 0:  # many ties
            sparsity = torch.randint(0, 3, (n,)).float() / 2
        out = align_keep(keep, sparsity, multiple)
        kept, got = int(keep.sum()), int(out.sum())
        assert out.dtype == torch.bool and out.shape == keep.shape
        if multiple == 1 or n < multiple:
            assert torch.equal(out, keep)
            continue
        assert got % multiple == 0 or got == n, (n, kept, got)
        assert got >= multiple
        # nearest admissible count, ties up
        admissible = [c for c in range(multiple, n + 1, multiple)] + [n]
        best = min(abs(c - kept) for c in admissible)
        assert abs(got - kept) == best and got == max(c for c in admissible if abs(c - kept) == best)
        if got >= kept:  # only additions; the added are the least sparse removed filters
            assert bool((out | ~keep).all())
            added = out & ~keep
            still_removed = ~out
            if added.any() and still_removed.any():
                assert sparsity[added].max() <= sparsity[still_removed].min()
        else:  # only removals; the dropped are the most sparse kept filters
            assert bool((~out | keep).all())
            dropped = keep & ~out
            if dropped.any() and out.any():
                assert sparsity[dropped].min() >= sparsity[out].max()


def test_align_keep_examples_and_inputs_untouched() -> None:
    keep = torch.tensor([True] * 13 + [False] * 7)
    sp = torch.linspace(0, 1, 20)
    keep_copy, sp_copy = keep.clone(), sp.clone()
    out = align_keep(keep, sp, 8)
    assert int(out.sum()) == 16 and bool(out[:16].all()) and not bool(out[16:].any())
    assert torch.equal(keep, keep_copy) and torch.equal(sp, sp_copy)
    # 11 kept -> 8 (nearer than 16): the three most sparse kept filters go
    keep = torch.zeros(20, dtype=torch.bool)
    keep[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]] = True
    out = align_keep(keep, sp, 8)
    assert out.nonzero().flatten().tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    # a layer pruned to nothing keeps N filters; an unpruned odd-width layer stays whole
    assert int(align_keep(torch.zeros(40, dtype=torch.bool), torch.rand(40), 8).sum()) == 8
    assert int(align_keep(torch.ones(21, dtype=torch.bool), torch.rand(21), 8).sum()) == 21
    assert int(align_keep(torch.ones(5, dtype=torch.bool), torch.rand(5), 8).sum()) == 5


def test_aligned_count_rules() -> None:
    assert aligned_count(12, 64, 8) == 16  # tie between 8 and 16 goes up
    assert aligned_count(11, 64, 8) == 8
    assert aligned_count(0, 64, 8) == 8
    assert aligned_count(3, 64, 8) == 8
    assert aligned_count(19, 20, 8) == 20  # the unpruned width is admissible
    assert aligned_count(17, 20, 8) == 16
    assert aligned_count(331, 512, 8) == 328
    assert aligned_count(5, 6, 8) == 5  # original narrower than N: as is
    with pytest.raises(ValueError, match="multiple"):
        aligned_count(3, 10, 0)
    paper = dict(conv1_2=56, conv2_1=107, conv4_3=331, conv9_1=12)
    orig = dict(conv1_2=64, conv2_1=128, conv4_3=512, conv9_1=128)
    assert align_counts(paper, orig, 8) == dict(conv1_2=56, conv2_1=104, conv4_3=328, conv9_1=16)
    assert align_counts(paper, orig, 1) == paper


# --------------------------------------------------------------------------- cost model


@pytest.fixture(scope="module")
def ssd_small() -> torch.nn.Module:
    return ssd300_vgg16(num_classes=5, width=0.25)


def test_layer_macs_ssd300_shares_and_ordering(ssd_small: torch.nn.Module) -> None:
    macs = layer_macs(ssd_small)
    shapes = layer_shapes(ssd_small)
    assert list(macs) == list(shapes) and all(macs[n] == shapes[n].macs for n in macs)
    # conv1_2 at width 0.25: 300*300 outputs x 16 filters x 16*3*3 inputs
    assert macs["conv1_2"] == 300 * 300 * 16 * 16 * 9
    shares = cost_shares(macs)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    high_res = [
        "conv1_2",
        "conv2_1",
        "conv2_2",
        "conv3_1",
        "conv3_2",
        "conv3_3",
        "conv4_1",
        "conv4_2",
        "conv4_3",
    ]
    late = [n for n in macs if n.startswith(("conv8", "conv9", "conv10", "conv11")) and "mbox" not in n]
    assert min(shares[n] for n in high_res) > max(shares[n] for n in late)
    assert sum(shares[n] for n in ["conv1_1", "conv1_2"] + high_res[1:]) > 0.7
    per_filter = macs_per_filter(ssd_small)
    assert per_filter["conv1_2"] == macs["conv1_2"] / 16


def test_layer_macs_full_width_on_meta() -> None:
    macs = config_macs(default_config("ssd300", 21))
    assert macs["conv1_2"] == 300 * 300 * 64 * 64 * 9 == 3_317_760_000
    assert macs["conv4_3"] == 38 * 38 * 512 * 512 * 9
    assert sum(macs.values()) == pytest.approx(31.37e9, rel=0.01)
    cheaper = config_macs(default_config("ssd300", 21), {"conv1_2": 32})
    # halving conv1_2 halves it and its consumer conv2_1
    assert cheaper["conv1_2"] == macs["conv1_2"] // 2 and cheaper["conv2_1"] == macs["conv2_1"] // 2
    with pytest.raises(ValueError, match="not in the ssd300_vgg16 config"):
        config_macs(default_config("ssd300", 21), {"conv99": 3})


def test_l1_layer_weights(ssd_small: torch.nn.Module) -> None:
    phase1 = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]
    phase1 += ["conv4_1", "conv4_2", "conv4_3", "conv4_3_mbox_loc", "conv4_3_mbox_conf"]
    phase4 = ["conv8_2", "conv9_1", "conv9_2", "conv10_1", "conv10_2", "conv11_1", "conv11_2"]
    for per in ("weight", "layer"):
        for layers in (phase1, phase4):
            w = l1_layer_weights(ssd_small, layers, per=per)
            assert list(w) == layers
            assert sum(w.values()) / len(w) == pytest.approx(1.0)
            assert all(v >= 0 for v in w.values())
    w = l1_layer_weights(ssd_small, phase1, per="weight")
    # per-weight cost = output area: conv1 (300^2) pulls 64x harder than conv4 (38^2)
    assert w["conv1_2"] / w["conv4_2"] == pytest.approx(300**2 / 38**2)
    assert w["conv1_2"] > w["conv2_2"] > w["conv3_3"] > w["conv4_3"]
    w = l1_layer_weights(ssd_small, phase1, per="layer")
    shares = cost_shares({n: layer_macs(ssd_small)[n] for n in phase1})
    assert w["conv1_2"] / w["conv1_1"] == pytest.approx(shares["conv1_2"] / shares["conv1_1"])
    assert l1_layer_weights(ssd_small, phase1, alpha=0.0) == {n: 1.0 for n in phase1}
    half = l1_layer_weights(ssd_small, phase1, alpha=0.5)
    full = l1_layer_weights(ssd_small, phase1, alpha=1.0)
    assert half["conv1_2"] == pytest.approx(0.5 + 0.5 * full["conv1_2"])
    with pytest.raises(ValueError, match="latency table"):
        l1_layer_weights(ssd_small, phase1, kind="latency")
    with pytest.raises(ValueError, match="no cost known"):
        l1_layer_weights(ssd_small, ["conv99"])


# --------------------------------------------------------------------------- budgets


def _toy_family():
    # cost falls and accuracy falls with pruning strength s; k/τ-like two-axis grid
    grid = param_grid(k=[0.5, 1.0, 1.5, 2.0, 2.5], tau=[0.6, 0.8])
    cost = {id(c): 1.0 - 0.3 * c["k"] * c["tau"] for c in grid}
    acc = {id(c): 0.9 - 0.05 * (c["k"] * c["tau"]) ** 2 for c in grid}
    return grid, (lambda c: cost[id(c)]), (lambda c: acc[id(c)])


def test_search_budget_meets_budget_with_most_accurate() -> None:
    grid, cost_fn, eval_fn = _toy_family()
    calls: list[dict] = []

    def eval_counted(c: dict) -> float:
        calls.append(c)
        return eval_fn(c)

    res = search_budget(lambda: grid, cost_fn, eval_counted, target=0.6, original_cost=1.0, eps=0.0)
    assert res.met and res.ratio is not None and res.ratio <= 0.6
    feasible = [c for c in grid if cost_fn(c) <= 0.6]
    assert res.best is max(feasible, key=eval_fn)
    assert res.metric == pytest.approx(eval_fn(res.best))
    assert len(calls) == len(feasible)  # infeasible candidates are never evaluated
    assert "met" in res.message and json.dumps(res.to_dict())
    # stop_at / max_evals cut the evaluations (least pruned first)
    calls.clear()
    res2 = search_budget(grid, cost_fn, eval_counted, target=0.6, original_cost=1.0, eps=0.0, max_evals=1)
    assert len(calls) == 1 and res2.best is res.best
    # eps tolerance: 0.64 is within 0.05 of 0.6
    res3 = search_budget(grid, cost_fn, eval_fn, target=0.6, original_cost=1.0, eps=0.05)
    assert res3.met and res3.ratio <= 0.65 and res3.metric >= res.metric


def test_search_budget_reports_unmet() -> None:
    grid, cost_fn, eval_fn = _toy_family()
    res = search_budget(grid, cost_fn, eval_fn, target=0.1, original_cost=1.0, eps=0.01)
    assert not res.met
    assert res.best is min(grid, key=cost_fn)
    assert res.ratio == pytest.approx(0.4)
    assert "cannot be met" in res.message and "0.400" in res.message
    with pytest.raises(ValueError, match="target"):
        search_budget(grid, cost_fn, eval_fn, target=1.5, original_cost=1.0)
    with pytest.raises(ValueError, match="no candidates"):
        search_budget([], cost_fn, eval_fn, target=0.5, original_cost=1.0)


def test_budget_on_ssd_channels_macs() -> None:
    cfg = default_config("ssd300", 21)
    cost = channels_cost_fn(cfg, "macs")
    original = cost({})
    cands = [{"conv1_2": c, "conv2_2": c * 2} for c in (64, 48, 32, 16)]
    res = search_budget(cands, cost, lambda c: c["conv1_2"] / 64, target=0.85, original_cost=original, eps=0)
    assert res.met and res.best == {"conv1_2": 32, "conv2_2": 64}
    assert res.ratio <= 0.85


# --------------------------------------------------------------------------- latency tables


@pytest.fixture(scope="module")
def tiny_vgg() -> torch.nn.Module:
    return vgg16(num_classes=10, variant="cifar", width=0.125)


def test_latency_table_roundtrip_and_key_mismatch(tmp_path, tiny_vgg: torch.nn.Module) -> None:
    table = profile_model(tiny_vgg, "ort-cpu", warmup=1, repeats=2, sweep=(0.5,))
    cfg = get_config(tiny_vgg)
    assert table.key == table_key(cfg, "ort-cpu", "cpu", "fp32")
    assert list(table.layers) == list(layer_macs(tiny_vgg))
    assert all(v["ms"] > 0 for v in table.layers.values())
    assert all(len(s) == 2 for s in table.samples.values())
    path = save_latency_table(tmp_path / "lat.json", table)
    back = load_latency_table(path, table.key)
    assert back == table
    assert load_latency_table(path) == table  # the only table
    with pytest.raises(ValueError, match="no latency table for key 'torch"):
        load_latency_table(path, table.key.replace("ort-cpu", "torch"))
    other = table_key(default_config("vgg16", 10, width=0.25, variant="cifar"), "ort-cpu", "cpu", "fp32")
    assert other != table.key
    with pytest.raises(FileNotFoundError, match="not found"):
        load_latency_table(tmp_path / "missing.json", table.key)
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="bad.json: not a prunekit latency table"):
        load_latency_table(tmp_path / "bad.json")
    # estimates: the profiled widths give back the measured total; narrower is cheaper
    assert estimate_latency(None, table) == pytest.approx(table.total_ms)
    narrow = layer_latency_estimates({"conv1_2": 4}, table)
    assert narrow["conv1_2"] < table.layers["conv1_2"]["ms"]
    assert narrow["conv2_1"] < table.layers["conv2_1"]["ms"]
    lat = channels_cost_fn(cfg, "latency", table)
    assert lat({}) == pytest.approx(table.total_ms)
    only = channels_cost_fn(cfg, "latency", table, layers=["conv1_1", "conv1_2"])
    assert only({}) == pytest.approx(table.layers["conv1_1"]["ms"] + table.layers["conv1_2"]["ms"])
    with pytest.raises(ValueError, match="latency table"):
        channels_cost_fn(cfg, "latency")
    cols = cost_columns(vgg16(num_classes=10, variant="cifar", width=0.125), tiny_vgg, table)
    assert cols["conv1_1"]["latency_share_before"] == pytest.approx(cols["conv1_1"]["latency_share_after"])
    assert sum(c["latency_share_before"] for c in cols.values()) == pytest.approx(1.0)


def test_cost_columns_pruned_kdet(ssd_small: torch.nn.Module) -> None:
    cfg = get_config(ssd_small)
    pruned = ssd300_vgg16(num_classes=5, width=0.25, keep_detection_layers=3)
    pruned.prunekit_config.channels = {**pruned.prunekit_config.channels, "conv1_2": 8}
    from prunekit.models import build_model

    pruned = build_model(pruned.prunekit_config)
    cols = cost_columns(pruned, ssd_small)
    assert set(cols) == set(layer_macs(ssd_small))
    assert cols["conv1_2"]["macs_after"] == cols["conv1_2"]["macs_before"] // 2
    assert cols["conv11_2"]["macs_after"] == 0 and cols["conv11_2_mbox_conf"]["macs_after"] == 0
    assert sum(c["macs_share_after"] for c in cols.values()) == pytest.approx(1.0)
    assert cfg.channels["conv1_2"] == 16


def test_profile_cli(tmp_path) -> None:
    from prunekit.cli import main

    out = tmp_path / "t.json"
    args = ["profile", "vgg16", "--num-classes", "10", "--width", "0.125", "--repeats", "1", "--warmup", "0"]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "ort-cpu|cpu:" in r.output and out.is_file()
    r = CliRunner().invoke(main, [*args, "--backend", "torch", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text())["tables"]) == 2
    r = CliRunner().invoke(main, ["profile", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert r.exit_code == 2 and "nope.pt: checkpoint not found" in r.output
    r = CliRunner().invoke(main, [*args, "--backend", "ort-cpu", "--device", "cuda", "--out", str(out)])
    assert r.exit_code == 2 and "ort-cpu runs on device 'cpu'" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_torch_cuda_fp16(tiny_vgg: torch.nn.Module) -> None:
    table = profile_model(tiny_vgg, "torch", "cuda", "fp16", warmup=2, repeats=3, channels_last=True)
    assert table.device_name and all(v["ms"] > 0 for v in table.layers.values())
