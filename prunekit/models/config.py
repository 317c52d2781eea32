"""Architecture configs: everything needed to rebuild a model whose channel counts changed.

A pruned model is not one of the stock architectures any more, so its checkpoint carries the
per-layer channel counts alongside the weights. The config is plain data (JSON-safe), so it can
also travel inside ONNX metadata and the manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AnchorConfig:
    """SSD default boxes, as torchvision's ``DefaultBoxGenerator`` takes them."""

    aspect_ratios: list[list[int]]
    scales: list[float]
    steps: list[int]
    clip: bool = True


@dataclass
class ArchConfig:
    """The rebuildable shape of a prunekit model.

    ``channels`` maps a layer name (the paper's: ``conv4_3``, ``fc6``...) to its number of output
    channels/features. Layers not listed keep the default of the architecture, so a stock model
    has an empty-or-full dict; a pruned one lists what changed.
    """

    arch: str  # "ssd300_vgg16" | "ssd512_vgg16" | "vgg16"
    num_classes: int  # detectors: including background (torchvision convention)
    input_size: tuple[int, int]  # (H, W)
    channels: dict[str, int] = field(default_factory=dict)
    image_mean: list[float] = field(default_factory=list)
    image_std: list[float] = field(default_factory=list)
    anchors: AnchorConfig | None = None
    num_detection_layers: int | None = None  # SSD "pruned-Kdet"; None = all feature maps
    variant: str | None = None  # vgg16: "imagenet" | "cifar"
    batch_norm: bool = False
    class_names: list[str] = field(default_factory=list)
    # Dropout rate by module path, where pruning changed it from the architecture's default
    # (Han et al.'s rule, :func:`prunekit.prune.surgery.scaled_dropout`): a dropout of 0.5 sized
    # for 1,024 units starves a layer cut to 48.
    dropout: dict[str, float] = field(default_factory=dict)
    # Detector post-processing defaults (torchvision SSD's), carried so exports and the
    # torch-free runtime decode exactly as the PyTorch model does.
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 200
    topk_candidates: int = 400

    @property
    def is_detector(self) -> bool:
        return self.arch.startswith("ssd")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture config keys: {sorted(unknown)}")
        if d.get("anchors") is not None:
            d["anchors"] = AnchorConfig(**d["anchors"])
        d["input_size"] = tuple(d["input_size"])
        return cls(**d)


def scaled(c: int, width: float) -> int:
    """Channel count after width scaling; never below 1."""
    return max(1, int(round(c * width)))
