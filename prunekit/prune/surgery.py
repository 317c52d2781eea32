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


def removed_constants(
    model: nn.Module, graph: DependencyGraph, keep: Selection, example: Tensor | None = None
) -> dict[str, Tensor]:
    """Consumer module path -> the bias its removed input channels contributed (``[out]``).

    A removed filter whose weights (and BN scale gamma) are zero still outputs a constant: its
    bias, or ``act(beta)`` after a BatchNorm. Dropping it would shift every consumer by
    ``Σ_kernel W[:, i] * c_i``; folding that into the consumer's bias keeps the pruned model
    equal to Θ_L1. The constants are read from one forward pass of a copy of ``model`` with the
    removed filters silenced (:func:`mask_channels` with ``keep_bias=True``), at each consumer's
    input, so any activation / pooling in between is accounted for. Exact for linear and unpadded
    conv consumers; a zero-padded conv sees the constant only in its interior (its 1-pixel border
    differs), and a channel reaching a consumer through a cross-channel op (SSD's L2Norm) gets an
    approximation.
    """
    from prunekit.prune.graph import example_input, traced_network

    selection = normalise_selection(graph, keep)
    gone_by_group = {g: sorted(set(range(graph.group(g).channels)) - set(k)) for g, k in selection.items()}
    gone_by_group = {g: v for g, v in gone_by_group.items() if v}
    if not gone_by_group:
        return {}
    masked = mask_channels(model, selection, graph, keep_bias=True).eval()
    targets = {c.target for g in gone_by_group for c in graph.group(g).consumers}
    seen: dict[str, Tensor] = {}
    hooks = [
        masked.get_submodule(t).register_forward_pre_hook(
            lambda _m, inp, t=t: seen.setdefault(t, inp[0].detach().clone())
        )
        for t in targets
    ]
    try:
        x = example if example is not None else example_input(model)
        with torch.no_grad():
            traced_network(masked)(x[:1].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Tensor] = {}
    for g, gone in gone_by_group.items():
        for c in graph.group(g).consumers:
            if c.target not in seen:
                continue
            m = model.get_submodule(c.target)
            idx = torch.tensor(c.slot.indices(gone), dtype=torch.long)
            x_in = seen[c.target][0]
            w = m.weight.detach()
            if w.dim() == 4:
                vals = x_in[idx].flatten(1).mean(dim=1)
                delta = (w[:, idx].sum(dim=(2, 3)) * vals).sum(dim=1)
            else:
                delta = w[:, idx] @ x_in.flatten()[idx]
            out[c.target] = out.get(c.target, 0) + delta
    return out


def fold_constants(model: nn.Module, deltas: Mapping[str, Tensor]) -> None:
    """Add :func:`removed_constants` to the consumers' biases of ``model`` (in place)."""
    with torch.no_grad():
        for path, delta in deltas.items():
            m = model.get_submodule(path)
            if m.bias is None:
                if float(delta.abs().max()) > 0:
                    log.warning("%s has no bias: the constant output of removed channels is dropped", path)
                continue
            m.bias.add_(delta.to(m.bias.dtype))


DROPOUT_RULES = ("han", "keep")


def check_dropout_rule(rule: str) -> None:
    """One check for :class:`~prunekit.prune.config.PruneConfig` and :func:`prune_channels`."""
    if rule not in DROPOUT_RULES:
        raise ValueError(f"dropout_rule must be one of {DROPOUT_RULES}, got {rule!r}")


def scaled_dropout(before: nn.Module, after: nn.Module) -> dict[str, float]:
    """Dropout rates for ``after`` (a cut copy of ``before``, same module paths) by Han et al.'s
    rule (NIPS 2015, sec. 3.4): D_r = D_o sqrt(C_r / C_o), C the connections of the Linear whose
    outputs the dropout acts on.

    Why: dropout's regularisation is sized for the layer it was set for. VGG's 0.5 after fc6 and
    fc7 halves 1,024 units in training; the same 0.5 on the 48 units a cut can leave is noise that
    retraining cannot average out (CIFAR-10, runs/cifar10_v5: three epochs of retraining took the
    last phase from 83.2 to 80.5). Rates compose over repeated cuts. Only ``nn.Dropout`` after an
    ``nn.Linear`` (in module order) is rescaled; paths whose rate is unchanged are left out.
    """
    old = dict(before.named_modules())
    rates: dict[str, float] = {}
    last: tuple[str, nn.Linear] | None = None
    for path, m in after.named_modules():
        if isinstance(m, nn.Linear):
            last = path, m
        elif type(m) is nn.Dropout and last is not None and isinstance(old.get(last[0]), nn.Linear):
            c_old, c_new = old[last[0]].weight.numel(), last[1].weight.numel()
            p = round(m.p * (c_new / c_old) ** 0.5, 6) if c_old else m.p
            if p != m.p:
                rates[path] = p
    return rates


def prune_channels(
    model: nn.Module,
    keep: Selection,
    graph: DependencyGraph | None = None,
    fold_bias: bool = False,
    example: Tensor | None = None,
    dropout_rule: str = "han",
) -> nn.Module:
    """A NEW model keeping only ``keep[layer]`` output channels of each listed layer.

    Layers not listed keep all their channels. Weights are copied from ``model`` (not modified).
    ``fold_bias`` folds the constant output of removed channels (bias, BN beta) into the
    consumers' biases (:func:`removed_constants`), so removing a channel whose BN scale is zero
    changes nothing; the method always does, plain slicing (``False``) is what the exactness tests
    of the slicing itself compare with. For prunekit models the result is rebuilt with
    :func:`prunekit.models.build_model` from a config with the new widths; for any other module
    it is a sliced deep copy (``example`` then gives the input shape for ``fold_bias``).
    ``dropout_rule="han"`` rescales the dropout after each cut Linear (:func:`scaled_dropout`);
    ``"keep"`` leaves the rates as they were. Neither changes the model's outputs in eval mode.
    """
    check_dropout_rule(dropout_rule)
    graph = graph or build_dependency_graph(model)
    work = copy.deepcopy(model)
    if fold_bias:
        fold_constants(work, removed_constants(model, graph, keep, example))
    selection = slice_in_place(work, graph, keep)
    rates = scaled_dropout(model, work) if dropout_rule == "han" else {}
    for path, p in rates.items():
        work.get_submodule(path).p = p
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
    new_cfg.dropout = {**new_cfg.dropout, **rates}
    new = build_model(new_cfg)
    load_state(new, work.state_dict(), f"<pruned {cfg.arch}>")
    new.train(model.training)
    return new.to(next(model.parameters()).device)


def mask_channels(
    model: nn.Module, keep: Selection, graph: DependencyGraph | None = None, keep_bias: bool = False
) -> nn.Module:
    """A copy of ``model`` in which the removed channels output exactly zero (same shapes).

    Zeroes each removed filter's weights and bias, its BatchNorm affine terms (so the normalised
    output is 0 whatever the running stats) and its per-channel parameters. Downstream this is
    what :func:`prune_channels` computes, which is how surgery is tested. ``keep_bias=True``
    zeroes only the weights and BN scales: the removed channels then output their constant
    (bias / BN beta), which is what a dead channel of Θ_L1 does and what ``fold_bias`` folds.
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
                    if m.bias is not None and not keep_bias:
                        m.bias[gone] = 0
                elif c.kind == "norm":
                    m = out.get_submodule(c.target)
                    if m.weight is None:
                        raise ValueError(f"{c.target}: cannot zero a BatchNorm without affine terms")
                    m.weight[gone] = 0
                    if not keep_bias:
                        m.bias[gone] = 0
                elif c.kind == "param" and not keep_bias:
                    p = out.get_parameter(c.target)
                    p.index_fill_(channel_dim(p, group.channels), gone, 0.0)
    return out


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only), without copying its data."""
    cfg = getattr(model, "prunekit_config", None)
    if cfg is not None:
        from prunekit.models import build_model

        with torch.device("meta"):
            return build_model(cfg)
    return copy.deepcopy(model).to("meta")


def predict_params(model: nn.Module, keep: Selection, graph: DependencyGraph | None = None) -> int:
    """Parameter count after :func:`prune_channels`, from the selection alone.

    The registered slicers run on a meta-device copy, so the count is by construction what
    surgery produces (no second per-layer-type dispatch to keep in step).
    """
    graph = graph or build_dependency_graph(model)
    work = _meta_copy(model)
    slice_in_place(work, graph, keep)
    return int(sum(p.numel() for p in work.parameters()))


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


def slice_optimizer_state(
    optimizer_state: dict[str, Any],
    param_names: list[list[str]],
    model: nn.Module,
    keep: dict[str, torch.Tensor],
    graph: DependencyGraph,
) -> dict[str, Any]:
    """The optimizer state dict with every per-parameter buffer cut like its parameter.

    The buffers are loaded into a copy of ``model`` in place of the parameters and the very surgery
    of the weights is applied to it (without the bias fold, which is not a slice): whatever couples
    a BN, a consumer's input slice or a head, the buffers follow the weights.
    """
    by_index = {
        idx: name
        for group, names in zip(optimizer_state["param_groups"], param_names)
        for idx, name in zip(group["params"], names)
    }
    keys = sorted(
        {k for s in optimizer_state["state"].values() for k, v in s.items() if torch.is_tensor(v) and v.dim()}
    )
    sliced: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        holder = copy.deepcopy(model)
        with torch.no_grad():
            for idx, name in by_index.items():
                p = holder.get_parameter(name)
                buf = optimizer_state["state"].get(idx, {}).get(key)
                p.copy_(buf if buf is not None else torch.zeros_like(p))
        cut = prune_channels(holder, keep, graph, fold_bias=False)
        sliced[key] = {n: p.detach().clone() for n, p in cut.named_parameters()}
    state = {}
    for idx, entry in optimizer_state["state"].items():
        name = by_index[idx]
        state[idx] = {k: (sliced[k][name] if k in sliced else v) for k, v in entry.items()}
    return {"state": state, "param_groups": copy.deepcopy(optimizer_state["param_groups"])}
