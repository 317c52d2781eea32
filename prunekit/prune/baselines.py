"""Baselines at a matched size, through the same surgery: L1-norm ranking and random removal.

* ``l1``: Li et al. (ICLR'17), "Pruning Filters for Efficient ConvNets": in every pruned layer keep
  the filters with the largest ``||W_l[i]||_1``.
* ``random``: the paper's RRF-x: remove a fraction x of the filters of every pruned layer at random.

Both remove the same fraction from every layer; :func:`prune_baseline` searches that fraction so
the pruned model has (at most, and as close as possible to) a target parameter count, which is how
they are compared with the multi-layer method at equal size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.surgery import predict_params, prune_channels

log = logging.getLogger(__name__)
METHODS = ("l1", "random")


def _layers(graph: DependencyGraph, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return [g.name for g in graph.prunable()]
    out = []
    for name in layers:
        g = graph.group(name)
        if not g.prunable:
            raise ValueError(f"layer {name!r} cannot be pruned: {g.reason}")
        if g.name not in out:
            out.append(g.name)
    return out


def n_keep(channels: int, ratio: float) -> int:
    """Filters kept when removing ``ratio`` of ``channels`` (rounded to nearest, at least 1)."""
    return max(1, min(channels, int(math.floor(channels * (1.0 - ratio) + 0.5))))


def filter_l1_norms(model: nn.Module, graph: DependencyGraph, name: str) -> Tensor:
    """``||W_l[i]||_1`` per output channel, summed over tied producers."""
    mods = dict(model.named_modules())
    group = graph.group(name)
    return sum(mods[p].weight.detach().abs().flatten(1).sum(1).cpu() for p in group.producers)


def baseline_keep(
    model: nn.Module,
    method: str,
    ratio: float,
    layers: Sequence[str] | None = None,
    graph: DependencyGraph | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Kept indices per layer after removing ``ratio`` of each layer's filters by ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"removal ratio must be in [0, 1), got {ratio}")
    graph = graph or build_dependency_graph(model)
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for name in _layers(graph, layers):
        c = graph.group(name).channels
        k = n_keep(c, ratio)
        if method == "l1":
            norms = filter_l1_norms(model, graph, name)
            idx = torch.argsort(norms, descending=True, stable=True)[:k]
        else:
            idx = torch.randperm(c, generator=gen)[:k]
        keep[name] = torch.sort(idx).values
    return keep


def ratio_for_params(
    model: nn.Module,
    target_params: int,
    layers: Sequence[str] | None = None,
    graph: DependencyGraph | None = None,
    iters: int = 40,
) -> float:
    """The smallest uniform removal ratio whose pruned model has at most ``target_params``.

    Raises ``ValueError`` when even keeping one filter per layer exceeds the target.
    """
    graph = graph or build_dependency_graph(model)
    names = _layers(graph, layers)

    def count(r: float) -> int:
        return predict_params(model, {n: range(n_keep(graph.group(n).channels, r)) for n in names}, graph)

    if count(0.0) <= target_params:
        return 0.0
    hi = 1.0 - 1e-9
    if count(hi) > target_params:
        raise ValueError(
            f"cannot reach {target_params:,} parameters by uniform filter removal "
            f"(minimum {count(hi):,} with one filter per pruned layer)"
        )
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if count(mid) <= target_params:
            hi = mid
        else:
            lo = mid
    return hi


def prune_baseline(
    model: nn.Module,
    method: str,
    ratio: float | None = None,
    target_params: int | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A NEW model pruned by ``method`` at ``ratio`` or at the ratio matching ``target_params``.

    Returns ``(model, info)`` with the ratio used, the parameter count and kept filters per layer.
    """
    if (ratio is None) == (target_params is None):
        raise ValueError("give exactly one of ratio or target_params")
    graph = build_dependency_graph(model)
    if target_params is not None:
        ratio = ratio_for_params(model, int(target_params), layers, graph)
    assert ratio is not None
    keep = baseline_keep(model, method, ratio, layers, graph, seed)
    pruned = prune_channels(model, keep, graph)
    info = {
        "method": method,
        "ratio": ratio,
        "seed": seed if method == "random" else None,
        "target_params": target_params,
        "params": sum(p.numel() for p in pruned.parameters()),
        "filters": {n: len(k) for n, k in keep.items()},
    }
    log.info(
        "%s baseline: removed %.1f%% of filters per layer -> %d params", method, 100 * ratio, info["params"]
    )
    return pruned, info
