"""MACs / latency budgets in the phase runner, cost-aware options and the report's cost columns."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit.prune.budget import phase_cost_weights, set_caps
from prunekit.prune.layer_costs import l1_layer_weights
from prunekit.prune.method import PruneConfig, run_phases
from prunekit.prune.phase_budget import load_table_for
from prunekit.prune.report import model_stats
from prunekit.prune.selection import select_filters
from prunekit.prune.trainer import FnTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Toy:
    """Train: a few SGD steps towards the original's predictions (+ L1); eval: agreement with them."""

    def __init__(self, model):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(4, 3, 32, 32, generator=g)
        with torch.no_grad():
            self.y = model.eval()(self.x).argmax(1)
        self.calls = []
        self.evals = 0

    def train(self, model, reg, epochs, tag):
        self.calls.append((tag, reg is not None))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(self.x), self.y)
            if reg is not None:
                loss = loss + reg(model)
            loss.backward()
            opt.step()
        model.eval()

    def eval(self, model):
        self.evals += 1
        with torch.no_grad():
            return float((model.eval()(self.x).argmax(1) == self.y).float().mean())


def _model():
    torch.manual_seed(0)
    return prunekit.vgg16(10, variant="cifar", width=0.125)


def _hp(**kw):
    base = dict(eps1=100, eps2=100, lam_grid=[1e-3], k_range=[0.5, 1.0, 2.0], epochs_sparsity=2,
                epochs_retrain=1)  # fmt: skip
    return PruneConfig(**{**base, **kw})


def test_macs_budget_is_met_with_the_most_accurate_scored_candidate(tmp_path):
    model = _model()
    toy = _Toy(model)
    hp = _hp(align=1, target_flops=0.5, budget_eps=0.0)
    out = run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval), hp, tmp_path)
    orig, final = model_stats(model), model_stats(out)
    assert final["macs"] <= 0.5 * orig["macs"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    b = summary["budget"]
    assert b["met"] and b["kind"] == "macs" and b["final_ratio"] <= 0.5
    assert b["final_cost"] == final["macs"] and b["original_cost"] == orig["macs"]
    # every phase caps its own layers at 0.5 of their cost; the convs (the biggest set) enforce 0.5
    assert b["phase_targets"] == [0.5, 0.5] and b["enforcing_phase"] == 0
    assert b["phase_layers"][0][0] == "conv1_1" and "fc6" in b["phase_layers"][1]
    for rec in summary["records"]:
        rb = rec["budget"]
        assert rec["budget_met"] and rb["ratio"] <= rb["phase_target"]
        scored = [c for c in rb["candidates"] if c["metric"] is not None]
        assert 1 <= len(scored) <= 8 and all(c["ratio"] <= rb["phase_target"] for c in scored)
        assert rb["metric"] == max(c["metric"] for c in scored)
        assert rec["pruned_metric"] == rb["metric"]  # the scored model is the one that was kept
        assert rec["threshold"]["search"] == "budget" and len(rec["threshold"]["tau"]) == 3
    # no extra training: the λ = 0 control, one sparsity and one retraining run per phase
    assert toy.calls == [(f"{p}/{s}", r) for p in ("convs", "fcs")
                         for s, r in (("sparsity", True), ("sparsity", True), ("retrain", False))]  # fmt: skip
    md = (tmp_path / "summary.md").read_text()
    assert "## Budget" in md and "met" in md and "MACs share after %" in md
    # the selection recorded in p1 reproduces from the saved thresholded model and its τ
    th, _ = prunekit.models.io.load_with_extra(tmp_path / "p1" / "thresholded.pt")
    pruned = prunekit.load(tmp_path / "p1" / "pruned.pt")
    tau = summary["records"][0]["threshold"]["tau"]
    layers = summary["records"][0]["prune_layers"]
    sel = select_filters(th, layers, None, *tau, align=1, min_keep_fraction=hp.min_keep_fraction)
    assert sel.counts() == {n: c for n, c in pruned.prunekit_config.channels.items() if n in layers}
    # resume: the budget choice is read back, nothing is trained or searched again
    toy.calls.clear()
    again = run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval), hp, tmp_path, resume=True)
    assert toy.calls == [] and again.prunekit_config.channels == out.prunekit_config.channels


def test_impossible_budget_is_reported_and_the_run_goes_on(tmp_path, caplog):
    model = _model()
    toy = _Toy(model)
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        out = run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval), _hp(target_flops=0.01), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rec = summary["records"][0]
    assert rec["budget_met"] is False
    rb = rec["budget"]
    assert "cannot be met" in rb["message"] and rb["ratio"] > rb["phase_target"] and rb["shortfall"] > 0
    assert rb["ratio"] == min(c["ratio"] for c in rb["candidates"])  # went on with the cheapest
    assert rb["metric"] is not None
    assert not summary["budget"]["met"] and "NOT met" in summary["budget"]["message"]
    assert summary["budget"]["final_ratio"] == pytest.approx(
        model_stats(out)["macs"] / model_stats(model)["macs"]
    )
    assert any("cannot be met" in r.message and "continuing" in r.message for r in caplog.records)
    # align=8 (the default) on width-0.125 VGG: no layer below 8 filters, all counts multiples of 8
    assert all(c % 8 == 0 for c in out.prunekit_config.channels.values())


def test_no_budget_path_is_the_papers_and_alpha0_is_uniform(tmp_path):
    model = _model()
    runs = {}
    for name, kw in {"paper": {}, "alpha0": dict(cost_aware="macs", cost_alpha=0.0)}.items():
        toy = _Toy(model)
        runs[name] = run_phases(
            model, "vgg16", FnTrainer(toy.train, toy.eval), _hp(align=1, **kw), tmp_path / name
        )
    a, b = (r.state_dict() for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    paper = json.loads((tmp_path / "paper" / "summary.json").read_text())
    alpha0 = json.loads((tmp_path / "alpha0" / "summary.json").read_text())
    assert "budget" not in paper and all("budget" not in r for r in paper["records"])
    assert paper["records"][0]["sparsity"]["layer_weights"] is None
    assert set(alpha0["records"][0]["sparsity"]["layer_weights"].values()) == {1.0}
    th = paper["records"][0]["threshold"]
    assert th["k"] == 2.0 and [t["k"] for t in th["trials"]] == [
        1.0,
        2.0,
    ]  # ε2 = 100: the largest k (bisection)
    # the per-layer tables carry MACs before/after and shares (JSON and markdown)
    table = json.loads((tmp_path / "paper" / "p1" / "table_pruned.json").read_text())
    row = table["layers"][0]
    assert row["macs_after"] <= row["macs_before"] and 0 < row["macs_share_before"] < 1
    assert sum(r["macs_share_after"] for r in table["layers"]) == pytest.approx(1.0)
    assert "## Cost per layer" in (tmp_path / "paper" / "p1" / "table_pruned.md").read_text()


def test_cost_alpha_interpolates_layer_weights():
    model = _model()
    layers = ["conv1_1", "conv3_1", "conv5_3", "fc6"]
    assert l1_layer_weights(model, layers, alpha=0.0) == {n: 1.0 for n in layers}
    full = l1_layer_weights(model, layers, alpha=1.0)
    half = l1_layer_weights(model, layers, alpha=0.5, per="weight")
    assert sum(full.values()) / len(full) == pytest.approx(1.0)
    assert full["conv1_1"] > full["conv3_1"] > full["conv5_3"] > full["fc6"]  # 32x32 maps cost most
    assert all(half[n] == pytest.approx(0.5 + 0.5 * full[n]) for n in layers)


def test_budget_split_over_phases():
    assert phase_cost_weights({"a": 3, "b": 1, "h": 1, "c": 5}, [["a", "h"], [], ["h", "b", "c"]]) == [
        4,
        0,
        6,
    ]
    assert set_caps(0.4, 10, 10) == pytest.approx([0.4])
    assert set_caps(0.4, 10, 10, rounds=2) == pytest.approx([0.7, 0.4])  # equal steps over the rounds
    # 2 of 10 cost units sit in layers no phase prunes: the sets must reach (4 - 2) / 8 of theirs
    assert set_caps(0.4, 10, 8) == pytest.approx([0.25])
    with pytest.raises(ValueError, match="no phase prunes already cost"):
        set_caps(0.1, 10, 8)
    with pytest.raises(ValueError, match="0, 1"):
        set_caps(0.0, 1, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(target_flops=0.5, target_latency=0.5, latency_table="t.json")
    with pytest.raises(ValueError, match="latency_table"):
        PruneConfig(target_latency=0.5)
    with pytest.raises(ValueError, match="target_flops"):
        PruneConfig(target_flops=1.5)
    with pytest.raises(ValueError, match="cost_alpha"):
        PruneConfig(cost_alpha=2)
    assert PruneConfig().align == 8 and PruneConfig(target_flops=0.3).budget == ("macs", 0.3)


def test_latency_budget_with_a_multi_table_file(tmp_path):
    from prunekit.prune.profile import profile_model, save_latency_table

    model = _model()
    path = tmp_path / "lat.json"
    for batch in (1, 2):  # two real ONNX Runtime CPU tables in one file
        save_latency_table(path, profile_model(model, "ort-cpu", batch=batch, warmup=1, repeats=2))
    with pytest.raises(ValueError, match="holds 2 latency tables"):
        load_table_for(PruneConfig(latency_table=str(path), latency_backend="torch"), model)
    hp = _hp(align=1, target_latency=0.6, latency_table=str(path), latency_batch=2, budget_eps=0.0)
    assert load_table_for(hp, model).batch == 2
    toy = _Toy(model)
    run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval), hp, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["budget"]["kind"] == "latency" and summary["budget"]["met"]
    assert summary["budget"]["final_ratio"] <= 0.6
    row = summary["layers"][0]
    assert row["latency_share_before"] > 0 and row["latency_ms_after"] <= row["latency_ms_before"]
    assert "latency share after %" in (tmp_path / "run" / "summary.md").read_text()


def test_prune_cli_with_a_flops_budget(tmp_path):
    from prunekit.cli import main
    from prunekit.data import build_dataset, make_synth_cifar

    data = make_synth_cifar(tmp_path / "shapes", n_train=10, n_test=6)
    classes = build_dataset(f"cifar10:{data}", "test").classes
    prunekit.save(prunekit.vgg16(len(classes), variant="cifar", width=0.125), tmp_path / "m.pt")
    args = [
        "prune", tmp_path / "m.pt", "--data", f"cifar10:{data}", "--val-split", "test", "--out", tmp_path / "run",
        "--lam-grid", "1e-4", "--k-range", "0.5,1,2", "--eps1", "100", "--epochs-sparsity", "1",
        "--epochs-retrain", "1", "--batch-size", "5", "--device", "cpu",
        "--force-compress",  # an untrained model and eps1 100: the checks are vacuous on purpose
        "--target-flops", "0.6",
        "--budget-eps", "0", "--cost-aware", "macs", "--cost-alpha", "0.5",
    ]  # fmt: skip
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "macs budget 0.600 x original met" in res.output and "fewer MACs" in res.output
    pruned, orig = prunekit.load(tmp_path / "run" / "model.pt"), prunekit.load(tmp_path / "m.pt")
    assert model_stats(pruned)["macs"] <= 0.6 * model_stats(orig)["macs"]
    assert all(c % 8 == 0 for c in pruned.prunekit_config.channels.values())  # --align defaults to 8
    cfg = json.loads((tmp_path / "run" / "phases" / "prune_config.json").read_text())["config"]
    assert cfg["align"] == 8 and cfg["cost_alpha"] == 0.5 and cfg["target_flops"] == 0.6
    assert "## Cost per layer" in (tmp_path / "run" / "layers.md").read_text()
    again = [
        tmp_path / "run2" if a == tmp_path / "run" else a for a in args[:-8]
    ]  # a new --out: no clobbering
    res = CliRunner().invoke(main, [str(a) for a in again] + ["--target-latency", "0.5"])
    assert res.exit_code != 0 and "latency_table" in res.output


def test_sparsity_trials_are_scored_after_bn_recalibration(tmp_path):
    """ε1 judges a λ on recalibrated statistics: a fast-shrinking γ leaves the running statistics
    behind (BCCD SSD300: val AP50 2.1 as trained, 91.0 re-estimated), which is not the L1's cost."""

    def train_fn(model, reg, epochs, tag):  # training leaves statistics as stale as λ is large
        model._stale = 0.0 if reg is None else float(reg.lam)

    def recal(model):
        model._stale = 0.0

    def eval_fn(model):
        return 0.9 - getattr(model, "_stale", 0.0)

    hp = _hp(eps1=5, eps2=50, lam_grid=[0.1, 0.2, 0.3], align=1)
    run_phases(_model(), "vgg16", FnTrainer(train_fn, eval_fn, recal), hp, tmp_path)
    sp = json.loads((tmp_path / "p1" / "record.json").read_text())["sparsity"]
    assert sp["lam"] == pytest.approx(0.3)  # as trained, λ = 0.1 already scores 0.8 < 0.85
    # the λ = 0 control, then the bisection of the grid: 0.2, then 0.3, every one recalibrated
    assert [t["lam"] for t in sp["trials"]] == pytest.approx([0.0, 0.2, 0.3])
    assert [t["metric"] for t in sp["trials"]] == pytest.approx([0.9] * 3)


def test_two_round_budget_caps_every_phase_on_its_own_layers():
    """A later round's phases keep their first-round layer sets, and the cap tightens per round:
    with one running-total target the FC phase of round one was left the convs' reduction to do."""
    import dataclasses

    from prunekit.prune.phase_budget import budget_plan
    from prunekit.prune.phases import resolve_phases

    model = _model()
    base = resolve_phases("vgg16", model)
    phases = [dataclasses.replace(p, name=f"{p.name}.r{r + 1}") for r in range(2) for p in base]
    plan = budget_plan(_hp(target_flops=0.4, rounds=2), model, phases, None)
    assert plan.targets == pytest.approx([0.7, 0.7, 0.4, 0.4])
    assert plan.layers[0] == plan.layers[2] and plan.layers[1] == plan.layers[3]
    assert sum(plan.weights[:2]) == pytest.approx(plan.original_cost)  # the two sets cover every layer
    assert plan.final_index == 2  # round two's conv phase: the largest set, not the last phase
    # the enforcing phase gets what the global target leaves after the other layers' current cost
    w_conv, w_fc = plan.weights[0], plan.weights[1]
    assert plan.phase_target(2, model) == pytest.approx((0.4 * plan.original_cost - w_fc) / w_conv)
    assert plan.phase_target(1, model) == pytest.approx(0.7) and plan.phase_target(3, model) == 0.4


def test_a_retraining_that_lowers_the_metric_keeps_the_pruned_model(tmp_path, caplog):
    """Measured on CIFAR-10 VGG16 (phase fcs.r2, distilled): 83.18 pruned, 80.48 after retraining.
    The phase keeps whichever of the two scores higher, says so, and records both."""
    model = _model()
    toy = _Toy(model)

    def train_fn(m, reg, epochs, tag):
        toy.train(m, reg, epochs, tag)
        if tag.endswith("/retrain"):
            with torch.no_grad():
                last = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
                last.weight.zero_()  # a retraining that breaks the classifier
                last.bias.zero_()

    runs = {}
    for keep in (True, False):
        hp = _hp(align=1, retrain_keep_better=keep)
        with caplog.at_level(logging.WARNING, logger="prunekit"):
            runs[keep] = run_phases(model, "vgg16", FnTrainer(train_fn, toy.eval), hp, tmp_path / str(keep))
    summary = json.loads((tmp_path / "True" / "summary.json").read_text())
    rec = summary["records"][-1]
    assert rec["retrain_kept"] == "pruned" and rec["retrained_metric"] > rec["retrained_metric_discarded"]
    head = {
        k: [x for x in m.modules() if isinstance(x, nn.Linear)][-1].weight.detach() for k, m in runs.items()
    }
    assert float(head[True].abs().sum()) > 0 and float(head[False].abs().sum()) == 0
    assert any("keeping the pruned model" in r.message for r in caplog.records)
    assert "pruned kept" in (tmp_path / "True" / "summary.md").read_text()
    off = json.loads((tmp_path / "False" / "summary.json").read_text())["records"][-1]
    assert off["retrain_kept"] == "retrained"


@pytest.mark.parametrize("images, kept", [(100, "retrained"), (100_000, "pruned")])
def test_keep_better_needs_more_than_a_standard_error(tmp_path, images, kept):
    """At a metric of 0.5, a 2-point drop is a tie on 100 validation images (SE 5 points) and a loss
    on 100,000 (SE 0.16)."""
    model = _model()
    toy = _Toy(model)

    def train_fn(m, reg, epochs, tag):
        toy.train(m, reg, epochs, tag)
        if tag.endswith("/retrain"):
            m._retrained = True

    def eval_fn(m):
        return {"top1": 0.5 - (0.02 if getattr(m, "_retrained", False) else 0.0), "num_images": images}

    run_phases(model, "vgg16", FnTrainer(train_fn, eval_fn), _hp(align=1, eps1=10, eps2=10), tmp_path)
    records = json.loads((tmp_path / "summary.json").read_text())["records"]
    assert {r["retrain_kept"] for r in records} == {kept}
