"""BatchNorm-folded views of a network's weights, for statistics that must see a filter's real scale.

A BatchNorm after a conv cancels the conv filter's scale: ``BN(s * W x) == BN(W x)``. Zero-row
statistics and thresholds read on raw conv weights of a conv+BN network therefore measure an
arbitrary scale (measured: zero rows at chance, p^k_w). Reading them on the folded weights
``gamma_i / sqrt(var_i + eps) * W_i`` - the weights of the equivalent BN-free layer - makes a
channel whose BN scale gamma reached zero an all-zero filter, so the paper's τ rule applies as
written. Layers without a following BatchNorm are returned as they are.
"""

from __future__ import annotations

from torch import Tensor, nn

from prunekit.prune.graph import DependencyGraph, Group


def norm_of(graph: DependencyGraph, group: Group) -> str | None:
    """Module path of the BatchNorm that normalises ``group``'s channels directly, or None.

    Only a single producer whose BN reads its channels in place (offset 0, one slot per channel)
    is folded; tied or concatenated producers keep their raw weights.
    """
    if len(group.producers) != 1:
        return None
    norms = [c for c in group.couplings if c.kind == "norm"]
    if len(norms) != 1 or norms[0].slot.offset != 0 or norms[0].slot.block != 1:
        return None
    return norms[0].target


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (1 where the BN has no affine scale)."""
    var = bn.running_var if bn.running_var is not None else None
    gamma = bn.weight.detach() if bn.weight is not None else None
    if var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = (var.detach() + bn.eps).rsqrt()
    return scale * gamma if gamma is not None else scale


def folded_weights(model: nn.Module, graph: DependencyGraph | None, fold: bool = True) -> dict[str, Tensor]:
    """Module path -> weight of every conv/linear, BN-folded where a BatchNorm follows it.

    ``fold=False`` (or no graph) gives the raw weights. The model is not modified; tensors are
    detached (folded ones are new tensors).
    """
    mods = dict(model.named_modules())
    out = {p: m.weight.detach() for p, m in mods.items() if isinstance(m, nn.Conv2d | nn.Linear)}
    if not fold or graph is None:
        return out
    for group in graph.groups:
        bn_path = norm_of(graph, group)
        if bn_path is None:
            continue
        producer = group.producers[0]
        w = out[producer]
        scale = bn_scale(mods[bn_path]).to(w.dtype)
        out[producer] = w * scale.view(-1, *([1] * (w.dim() - 1)))
    return out


def producer_norms(model: nn.Module, graph: DependencyGraph) -> dict[str, str]:
    """Producer module path -> path of the BatchNorm folded into it (see :func:`norm_of`)."""
    out = {}
    for group in graph.groups:
        bn_path = norm_of(graph, group)
        if bn_path is not None:
            out[group.producers[0]] = bn_path
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A NEW prunekit model without BatchNorm computing what ``model`` computes in eval mode.

    Every conv+BN pair becomes one conv with ``W' = s * W`` and ``b' = s * (b - mean) + beta``
    (``s = gamma / sqrt(var + eps)``): the paper's BN-free setting (``--fold-bn``), in which an L1
    term on the conv weights changes the function. Other tensors (heads, L2Norm scale, the
    classifier) are copied by name.
    """
    import copy

    import torch

    from prunekit.models import build_model, get_config, layer_names
    from prunekit.prune.graph import build_dependency_graph

    cfg = get_config(model)
    if not cfg.batch_norm:
        return copy.deepcopy(model)
    graph = build_dependency_graph(model)
    norms = producer_norms(model, graph)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.batch_norm = False
    new = build_model(new_cfg).to(next(model.parameters()).device)
    old_paths, new_paths = layer_names(model), layer_names(new)
    old_mods = dict(model.named_modules())
    state = {}
    with torch.no_grad():
        for name, old_path in old_paths.items():
            m, new_path = old_mods[old_path], new_paths[name]
            w = m.weight.detach()
            b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], device=w.device)
            if old_path in norms:
                bn = old_mods[norms[old_path]]
                s = bn_scale(bn)
                w = w * s.view(-1, *([1] * (w.dim() - 1)))
                b = s * (b - bn.running_mean) + bn.bias.detach()
            state[f"{new_path}.weight"] = w
            state[f"{new_path}.bias"] = b
    old_state = model.state_dict()
    for key, value in new.state_dict().items():
        if key in state:
            continue
        if key not in old_state or old_state[key].shape != value.shape:
            raise ValueError(f"cannot fold BatchNorm of this {cfg.arch}: no source for {key!r}")
        state[key] = old_state[key]
    new.load_state_dict(state)
    new.train(model.training)
    return new
