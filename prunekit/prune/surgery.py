"""How to remove channels: slice every coupled tensor and rebuild a plain, dense prunekit model.

One small function per (layer type, coupling kind) in :data:`SLICERS`, registered by type, so a
new layer type is one new function. :func:`prune_channels` slices a copy of the source model with
them and, for prunekit models, loads the result into a freshly built model whose config lists the
new widths: the output is an ordinary prunekit model that saves, loads, trains and exports like
any other (no masks, no sparse kernels).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.prune.graph import Coupling, DependencyGraph, Group, build_dependency_graph

log = logging.getLogger(__name__)

Slicer = Callable[[nn.Module, Tensor], None]
SLICERS: dict[tuple[type, str], Slicer] = {}
Selection = Mapping[str, Sequence[int] | Tensor]


def register(module_type: type, kind: str) -> Callable[[Slicer], Slicer]:
    """Register ``fn(module, keep_index)`` that keeps only ``keep_index`` along ``kind``'s dim."""

    def deco(fn: Slicer) -> Slicer:
        SLICERS[(module_type, kind)] = fn
        return fn

    return deco


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


@register(nn.Conv2d, "out")
def _conv_out(m: nn.Conv2d, keep: Tensor) -> None:
    m.weight = _param(m.weight.data[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias.data[keep], m.bias)
    m.out_channels = len(keep)


@register(nn.Conv2d, "in")
def _conv_in(m: nn.Conv2d, keep: Tensor) -> None:
    m.weight = _param(m.weight.data[:, keep], m.weight)
    m.in_channels = len(keep)


@register(nn.Linear, "out")
def _linear_out(m: nn.Linear, keep: Tensor) -> None:
    m.weight = _param(m.weight.data[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias.data[keep], m.bias)
    m.out_features = len(keep)


@register(nn.Linear, "in")
def _linear_in(m: nn.Linear, keep: Tensor) -> None:
    m.weight = _param(m.weight.data[:, keep], m.weight)
    m.in_features = len(keep)


def _norm(m: nn.modules.batchnorm._BatchNorm, keep: Tensor) -> None:
    if m.weight is not None:
        m.weight = _param(m.weight.data[keep], m.weight)
        m.bias = _param(m.bias.data[keep], m.bias)
    if m.running_mean is not None:
        m.running_mean = m.running_mean[keep].clone()
        m.running_var = m.running_var[keep].clone()
    m.num_features = len(keep)


register(nn.BatchNorm1d, "norm")(_norm)
register(nn.BatchNorm2d, "norm")(_norm)


def channel_dim(p: Tensor, channels: int) -> int:
    """The one non-singleton dim of a per-channel parameter (``[C]`` or ``[1, C, 1, 1]``)."""
    dims = [d for d, s in enumerate(p.shape) if s != 1]
    if len(dims) != 1 or p.shape[dims[0]] != channels:
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not per-channel for {channels} channels")
    return dims[0]


def _slice_param(root: nn.Module, path: str, keep: Tensor, channels: int) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    p = getattr(owner, attr)
    setattr(owner, attr, _param(p.data.index_select(channel_dim(p, channels), keep), p))


def _slicer(m: nn.Module, kind: str) -> Slicer:
    for t in type(m).__mro__:
        if (t, kind) in SLICERS:
            return SLICERS[(t, kind)]
    raise ValueError(f"no slicing function registered for {type(m).__name__} ({kind})")


def _dim_size(root: nn.Module, c: Coupling) -> int:
    if c.kind == "param":
        return int(root.get_parameter(c.target).numel())
    m = root.get_submodule(c.target)
    if c.kind == "norm":
        return int(m.num_features)
    return int(m.weight.shape[0 if c.kind == "out" else 1])


def normalise_selection(graph: DependencyGraph, keep: Selection) -> dict[str, list[int]]:
    """``{layer: kept indices}`` -> ``{group name: sorted kept indices}``, validated."""
    out: dict[str, list[int]] = {}
    for name, idx in keep.items():
        group = graph.group(name)
        if not group.prunable:
            raise ValueError(f"layer {name!r} cannot be pruned: {group.reason}")
        kept = sorted({int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)})
        if not kept:
            raise ValueError(f"layer {name!r}: cannot remove all {group.channels} filters (keep at least 1)")
        if kept[0] < 0 or kept[-1] >= group.channels:
            raise ValueError(f"layer {name!r}: kept index out of range 0..{group.channels - 1}")
        if group.name in out and out[group.name] != kept:
            raise ValueError(f"layers tied to {group.name!r} (residual add) got different selections")
        out[group.name] = kept
    return out


def _removals(graph: DependencyGraph, selection: dict[str, list[int]]) -> dict[Coupling, set[int]]:
    """Per (target, kind), the removed indices in the ORIGINAL index space (concats share targets)."""
    removed: dict[tuple[str, str], set[int]] = {}
    for gname, kept in selection.items():
        group = graph.group(gname)
        gone = sorted(set(range(group.channels)) - set(kept))
        if not gone:
            continue
        for c in group.couplings:
            removed.setdefault((c.target, c.kind), set()).update(c.slot.indices(gone))
    return {Coupling(t, k): v for (t, k), v in removed.items()}


def slice_in_place(root: nn.Module, graph: DependencyGraph, keep: Selection) -> dict[str, list[int]]:
    """Slice ``root`` (a module whose paths match the graph's) in place; returns the selection."""
    selection = normalise_selection(graph, keep)
    groups = {g.name: g for g in graph.groups}
    channels_of = {c.target: groups[n].channels for n in selection for c in groups[n].couplings}
    for c, gone in _removals(graph, selection).items():
        size = _dim_size(root, c)
        keep_idx = torch.tensor(sorted(set(range(size)) - gone), dtype=torch.long)
        if c.kind == "param":
            _slice_param(root, c.target, keep_idx, channels_of[c.target])
        else:
            m = root.get_submodule(c.target)
            _slicer(m, c.kind)(m, keep_idx)
    return selection


def new_widths(graph: DependencyGraph, selection: dict[str, list[int]]) -> dict[str, int]:
    """Layer name -> new output width for every producer of every selected group."""
    out = {}
    for gname, kept in selection.items():
        for p in graph.group(gname).producers:
            out[graph.name_of(p)] = len(kept)
    return out


def prune_channels(model: nn.Module, keep: Selection, graph: DependencyGraph | None = None) -> nn.Module:
    """A NEW model keeping only ``keep[layer]`` output channels of each listed layer.

    Layers not listed keep all their channels. Weights are copied from ``model`` (not modified).
    For prunekit models the result is rebuilt with :func:`prunekit.models.build_model` from a
    config with the new widths; for any other module it is a sliced deep copy.
    """
    graph = graph or build_dependency_graph(model)
    work = copy.deepcopy(model)
    selection = slice_in_place(work, graph, keep)
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None:
        return work
    from prunekit.models import build_model
    from prunekit.models.io import load_state

    new_cfg = copy.deepcopy(cfg)
    widths = new_widths(graph, selection)
    unknown = [n for n in widths if n not in new_cfg.channels]
    if unknown:
        raise ValueError(f"layers {unknown} are not in the {cfg.arch} config's channels; cannot rebuild")
    new_cfg.channels.update(widths)
    new = build_model(new_cfg)
    load_state(new, work.state_dict(), f"<pruned {cfg.arch}>")
    new.train(model.training)
    return new.to(next(model.parameters()).device)


def mask_channels(model: nn.Module, keep: Selection, graph: DependencyGraph | None = None) -> nn.Module:
    """A copy of ``model`` in which the removed channels output exactly zero (same shapes).

    Zeroes each removed filter's weights and bias, its BatchNorm affine terms (so the normalised
    output is 0 whatever the running stats) and its per-channel parameters. Downstream this is
    what :func:`prune_channels` computes, which is how surgery is tested.
    """
    graph = graph or build_dependency_graph(model)
    out = copy.deepcopy(model)
    selection = normalise_selection(graph, keep)
    with torch.no_grad():
        for gname, kept in selection.items():
            group = graph.group(gname)
            gone = torch.tensor(sorted(set(range(group.channels)) - set(kept)), dtype=torch.long)
            if not len(gone):
                continue
            for c in group.couplings:
                if c.kind == "out":
                    m = out.get_submodule(c.target)
                    m.weight[gone] = 0
                    if m.bias is not None:
                        m.bias[gone] = 0
                elif c.kind == "norm":
                    m = out.get_submodule(c.target)
                    if m.weight is None:
                        raise ValueError(f"{c.target}: cannot zero a BatchNorm without affine terms")
                    m.weight[gone] = 0
                    m.bias[gone] = 0
                elif c.kind == "param":
                    p = out.get_parameter(c.target)
                    p.index_fill_(channel_dim(p, group.channels), gone, 0.0)
    return out


def predict_params(model: nn.Module, keep: Selection, graph: DependencyGraph | None = None) -> int:
    """Parameter count after :func:`prune_channels`, computed from the selection alone."""
    graph = graph or build_dependency_graph(model)
    selection = normalise_selection(graph, keep)
    removed = _removals(graph, selection)
    gone: dict[str, dict[str, int]] = {}
    for c, idx in removed.items():
        gone.setdefault(c.target, {})[c.kind] = len(idx)
    total = 0
    for path, m in model.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        g = gone.get(path)
        if g is None:
            total += own
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            o = w.shape[0] - g.get("out", 0)
            i = w.shape[1] - g.get("in", 0)
            total += o * i * int(w[0, 0].numel()) + (o if m.bias is not None else 0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += own - (2 * g["norm"] if m.weight is not None else 0)
        else:
            total += own
    for c, idx in removed.items():
        if c.kind == "param":
            total -= len(idx)
    return int(total)


def group_summary(group: Group, graph: DependencyGraph) -> dict[str, Any]:
    """JSON-able description of a group (for ``prunekit inspect --graph`` and logs)."""
    return {
        "layer": group.name,
        "producers": [graph.name_of(p) for p in group.producers],
        "channels": group.channels,
        "prunable": group.prunable,
        "reason": group.reason,
        "couplings": [
            {
                "target": graph.name_of(c.target),
                "kind": c.kind,
                "offset": c.slot.offset,
                "block": c.slot.block,
            }
            for c in group.couplings
        ],
    }


def keep_detection_layers(model: nn.Module, k: int) -> nn.Module:
    """The paper's "pruned-Kdet": a NEW SSD keeping the first ``k`` feature maps.

    Later extra blocks, their head convs and their default boxes are dropped; every kept tensor
    is copied from ``model``, so the kept heads produce exactly the first anchors of the
    original's output. The result is a plain prunekit model (``cfg.num_detection_layers == k``).
    """
    from prunekit.models import build_model, get_config
    from prunekit.models.io import load_state
    from prunekit.models.ssd import FEATURE_SOURCES

    cfg = get_config(model)
    if not cfg.is_detector or cfg.anchors is None:
        raise ValueError(f"keep_detection_layers needs an SSD detector, got a {cfg.arch} model")
    n = len(cfg.anchors.aspect_ratios)
    if not 1 <= k <= n:
        raise ValueError(f"keep_detection_layers must be in 1..{n} for this model, got {k}")
    new_cfg = copy.deepcopy(cfg)
    a = new_cfg.anchors
    a.aspect_ratios, a.scales, a.steps = a.aspect_ratios[:k], a.scales[: k + 1], a.steps[:k]
    new_cfg.num_detection_layers = k
    dropped = set(FEATURE_SOURCES[max(k, 2) :])
    dropped |= {s.replace("_2", "_1") for s in dropped}
    new_cfg.channels = {name: c for name, c in cfg.channels.items() if name not in dropped}
    new = build_model(new_cfg)
    state = model.state_dict()
    missing = [key for key in new.state_dict() if key not in state]
    if missing:
        raise ValueError(f"cannot cut {cfg.arch} to {k} detection layers: source lacks {missing[:3]}")
    load_state(new, {key: state[key] for key in new.state_dict()}, f"<{cfg.arch} pruned-{k}det>")
    new.train(model.training)
    return new.to(next(model.parameters()).device)
