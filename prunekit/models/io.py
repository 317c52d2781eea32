"""Building models by name, naming their layers, and saving/loading them with their config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileio import atomic_write
from prunekit.models.config import ArchConfig
from prunekit.models.ssd import FEATURE_SOURCES, build_ssd, ssd_config
from prunekit.models.vgg import VGG, vgg16_config

log = logging.getLogger(__name__)
FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 1
ARCHS = ("ssd300_vgg16", "ssd512_vgg16", "vgg16")
ALIASES = {"ssd300": "ssd300_vgg16", "ssd512": "ssd512_vgg16", "vgg16-cifar": "vgg16", "vgg": "vgg16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message names the file."""


def get_config(model: nn.Module) -> ArchConfig:
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} is not a prunekit model (no prunekit_config)")
    return cfg


def build_model(cfg: ArchConfig) -> nn.Module:
    """Rebuild a model (stock or pruned) from its config, with freshly initialised weights."""
    if cfg.is_detector:
        model = build_ssd(cfg)
    elif cfg.arch == "vgg16":
        model = VGG(cfg)
    else:
        raise ValueError(f"unknown architecture {cfg.arch!r}; expected one of {ARCHS}")
    modules = dict(model.named_modules()) if cfg.dropout else {}
    for path, p in cfg.dropout.items():
        m = modules.get(path)
        if not isinstance(m, nn.Dropout):
            raise ValueError(
                f"{cfg.arch} config sets a dropout rate on {path!r}, which is not a Dropout module"
            )
        m.p = float(p)
    return model


def default_config(name: str, num_classes: int, width: float = 1.0, **kw: Any) -> ArchConfig:
    """Config of a stock model by name (``ssd300``, ``ssd512_vgg16``, ``vgg16``...)."""
    arch = ALIASES.get(name, name)
    if arch in ("ssd300_vgg16", "ssd512_vgg16"):
        return ssd_config(arch, num_classes, width, **kw)
    if arch == "vgg16":
        return vgg16_config(num_classes, width=width, **kw)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(ARCHS + tuple(ALIASES))}")


def create_model(name: str, num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return build_model(default_config(name, num_classes, width, **kw))


def layer_names(model: nn.Module) -> dict[str, str]:
    """Paper layer name -> module path (``conv4_3`` -> ``backbone.features.21``), in forward order.

    Detection-head convs get Caffe SSD's names (``conv4_3_mbox_loc`` / ``_conf``); the VGG
    classifier's linears are ``fc6``, ``fc7``, ``fc8``.
    """
    cfg = get_config(model)
    names: dict[str, str] = {}
    if cfg.is_detector:
        order = [n for n in _ssd_conv_order(cfg)]
        paths = [
            p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and p.startswith("backbone.")
        ]
        if len(order) != len(paths):
            raise RuntimeError(f"layer naming mismatch: {len(order)} names for {len(paths)} convs")
        names.update(zip(order, paths))
        for i, src in enumerate(FEATURE_SOURCES[: len(cfg.anchors.aspect_ratios)]):  # type: ignore[union-attr]
            names[f"{src}_mbox_loc"] = f"head.regression_head.module_list.{i}"
            names[f"{src}_mbox_conf"] = f"head.classification_head.module_list.{i}"
        return names
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    conv_names = [n for n in cfg.channels if n.startswith("conv")]
    names.update(zip(conv_names, convs))
    fcs = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    names.update(zip(["fc6", "fc7", "fc8"], fcs))
    return names


def _ssd_conv_order(cfg: ArchConfig) -> list[str]:
    from prunekit.models.ssd import default_channels

    k = len(cfg.anchors.aspect_ratios)  # type: ignore[union-attr]
    order = list(default_channels(cfg.arch))
    if k == 1:  # conv5..conv7 are not built for pruned-1det
        return order[: order.index("conv5_1")]
    n_extra_convs = 2 * (k - 2)
    return order[: order.index("conv7") + 1 + n_extra_convs]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write weights + architecture config atomically; loadable with ``weights_only=True``.

    ``extra`` holds JSON-like metadata (metrics, training state) stored beside the weights.
    """
    cfg = get_config(model)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "state_dict": state,
        "extra": extra or {},
    }
    path = Path(path)
    _atomic_torch_save(obj, path)
    return path


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a prunekit checkpoint (refused, with what to do, when it is something else)."""
    obj = _read(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a prunekit checkpoint (a plain state_dict? load it with --weights into a named model)"
        )
    return obj


def checkpoint_config(path: str | os.PathLike) -> ArchConfig:
    """The architecture a prunekit checkpoint holds, without building the model."""
    return ArchConfig.from_dict(_read_checkpoint(Path(path))["config"])


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a prunekit checkpoint (stock or pruned), in eval mode."""
    model, _ = load_with_extra(path, map_location)
    return model


def load_with_extra(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    path = Path(path)
    obj = _read_checkpoint(path)
    cfg = ArchConfig.from_dict(obj["config"])
    model = build_model(cfg)
    load_state(model, obj["state_dict"], path)
    return model.to(map_location).eval(), dict(obj.get("extra") or {})


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict`` with an error that names the first layer whose shape differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for k, mine in own.items():  # model order, so the first differing layer is reported
        v = state.get(k)
        if v is not None and tuple(mine.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: layer {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                f"{tuple(mine.shape)} in the {get_config(model).arch} model (another architecture, "
                f"width or class count?)"
            )
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the {get_config(model).arch} model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict(state)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a plain state dict (e.g. torchvision's ``ssd300_vgg16_coco-b556d3b4.pth``) into a model."""
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    load_state(model, obj, path)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compile wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
