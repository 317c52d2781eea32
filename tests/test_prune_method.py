"""The method's steps on hand-made tensors and toy evaluators, and the phase runner end to end."""

import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.method import PruneConfig
from prunekit.prune.phases import Phase, load_phases, preset_phases, resolve, resolve_phases
from prunekit.prune.selection import (
    filter_sparsity,
    group_statistics,
    removal_rule,
    search_tau,
    select_filters,
    tau_grid,
    zero_rows,
)
from prunekit.prune.sparsity import induce_sparsity, l1_regularizer
from prunekit.prune.threshold import apply_threshold, global_std, search_threshold

# -- zero rows and the τ rule -------------------------------------------------------------------


def test_zero_rows_are_kernel_rows():
    w = torch.ones(2, 3, 3, 3)
    w[0, :, 0, :] = 0  # filter 0: first kernel row of every input channel -> 3 of 9 rows
    w[0, 1, 2, 1] = 0  # a single zero weight does not make a zero row
    w[1, 2] = 0  # filter 1: all 3 rows of input channel 2 -> 3 of 9
    w[1, 0, 1] = 0
    z = zero_rows(w)
    assert z.shape == (2, 3, 3)
    assert filter_sparsity(w).tolist() == pytest.approx([3 / 9, 4 / 9])
    assert zero_rows(torch.tensor([[0.0, 1.0], [0.0, 0.0]])).tolist() == [[True, False], [True, True]]


def test_tau_rule_on_hand_made_statistics():
    s_l = torch.tensor([0.95, 0.85, 0.85, 0.65, 0.91, 0.70])
    s_next = torch.tensor([0.0, 0.95, 0.5, 1.0, 0.0, 0.95])
    # 0: s_l > τ1; 1: τ2 < s_l and s_next > τ3; 2: s_next too low; 3: s_l <= τ2; 5: s_l == τ2 is not >
    assert removal_rule(s_l, s_next, 0.9, 0.7, 0.9).tolist() == [True, True, False, False, True, False]
    with pytest.raises(ValueError, match="tau2"):
        removal_rule(s_l, s_next, 0.7, 0.9, 0.9)


def _two_conv_net():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
        w1, w2 = net[0].weight, net[2].weight
        w1[0] = 0  # filter 0: all rows zero -> removed by τ1
        w1[1, :, :2] = 0  # filter 1: 4 of 6 rows (0.67) -> kept (not > τ2 = 0.5? it is) ...
        w2[:, 1] = 0  # ... and its outgoing slice is all zero -> removed by the second condition
        w1[2, :, :2] = 0  # filter 2: same own sparsity, outgoing slice dense -> kept
    return net


def test_select_filters_uses_both_layers_statistics():
    net = _two_conv_net()
    graph = build_dependency_graph(net, torch.zeros(1, 2, 9, 9))
    s_l, s_next = group_statistics(
        {p: m.weight for p, m in net.named_modules() if hasattr(m, "weight")}, graph.group("0")
    )
    assert s_l.tolist() == pytest.approx([1.0, 4 / 6, 4 / 6, 0.0])
    assert s_next.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    sel = select_filters(net, ["0"], graph, tau1=0.9, tau2=0.5, tau3=0.9)
    assert sel.keep["0"].tolist() == [2, 3]
    assert sel.stats["0"]["kept"] == 2


def test_select_filters_keeps_min_keep_least_sparse_and_aligns():
    net = _two_conv_net()
    graph = build_dependency_graph(net, torch.zeros(1, 2, 9, 9))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[3, 0, 0, 0] = 1.0  # filter 3 is the least sparse
    sel = select_filters(net, ["0", "2"], graph)
    assert sel.keep["0"].tolist() == [3]
    sel = select_filters(net, ["0"], graph, min_keep=2)
    assert len(sel.keep["0"]) == 2 and 3 in sel.keep["0"].tolist()
    sel = select_filters(net, ["0"], graph, align=2)
    assert len(sel.keep["0"]) == 2  # one kept by the rule, rounded up to a multiple of 2


def test_fc_neurons_go_when_all_incoming_or_all_outgoing_weights_are_zero():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.fill_(1.0)
        net[0].weight[1] = 0  # neuron 1: no input
        net[2].weight[:, 3] = 0  # neuron 3: no output
        net[0].weight[0, :3] = 0  # neuron 0: 75% zero incoming -> stays (FC rule is all-or-nothing)
    sel = select_filters(net, ["0", "2", "4"], build_dependency_graph(net, torch.zeros(1, 4)))
    assert sel.keep["0"].tolist() == [0, 2, 4] and sel.stats["0"]["rule"] == "fc"
    assert "4" not in sel.keep  # the output layer is never pruned


# -- global threshold ---------------------------------------------------------------------------


def test_threshold_is_one_global_std_over_all_phase_weights():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -3.0]).view(2, 1, 1, 1))
        net[1].weight.copy_(torch.tensor([0.5, 2.0, -0.1, 4.0]).view(2, 2, 1, 1))
    all_w = torch.tensor([1.0, -3.0, 0.5, 2.0, -0.1, 4.0])
    assert global_std(net, ["0", "1"]) == pytest.approx(float(all_w.std()))
    th = apply_threshold(net, ["0", "1"], 1.5)
    assert th[0].weight.flatten().tolist() == [0.0, -3.0] and th[1].weight.flatten().tolist() == [0, 2, 0, 4]
    assert net[0].weight.flatten().tolist() == [1.0, -3.0]  # the source is untouched


def _toy_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))


def _density(model):
    w = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()])
    return float((w != 0).float().mean())


@pytest.mark.parametrize("strategy", ["scan", "bisect"])
def test_threshold_search_picks_the_largest_admissible_k(strategy):
    net = _toy_net()
    ks = [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    calls = []

    def eval_fn(m):  # metric = fraction of weights still non-zero
        calls.append(1)
        return _density(m)

    res = search_threshold(net, ["0", "2"], ks, eval_fn, eps2=45.0, sparse_metric=1.0, strategy=strategy)
    std = global_std(net, ["0", "2"])
    expect = max(k for k in ks if _density(apply_threshold(net, ["0", "2"], k * std)) >= 0.55)
    assert res.k == expect and res.admissible and res.t == pytest.approx(expect * std)
    assert res.metric >= 0.55 and _density(res.model) == res.metric
    if strategy == "bisect":
        assert len(calls) <= 3
    none = search_threshold(net, ["0", "2"], [2.0, 3.0], eval_fn, eps2=1.0, sparse_metric=1.0)
    assert none.k == 0.0 and not none.admissible


# -- sparsity induction -------------------------------------------------------------------------


def test_l1_regularizer_sums_weighted_abs_weights():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
        net[1].weight.fill_(2.0)
    reg = l1_regularizer(net, ["0", "1"], 0.5, {"1": 3.0})
    assert float(reg(net).detach()) == pytest.approx(0.5 * (2 * 1.0 + 3.0 * 2 * 2.0))
    with pytest.raises(ValueError, match="not a conv/linear"):
        l1_regularizer(net, ["7"], 0.1)


def test_lambda_search_keeps_the_largest_lambda_within_eps1():
    net = _toy_net()
    trained = []

    def train_fn(m, reg):  # proximal-ish: a few steps on the L1 term alone
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            reg(m).backward()
            opt.step()
        trained.append(m)

    def eval_fn(m):  # metric = mean |w| relative to the start: shrinks as λ grows
        return float(m[0].weight.detach().abs().mean() / net[0].weight.detach().abs().mean())

    res = induce_sparsity(
        net, ["0", "2"], [1e-3, 1e-2, 1e-1, 1.0], train_fn, eval_fn, eps1=30.0, baseline_metric=1.0
    )
    # 20 steps * 0.05 * λ shrink per weight: λ=0.1 -> 0.1 absolute, too much for mean |w| ~0.1
    assert res.lam == 1e-2 and res.admissible
    assert [t["lam"] for t in res.trials] == [1e-3, 1e-2, 1e-1]  # stopped at the first failure
    assert res.model is trained[1] and net[0].weight.abs().sum() > res.model[0].weight.abs().sum()
    res = induce_sparsity(net, ["0"], [1e-3], train_fn, lambda m: 0.5, eps1=1.0, baseline_metric=1.0)
    assert res.lam == 0.0 and not res.admissible  # nothing admissible: continue unchanged
    assert torch.equal(res.model[0].weight, net[0].weight)


@pytest.mark.parametrize(
    ("last_ok", "tried", "kept"),
    [
        (5, [4.0, 16.0, 32.0], 32.0),
        (0, [4.0, 1.0, 2.0], 1.0),
        (1, [4.0, 1.0, 2.0], 2.0),
        (2, [4.0, 16.0, 8.0], 4.0),
        (-1, [4.0, 1.0], 0.0),
    ],
    ids=["all-pass", "first-only", "second", "third", "none"],
)
def test_bisecting_lambda_search_tries_log2_of_the_grid_and_keeps_the_largest_admissible(
    last_ok, tried, kept
):
    grid = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    net = _toy_net()

    def eval_fn(m):  # the trial's λ is stamped on the model by train_fn; admissible up to grid[last_ok]
        lam = m.lam
        return 0.9 if lam == 0 or (last_ok >= 0 and lam <= grid[last_ok]) else 0.5

    def train_fn(m, reg):
        m.lam = reg.lam

    res = induce_sparsity(
        net, ["0"], grid, train_fn, eval_fn, eps1=2.0, baseline_metric=0.9, reference="control", search="bisect",
        make_regularizer=lambda m, lam: l1_regularizer(m, ["0"], lam),
    )  # fmt: skip
    assert [t["lam"] for t in res.trials] == [0.0, *tried]  # the λ = 0 control, then the bisection
    assert res.lam == kept and res.admissible == (kept > 0)
    with pytest.raises(ValueError, match="lam_search must be one of"):
        induce_sparsity(net, ["0"], grid, train_fn, eval_fn, 2.0, 0.9, search="descending")


# -- phases -------------------------------------------------------------------------------------


def test_ssd300_presets_are_the_papers_four_phases_with_their_heads():
    model = prunekit.ssd300_vgg16(3, width=0.125)
    graph = build_dependency_graph(model)
    phases = [resolve(p, graph) for p in resolve_phases("ssd300", model)]
    assert [p.prune_layers[0] for p in phases] == ["conv1_1", "conv5_1", "conv8_1", "conv9_1"]
    assert [p.prune_layers[-1] for p in phases] == ["conv4_3", "conv7", "conv8_2", "conv11_2"]
    assert len(phases[0].prune_layers) == 10
    assert phases[0].l1_layers[-2:] == ["conv4_3_mbox_loc", "conv4_3_mbox_conf"]
    assert phases[1].l1_layers[-2:] == ["conv7_mbox_loc", "conv7_mbox_conf"]
    assert {n for n in phases[3].l1_layers if "mbox" in n} == {
        f"conv{i}_2_mbox_{k}" for i in (9, 10, 11) for k in ("loc", "conf")
    }


def test_ssd512_and_vgg16_presets():
    ssd512 = prunekit.ssd512_vgg16(3, width=0.125)
    last = resolve(preset_phases("ssd512_vgg16")[-1], build_dependency_graph(ssd512))
    assert last.prune_layers[-1] == "conv12_2" and "conv12_2_mbox_conf" in last.l1_layers
    vgg = prunekit.vgg16(10, width=0.125)
    convs, fcs = (resolve(p, build_dependency_graph(vgg)) for p in resolve_phases("vgg16", vgg))
    assert convs.prune_layers[-1] == "conv5_3" and fcs.prune_layers == ["fc6", "fc7"]
    assert fcs.l1_layers == ["fc6", "fc7", "fc8"]


def test_preset_on_a_pruned_kdet_model_skips_missing_layers():
    model = prunekit.ssd300_vgg16(3, width=0.125, keep_detection_layers=3)
    graph = build_dependency_graph(model)
    phases = [resolve(p, graph) for p in resolve_phases("ssd300", model)]
    assert phases[2].prune_layers == ["conv8_1", "conv8_2"] and phases[3].prune_layers == []


def test_user_phase_file_with_ranges_and_overlap(tmp_path):
    f = tmp_path / "phases.yaml"
    f.write_text(
        "phases:\n  - name: a\n    layers: [conv1_1..conv2_2]\n  - {name: b, layers: [conv2_2, conv3_1]}\n"
    )
    model = prunekit.vgg16(10, width=0.125)
    a, b = resolve_phases(str(f), model)
    graph = build_dependency_graph(model)
    ra = resolve(a, graph)
    rb = resolve(b, graph, already_pruned=set(ra.prune_layers))
    assert ra.prune_layers == ["conv1_1", "conv1_2", "conv2_1", "conv2_2"]
    assert rb.prune_layers == ["conv3_1"] and "earlier phase" in rb.skipped["conv2_2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"layers": ["conv1_1", "conv77"]}]))
    with pytest.raises(ValueError, match="conv77"):
        resolve_phases(str(bad), model)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_phases(tmp_path / "nope.yaml")


# -- the runner ---------------------------------------------------------------------------------


def test_search_tau_evaluates_distinct_selections_once():
    net = _two_conv_net()
    evals = []

    def eval_fn(m):
        evals.append(1)
        return 1.0

    grid = tau_grid((0.5, 0.6, 0.95))
    res = search_tau(net, net, ["0"], eval_fn, grid, reference_metric=1.0, example=torch.zeros(1, 2, 9, 9))
    assert len(res["rows"]) == 9 and len(evals) < 9
    assert res["best"]["params"] == min(r["params"] for r in res["rows"])
    with pytest.raises(ValueError, match="0.5, 1"):
        tau_grid((0.4,))


def test_prune_config_validates():
    with pytest.raises(ValueError, match="tau2"):
        PruneConfig(tau1=0.6, tau2=0.8)
    assert PruneConfig.from_dict(PruneConfig(align=8).to_dict()).align == 8
    with pytest.raises(ValueError, match="unknown"):
        PruneConfig.from_dict({"eps9": 1})


def test_phase_dataclass_round_trip():
    p = Phase("x", ["conv1_1..conv1_2"], include_heads=False)
    assert Phase(**p.to_dict()) == p
