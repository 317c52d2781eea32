"""Baselines at a matched size, and the numbers in the per-layer report."""

import pytest
import torch

import prunekit
from prunekit.prune.baselines import baseline_keep, n_keep, prune_baseline, ratio_for_params
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.report import layer_table, model_stats, module_macs, render_markdown
from prunekit.prune.surgery import keep_detection_layers, prune_channels


def test_ssd300_stats_match_the_known_size_and_cost():
    stats = model_stats(prunekit.ssd300_vgg16(21))
    assert stats["params"] == 26_285_486
    assert stats["size_mb"] == pytest.approx(
        26_285_486 * 4 / 2**20
    )  # 100.27 MiB (the paper: 105.2 MB = 1e6 B)
    assert stats["macs"] == 31_373_537_792  # ~31.4 GMACs at 300x300


def test_layer_macs_add_up_and_follow_the_filters():
    model = prunekit.vgg16(10, variant="cifar", width=0.25)
    total, per = module_macs(model)
    rows = layer_table(model)
    assert sum(r["macs"] for r in rows) == total  # only convs and linears multiply-add
    conv1_1 = rows[0]
    assert conv1_1["layer"] == "conv1_1" and conv1_1["macs"] == 32 * 32 * 16 * 3 * 9
    pruned = prune_channels(model, {"conv1_1": range(4)})
    rows = layer_table(pruned, original=model)
    assert (rows[0]["filters_before"], rows[0]["filters_after"], rows[0]["kept_pct"]) == (16, 4, 25.0)
    assert rows[1]["macs"] == rows[1]["macs_before"] // 4  # conv1_2 reads 4 of 16 channels
    assert rows[1]["params_before"] == 16 * 16 * 9 + 16 and rows[1]["params"] == 16 * 4 * 9 + 16
    md = render_markdown(rows, {"original": model_stats(model), "pruned": model_stats(pruned)})
    assert "| conv1_1 | 16 | 4 | 25.0 |" in md and "| parameters |" in md


def test_layer_table_of_a_kdet_model_shows_dropped_layers_as_zero():
    model = prunekit.ssd300_vgg16(3, width=0.125)
    rows = {r["layer"]: r for r in layer_table(keep_detection_layers(model, 3), original=model)}
    assert rows["conv10_2"]["filters_after"] == 0 and rows["conv10_2_mbox_conf"]["params"] == 0
    assert rows["conv8_2"]["filters_after"] == rows["conv8_2"]["filters_before"] == 64


def test_l1_baseline_keeps_the_largest_norm_filters_and_random_is_seeded():
    model = prunekit.vgg16(10, variant="cifar", width=0.125)
    with torch.no_grad():
        w = model.features[0].weight  # conv1_1, 8 filters
        w.copy_(torch.arange(1, 9, dtype=torch.float).view(8, 1, 1, 1).expand_as(w))
    graph = build_dependency_graph(model)
    keep = baseline_keep(model, "l1", 0.5, ["conv1_1"], graph)
    assert keep["conv1_1"].tolist() == [4, 5, 6, 7]
    r1 = baseline_keep(model, "random", 0.5, None, graph, seed=1)
    r2 = baseline_keep(model, "random", 0.5, None, graph, seed=2)
    assert all(len(r1[n]) == n_keep(graph.group(n).channels, 0.5) for n in r1)
    assert any(not torch.equal(r1[n], r2[n]) for n in r1)
    assert n_keep(5, 0.99) == 1 and n_keep(10, 0.0) == 10


@pytest.mark.parametrize("method", ["l1", "random"])
def test_baselines_match_a_parameter_budget(method):
    model = prunekit.ssd300_vgg16(3, width=0.25)
    target = prunekit.count_params(model) // 5
    pruned, info = prune_baseline(model, method, target_params=target, seed=0)
    assert info["params"] == prunekit.count_params(pruned) <= target
    assert info["params"] > 0.9 * target  # matched, not merely under
    graph = build_dependency_graph(model)
    assert ratio_for_params(model, target, graph=graph) == pytest.approx(info["ratio"])
    with pytest.raises(ValueError, match="cannot reach"):
        ratio_for_params(model, 1000, graph=graph)
    with pytest.raises(ValueError, match="exactly one"):
        prune_baseline(model, method)
