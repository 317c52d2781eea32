"""Surgery is exact: a pruned model computes what the original computes with those filters zeroed."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.models import SSDRaw, get_config
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.surgery import keep_detection_layers, mask_channels, predict_params, prune_channels
from tests.test_prune_graph import ConcatResidual


def _randomise(model: nn.Module) -> None:
    """Non-trivial biases and BN statistics, so zeroing must really silence a channel."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            if isinstance(m, nn.Linear):
                m.weight.mul_(10)  # VGG's N(0, 0.01) init would make outputs ~1e-4
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)


def _random_selection(graph, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in graph.prunable():
        k = int(torch.randint(1, group.channels + 1, (), generator=g))
        keep[group.name] = torch.randperm(group.channels, generator=g)[:k]
    return keep


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        if getattr(model, "prunekit_config", None) is not None and get_config(model).is_detector:
            return SSDRaw(model.eval())(x)
        return (model.eval()(x),)


@pytest.mark.parametrize(
    "build",
    [
        lambda: prunekit.ssd300_vgg16(4, width=0.125),
        lambda: prunekit.ssd512_vgg16(3, width=0.125, batch_norm=True),
        lambda: prunekit.vgg16(10, variant="cifar", width=0.125),
        lambda: prunekit.vgg16(10, variant="imagenet", width=0.0625),
    ],
    ids=["ssd300", "ssd512-bn", "vgg16-cifar", "vgg16-imagenet"],
)
def test_pruned_equals_zeroed_and_param_count_is_predicted(build):
    model = build().eval()
    _randomise(model)
    graph = build_dependency_graph(model)
    keep = _random_selection(graph, seed=3)
    pruned = prune_channels(model, keep, graph)
    zeroed = mask_channels(model, keep, graph)
    x = torch.randn(1, 3, *get_config(model).input_size)
    for a, b in zip(_outputs(zeroed, x), _outputs(pruned, x)):
        assert a.shape == b.shape
        assert a.abs().max() > 1e-2  # the comparison is not between zeros
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert prunekit.count_params(pruned) == predict_params(model, keep, graph) < prunekit.count_params(model)
    cfg = get_config(pruned)
    assert all(cfg.channels[name] == len(idx) for name, idx in keep.items())
    # the source model is untouched
    assert prunekit.count_params(model) == prunekit.count_params(build())


def test_custom_concat_residual_cnn_is_pruned_exactly():
    net = ConcatResidual().eval()
    _randomise(net)
    graph = build_dependency_graph(net, torch.zeros(1, 3, 16, 16))
    keep = {"c1": [0, 2, 3, 7], "c2a": [1, 4], "c2b": [0, 1, 4], "c4": [2, 5, 6], "fc1": range(0, 16, 3)}
    pruned = prune_channels(net, keep, graph)
    assert pruned.c3.weight.shape == (3, 5, 3, 3) and pruned.c4.weight.shape == (3, 3, 3, 3)
    assert pruned.fc1.weight.shape == (6, 12) and pruned.b3.num_features == 3
    x = torch.randn(2, 3, 16, 16)
    zeroed = mask_channels(net, keep, graph)
    torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=0)
    assert prunekit.count_params(pruned) == predict_params(net, keep, graph)


def test_pruned_model_round_trips_through_save_and_load(tmp_path):
    model = prunekit.ssd300_vgg16(3, width=0.125).eval()
    keep = {"conv1_1": [0, 1, 5], "conv4_3": range(0, 64, 2), "conv7": range(100), "conv11_2": [3]}
    pruned = prune_channels(model, keep).eval()
    loaded = prunekit.load(prunekit.save(pruned, tmp_path / "p.pt"))
    x = torch.rand(1, 3, 300, 300)
    for a, b in zip(_outputs(pruned, x), _outputs(loaded, x)):
        assert torch.equal(a, b)
    assert loaded.backbone.scale_weight.shape == (32,)
    assert get_config(loaded).channels["conv7"] == 100


def test_surgery_rejects_bad_selections():
    model = prunekit.ssd300_vgg16(3, width=0.125)
    graph = build_dependency_graph(model)
    with pytest.raises(ValueError, match="cannot remove all"):
        prune_channels(model, {"conv1_1": []}, graph)
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune_channels(model, {"conv4_3_mbox_conf": [0]}, graph)
    with pytest.raises(ValueError, match="out of range"):
        prune_channels(model, {"conv1_1": [8]}, graph)
    with pytest.raises(ValueError, match="unknown layer"):
        prune_channels(model, {"conv99": [0]}, graph)


@pytest.mark.parametrize("k", [1, 3])
def test_keep_detection_layers_keeps_the_first_anchors_exactly(k):
    model = prunekit.ssd300_vgg16(3, width=0.125).eval()
    cut = keep_detection_layers(model, k).eval()
    assert get_config(cut).num_detection_layers == k
    assert prunekit.count_params(cut) < prunekit.count_params(model)
    x = torch.rand(1, 3, 300, 300)
    full, part = _outputs(model, x), _outputs(cut, x)
    n = part[0].shape[1]
    assert n == {1: 5776, 3: 8542}[k]
    torch.testing.assert_close(part[0], full[0][:, :n], atol=1e-6, rtol=0)
    torch.testing.assert_close(part[1], full[1][:, :n], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="1..6"):
        keep_detection_layers(model, 7)


def test_dropout_after_a_cut_linear_follows_hans_rule_and_survives_save_and_load(tmp_path):
    model = prunekit.vgg16(10, variant="imagenet", width=0.0625).eval()  # fc6 6272... -> 256, fc7 256
    fc6, fc7 = model.classifier[0], model.classifier[3]
    keep = {"conv5_3": range(8), "fc6": range(64), "fc7": range(16)}
    pruned = prune_channels(model, keep)
    r6 = (8 * 49 * 64) / fc6.weight.numel()  # conv5_3 32 -> 8 channels of 7x7, fc6 256 -> 64 units
    r7 = (64 * 16) / fc7.weight.numel()
    assert pruned.classifier[2].p == pytest.approx(0.5 * r6**0.5, abs=1e-6)
    assert pruned.classifier[5].p == pytest.approx(0.5 * r7**0.5, abs=1e-6)
    again = prune_channels(pruned, {"fc7": range(4)})  # rates compose over repeated cuts
    assert again.classifier[5].p == pytest.approx(0.5 * ((64 * 4) / fc7.weight.numel()) ** 0.5, abs=1e-6)
    assert again.classifier[2].p == pruned.classifier[2].p
    loaded = prunekit.load(prunekit.save(again, tmp_path / "p.pt"))
    assert [m.p for m in loaded.modules() if isinstance(m, nn.Dropout)] == [
        again.classifier[2].p,
        again.classifier[5].p,
    ]
    kept = prune_channels(model, keep, dropout_rule="keep")
    assert kept.classifier[2].p == kept.classifier[5].p == 0.5
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # eval outputs do not depend on the rule
        torch.testing.assert_close(pruned.eval()(x), kept.eval()(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="dropout_rule"):
        prune_channels(model, keep, dropout_rule="scale")
    bad = get_config(pruned)
    bad.dropout = {"features.0": 0.1}
    with pytest.raises(ValueError, match="not a Dropout module"):
        prunekit.models.build_model(bad)
