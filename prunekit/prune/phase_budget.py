"""A cost budget over the phases of a post-training run, and the search of a phase under it.

With a budget (``target_flops`` / ``target_latency``: a fraction of the ORIGINAL model's MACs or
estimated latency) steps 2 and 3 are searched together instead of by ε2: every distinct selection
over ``k_range`` x (the configured τ triple + the τ grid from ``budget_taus``) is priced from its
channel counts (no evaluation), and among those within the phase's budget the one whose model
*pruned from Θ_L1, before retraining* scores best is kept (the thresholded model only guides the
selection, as in the paper, so it is not what is scored). Candidates are scored least pruned first,
at most ``budget_max_evals`` of them, stopping early at one that matches Θ_L1's own metric.
A global budget is split over the phases by the layers each one prunes: every phase must bring
the cost of its own layers (:func:`prunekit.prune.budget.set_caps`) down to the same fraction of
their original cost, reached in equal steps over the rounds (two rounds at 0.4: 0.7 of each set's
cost after round one, 0.4 after round two), except the last round's phase with the largest
original cost, which enforces the global target on the whole model given every other layer's
current cost, so it takes up any other phase's overshoot or shortfall (later phases only cut). Caps on
each set's own cost, not on the running total, because the sets are coupled: cutting conv5_3
shrinks fc6's MACs, and a running-total target once left the FC phase (the last with cost in round
one) the whole conv reduction to do, which it cannot (measured, CIFAR-10 VGG16 at 0.38: cheapest
FC candidate 0.457). A phase that
cannot reach its target within ``budget_eps`` goes on with its cheapest candidate, logs a warning
and records ``budget_met: false`` with the ratio it reached; ``summary.json`` says whether the
final model meets the budget. Without a budget the paper's method runs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.phases import Phase, ResolvedPhase, resolve
from prunekit.prune.selection import tau_grid
from prunekit.prune.selectors import TauRule
from prunekit.prune.surgery import prune_channels

if TYPE_CHECKING:
    from prunekit.models.config import ArchConfig
    from prunekit.prune.profile import LatencyTable

log = logging.getLogger(__name__)


def arch_config(model: nn.Module, why: str) -> ArchConfig:
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None:
        raise ValueError(
            f"{why} needs a prunekit model (one with prunekit_config), got {type(model).__name__}"
        )
    return cfg


def load_table_for(hp: PruneConfig, model: nn.Module) -> LatencyTable | None:
    """The latency table ``hp`` names for ``model`` (the ORIGINAL model), or None without one.

    ``latency_key`` picks a table of a multi-table file explicitly; otherwise the key is made by
    :func:`prunekit.prune.profile.table_key` from the model and ``latency_backend/device/
    precision/batch``; a file holding a single table uses that one (e.g. measured on the deploy
    device, pruning elsewhere). Anything else is an error listing the keys the file has.
    """
    if not hp.latency_table:
        return None
    from prunekit.prune.profile import list_latency_tables, load_latency_table, table_key

    path = hp.latency_table
    if hp.latency_key:
        return load_latency_table(path, hp.latency_key)
    keys = list_latency_tables(path)
    key: str | None = None
    try:
        cfg = arch_config(model, "a latency table key")
        key = table_key(cfg, hp.latency_backend, hp.latency_device, hp.latency_precision, hp.latency_batch)
    except ValueError as e:
        log.debug("no latency table key for this model/device: %s", e)
    if key is not None and key in keys:
        return load_latency_table(path, key)
    if len(keys) == 1:
        log.info("%s: using its only latency table %r", path, keys[0])
        return load_latency_table(path, keys[0])
    raise ValueError(
        f"{path}: holds {len(keys)} latency tables and none has the key {key!r}; "
        f"choose one with latency_key (--latency-key): {sorted(keys)}"
    )


@dataclass
class BudgetPlan:
    """A global budget resolved against the original model: its cost and each phase's target."""

    kind: str
    target: float
    eps: float
    original_cost: float
    weights: list[float]  # each phase's layer set's original cost (0: the phase prunes nothing)
    targets: list[float]  # each phase's cap on its own set, a fraction of the set's original cost
    layers: list[list[str]]  # each phase's layer set (a later round's phase: its first-round set)
    final_index: int  # the phase that enforces the global target on the whole model
    table: LatencyTable | None

    def cost(
        self, model: nn.Module, channels: dict[str, int] | None = None, layers: Sequence[str] | None = None
    ) -> float:
        from prunekit.prune.budget import channels_cost_fn

        cfg = arch_config(model, "a budget")
        return channels_cost_fn(cfg, self.kind, self.table, layers)(channels or {})

    def phase_target(self, index: int, model: nn.Module) -> float:
        """Cap of phase ``index`` on its own set, as a fraction of the set's original cost. The
        enforcing phase gets what the global target leaves after every other layer's current cost."""
        if index != self.final_index:
            return self.targets[index]
        others = self.cost(model) - self.cost(model, layers=self.layers[index])
        allowed = (self.target * self.original_cost - others) / self.weights[index]
        return float(min(1.0, max(allowed, 1e-6)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "eps": self.eps,
            "original_cost": self.original_cost,
            "phase_weights": self.weights,
            "phase_targets": self.targets,
            "phase_targets_of": "each phase's own layers (phase_layers), as a fraction of their original cost",
            "phase_layers": self.layers,
            "enforcing_phase": self.final_index,
        }


def budget_plan(
    hp: PruneConfig, original: nn.Module, phases: Sequence[Phase], table: LatencyTable | None
) -> BudgetPlan | None:
    budget = hp.budget
    if budget is None:
        return None
    from prunekit.prune.budget import owned_layers, phase_cost_weights, set_caps
    from prunekit.prune.cost import config_macs
    from prunekit.prune.profile import layer_latency_estimates

    kind, target = budget
    cfg = arch_config(original, f"a {kind} budget")
    if kind == "macs":
        per_layer = {n: float(v) for n, v in config_macs(cfg).items()}
    else:
        assert table is not None  # PruneConfig checks target_latency comes with latency_table
        per_layer = layer_latency_estimates(None, table, cfg)
    graph = build_dependency_graph(original)
    per_round = len(phases) // hp.rounds
    already: set[str] = set()
    sets: list[list[str]] = []
    for p in phases[:per_round]:
        rp = resolve(p, graph, already)
        already |= set(rp.prune_layers)
        sets.append(rp.l1_layers if rp.prune_layers else [])
    owned = owned_layers(sets)
    weights = phase_cost_weights(per_layer, owned)
    total = float(sum(per_layer.values()))
    if sum(weights) <= 0:
        raise ValueError(f"a {kind} budget needs phases that prune layers with a cost; these prune none")
    caps = set_caps(target, total, sum(weights), hp.rounds)
    # The enforcing phase is the last round's biggest lever (largest original cost), not simply the
    # last phase with cost: a last FC phase cannot make up for convolutions left too wide, and
    # capping every set at the same fraction over-cuts the convolutions when the FC layers shrink
    # far below their share (measured, CIFAR-10 VGG16 at 0.38: the FC set fell to 0.064 of its cost
    # in round one and the convs were still held to 0.38 of theirs, 0.289 in all, val 76.8).
    last = range(len(phases) - per_round, len(phases))
    final = max(last, key=lambda i: (weights[i % per_round], -i))
    plan = BudgetPlan(
        kind, target, hp.budget_eps, total, [weights[i % per_round] for i in range(len(phases))],
        [caps[i // per_round] for i in range(len(phases))], [owned[i % per_round] for i in range(len(phases))],
        final, table,
    )  # fmt: skip
    log.info(
        "%s budget %.3f x original (%.4g): each phase's layers capped at %s of their cost; %s enforces %.3f",
        kind, target, plan.original_cost,
        ", ".join(f"{p.name} {t:.3f}" for p, t in zip(phases, plan.targets)), phases[final].name, target,
    )  # fmt: skip
    return plan


def budget_search(
    sparse: nn.Module,
    rp: ResolvedPhase,
    graph: DependencyGraph,
    hp: PruneConfig,
    plan: BudgetPlan,
    score: Callable[[nn.Module], float],
    index: int,
    phase_name: str,
    sparse_metric: float,
    make_threshold: Callable[[float], nn.Module],
) -> tuple[nn.Module, dict[str, Any]]:
    """Steps 2 + 3 under a budget (module docstring): the chosen Θ_L1^th and its record.
    ``score`` is the run's metric of a model after BN re-estimation."""
    from prunekit.prune.budget import SelectionCandidate, search_budget, selection_candidates

    own = (hp.tau1, hp.tau2, hp.tau3)
    taus = [own] + [t for t in tau_grid(hp.budget_taus) if t != own]
    cands, std = selection_candidates(
        sparse,
        rp.l1_layers,
        rp.prune_layers,
        graph,
        hp.k_range,
        taus,
        TauRule.from_config(hp),
        make_threshold,
    )
    prices: dict[tuple, float] = {}

    own = plan.layers[index]
    set_cost = plan.weights[index]
    if set_cost <= 0:  # a phase whose layers carry no cost: the budget does not constrain it
        own, set_cost = None, plan.original_cost

    def cost_fn(c: SelectionCandidate) -> float:
        key = tuple(sorted(c.counts.items()))
        if key not in prices:
            prices[key] = plan.cost(sparse, c.counts, own)
        return prices[key]

    def eval_fn(c: SelectionCandidate) -> float:
        return score(
            prune_channels(sparse, c.keep, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule)
        )

    target = plan.phase_target(index, sparse) if own is not None else 1.0
    res = search_budget(
        cands, cost_fn, eval_fn, target, set_cost, plan.eps, plan.kind,
        max_evals=hp.budget_max_evals, stop_at=sparse_metric, describe=SelectionCandidate.label,
    )  # fmt: skip
    chosen: SelectionCandidate = res.best
    info = {
        **res.to_dict(),
        "phase": phase_name,
        "phase_target": target,
        "phase_target_of": "this phase's layers"
        if own is not None
        else "the whole model (no cost in its layers)",
        "global_target": plan.target,
        "shortfall": max(0.0, float(res.ratio or 0.0) - target),
        "scored": "model pruned from the sparse model, before retraining",
    }
    if res.met:
        log.info("phase %s: %s", phase_name, res.message)
    else:
        log.warning(
            "phase %s: %s; continuing with the cheapest candidate (%.3f x original, phase target %.3f)",
            phase_name, res.message, res.ratio, target,
        )  # fmt: skip
    thresholded = make_threshold(chosen.k)
    th = {
        "k": chosen.k,
        "t": chosen.k * std,
        "std": std,
        "metric": None,
        "admissible": None,
        "trials": [],
        "tau": list(chosen.taus),
        "search": "budget",
        "budget": info,
    }
    return thresholded, th


def final_budget(plan: BudgetPlan, model: nn.Module) -> dict[str, Any]:
    cost = plan.cost(model)
    ratio = cost / plan.original_cost
    met = ratio <= plan.target + plan.eps
    msg = (
        f"{plan.kind} budget {plan.target:.3f} x original {'met' if met else 'NOT met'}: the final model "
        f"costs {ratio:.3f} x original (eps {plan.eps:.3f})"
    )
    (log.info if met else log.warning)(msg)
    return {**plan.to_dict(), "final_cost": cost, "final_ratio": ratio, "met": met, "message": msg}
