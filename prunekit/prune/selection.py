"""Step 3 of a phase: which filters to remove, from zero-row statistics of the thresholded model.

A "row" of a conv filter is one kernel row (``k_w`` weights): for a weight ``[O, I, kh, kw]`` the
rows are indexed ``[O, I, kh]``; a row is zero when all its ``k_w`` weights are. For a linear
weight ``[O, I]`` each weight is its own row. Filter i of layer l is removed when

    s(W_l[i]) > τ1,   or   s(W_l[i]) > τ2 and s(W_{l+1}[:, i]) > τ3      (τ1 > τ2)

where ``s`` is the fraction of zero rows and ``W_{l+1}[:, i]`` is the slice of EVERY consumer
that reads channel i (next conv and detection heads; after a flatten, the block of linear inputs
that channel i became). Fully connected neurons are removed when all their incoming or all their
outgoing weights are zero (paper section 4.3).

Statistics are read on BN-folded weights (:mod:`prunekit.prune.fold`) unless ``fold_bn=False``:
under a BatchNorm the raw conv weights carry no scale, the folded ones do. A layer never loses
more than ``1 - min_keep_fraction`` of its filters: on weak statistics the rule is a cliff (a layer
goes all or nothing), and an SSD extra layer cut to one filter is a detection layer deleted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.prune.fold import folded_weights
from prunekit.prune.graph import DependencyGraph, Group, build_dependency_graph

log = logging.getLogger(__name__)

TAU1, TAU2, TAU3 = 0.9, 0.7, 0.9
MIN_KEEP_FRACTION = 0.125


def zero_rows(w: Tensor) -> Tensor:
    """Bool mask of zero rows: ``[O, I, kh]`` for a conv weight, ``[O, I]`` for a linear one."""
    if w.dim() == 4:
        return (w == 0).all(dim=3)
    if w.dim() == 2:
        return w == 0
    raise ValueError(f"expected a conv [O,I,kh,kw] or linear [O,I] weight, got shape {tuple(w.shape)}")


def filter_sparsity(w: Tensor) -> Tensor:
    """s(W_l[i]) for every filter i: fraction of zero rows, shape ``[O]``."""
    z = zero_rows(w)
    return z.flatten(1).float().mean(dim=1)


def input_zero_rows(w: Tensor) -> tuple[Tensor, int]:
    """Per input channel of a consumer weight: (number of zero rows ``[I]``, rows per channel)."""
    z = zero_rows(w)
    if z.dim() == 3:
        return z.sum(dim=(0, 2)), z.shape[0] * z.shape[2]
    return z.sum(dim=0), z.shape[0]


def keep_floor(channels: int, min_keep: int = 1, min_keep_fraction: float = 0.0) -> int:
    """Fewest filters a layer of ``channels`` may keep: ``max(min_keep, ceil(fraction * channels))``."""
    import math

    return min(channels, max(min_keep, math.ceil(min_keep_fraction * channels - 1e-9)))


def group_statistics(weights: dict[str, Tensor], group: Group) -> tuple[Tensor, Tensor]:
    """``(s_l, s_next)`` per channel of ``group``: own zero-row fraction and outgoing one.

    Tied producers (residual add) pool their rows; ``s_next`` pools the rows of all consumers.
    """
    c = group.channels
    zeros = torch.zeros(c)
    rows = 0
    for p in group.producers:
        z = zero_rows(weights[p]).flatten(1)
        zeros += z.sum(dim=1).float().cpu()
        rows += z.shape[1]
    s_l = zeros / max(rows, 1)
    out_zeros = torch.zeros(c)
    out_rows = 0
    for cons in group.consumers:
        zr, per = input_zero_rows(weights[cons.target])
        zr = zr.float().cpu()
        block = zr[cons.slot.offset : cons.slot.offset + c * cons.slot.block].view(c, cons.slot.block)
        out_zeros += block.sum(dim=1)
        out_rows += per * cons.slot.block
    s_next = out_zeros / out_rows if out_rows else torch.zeros(c)
    return s_l, s_next


def removal_rule(
    s_l: Tensor, s_next: Tensor, tau1: float = TAU1, tau2: float = TAU2, tau3: float = TAU3
) -> Tensor:
    """Bool ``[C]``: True where filter i is removed by the paper's two conditions."""
    check_taus(tau1, tau2, tau3)
    return (s_l > tau1) | ((s_l > tau2) & (s_next > tau3))


def fc_rule(s_in: Tensor, s_out: Tensor) -> Tensor:
    """Bool ``[C]``: a neuron goes when all its incoming or all its outgoing weights are zero."""
    return (s_in >= 1.0) | (s_out >= 1.0)


def check_taus(tau1: float, tau2: float, tau3: float) -> None:
    for name, v in (("tau1", tau1), ("tau2", tau2), ("tau3", tau3)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if tau2 > tau1:
        raise ValueError(f"tau2 ({tau2}) must not exceed tau1 ({tau1})")


@dataclass
class SelectionResult:
    """Kept channel indices per layer and the statistics behind them (JSON via ``to_dict``)."""

    keep: dict[str, Tensor]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {n: len(k) for n, k in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        return {n: {**self.stats.get(n, {}), "kept": k.tolist()} for n, k in self.keep.items()}


def select_filters(
    model: nn.Module,
    layers: Sequence[str],
    graph: DependencyGraph | None = None,
    tau1: float = TAU1,
    tau2: float = TAU2,
    tau3: float = TAU3,
    min_keep: int = 1,
    align: int = 1,
    min_keep_fraction: float = 0.0,
    fold_bn: bool = True,
    floors: Mapping[str, int] | None = None,
) -> SelectionResult:
    """Select the filters to keep in each prunable layer of ``layers`` from ``model`` (Θ_L1^th).

    Conv producers use the τ rule, linear producers the all-zero rule. Non-prunable layers in
    ``layers`` (heads, the final classifier) are skipped. At least :func:`keep_floor` filters
    survive per layer (the least sparse ones), and at least ``floors[layer]`` where given (a floor
    relative to the original width, for a model pruned several times). ``align > 1`` rounds each kept count with
    :func:`align_keep`. Returns kept indices (sorted, int64) by layer name.
    """
    return select_filters_grid(
        model, layers, graph, [(tau1, tau2, tau3)], min_keep, align, min_keep_fraction, fold_bn, floors
    )[0]


def select_filters_grid(
    model: nn.Module,
    layers: Sequence[str],
    graph: DependencyGraph | None,
    taus: Sequence[tuple[float, float, float]],
    min_keep: int = 1,
    align: int = 1,
    min_keep_fraction: float = 0.0,
    fold_bn: bool = True,
    floors: Mapping[str, int] | None = None,
) -> list[SelectionResult]:
    """:func:`select_filters` for every (τ1, τ2, τ3) in ``taus`` (results in the same order).

    The zero-row statistics depend on the model only, so they are computed once for all triples
    (what the budget search needs: many τ triples per thresholded model).
    """
    for t in taus:
        check_taus(*t)
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    if not 0.0 <= min_keep_fraction <= 1.0:
        raise ValueError(f"min_keep_fraction must be in [0, 1], got {min_keep_fraction}")
    graph = graph or build_dependency_graph(model)
    weights = folded_weights(model, graph, fold_bn)
    results = [SelectionResult({}) for _ in taus]
    seen: set[str] = set()
    for name in layers:
        try:
            group = graph.group(name)
        except ValueError:
            raise ValueError(f"layer {name!r} is not a conv/linear layer of the model") from None
        if not group.prunable or group.name in seen:
            continue
        seen.add(group.name)
        s_l, s_next = group_statistics(weights, group)
        is_fc = all(isinstance(weights[p], Tensor) and weights[p].dim() == 2 for p in group.producers)
        norm = sum(weights[p].abs().flatten(1).sum(1).float().cpu() for p in group.producers)
        for (tau1, tau2, tau3), result in zip(taus, results):
            remove = fc_rule(s_l, s_next) if is_fc else removal_rule(s_l, s_next, tau1, tau2, tau3)
            keep_mask = ~remove
            by_tau = int(keep_mask.sum())
            floor = keep_floor(group.channels, min_keep, min_keep_fraction)
            floor = min(group.channels, max(floor, int((floors or {}).get(group.name, 0))))
            if by_tau < floor:
                # keep the least sparse filters (own sparsity, outgoing, then the largest folded L1 norm)
                order = sorted(
                    range(group.channels), key=lambda i: (float(s_l[i]), float(s_next[i]), -float(norm[i]), i)
                )
                keep_mask = torch.zeros(group.channels, dtype=torch.bool)
                keep_mask[order[:floor]] = True
            by_rule = int(keep_mask.sum())
            if align > 1:
                keep_mask = align_keep(keep_mask, s_l, align)
            kept = keep_mask.nonzero().flatten().to(torch.long)
            result.keep[group.name] = kept
            result.stats[group.name] = {
                "filters": group.channels,
                "kept_by_rule": by_tau,
                "kept_after_floor": by_rule,
                "floor": floor,
                "kept": len(kept),
                "rule": "fc" if is_fc else "tau",
                "mean_filter_sparsity": float(s_l.mean()),
                "mean_outgoing_sparsity": float(s_next.mean()),
                # per filter, for the zero-row histogram of the phase report
                "filter_sparsity": [round(float(v), 4) for v in s_l],
                "outgoing_sparsity": [round(float(v), 4) for v in s_next],
            }
    return results


def tau_grid(values: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> list[tuple[float, float, float]]:
    """All (τ1, τ2, τ3) with each τ in ``values`` ⊂ [0.5, 1) and τ2 < τ1."""
    for v in values:
        if not 0.5 <= v < 1.0:
            raise ValueError(f"τ grid values must be in [0.5, 1), got {v}")
    vs = sorted(set(values))
    return [(t1, t2, t3) for t1, t2, t3 in itertools.product(vs, vs, vs) if t2 < t1]


def search_tau(
    sparse: nn.Module,
    thresholded: nn.Module,
    layers: Sequence[str],
    eval_fn: Callable[[nn.Module], float],
    grid: Sequence[tuple[float, float, float]] | None = None,
    eps: float = 1.0,
    reference_metric: float | None = None,
    retrain_fn: Callable[[nn.Module], Any] | None = None,
    min_keep: int = 1,
    align: int = 1,
    example: Tensor | None = None,
    min_keep_fraction: float = 0.0,
) -> dict[str, Any]:
    """Grid search over (τ1, τ2, τ3): prune Θ_L1 with each selection and evaluate.

    Distinct selections are pruned and evaluated once (many τ triples select the same filters).
    ``retrain_fn(model)`` (optional) fine-tunes each candidate in place before evaluation. The
    best triple is the one with the fewest parameters whose metric stays within ``eps`` points of
    ``reference_metric`` (default: ``eval_fn(sparse)``); if none does, the most accurate one.
    Returns ``{"best": row, "rows": [...]}`` with one JSON row per triple. ``example``: an input
    for tracing modules that are not prunekit models.
    """
    from prunekit.models import count_params
    from prunekit.prune.surgery import prune_channels

    graph = build_dependency_graph(sparse, example)
    ref = float(eval_fn(sparse)) if reference_metric is None else float(reference_metric)
    rows: list[dict[str, Any]] = []
    done: dict[tuple, tuple[int, float]] = {}
    for t1, t2, t3 in grid or tau_grid():
        sel = select_filters(
            thresholded, layers, graph, t1, t2, t3, min_keep=min_keep, align=align,
            min_keep_fraction=min_keep_fraction,
        )  # fmt: skip
        key = tuple((n, tuple(k.tolist())) for n, k in sorted(sel.keep.items()))
        if key not in done:
            pruned = prune_channels(sparse, sel.keep, graph)
            if retrain_fn is not None:
                retrain_fn(pruned)
            done[key] = (count_params(pruned), float(eval_fn(pruned)))
            log.info("τ=(%.2f, %.2f, %.2f): %d params, metric %.4f", t1, t2, t3, *done[key])
        params, metric = done[key]
        rows.append(
            {"tau1": t1, "tau2": t2, "tau3": t3, "params": params, "metric": metric, "filters": sel.counts()}
        )
    ok = [r for r in rows if r["metric"] >= ref - eps * 0.01]
    best = min(ok, key=lambda r: (r["params"], -r["metric"])) if ok else max(rows, key=lambda r: r["metric"])
    return {"reference_metric": ref, "eps": eps, "best": best, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Channel alignment: round each layer's kept-filter count to a multiple of N.
#
# Odd channel counts (the paper's 331, 181, 107...) miss the vectorised and tensor-core code paths of
# GPU and CPU kernels, so a model with fewer multiply-adds can run slower than the original. After
# the paper's selection rule has chosen which filters to remove, alignment moves the count of a layer
# to the **nearest** admissible width (ties go up), changing as few filters as possible:
#
# - admissible widths are the multiples of N in ``[N, original]`` plus the original width itself
#   (a layer that is not pruned at all is always fine);
# - when the count goes up, the least sparse of the removed filters come back; when it goes down,
#   the most sparse of the kept filters go, so the kept set is always the least sparse ones that the
#   selection's own choice allows;
# - a layer whose original width is below N, or whose count already is admissible, keeps its mask
#   as it is; ``multiple=1`` is the paper's method unchanged.
#
# Nearest rather than always-up keeps the parameter count close to the paper's; "never below N"
# keeps every layer alive (a layer pruned to zero filters would disconnect the network).


def aligned_count(kept: int, original: int, multiple: int) -> int:
    """The admissible filter count nearest to ``kept`` (ties up), per the alignment rule above."""
    if multiple < 1:
        raise ValueError(f"alignment multiple must be >= 1, got {multiple}")
    if not 0 <= kept <= original:
        raise ValueError(f"kept filter count {kept} outside 0..{original}")
    if multiple == 1 or original < multiple:
        return kept
    if kept == original or (kept >= multiple and kept % multiple == 0):
        return kept
    down = (kept // multiple) * multiple
    up = down + multiple
    choices = [c for c in (down, up) if multiple <= c <= original]
    if original % multiple:  # the unpruned width is admissible even when not a multiple
        choices.append(original)
    # nearest; on a tie the larger count (more filters kept is the safer error for accuracy)
    return min(choices, key=lambda c: (abs(c - kept), -c))


def align_keep(keep_mask: torch.Tensor, filter_sparsity: torch.Tensor, multiple: int) -> torch.Tensor:
    """Return a new boolean keep mask whose count is :func:`aligned_count` of the input's.

    ``keep_mask`` [C_out] bool: True = the selection keeps filter i. ``filter_sparsity`` [C_out]:
    the filter's sparsity score (fraction of zero rows; higher = more removable). Filters whose
    status changes are picked by that score, ties broken by index so the result is deterministic.
    The input tensors are not modified.
    """
    if keep_mask.dim() != 1 or filter_sparsity.shape != keep_mask.shape:
        raise ValueError(
            f"keep_mask and filter_sparsity must be 1-D of the same length, got "
            f"{tuple(keep_mask.shape)} and {tuple(filter_sparsity.shape)}"
        )
    keep = keep_mask.detach().to(torch.bool).cpu().clone()
    n = keep.numel()
    kept = int(keep.sum())
    target = aligned_count(kept, n, multiple)
    if target == kept:
        return keep.to(keep_mask.device)
    score = filter_sparsity.detach().to(torch.float64).cpu()
    index = torch.arange(n, dtype=torch.float64)
    if target > kept:
        # bring back the least sparse removed filters
        cand = (~keep).nonzero().flatten()
        order = _lexsort(score[cand], index[cand])
        keep[cand[order[: target - kept]]] = True
    else:
        # drop the most sparse kept filters (ties: the later index goes first)
        cand = keep.nonzero().flatten()
        order = _lexsort(-score[cand], -index[cand])
        keep[cand[order[: kept - target]]] = False
    return keep.to(keep_mask.device)


def _lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``primary`` then ``secondary`` (both ascending)."""
    order = torch.argsort(secondary, stable=True)
    return order[torch.argsort(primary[order], stable=True)]


def align_counts(counts: dict[str, int], original: dict[str, int], multiple: int) -> dict[str, int]:
    """Aligned kept-filter counts per layer (for reports and what-if tables; no masks needed).

    Layers missing from ``original`` are taken as unpruned reference (their count is their width).
    """
    return {name: aligned_count(c, original.get(name, c), multiple) for name, c in counts.items()}
