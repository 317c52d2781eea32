"""Baselines at a matched size, through the same surgery: L1-norm ranking and random removal.

* ``l1``: Li et al. (ICLR'17), "Pruning Filters for Efficient ConvNets": in every pruned layer keep
  the filters with the largest ``||W_l[i]||_1``.
* ``random``: the paper's RRF-x: remove a fraction x of the filters of every pruned layer at random.
* ``bnscale``: network slimming's |gamma| ranking.

All remove the same fraction from every layer; :func:`prune_baseline` searches that fraction so the
pruned model has (at most, and as close as possible to) a target parameter count, which is how they
are compared with the multi-layer method at equal size. The scoring lives in
:mod:`prunekit.prune.selectors`; this module is the user-facing entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.selectors import BNScale, L1Norm, Random, RankSelector, match_budget, n_keep
from prunekit.prune.surgery import predict_params, prune_channels

log = logging.getLogger(__name__)
METHODS = ("l1", "random", "bnscale")

__all__ = ["METHODS", "baseline_keep", "make_selector", "n_keep", "prune_baseline", "ratio_for_params"]


def make_selector(method: str, ratio: float = 0.0, seed: int = 0) -> RankSelector:
    if method == "l1":
        return L1Norm(ratio)
    if method == "random":
        return Random(ratio, seed=seed)
    if method == "bnscale":
        return BNScale(ratio)
    raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")


def filter_l1_norms(model: nn.Module, graph: DependencyGraph, name: str) -> Tensor:
    """``||W_l[i]||_1`` per output channel, summed over tied producers."""
    return L1Norm().scores(model, graph.group(name), graph)


def baseline_keep(
    model: nn.Module,
    method: str,
    ratio: float,
    layers: Sequence[str] | None = None,
    graph: DependencyGraph | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Kept indices per layer after removing ``ratio`` of each layer's filters by ``method``."""
    sel = make_selector(method, ratio, seed)  # validates the method before any tracing
    graph = graph or build_dependency_graph(model)
    return sel.select(model, layers, graph).keep


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
    count = lambda keep: predict_params(model, keep, graph)  # noqa: E731
    return match_budget(model, lambda r: Random(r), count, target_params, graph, layers, iters)[1]


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
    make_selector(method)
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
