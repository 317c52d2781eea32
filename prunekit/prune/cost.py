"""Per-layer cost model: multiply-adds (and measured latency) of every prunable conv/linear.

The paper's L1 term treats every weight alike, so it prunes where weights are plentiful (conv5,
conv6, the extras at 19x19 and below) and leaves conv1..conv4, where the 300x300..38x38 feature
maps put most of the multiply-adds, almost untouched. This module measures where the cost is, so
the L1 term can be weighted by it (:func:`l1_layer_weights`), the budget search can price a
candidate (:func:`config_macs`) and reports can show cost before/after (:func:`cost_columns`).

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (its per-module breakdown; flops / 2)
on a copy of the model on the ``meta`` device, so counting a full-width SSD300 costs no compute.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.models import SSDRaw, build_model, get_config, layer_names
from prunekit.models.config import ArchConfig

if TYPE_CHECKING:
    from prunekit.prune.profile import LatencyTable

log = logging.getLogger(__name__)

KINDS = ("macs", "latency")
PER = ("weight", "layer")


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


def l1_layer_weights(
    model: nn.Module,
    layers: list[str],
    kind: str = "macs",
    table: LatencyTable | None = None,
    alpha: float = 1.0,
    per: str = "weight",
) -> dict[str, float]:
    """Per-layer multipliers of the L1 term for a phase's ``layers``; their mean is 1.

    The regulariser becomes ``λ Σ_l w_l ||W_l||_1``. With ``per="weight"`` (default) ``w_l`` is
    proportional to the cost one weight of layer l carries: MACs / parameters (= the output map's
    area for a conv) or latency / parameters, so ``Σ_l w_l ||W_l||_1`` is an L1 relaxation of the
    phase's total cost, and a filter's pull toward zero grows with the cost its removal saves
    (its own MACs and, through ``W_{l+1}[:, i]``, its consumer's). With ``per="layer"`` ``w_l`` is
    the layer's cost share (the issue's literal reading; it also favours large layers).
    ``alpha`` interpolates from uniform (0, the paper) to fully cost-proportional (1). Normalising
    to mean 1 over the phase keeps λ's meaning, so the paper's λ grid still applies.
    ``kind="latency"`` needs a ``table`` from :mod:`prunekit.prune.profile` measured on this
    model's architecture.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; expected one of {KINDS}")
    if per not in PER:
        raise ValueError(f"unknown cost normalisation {per!r}; expected one of {PER}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not layers:
        return {}
    if kind == "macs":
        costs: dict[str, float] = {k: float(v) for k, v in layer_macs(model).items()}
    else:
        if table is None:
            raise ValueError("kind='latency' needs a latency table (run `prunekit profile` first)")
        from prunekit.prune.profile import layer_latency_estimates

        cfg = get_config(model)
        costs = layer_latency_estimates(cfg.channels, table, cfg=cfg)
    missing = [n for n in layers if n not in costs]
    if missing:
        raise ValueError(f"no cost known for layers {missing} (names must be the model's layer names)")
    if per == "weight":
        mods = _prunable_modules(model)
        costs = {n: costs[n] / max(1, mods[n].weight.numel()) for n in layers}
    else:
        costs = {n: costs[n] for n in layers}
    mean = sum(costs.values()) / len(costs)
    if mean <= 0:
        return {n: 1.0 for n in layers}
    return {n: (1.0 - alpha) + alpha * costs[n] / mean for n in layers}


def cost_columns(
    model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Per-layer cost columns for the pruning report, keyed by the original's layer names.

    ``macs_before``/``macs_after`` (a layer the pruned model dropped, e.g. pruned-Kdet, has 0
    after), their shares of each model's total, and with a latency ``table`` the estimated
    ``latency_ms_before/after`` and ``latency_share_before/after``.
    """
    before = layer_macs(original)
    after = layer_macs(model)
    sb, sa = cost_shares(before), cost_shares(after)
    cols: dict[str, dict[str, float | int | None]] = {}
    for name in before:
        cols[name] = {
            "macs_before": before[name],
            "macs_after": after.get(name, 0),
            "macs_share_before": sb[name],
            "macs_share_after": sa.get(name, 0.0),
        }
    if table is not None:
        from prunekit.prune.profile import layer_latency_estimates

        lb = layer_latency_estimates(get_config(original).channels, table, cfg=get_config(original))
        la = layer_latency_estimates(get_config(model).channels, table, cfg=get_config(model))
        slb, sla = cost_shares(lb), cost_shares(la)
        for name, col in cols.items():
            col["latency_ms_before"] = lb.get(name)
            col["latency_ms_after"] = la.get(name, 0.0)
            col["latency_share_before"] = slb.get(name)
            col["latency_share_after"] = sla.get(name, 0.0)
    return cols


def total_macs(model: nn.Module) -> int:
    """Whole-network MACs at batch 1 (every op FlopCounterMode knows, not only prunable layers)."""
    m = _meta_copy(model)
    run, x = _forward_module(m)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(x)
    return int(counter.get_total_flops()) // 2


def add_cost_columns(
    rows: list[dict[str, Any]], model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> list[dict[str, Any]]:
    """Merge :func:`cost_columns` into ``layer_table`` rows in place (rows without a column are
    left alone); returns ``rows``. Both models must be prunekit models (they have a config)."""
    cols = cost_columns(model, original, table)
    for row in rows:
        row.update(cols.get(row["layer"], {}))
    return rows


def render_cost_markdown(rows: list[dict[str, Any]], title: str = "Cost per layer") -> str:
    """Markdown of the cost columns of ``rows`` (MACs and their shares, latency when present);
    empty when the rows carry no cost columns."""
    rows = [r for r in rows if "macs_share_before" in r]
    if not rows:
        return ""
    lat = any(r.get("latency_ms_before") is not None for r in rows)
    head = ["layer", "MACs before", "MACs after", "MACs share before %", "MACs share after %"]
    if lat:
        head += ["latency ms before", "latency ms after", "latency share before %", "latency share after %"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "-" if v is None else f"{100 * float(v):.1f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{float(v):.3f}"  # noqa: E731
    for r in rows:
        cells = [
            r["layer"],
            f"{int(r['macs_before']):,}",
            f"{int(r['macs_after']):,}",
            pct(r["macs_share_before"]),
            pct(r["macs_share_after"]),
        ]
        if lat:
            cells += [
                ms(r.get("latency_ms_before")),
                ms(r.get("latency_ms_after")),
                pct(r.get("latency_share_before")),
                pct(r.get("latency_share_after")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
