"""SSD300 / SSD512 with a VGG16 trunk, built on torchvision's detection classes.

The module layout mirrors torchvision's ``ssd300_vgg16`` exactly (``backbone.features``,
``backbone.scale_weight``, ``backbone.extra``, ``head.*``), so torchvision's COCO checkpoint loads
as-is, while every conv's width comes from an :class:`ArchConfig` so a pruned model rebuilds.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from prunekit.models.config import AnchorConfig, ArchConfig, scaled

# VGG16 trunk up to conv4_3: (name, out_channels); "M" = 2x2 max-pool, "C" = the same with ceil_mode.
_TRUNK = [
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "C",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512),
]  # fmt: skip
_STAGE5 = [("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)]
_FC = [("conv6", 1024), ("conv7", 1024)]
# Extra blocks: (1x1 name, 1x1 out), (3x3 name, 3x3 out), conv kwargs per architecture.
_EXTRAS = [
    ("conv8_1", 256, "conv8_2", 512),
    ("conv9_1", 128, "conv9_2", 256),
    ("conv10_1", 128, "conv10_2", 256),
    ("conv11_1", 128, "conv11_2", 256),
    ("conv12_1", 128, "conv12_2", 256),
]
_EXTRA_KW = {
    "ssd300_vgg16": [dict(kernel_size=3, padding=1, stride=2)] * 2 + [dict(kernel_size=3)] * 2,
    # SSD512 as in the original Caffe model: 64-32-16-8-4-2-1 feature maps.
    "ssd512_vgg16": [dict(kernel_size=3, padding=1, stride=2)] * 4 + [dict(kernel_size=4, padding=1)],
}
FEATURE_SOURCES = ["conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2"]

DEFAULT_ANCHORS = {
    "ssd300_vgg16": AnchorConfig(
        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    ),
    "ssd512_vgg16": AnchorConfig(
        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
        steps=[8, 16, 32, 64, 128, 256, 512],
    ),
}
# torchvision's values: inputs in [0, 1] are mapped to Caffe-style 0..255 minus the mean.
TV_MEAN = [0.48235, 0.45882, 0.40784]
TV_STD = [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0]


def default_channels(arch: str, width: float = 1.0) -> dict[str, int]:
    """Every conv of the trunk and extras with its (width-scaled) output channels, in order."""
    n_extra = 4 if arch == "ssd300_vgg16" else 5
    pairs = [p for p in _TRUNK if isinstance(p, tuple)] + _STAGE5 + _FC
    for a, ca, b, cb in _EXTRAS[:n_extra]:
        pairs += [(a, ca), (b, cb)]
    return {name: scaled(c, width) for name, c in pairs}


def _conv_block(cin: int, cout: int, bn: bool, **kw) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, **kw)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class VGGFeatureExtractor(nn.Module):
    """VGG16 trunk + SSD extras, returning the detection feature maps.

    Same attribute names and indices as torchvision's ``SSDFeatureExtractorVGG`` (without
    batch norm), so state dicts are interchangeable. The forward is written without Python
    control flow on tensors so that torch.fx and ONNX export trace it cleanly.
    """

    def __init__(self, arch: str, channels: dict[str, int], num_feature_maps: int, batch_norm: bool):
        super().__init__()
        bn = batch_norm
        trunk: list[nn.Module] = []
        cin = 3
        for item in _TRUNK:
            if isinstance(item, str):
                trunk.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=item == "C"))
                continue
            name, _ = item
            trunk += _conv_block(cin, channels[name], bn, kernel_size=3, padding=1)
            cin = channels[name]
        self.features = nn.Sequential(*trunk)
        self.scale_weight = nn.Parameter(torch.ones(channels["conv4_3"]) * 20)

        stage5: list[nn.Module] = [nn.MaxPool2d(kernel_size=2, stride=2)]
        for name, _ in _STAGE5:
            stage5 += _conv_block(cin, channels[name], bn, kernel_size=3, padding=1)
            cin = channels[name]
        fc: list[nn.Module] = [nn.MaxPool2d(kernel_size=3, stride=1, padding=1)]
        fc += _conv_block(cin, channels["conv6"], bn, kernel_size=3, padding=6, dilation=6)
        fc += _conv_block(channels["conv6"], channels["conv7"], bn, kernel_size=1)
        cin = channels["conv7"]
        extra: list[nn.Module] = [nn.Sequential(*stage5, nn.Sequential(*fc))]
        for (a, _, b, _), kw in list(zip(_EXTRAS, _EXTRA_KW[arch]))[: num_feature_maps - 2]:
            block = _conv_block(cin, channels[a], bn, kernel_size=1)
            block += _conv_block(channels[a], channels[b], bn, **kw)
            extra.append(nn.Sequential(*block))
            cin = channels[b]
        self.extra = nn.ModuleList(extra)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.features(x)
        # L2Norm + learned per-channel scale on conv4_3 (SSD paper, ParseNet).
        out = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


def feature_channels(cfg: ArchConfig, channels: dict[str, int]) -> list[int]:
    return [channels[name] for name in FEATURE_SOURCES[: _num_maps(cfg)]]


def _num_maps(cfg: ArchConfig) -> int:
    assert cfg.anchors is not None
    return len(cfg.anchors.aspect_ratios)


def ssd_config(
    arch: str,
    num_classes: int,
    width: float = 1.0,
    batch_norm: bool = False,
    keep_detection_layers: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    class_names: list[str] | None = None,
) -> ArchConfig:
    """The config of a stock (unpruned) SSD, optionally cut to its first K detection layers."""
    if arch not in DEFAULT_ANCHORS:
        raise ValueError(f"unknown SSD architecture {arch!r}; expected one of {sorted(DEFAULT_ANCHORS)}")
    size = 300 if arch == "ssd300_vgg16" else 512
    a = DEFAULT_ANCHORS[arch]
    k = keep_detection_layers or len(a.aspect_ratios)
    if not 1 <= k <= len(a.aspect_ratios):
        raise ValueError(f"keep_detection_layers must be in 1..{len(a.aspect_ratios)} for {arch}, got {k}")
    anchors = AnchorConfig([list(r) for r in a.aspect_ratios[:k]], list(a.scales[: k + 1]), list(a.steps[:k]))
    channels = default_channels(arch, width)
    dropped = {n for n in FEATURE_SOURCES[max(k, 2) :]} | {
        n.replace("_2", "_1") for n in FEATURE_SOURCES[max(k, 2) :]
    }
    channels = {n: c for n, c in channels.items() if n not in dropped}
    return ArchConfig(
        arch=arch,
        num_classes=num_classes,
        input_size=(size, size),
        channels=channels,
        image_mean=list(image_mean or TV_MEAN),
        image_std=list(image_std or TV_STD),
        anchors=anchors,
        num_detection_layers=k,
        batch_norm=batch_norm,
        class_names=list(class_names or []),
    )


def build_ssd(cfg: ArchConfig) -> SSD:
    """Build a torchvision ``SSD`` from a config (stock or pruned)."""
    assert cfg.anchors is not None
    channels = {**default_channels(cfg.arch), **cfg.channels}
    n_maps = _num_maps(cfg)
    # The conv7 block always exists (it is extra[0]); only its head may be dropped (K=1).
    backbone = VGGFeatureExtractor(cfg.arch, channels, max(n_maps, 2), cfg.batch_norm)
    anchor_gen = DefaultBoxGenerator(
        cfg.anchors.aspect_ratios, scales=cfg.anchors.scales, steps=cfg.anchors.steps, clip=cfg.anchors.clip
    )
    head = SSDHead(feature_channels(cfg, channels), anchor_gen.num_anchors_per_location(), cfg.num_classes)
    model = SSD(
        _TruncatedFeatures(backbone, n_maps) if n_maps == 1 else backbone,
        anchor_gen,
        tuple(cfg.input_size),
        cfg.num_classes,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
        head=head,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        topk_candidates=cfg.topk_candidates,
    )
    model.prunekit_config = cfg  # type: ignore[attr-defined]
    return model


class _TruncatedFeatures(nn.Module):
    """pruned-1det: only conv4_3 feeds a head, so the conv5..conv7 block is dead weight."""

    def __init__(self, backbone: VGGFeatureExtractor, n_maps: int):
        super().__init__()
        self.features = backbone.features
        self.scale_weight = backbone.scale_weight
        self.n_maps = n_maps

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.features(x)
        return OrderedDict([("0", self.scale_weight.view(1, -1, 1, 1) * F.normalize(x))])


def ssd300_vgg16(num_classes: int = 21, width: float = 1.0, batch_norm: bool = False, **kwargs) -> SSD:
    """SSD300 with a VGG16 trunk (Liu et al.); 21 classes = 20 VOC classes + background."""
    return build_ssd(ssd_config("ssd300_vgg16", num_classes, width, batch_norm, **kwargs))


def ssd512_vgg16(num_classes: int = 21, width: float = 1.0, batch_norm: bool = False, **kwargs) -> SSD:
    """SSD512 with a VGG16 trunk: 7 feature maps, conv12 included (the paper's Table 1)."""
    return build_ssd(ssd_config("ssd512_vgg16", num_classes, width, batch_norm, **kwargs))


class SSDRaw(nn.Module):
    """The SSD network without pre/post-processing: normalised images in, per-anchor outputs out.

    This is what pruning traces, what ONNX ``raw`` export emits, and what equivalence compares:
    ``(bbox_regression [N, A, 4], cls_logits [N, A, C])``. Input: [N, 3, H, W] already resized
    to the model size and normalised with the config's mean/std.
    """

    def __init__(self, model: SSD):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = list(self.backbone(x).values())
        out = self.head(feats)
        return out["bbox_regression"], out["cls_logits"]
