"""The channel dependency graph: coupled tensors found by tracing, on SSD, VGG16 and a custom CNN."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.prune.graph import build_dependency_graph


@pytest.fixture(scope="module")
def ssd300_graph():
    return build_dependency_graph(prunekit.ssd300_vgg16(4, width=0.125))


def _coupled(graph, name):
    return {(graph.name_of(c.target), c.kind) for c in graph.group(name).couplings}


def test_conv4_3_couples_next_conv_both_heads_and_l2norm_scale(ssd300_graph):
    assert _coupled(ssd300_graph, "conv4_3") == {
        ("conv4_3", "out"),
        ("backbone.scale_weight", "param"),
        ("conv5_1", "in"),
        ("conv4_3_mbox_loc", "in"),
        ("conv4_3_mbox_conf", "in"),
    }


def test_conv7_feeds_conv8_1_and_its_heads(ssd300_graph):
    assert ssd300_graph.consumers("conv7") == ["conv8_1", "conv7_mbox_loc", "conv7_mbox_conf"]
    assert ssd300_graph.consumers("conv11_2") == ["conv11_2_mbox_loc", "conv11_2_mbox_conf"]


def test_heads_are_never_prunable_and_every_trunk_conv_is(ssd300_graph):
    prunable = [g.name for g in ssd300_graph.prunable()]
    assert prunable[0] == "conv1_1" and prunable[-1] == "conv11_2" and len(prunable) == 23
    for name in ("conv4_3_mbox_loc", "conv11_2_mbox_conf"):
        group = ssd300_graph.group(name)
        assert not group.prunable and "head" in group.reason


def test_ssd512_with_batch_norm_couples_bn_and_conv12():
    g = build_dependency_graph(prunekit.ssd512_vgg16(4, width=0.125, batch_norm=True))
    kinds = [c.kind for c in g.group("conv4_3").couplings]
    assert kinds.count("norm") == 1 and kinds.count("param") == 1 and kinds.count("in") == 3
    assert g.consumers("conv11_2") == ["conv12_1", "conv11_2_mbox_loc", "conv11_2_mbox_conf"]
    assert g.group("conv12_2").prunable


def test_vgg_imagenet_flatten_maps_each_channel_to_49_linear_inputs():
    g = build_dependency_graph(prunekit.vgg16(10, variant="imagenet", width=0.125))
    (fc6_in,) = g.group("conv5_3").consumers
    assert g.name_of(fc6_in.target) == "fc6" and fc6_in.slot.block == 49 and fc6_in.slot.offset == 0
    assert g.group("fc7").prunable and not g.group("fc8").prunable
    assert "network output" in g.group("fc8").reason


class ConcatResidual(nn.Module):
    """conv -> two branches concatenated -> conv+BN -> residual block -> pool -> flatten -> 2 linears."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2a = nn.Conv2d(8, 6, 3, padding=1)
        self.c2b = nn.Conv2d(8, 5, 1)
        self.c3 = nn.Conv2d(11, 8, 3, padding=1)
        self.b3 = nn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = torch.cat([F.relu(self.c2a(x)), torch.relu(self.c2b(x))], dim=1)
        z = self.b3(self.c3(y))
        r = F.relu(self.c4(F.relu(z)) + z)
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(r), 1))))


def test_custom_cnn_concat_offsets_and_residual_tie():
    g = build_dependency_graph(ConcatResidual(), torch.zeros(1, 3, 16, 16))
    (a,) = g.group("c2a").consumers
    (b,) = g.group("c2b").consumers
    assert (a.target, a.slot.offset) == ("c3", 0) and (b.target, b.slot.offset) == ("c3", 6)
    tied = g.group("c3")
    assert tied is g.group("c4") and tied.producers == ["c3", "c4"]
    assert {(c.target, c.kind, c.slot.block) for c in tied.couplings} == {
        ("c3", "out", 1),
        ("b3", "norm", 1),
        ("c4", "in", 1),
        ("c4", "out", 1),
        ("fc1", "in", 4),
    }
    assert g.group("c1").prunable and {c.target for c in g.group("c1").couplings} >= {"b1", "c2a", "c2b"}
    assert not g.group("fc2").prunable


def test_grouped_conv_blocks_its_producer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1))
    g = build_dependency_graph(net, torch.zeros(1, 3, 12, 12))
    assert not g.group("0").prunable and "grouped" in g.group("0").reason


def test_untraceable_model_is_a_value_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.c(x)
            return x

    with pytest.raises(ValueError, match="cannot trace"):
        build_dependency_graph(Branchy(), torch.zeros(1, 3, 8, 8))
