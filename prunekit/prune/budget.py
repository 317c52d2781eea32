"""Cost budgets: the most accurate candidate whose MACs or latency fit ``target`` x the original's.

``--target-flops 0.4`` means "at most 40 % of the original multiply-adds"; ``--target-latency 0.5``
the same for the latency estimated from a measured table (:mod:`prunekit.prune.profile`). The search
knows nothing about how candidates are made (threshold k, τ1/τ2/τ3, alignment...): the pruning
method hands it three callables, so the same search serves any selection rule.

Costs are cheap (a meta-device MAC count or a table look-up), evaluations are not (a validation
pass), so every candidate is priced first and only those within budget are evaluated, the least
pruned first (they are the likeliest to be most accurate), up to ``max_evals``.

The second half serves the phase runner (:mod:`prunekit.prune.method`): the distinct selections a
phase can make over (k, τ1, τ2, τ3) (:func:`selection_candidates`) and how one global budget is
split into per-phase caps on each phase's own layers (:func:`phase_cost_weights`, :func:`set_caps`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from prunekit.models.config import ArchConfig
from prunekit.prune.cost import config_macs
from prunekit.prune.graph import DependencyGraph
from prunekit.prune.profile import LatencyTable, estimate_latency, layer_latency_estimates

if TYPE_CHECKING:
    from prunekit.prune.config import PruneConfig
    from prunekit.prune.phases import Phase
    from prunekit.prune.selectors import TauRule

__all__ = [
    "BudgetResult",
    "SelectionCandidate",
    "channels_cost_fn",
    "estimate_latency",
    "owned_layers",
    "param_grid",
    "phase_cost_weights",
    "search_budget",
    "selection_candidates",
    "set_caps",
]

log = logging.getLogger(__name__)


@dataclass
class BudgetResult:
    """Outcome of :func:`search_budget`.

    ``met``: some candidate costs at most ``(target + eps) x original``. ``best`` is the chosen
    candidate (the most accurate within budget; when unmet, the cheapest one, so the caller can
    still go on and say so). ``evaluated`` lists every candidate priced (JSON-safe rows).
    """

    met: bool
    target: float
    eps: float
    kind: str
    original_cost: float
    best: Any | None
    cost: float | None
    ratio: float | None
    metric: float | None
    message: str
    evaluated: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the candidate object itself is described by its label only)."""
        return {
            "met": self.met,
            "target": self.target,
            "eps": self.eps,
            "kind": self.kind,
            "original_cost": self.original_cost,
            "cost": self.cost,
            "ratio": self.ratio,
            "metric": self.metric,
            "message": self.message,
            "candidates": self.evaluated,
        }


def search_budget(
    candidates_fn: Callable[[], Iterable[Any]] | Iterable[Any],
    cost_fn: Callable[[Any], float],
    eval_fn: Callable[[Any], float],
    target: float,
    original_cost: float,
    eps: float = 0.01,
    kind: str = "macs",
    max_evals: int | None = None,
    stop_at: float | None = None,
    describe: Callable[[Any], str] = str,
    evaluate_fallback: bool = True,
) -> BudgetResult:
    """Pick the most accurate candidate with ``cost_fn(c) <= (target + eps) * original_cost``.

    ``eval_fn`` returns the validation metric (higher is better). Ties in the metric go to the
    cheaper candidate. ``stop_at``: stop evaluating once a candidate reaches this metric (e.g. the
    unpruned metric minus the allowed drop). ``eps`` is in units of the original cost (0.01 = one
    percent of it). If no candidate fits, the result has ``met=False``, the cheapest candidate as
    ``best`` (evaluated when ``evaluate_fallback``) and a message saying how close it came.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"budget target must be a fraction of the original in (0, 1], got {target}")
    if eps < 0:
        raise ValueError(f"budget tolerance eps must be >= 0, got {eps}")
    if original_cost <= 0:
        raise ValueError(f"original cost must be positive, got {original_cost}")
    cands = list(candidates_fn() if callable(candidates_fn) else candidates_fn)
    if not cands:
        raise ValueError("budget search got no candidates")
    priced = [(c, float(cost_fn(c))) for c in cands]
    rows = [
        {"label": describe(c), "cost": cost, "ratio": cost / original_cost, "metric": None}
        for c, cost in priced
    ]
    limit = (target + eps) * original_cost
    feasible = sorted(
        (i for i, (_, cost) in enumerate(priced) if cost <= limit), key=lambda i: (-priced[i][1], i)
    )
    if not feasible:
        i = min(range(len(priced)), key=lambda j: (priced[j][1], j))
        c, cost = priced[i]
        metric = float(eval_fn(c)) if evaluate_fallback else None
        rows[i]["metric"] = metric
        msg = (
            f"{kind} budget {target:.3f} x original cannot be met within eps={eps:.3f}: the cheapest of "
            f"{len(priced)} candidates ({rows[i]['label']}) costs {cost / original_cost:.3f} x original"
        )
        log.warning(msg)
        return BudgetResult(
            False, target, eps, kind, original_cost, c, cost, cost / original_cost, metric, msg, rows
        )
    if max_evals is not None:
        if max_evals < 1:
            raise ValueError(f"max_evals must be >= 1, got {max_evals}")
        feasible = feasible[:max_evals]
    best_i: int | None = None
    for i in feasible:
        c, cost = priced[i]
        metric = float(eval_fn(c))
        rows[i]["metric"] = metric
        log.info(
            "budget candidate %s: %.3f x original %s, metric %.4f",
            rows[i]["label"],
            rows[i]["ratio"],
            kind,
            metric,
        )
        if best_i is None or (metric, -cost) > (rows[best_i]["metric"], -priced[best_i][1]):
            best_i = i
        if stop_at is not None and metric >= stop_at:
            break
    assert best_i is not None
    c, cost = priced[best_i]
    ratio = cost / original_cost
    note = "" if ratio <= target else f" (over the target, within eps={eps:.3f})"
    msg = (
        f"{kind} budget {target:.3f} x original met: {rows[best_i]['label']} costs {ratio:.3f} x original"
        f"{note}, metric {rows[best_i]['metric']:.4f} (best of {sum(r['metric'] is not None for r in rows)} "
        f"evaluated, {len(priced)} priced)"
    )
    return BudgetResult(
        True, target, eps, kind, original_cost, c, cost, ratio, rows[best_i]["metric"], msg, rows
    )


def param_grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """All combinations of the given axes, e.g. ``param_grid(k=[1, 2], tau1=[0.8, 0.9])``."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


def channels_cost_fn(
    cfg: ArchConfig,
    kind: str = "macs",
    table: LatencyTable | None = None,
    layers: Sequence[str] | None = None,
) -> Callable[[dict[str, int]], float]:
    """A ``channels -> cost`` function for the architecture ``cfg`` (compose it into ``cost_fn``).

    ``kind="macs"``: MACs of the prunable layers; ``"latency"``: estimated ms from ``table``.
    ``layers`` restricts the sum to those layers (e.g. a phase's, for a per-phase budget);
    by default every prunable layer counts.
    """
    keep = None if layers is None else set(layers)

    def total(costs: dict[str, float] | dict[str, int]) -> float:
        return float(sum(v for n, v in costs.items() if keep is None or n in keep))

    if kind == "macs":
        return lambda channels: total(config_macs(cfg, channels))
    if kind == "latency":
        if table is None:
            raise ValueError("a latency budget needs a latency table (run `prunekit profile` first)")
        return lambda channels: total(layer_latency_estimates(channels, table, cfg))
    raise ValueError(f"unknown budget kind {kind!r}; expected 'macs' or 'latency'")


# ---------------------------------------------------------------------------------------------
# the phase runner's use: candidates from (k, τ1, τ2, τ3) and a global budget split over phases
# ---------------------------------------------------------------------------------------------


@dataclass
class SelectionCandidate:
    """One distinct filter selection of a phase and every (k, τ1, τ2, τ3) that produced it.

    ``k``/``taus`` are the first (smallest k, then grid order) setting that gave it; re-running
    the selection with them on ``apply_threshold(Θ_L1, k * std)`` reproduces ``keep`` exactly.
    """

    k: float
    taus: tuple[float, float, float]
    keep: dict[str, Tensor]
    counts: dict[str, int]
    settings: list[tuple[float, tuple[float, float, float]]] = field(default_factory=list)

    def label(self) -> str:
        t1, t2, t3 = self.taus
        more = f" (+{len(self.settings) - 1} equivalent)" if len(self.settings) > 1 else ""
        return f"k={self.k:g} tau=({t1:g},{t2:g},{t3:g}){more}"


def selection_candidates(
    sparse: nn.Module,
    l1_layers: Sequence[str],
    prune_layers: Sequence[str],
    graph: DependencyGraph,
    k_range: Sequence[float],
    taus: Sequence[tuple[float, float, float]],
    rule: TauRule,
    make_threshold: Callable[[float], nn.Module] | None = None,
) -> tuple[list[SelectionCandidate], float]:
    """Every distinct selection over ``k_range`` x ``taus`` on Θ_L1 (``sparse``); and the std.

    The threshold is ``make_threshold(k)`` (default: the paper's global ``k * std`` over
    ``l1_layers``); selection is ``rule`` (the τ rule as configured: floors, alignment, folded
    statistics) with each triple of ``taus`` on ``prune_layers``. Many settings select the same
    filters, so candidates are deduplicated: each is priced and evaluated once.
    """
    from prunekit.prune.threshold import apply_threshold, global_std

    ks = sorted({float(k) for k in k_range if k >= 0})
    if not ks or not taus:
        raise ValueError("budget search needs a non-empty k range and τ grid")
    std = global_std(sparse, l1_layers)
    found: dict[tuple, SelectionCandidate] = {}
    grid = [(float(t[0]), float(t[1]), float(t[2])) for t in taus]
    for k in ks:
        thresholded = make_threshold(k) if make_threshold else apply_threshold(sparse, l1_layers, k * std)
        sels = rule.select_grid(thresholded, prune_layers, graph, grid)
        for t3, sel in zip(grid, sels):
            key = tuple((n, tuple(v.tolist())) for n, v in sorted(sel.keep.items()))
            if key not in found:
                found[key] = SelectionCandidate(k, t3, dict(sel.keep), sel.counts())
            found[key].settings.append((k, t3))
        del thresholded
    return list(found.values()), std


def owned_layers(phase_layers: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each phase's layers without those an earlier phase already lists (a layer belongs to the
    first phase that lists it), so the sets partition the layers and their costs add up."""
    seen: set[str] = set()
    out = []
    for layers in phase_layers:
        own = [n for n in layers if n not in seen]
        seen.update(own)
        out.append(own)
    return out


def phase_cost_weights(
    layer_costs: Mapping[str, float], phase_layers: Sequence[Sequence[str]]
) -> list[float]:
    """The original cost each phase carries: the sum over its layers (``l1_layers``: the producers
    it prunes and the heads they feed), a layer listed by several phases counted in the first
    (:func:`owned_layers`). Pass an empty list for a phase that prunes nothing."""
    return [float(sum(layer_costs.get(n, 0.0) for n in own)) for own in owned_layers(phase_layers)]


def set_caps(target: float, total: float, in_sets: float, rounds: int = 1) -> list[float]:
    """Cap on every phase's own layer set after each round, as a fraction of the set's original cost.

    Costs outside every set (``total - in_sets``: layers no phase prunes) stay, so the sets must
    reach ``s = (target * total - fixed) / in_sets`` of their cost for the whole model to meet
    ``target``; the reduction ``1 - s`` is reached in equal steps over ``rounds``, so a second
    round is not left with nothing to do (or a first round with everything).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"budget target must be a fraction of the original in (0, 1], got {target}")
    if rounds < 1 or in_sets <= 0 or total < in_sets:
        raise ValueError(f"need rounds >= 1 and 0 < in_sets <= total, got {rounds}, {in_sets}, {total}")
    fixed = total - in_sets
    s = (target * total - fixed) / in_sets
    if s <= 0:
        raise ValueError(
            f"budget {target:.3f} cannot be met: the layers no phase prunes already cost "
            f"{fixed / total:.3f} x the original"
        )
    return [1.0 - (1.0 - s) * (r + 1) / rounds for r in range(rounds)]


def land_on_budget(
    model: nn.Module,
    keep: dict[str, Tensor],
    phases: Sequence[Phase],
    hp: PruneConfig,
    k: float,
    graph: DependencyGraph,
    original_channels: dict[str, int],
    budget: list[tuple[str, float, Any]],
    steps: int = 8,
) -> dict[str, Tensor]:
    """The cut of a point whose full selection would pass a budget, made only as deep as the budget.

    A budget stops pruning once met, but one point can remove far more than asked: the demo at
    λ 0.7 with a target of 0.3 went 0.374 -> 0.163 of the parameters in one point (AP50 97.3 ->
    88.4 at the end). Here the threshold is bisected in (0, k] for the lowest one whose selection
    still meets every target, so the point lands near it. A selection that does not reach the
    budget is returned as it is.
    """
    from prunekit.prune.selectors import select_keep
    from prunekit.prune.surgery import prune_channels

    if not keep or not budget:
        return keep

    def meets(sel: dict[str, Tensor]) -> bool:
        if not sel:
            return False
        new = prune_channels(model, sel, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule)
        return all(fn(new) <= target for _, target, fn in budget)

    if not meets(keep):
        return keep
    lo, hi, best = 0.0, k, keep
    for _ in range(steps):
        mid = (lo + hi) / 2
        sel = select_keep(model, phases, hp, mid, graph, original_channels)
        if meets(sel):
            best, hi = sel, mid
        else:
            lo = mid
    if best is not keep:
        log.info("budget: the point cuts at k %.3g instead of %.3g, as far as the budget asks", hi, k)
    return best
