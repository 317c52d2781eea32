"""Per-layer cost model: the shapes and multiply-adds of every prunable conv/linear.

The paper's L1 term treats every weight alike, so it prunes where weights are plentiful (conv5,
conv6, the extras at 19x19 and below) and leaves conv1..conv4, where the 300x300..38x38 feature
maps put most of the multiply-adds, almost untouched. This module measures where the cost is, so
the L1 term can be weighted by it (:mod:`prunekit.prune.layer_costs`, which adds measured
latency), the budget search can price a candidate (:func:`config_macs`) and reports can show
cost before/after. A latency table (:mod:`prunekit.prune.profile`) is built on these shapes; this
module does not read one, so the two do not import each other.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (its per-module breakdown; flops / 2)
on a copy of the model on the ``meta`` device, so counting a full-width SSD300 costs no compute.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.models import SSDRaw, build_model, get_config, layer_names
from prunekit.models.config import ArchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvShape:
    """Geometry of one prunable layer at the model's input size (batch 1).

    For a linear layer ``kernel`` is (1, 1) and ``in_hw``/``out_hw`` are (1, 1).
    """

    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def macs(self) -> int:
        kh, kw = self.kernel
        return (
            self.out_hw[0] * self.out_hw[1] * self.out_channels * (self.in_channels // self.groups) * kh * kw
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "in_hw": list(self.in_hw),
            "out_hw": list(self.out_hw),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvShape:
        t = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**t)


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device: counting and shape tracing cost no compute."""
    try:
        with torch.device("meta"):
            m = build_model(get_config(model))
        if _same_shapes(m, model):
            return m.eval()
    except Exception:  # noqa: BLE001 - a model whose config does not rebuild it: copy it instead
        pass
    return copy.deepcopy(model).to("meta").eval()


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    return sa == sb


def _forward_module(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """The module to run and its zero input at the config's input size, on the model's device."""
    cfg = get_config(model)
    device = next(iter(model.parameters())).device
    h, w = cfg.input_size
    x = torch.zeros(1, 3, h, w, device=device)
    return (SSDRaw(model) if cfg.is_detector else model), x


def _prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    paths = layer_names(model)
    mods = dict(model.named_modules())
    return {
        name: mods[path] for name, path in paths.items() if isinstance(mods.get(path), nn.Conv2d | nn.Linear)
    }


def layer_macs(model: nn.Module, on_meta: bool = True) -> dict[str, int]:
    """Multiply-adds of every prunable conv/linear (paper names, forward order) at batch 1.

    Head convs are included: their input channels shrink with the layer feeding them. Counted
    by ``FlopCounterMode`` per module (flops / 2). ``on_meta`` counts a meta-device rebuild of the
    model (no compute, no weights needed); set it False to count the model as it is.
    """
    cfg = getattr(model, "prunekit_config", None) if on_meta else None
    if isinstance(cfg, ArchConfig):
        try:
            macs = config_macs(cfg)
        except Exception:  # noqa: BLE001 - a config that does not rebuild: count the model itself
            macs = None
        hit = _MACS_CACHE.get(_config_key(cfg))
        if macs is not None and hit is not None and hit[0] == _shapes(model):  # config describes it
            return macs
    m = _meta_copy(model) if on_meta else model
    paths = layer_names(m)
    run, x = _forward_module(m)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(x)
    counts = counter.get_flop_counts()
    root = type(run).__name__
    out: dict[str, int] = {}
    for name, path in paths.items():
        ops = counts.get(f"{root}.{path}", {})
        out[name] = int(sum(ops.values())) // 2
    return out


# MAC counts and layer shapes of prunekit models depend only on their config: cached (with the
# state-dict shapes they were computed for), because the budget search prices many candidates and
# every report row needs the original's counts again.
_MACS_CACHE: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, Any]]] = {}


def _config_key(cfg: ArchConfig) -> str:
    d = cfg.to_dict()
    d.pop("class_names", None)
    return json.dumps(d, sort_keys=True, default=str)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _remember(key: str, shapes: dict[str, tuple[int, ...]], macs: dict[str, Any]) -> None:
    if len(_MACS_CACHE) > 512:
        _MACS_CACHE.clear()
    _MACS_CACHE[key] = (shapes, dict(macs))


def layer_shapes(model: nn.Module) -> dict[str, ConvShape]:
    """Geometry of every prunable layer, traced with forward hooks on a meta-device copy."""
    cfg = getattr(model, "prunekit_config", None)
    key = "shapes:" + _config_key(cfg) if isinstance(cfg, ArchConfig) else None
    own = _shapes(model) if key is not None else None
    if key is not None and key in _MACS_CACHE and _MACS_CACHE[key][0] == own:  # cached for this config
        return dict(_MACS_CACHE[key][1])
    m = _meta_copy(model)
    mods = _prunable_modules(m)
    shapes: dict[str, ConvShape] = {}
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                shapes[name] = ConvShape(
                    "conv",
                    mod.in_channels,
                    mod.out_channels,
                    _pair(mod.kernel_size),
                    _pair(mod.stride),
                    _pair(mod.padding),
                    _pair(mod.dilation),
                    mod.groups,
                    (int(x.shape[-2]), int(x.shape[-1])),
                    (int(output.shape[-2]), int(output.shape[-1])),
                )
            else:
                shapes[name] = ConvShape(
                    "linear",
                    mod.in_features,
                    mod.out_features,
                    (1, 1),
                    (1, 1),
                    (0, 0),
                    (1, 1),
                    1,
                    (1, 1),
                    (1, 1),
                )

        return fn

    for name, mod in mods.items():
        handles.append(mod.register_forward_hook(hook(name)))
    try:
        run, x = _forward_module(m)
        with torch.no_grad():
            run(x)
    finally:
        for h in handles:
            h.remove()
    out = {name: shapes[name] for name in mods if name in shapes}
    if key is not None and own is not None:
        _remember(key, own, out)
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def config_macs(cfg: ArchConfig, channels: dict[str, int] | None = None) -> dict[str, int]:
    """Per-layer MACs of the architecture ``cfg`` with ``channels`` overriding its widths.

    What the budget search prices a candidate selection with: no weights, no compute.
    """
    cfg = _with_channels(cfg, channels)
    key = _config_key(cfg)
    if key in _MACS_CACHE:
        return dict(_MACS_CACHE[key][1])
    with torch.device("meta"):
        m = build_model(cfg)
    out = layer_macs(m, on_meta=False)
    _remember(key, _shapes(m), out)
    return out


def _with_channels(cfg: ArchConfig, channels: dict[str, int] | None) -> ArchConfig:
    if not channels:
        return cfg
    unknown = set(channels) - set(cfg.channels)
    if unknown and cfg.channels:
        raise ValueError(f"channel counts for layers not in the {cfg.arch} config: {sorted(unknown)}")
    c = copy.deepcopy(cfg)
    c.channels = {**cfg.channels, **{k: int(v) for k, v in channels.items()}}
    return c


def macs_per_filter(model: nn.Module) -> dict[str, float]:
    """MACs one output filter of each layer costs in that layer (its own share, not the consumer's)."""
    shapes = layer_shapes(model)
    return {n: s.macs / s.out_channels for n, s in shapes.items()}


def cost_shares(costs: dict[str, float]) -> dict[str, float]:
    """Each layer's fraction of the total; sums to 1 (all zeros when the total is zero)."""
    total = float(sum(costs.values()))
    if total <= 0:
        return {k: 0.0 for k in costs}
    return {k: float(v) / total for k, v in costs.items()}


def total_macs(model: nn.Module) -> int:
    """Whole-network MACs at batch 1 (every op FlopCounterMode knows, not only prunable layers)."""
    m = _meta_copy(model)
    run, x = _forward_module(m)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(x)
    return int(counter.get_total_flops()) // 2
