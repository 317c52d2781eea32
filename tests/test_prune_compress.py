"""The method compresses for the right reasons: BN-aware statistics, proximal L1, folded biases,
floors, and a phase run with realistic tolerances that removes planted dead filters and no others."""

import json
import logging
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.prune.fold import folded_weights
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.method import PruneConfig, run_phases
from prunekit.prune.phases import resolve, resolve_phases
from prunekit.prune.selection import filter_sparsity, keep_floor, select_filters
from prunekit.prune.selectors import BNScale, L1Norm, Random, TauRule, match_budget, statistic_layers
from prunekit.prune.sparsity import NoAdmissibleLambda, Sparsity, induce_sparsity, sparsity_targets
from prunekit.prune.surgery import mask_channels, predict_params, prune_channels
from prunekit.prune.trainer import FnTrainer, recalibrate_bn


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 1.0)
    return net


def test_removing_dead_channels_with_beta_folded_equals_the_sparse_model():
    net = _bn_net()
    x = torch.randn(4, 3, 12, 12)
    graph = build_dependency_graph(net, x[:1])
    keep = {"0": [0, 2, 3, 5], "4": [1, 2, 4], "8": [0, 1, 3, 4, 6]}
    sparse = mask_channels(net, keep, graph, keep_bias=True)  # dead: weights and γ zero, β kept
    assert float(sparse[1].bias.detach()[1]) != 0  # the dead channels still output ReLU(β)
    folded = prune_channels(sparse, keep, graph, fold_bias=True, example=x[:1])
    dropped = prune_channels(sparse, keep, graph, fold_bias=False, example=x[:1])
    with torch.no_grad():
        ref, out, bad = sparse(x), folded(x), dropped(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert float((bad - ref).abs().max()) > 1e-2  # without the fold the consumers shift
    assert prunekit.count_params(folded) == predict_params(sparse, keep, graph)


def test_beta_folded_vgg_conv5_3_into_fc6_is_exact():
    model = prunekit.vgg16(10, variant="imagenet", width=0.0625, batch_norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_dependency_graph(model, x[:1])
    with torch.no_grad():
        bn = model.get_submodule(graph.names["conv5_3"].replace("features.", "features.")).__class__
        assert bn is nn.Conv2d
        idx = int(graph.names["conv5_3"].split(".")[1]) + 1
        model.features[idx].bias.uniform_(0.2, 0.8)  # every β of conv5_3 positive
    keep = {"conv5_3": list(range(0, 32, 2))}
    sparse = mask_channels(model, keep, graph, keep_bias=True)
    pruned = prune_channels(sparse, keep, graph, fold_bias=True, example=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), sparse(x), atol=1e-5, rtol=0)


def test_statistics_are_read_on_bn_folded_weights():
    net = _bn_net()
    graph = build_dependency_graph(net, torch.zeros(1, 3, 12, 12))
    with torch.no_grad():
        net[1].weight[3] = 0.0  # γ = 0: the channel is dead, its conv weights are not zero
    assert float(filter_sparsity(net[0].weight)[3]) == 0.0
    folded = folded_weights(net, graph)
    assert float(filter_sparsity(folded["0"])[3]) == 1.0
    sel = select_filters(net, ["0"], graph, 0.9, 0.7, 0.9)
    assert 3 not in sel.keep["0"].tolist() and len(sel.keep["0"]) == 7
    raw = select_filters(net, ["0"], graph, 0.9, 0.7, 0.9, fold_bn=False)
    assert len(raw.keep["0"]) == 8


def test_selection_never_cuts_a_layer_below_its_floor():
    net = _bn_net()
    graph = build_dependency_graph(net, torch.zeros(1, 3, 12, 12))
    with torch.no_grad():
        net[1].weight.zero_()  # every channel dead: the τ rule alone would remove all
        net[1].weight[5] = 0.3
    sel = select_filters(net, ["0"], graph, min_keep_fraction=0.25)
    assert len(sel.keep["0"]) == keep_floor(8, 1, 0.25) == 2
    assert 5 in sel.keep["0"].tolist() and sel.stats["0"]["kept_by_rule"] == 1


def test_proximal_l1_makes_exact_zeros_the_subgradient_does_not():
    from prunekit.data.memory import TensorImageDataset
    from prunekit.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (32,), generator=g)
    ds = TensorImageDataset(x, y, [str(i) for i in range(10)])
    zeros = {}
    for proximal in (True, False):
        model = prunekit.vgg16(10, variant="cifar", width=0.125)
        layers = [f"conv{i}_{j}" for i, j in ((1, 1), (1, 2), (2, 1), (2, 2))]
        targets = sparsity_targets(model, layers, "bn", normalise=True)
        assert all(p.endswith(".weight") and "features" in p for p in targets) and len(targets) == 4
        reg = Sparsity(2.0, targets, proximal=proximal)
        train(model, ds, TrainConfig(epochs=4, lr=0.05, batch_size=8, schedule="constant"), regularizer=reg,
              progress=False)  # fmt: skip
        gammas = torch.cat([p.detach().flatten() for p in reg.parameters(model)])
        zeros[proximal] = int((gammas == 0).sum())
    # shrink per step lr * λ = 0.1 of the mean |γ|, 16 steps: 1.6 in all
    assert zeros[True] > 0 and zeros[False] == 0


class _PlantedToy:
    """No data gradient: ``train`` only applies the proximal L1 step; ``evaluate`` is the output's
    agreement with the starting model on fixed images (cosine of the centred logits); BN statistics
    are recalibrated on those images (the starting model's too, so the reference is consistent)."""

    def __init__(self, model):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, 32, 32, generator=g)
        recalibrate_bn(model, [self.x])
        with torch.no_grad():
            self.ref = model.eval()(self.x)
        self.calls = []

    def train(self, model, sparsity, epochs, tag):
        self.calls.append((tag, epochs, sparsity is not None))
        if sparsity is not None:
            for _ in range(epochs):
                sparsity.prox(model, 1.0)

    def eval(self, model):
        with torch.no_grad():
            out = model.eval()(self.x)
        # the input-dependent part only (an untrained VGG's logits are mostly one constant vector),
        # and scale-free (a shrink of every γ scales the logits)
        a, b = (out - out.mean(0)).flatten(), (self.ref - self.ref.mean(0)).flatten()
        return max(0.0, float(torch.nn.functional.cosine_similarity(a, b, dim=0)))

    def recalibrate(self, model):
        recalibrate_bn(model, [self.x])


def _planted_vgg():
    model = prunekit.vgg16(10, variant="cifar", width=0.125).eval()
    graph = build_dependency_graph(model)
    g = torch.Generator().manual_seed(0)
    planted = {"conv2_1": [1, 5, 9], "conv4_2": [0, 7, 30, 31], "conv5_3": [2, 3, 20]}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
        for name, idx in planted.items():
            bn = model.get_submodule(graph.group(name).couplings[1].target)
            bn.weight[idx] = 0.0  # dead; β stays and is folded into the consumers
            # conv5_3's consumer is fc6, where the fold is exact; a zero-padded 3x3 consumer sees the
            # constant only in its interior, and this untrained net amplifies any change (a 2% shrink
            # of one γ moves its output by 5%), so elsewhere the dead channels' ReLU(β) is 0
            bn.bias[idx] = 0.3 if name == "conv5_3" else -0.1
        model.classifier[0].weight[[4, 11]] = 0.0  # two fc6 neurons without input
    return model, planted


def test_phase_run_with_realistic_tolerances_removes_the_planted_filters_and_no_others(tmp_path):
    model, planted = _planted_vgg()
    toy = _PlantedToy(model)
    hp = PruneConfig(eps1=2, eps2=15, shrink_grid=[0.001], epochs_sparsity=2, epochs_retrain=1, align=1)
    out = run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval, toy.recalibrate), hp, tmp_path)
    cfg = prunekit.models.get_config(out)
    base = prunekit.models.get_config(model)
    for name, width in base.channels.items():
        expect = width - len(planted.get(name, [])) - (2 if name == "fc6" else 0)
        assert cfg.channels[name] == expect, name
    assert prunekit.count_params(out) < prunekit.count_params(model)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rec = summary["records"][0]
    assert rec["sparsity"]["trials"][0]["control"] and rec["sparsity"]["admissible"]
    # surgery starts from Θ_L1 and folds β: the pruned model scores what Θ_L1 scores
    assert rec["pruned_metric"] == pytest.approx(rec["sparsity"]["metric"], abs=0.02)
    diag = json.loads((tmp_path / "p1" / "diagnostics.json").read_text())
    row = next(r for r in diag["layers"] if r["layer"] == "conv4_2")
    assert row["gamma_zero"] == 4 and row["kept"] == 60 and row["above_tau1"] == 4
    assert (tmp_path / "p1" / "diagnostics.png").stat().st_size > 1000
    # the control is the same sparsity stage at λ = 0
    assert [t["lam"] for t in rec["sparsity"]["trials"]][0] == 0.0
    assert toy.calls[:3] == [
        ("convs/sparsity", 2, True),
        ("convs/sparsity", 2, True),
        ("convs/retrain", 1, False),
    ]
    for step in ("sparse", "thresholded", "pruned", "retrained"):
        assert (tmp_path / "p1" / f"{step}.pt").is_file() and (tmp_path / "p2" / f"table_{step}.md").is_file()
    assert (
        summary["final"]["params"] == prunekit.count_params(out)
        and "| conv1_1 |" in (tmp_path / "summary.md").read_text()
    )
    # resume: nothing is trained again and the same model comes back; other settings are refused
    toy.calls.clear()
    trainer = FnTrainer(toy.train, toy.eval, toy.recalibrate)
    again = run_phases(model, "vgg16", trainer, hp, tmp_path, resume=True)
    assert toy.calls == [] and prunekit.models.get_config(again).channels == cfg.channels
    with pytest.raises(ValueError, match="other hyper-parameters"):
        run_phases(model, "vgg16", trainer, PruneConfig(eps1=3), tmp_path, resume=True)


def test_surgery_takes_the_sparse_model_not_the_thresholded_one(tmp_path):
    model, _ = _planted_vgg()
    toy = _PlantedToy(model)
    # ε2 = 100 admits a real threshold, so that Θ_L1^th and Θ_L1 differ
    hp = PruneConfig(eps1=2, eps2=100, shrink_grid=[0.001], epochs_sparsity=1, epochs_retrain=0, align=1)
    run_phases(
        model,
        [resolve_phases("vgg16", model)[0]],
        FnTrainer(toy.train, toy.eval, toy.recalibrate),
        hp,
        tmp_path,
    )
    sparse = prunekit.load(tmp_path / "p1" / "sparse.pt")
    thresholded = prunekit.load(tmp_path / "p1" / "thresholded.pt")
    pruned = prunekit.load(tmp_path / "p1" / "pruned.pt")
    # conv1_1 loses nothing: its weights in the pruned model are Θ_L1's, zeros of Θ_L1^th included
    w_p, w_s, w_t = (m.features[0].weight for m in (pruned, sparse, thresholded))
    assert (w_t == 0).sum() > (w_s == 0).sum()
    torch.testing.assert_close(w_p, w_s)


def test_conv5_3_outgoing_statistic_reads_fc6():
    model = prunekit.vgg16(10, variant="imagenet", width=0.0625)
    graph = build_dependency_graph(model)
    convs = resolve(resolve_phases("vgg16", model)[0], graph)
    assert "fc6" not in convs.l1_layers and "fc6" in statistic_layers(convs, graph)


def test_no_admissible_lambda_is_loud_and_strict_raises(caplog):
    net = _bn_net()
    calls = []

    def train_fn(m, reg):
        calls.append(reg.lam == 0)

    metrics = iter([0.90, 0.50, 0.40])  # control, then every λ far below it

    with caplog.at_level(logging.WARNING):
        res = induce_sparsity(
            net, ["0"], [0.1, 0.2], train_fn, lambda m: next(metrics), eps1=2.0, baseline_metric=0.8,
            reference="control", stop_early=False, se=0.01,
        )  # fmt: skip
    assert not res.admissible and res.lam == 0.0 and res.reference == 0.90 and calls == [True, False, False]
    assert (
        "NO λ admissible" in caplog.text and "λ=0.1 -> 0.5000" in caplog.text and "1.00 points" in caplog.text
    )
    metrics = iter([0.90, 0.50])
    with pytest.raises(NoAdmissibleLambda, match="0.9000"):
        induce_sparsity(net, ["0"], [0.1], train_fn, lambda m: next(metrics), 2.0, 0.8, reference="control",
                        strict=True)  # fmt: skip


@pytest.mark.parametrize(
    "selector", [L1Norm(), Random(seed=3), BNScale()], ids=["l1norm", "random", "bnscale"]
)
def test_every_rank_selector_at_a_matched_budget_gives_the_predicted_count(selector):
    model = prunekit.vgg16(10, variant="cifar", width=0.125)
    graph = build_dependency_graph(model)
    target = prunekit.count_params(model) // 3
    count = lambda keep: predict_params(model, keep, graph)  # noqa: E731
    make = lambda r: type(selector)(**{**selector.__dict__, "ratio": r})  # noqa: E731
    sel, ratio = match_budget(model, make, count, target, graph)
    pruned = prune_channels(model, sel.keep, graph)
    assert prunekit.count_params(pruned) == count(sel.keep) <= target
    assert count(make(max(0.0, ratio - 0.02)).select(model, None, graph).keep) > target  # tight


def test_tau_rule_selector_is_select_filters():
    net = _bn_net()
    graph = build_dependency_graph(net, torch.zeros(1, 3, 12, 12))
    with torch.no_grad():
        net[1].weight[[1, 6]] = 0.0
    assert TauRule(min_keep_fraction=0.0).select(net, ["0"], graph).keep["0"].tolist() == [0, 2, 3, 4, 5, 7]


def test_recalibration_restores_statistics_of_a_cut_model():
    net = _bn_net().eval()
    x = torch.randn(64, 3, 12, 12) * 2 + 1
    with torch.no_grad():
        ref = net[0](x).mean(dim=(0, 2, 3))  # what conv1's BN should hold: the data's channel means
    assert recalibrate_bn(net, [x[:32], x[32:]]) == 2
    torch.testing.assert_close(net[1].running_mean, ref, atol=1e-5, rtol=1e-4)
    assert not net.training and not net[1].training and net[1].momentum == 0.1  # mode and momentum restored


def test_narrow_vgg_fc_init_scales_with_fan_in():
    model = prunekit.vgg16(10, variant="imagenet", width=0.25)
    fc6 = model.classifier[0]
    assert float(fc6.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * fc6.in_features), rel=0.05)


@pytest.mark.parametrize(
    "build",
    [
        lambda: prunekit.vgg16(10, variant="cifar", width=0.125),
        lambda: prunekit.ssd300_vgg16(3, width=0.125, batch_norm=True),
    ],
    ids=["vgg16-bn", "ssd300-bn"],
)
def test_fold_bn_gives_a_bn_free_model_with_the_same_outputs(build):
    from prunekit.models import SSDRaw, get_config
    from prunekit.prune.fold import fold_batchnorm

    model = build().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    folded = fold_batchnorm(model).eval()
    assert not get_config(folded).batch_norm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, *get_config(model).input_size)
    with torch.no_grad():
        ref = SSDRaw(model)(x) if get_config(model).is_detector else (model(x),)
        out = SSDRaw(folded)(x) if get_config(model).is_detector else (folded(x),)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_rounds_pass_over_the_phases_again_and_may_cut_every_layer(tmp_path):
    model, planted = _planted_vgg()
    toy = _PlantedToy(model)
    hp = PruneConfig(
        eps1=2, eps2=15, shrink_grid=[0.001], epochs_sparsity=1, epochs_retrain=1, align=1, rounds=2
    )
    out = run_phases(model, "vgg16", FnTrainer(toy.train, toy.eval, toy.recalibrate), hp, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["phase"] for r in summary["records"]] == ["convs.r1", "fcs.r1", "convs.r2", "fcs.r2"]
    second = summary["records"][2]
    assert "conv4_2" in second["prune_layers"] and not second.get("skipped")  # not "already pruned"
    assert (tmp_path / "p4" / "retrained.pt").is_file()
    # nothing new died between the rounds: the second pass finds the same architecture
    assert summary["records"][1]["filters"] == prunekit.models.get_config(out).channels | {"fc8": 10}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        PruneConfig(rounds=0)


def test_tolerances_reaching_below_zero_are_refused(tmp_path):
    from prunekit.prune.method import ToleranceFloorError

    model = prunekit.vgg16(10, variant="cifar", width=0.125).eval()
    trainer = FnTrainer(lambda m, s, e, t: None, lambda m: 0.04)
    with pytest.raises(ToleranceFloorError, match=r"scores 0\.0400 before pruning.*below zero"):
        run_phases(model, "vgg16", trainer, PruneConfig(eps1=1, eps2=15, eps_pruned=5), tmp_path)
