"""The phase runner: the paper's multi-layer pruning (section 3), one phase after another.

For each phase: (1) sparsity induction with L1 on the phase's layers (by default a proximal L1 on
the BN scales of conv+BN layers and on the weights elsewhere), λ from a grid within ε1 of a λ = 0
control, every trial scored after its BN statistics are re-estimated (the running statistics lag a
fast-shrinking γ: BCCD SSD300, p1, shrink 1: val AP50 2.1 as trained, 91.0 re-estimated); (2) one global threshold k, the largest k within ε2 of Θ_L1 (BN recalibrated before it is
scored); (3) filter selection by zero-row statistics of Θ_L1^th (τ1, τ2, τ3) on BN-folded weights,
never below ``min_keep_fraction`` of a layer; (4) surgery from Θ_L1 into a dense, smaller model,
the removed channels' constant outputs folded into their consumers' biases, checked against
``eps_pruned`` (a smaller k is tried while it is out of tolerance); (5) retraining without L1.
``sparsity_target="weights"``, ``proximal=False``, ``threshold_scale="raw"``, ``fold_stats=False``,
``min_keep_fraction=0`` and ``align=1`` give the paper's steps exactly. Every step leaves a checkpoint ``<out>/pN/{sparse,thresholded,pruned,
retrained}.pt`` and a per-layer table ``<out>/pN/table_<step>.{json,md}``; ``resume=True`` picks up
after the last completed step. ``<out>/summary.{json,md}`` holds the whole run.

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

Training, evaluation and BN recalibration go through one :class:`prunekit.prune.trainer.Trainer`
built by the caller, so the runner knows no data; its ``evaluate`` returns the validation metric in
[0, 1] or a metrics dict (reduced with :func:`prunekit.evaluate.primary_metric`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.phases import Phase, ResolvedPhase, resolve, resolve_phases
from prunekit.prune.report import layer_table, model_stats, render_markdown
from prunekit.prune.selection import select_filters, tau_grid
from prunekit.prune.sparsity import (
    POINT,
    Sparsity,
    induce_sparsity,
    se_text,
    sparsity_targets,
    weight_sparsity,
)
from prunekit.prune.surgery import keep_detection_layers, prune_channels
from prunekit.prune.threshold import (
    apply_threshold,
    global_std,
    search_threshold,
    threshold_model,
)
from prunekit.prune.trainer import Trainer, standard_error

if TYPE_CHECKING:
    from prunekit.models.config import ArchConfig
    from prunekit.prune.profile import LatencyTable

log = logging.getLogger(__name__)
STEPS = ("sparse", "thresholded", "pruned", "retrained")


class PhaseToleranceError(RuntimeError):
    """Raised under ``strict`` when a phase's pruned model loses more than ``eps_pruned``."""


class ToleranceFloorError(ValueError):
    """The model scores so low that a tolerance reaches below zero (every check would pass)."""


class _Runner:
    """State of one run (the trainer, metrics cached, files written on rank 0 only)."""

    def __init__(self, trainer: Trainer, hp: PruneConfig, out: Path):
        self.trainer, self.hp, self.out = trainer, hp, out
        self.main = _is_main_process()
        self.original_channels: dict[str, int] = {}
        self.table: LatencyTable | None = None
        self.budget: _BudgetPlan | None = None
        self.val_items: int | None = None

    def train(self, model: nn.Module, sparsity: Any, stage: str, tag: str) -> None:
        epochs = self.hp.epochs_sparsity if stage == "sparsity" else self.hp.epochs_retrain
        torch.manual_seed(self.hp.seed)
        t0 = time.perf_counter()
        self.trainer.train(model, epochs, sparsity, tag)
        log.info("%s: trained %s in %.1f s", tag, stage, time.perf_counter() - t0)

    def evaluate(self, model: nn.Module) -> tuple[float, dict[str, Any] | None]:
        res = self.trainer.evaluate(model)
        if isinstance(res, Mapping):
            from prunekit.evaluate import primary_metric

            n = res.get("num_images")
            if isinstance(n, int):
                self.val_items = n
            return float(primary_metric(dict(res))), _json_safe(res)
        return float(res), None

    def metric(self, model: nn.Module) -> float:
        return self.evaluate(model)[0]

    def recalibrated_metric(self, model: nn.Module) -> float:
        if self.hp.recalibrate_bn:
            self.trainer.recalibrate(model)
        return self.metric(model)

    def se(self, metric: float) -> float | None:
        return standard_error(metric, self.val_items)

    def save(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        if self.main:
            from prunekit.models import save

            save(model, path, extra=_json_safe({**extra, "original_channels": self.original_channels}))

    def write_json(self, path: Path, obj: Any) -> None:
        if self.main:
            atomic_write_json(path, _json_safe(obj))


def _is_main_process() -> bool:
    try:
        from prunekit.distributed import is_main_process
    except ImportError:  # pragma: no cover - distributed module always ships with prunekit
        return True
    return is_main_process()


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _load(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from prunekit.models.io import load_with_extra

    return load_with_extra(path)


def _layer_weights(
    model: nn.Module, rp: ResolvedPhase, hp: PruneConfig, table: LatencyTable | None = None
) -> dict[str, float] | None:
    if hp.layer_weights:
        return {n: float(w) for n, w in hp.layer_weights.items() if n in rp.l1_layers}
    if hp.cost_aware is None:
        return None
    from prunekit.prune.layer_costs import l1_layer_weights

    if hp.cost_aware == "latency" and table is None:
        raise ValueError("cost_aware='latency' needs latency_table (a `prunekit profile` JSON file)")
    return l1_layer_weights(
        model,
        rp.l1_layers,
        kind=hp.cost_aware,
        table=table if hp.cost_aware == "latency" else None,
        alpha=hp.cost_alpha,
        per=hp.cost_per,
    )


def _arch_config(model: nn.Module, why: str) -> ArchConfig:
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
        cfg = _arch_config(model, "a latency table key")
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
class _BudgetPlan:
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

        cfg = _arch_config(model, "a budget")
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


def _budget_plan(
    hp: PruneConfig, original: nn.Module, phases: Sequence[Phase], table: LatencyTable | None
) -> _BudgetPlan | None:
    budget = hp.budget
    if budget is None:
        return None
    from prunekit.prune.budget import owned_layers, phase_cost_weights, set_caps
    from prunekit.prune.cost import config_macs
    from prunekit.prune.profile import layer_latency_estimates

    kind, target = budget
    cfg = _arch_config(original, f"a {kind} budget")
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
    plan = _BudgetPlan(
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


def _budget_search(
    sparse: nn.Module,
    rp: ResolvedPhase,
    graph: DependencyGraph,
    runner: _Runner,
    index: int,
    phase_name: str,
    sparse_metric: float,
    make_threshold: Callable[[float], nn.Module],
    fold: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """Steps 2 + 3 under a budget (module docstring): the chosen Θ_L1^th and its record."""
    from prunekit.prune.budget import SelectionCandidate, search_budget, selection_candidates

    hp, plan = runner.hp, runner.budget
    assert plan is not None
    own = (hp.tau1, hp.tau2, hp.tau3)
    taus = [own] + [t for t in tau_grid(hp.budget_taus) if t != own]
    cands, std = selection_candidates(
        sparse, rp.l1_layers, rp.prune_layers, graph, hp.k_range, taus, hp.min_keep, hp.align,
        hp.min_keep_fraction, fold, make_threshold,
    )  # fmt: skip
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
        return runner.recalibrated_metric(
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


def _write_table(
    stem: Path,
    rows: Sequence[Mapping[str, Any]],
    totals: Mapping[str, Mapping[str, Any]],
    title: str,
    extra: Mapping[str, Any],
) -> None:
    """``write_table`` plus the cost columns' markdown (the JSON carries them in the rows)."""
    from prunekit.prune.layer_costs import render_cost_markdown

    atomic_write_json(
        stem.with_suffix(".json"), {"layers": list(rows), "totals": dict(totals), **dict(extra)}
    )
    md = render_markdown(rows, totals, title)
    cost_md = render_cost_markdown(list(rows))
    atomic_write_text(stem.with_suffix(".md"), md + ("\n" + cost_md if cost_md else ""))


def cost_rows(
    model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> list[dict[str, Any]]:
    """``layer_table(model, original)`` with the cost columns of
    :func:`prunekit.prune.layer_costs.cost_columns` merged in (MACs shares; latency with a ``table``).
    Models without a prunekit config get the plain layer table."""
    rows = layer_table(model, original=original)
    if hasattr(model, "prunekit_config") and hasattr(original, "prunekit_config"):
        from prunekit.prune.layer_costs import add_cost_columns

        add_cost_columns(rows, model, original, table)
    return rows


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def threshold_settings(hp: PruneConfig) -> tuple[str | None, bool]:
    """``(scale, fold)``: the unit k is read in (None: the paper's raw pooled std) and whether
    thresholds and statistics are read on BN-folded weights."""
    scale = None if hp.threshold_scale == "raw" else hp.threshold_scale
    return scale, hp.fold_stats and scale is not None


def threshold_at(
    model: nn.Module, layers: Sequence[str], k: float, graph: DependencyGraph, hp: PruneConfig
) -> nn.Module:
    """Θ^th: a copy of ``model`` with the weights of ``layers`` below ``k`` units zeroed, in the units
    ``hp`` names (one global threshold over the set)."""
    scale, fold = threshold_settings(hp)
    if scale is None:
        return apply_threshold(model, layers, k * global_std(model, layers))
    return threshold_model(model, layers, k, graph, scale, fold)


def statistic_layers(rp: ResolvedPhase, graph: DependencyGraph) -> list[str]:
    """The phase's L1 set plus every consumer of its pruned layers outside it (conv5_3's fc6):
    thresholded too, so that the outgoing statistic s(W_{l+1}[:, i]) of the last layer exists."""
    out = list(rp.l1_layers)
    for name in rp.prune_layers:
        for c in graph.group(name).consumers:
            cname = graph.name_of(c.target)
            if cname not in out:
                out.append(cname)
    return out


def run_phase(
    model: nn.Module,
    phase: Phase,
    index: int,
    runner: _Runner,
    original: nn.Module,
    already_pruned: set[str],
    before_metric: float,
    resume: bool,
) -> tuple[nn.Module, dict[str, Any], float]:
    """One phase; returns (retrained model, phase record, its metric)."""
    hp = runner.hp
    pdir = runner.out / f"p{index + 1}"
    graph = build_dependency_graph(model)
    rp = resolve(phase, graph, already_pruned)
    record: dict[str, Any] = {"phase": phase.name, "dir": pdir.name, **rp.to_dict(), "before": before_metric}
    if not rp.prune_layers:
        log.info("phase %s: nothing to prune (%s)", phase.name, rp.skipped or "no layers")
        record["skipped"] = True
        return model, record, before_metric
    device = _device_of(model)
    stat_layers = statistic_layers(rp, graph)

    def table(step: str, m: nn.Module, metric: float, extra: dict[str, Any] | None = None) -> None:
        if not runner.main:
            return
        rows = cost_rows(m, original, runner.table)
        if step in ("sparse", "thresholded"):
            zeros = weight_sparsity(m, rp.l1_layers)
            for r in rows:
                if r["layer"] in zeros:
                    r["zero_weights_pct"] = 100.0 * zeros[r["layer"]]
        totals = {
            "original": {**model_stats(original), "metric": None},
            step: {**model_stats(m), "metric": metric},
        }
        _write_table(
            pdir / f"table_{step}", rows, totals, f"{phase.name}: {step}", {"step": step, **(extra or {})}
        )

    # 1. sparsity induction
    path = pdir / "sparse.pt"
    if resume and path.is_file():
        sparse, extra = _load(path)
        sparse = sparse.to(device)
        sp = extra["sparsity"]
        log.info("phase %s: resumed %s", phase.name, path)
    else:
        weights = _layer_weights(model, rp, hp, runner.table)
        targets = sparsity_targets(model, rp.l1_layers, hp.sparsity_target, weights, hp.l1_normalise, graph)
        lr_sum = float(runner.trainer.lr_sum(hp.epochs_sparsity))
        lams = list(hp.lam_grid) if hp.lam_grid else [x / max(lr_sum, 1e-12) for x in hp.shrink_grid]

        def train_sparse(m: nn.Module, reg: Any) -> None:
            runner.train(m, reg, "sparsity", f"{phase.name}/sparsity")

        res = induce_sparsity(
            model, rp.l1_layers, lams, train_sparse, runner.recalibrated_metric, hp.eps1, before_metric, weights,
            stop_early=hp.stop_early, make_regularizer=lambda m, lam: Sparsity(lam, targets, hp.proximal),
            reference=hp.eps1_reference, strict=hp.strict, se=runner.se(before_metric), name=phase.name,
            search=hp.lam_search,
        )  # fmt: skip
        for t in res.trials:
            t["shrink"] = t["lam"] * lr_sum
        # the layout a resumed run loads it in: channels_last and contiguous kernels round differently,
        # and every later choice (k, back-off) must be the same after a resume
        sparse = res.model.to(memory_format=torch.contiguous_format)
        sp = {**res.to_dict(), "layer_weights": weights, "lr_sum": lr_sum, "target": hp.sparsity_target,
              "regularised": len(targets), "se": runner.se(res.metric)}  # fmt: skip
        runner.save(
            sparse, path, {"step": "sparse", "phase": phase.name, "sparsity": sp, "metric": res.metric}
        )
        table("sparse", sparse, res.metric, {"sparsity": sp})
    record["sparsity"] = sp

    # 2. global threshold (with a budget: threshold and selection searched together)
    path = pdir / "thresholded.pt"
    scale, fold = threshold_settings(hp)
    recal = runner.trainer.recalibrate if hp.recalibrate_bn else None

    def make_threshold(k: float) -> nn.Module:
        return threshold_at(sparse, stat_layers, k, graph, hp)

    if resume and path.is_file():
        thresholded, extra = _load(path)
        th = extra["threshold"]
    else:
        if runner.budget is not None:
            thresholded, th = _budget_search(
                sparse, rp, graph, runner, index, phase.name, sp["metric"], make_threshold, fold
            )
        else:
            tres = search_threshold(
                sparse, stat_layers, hp.k_range, runner.metric, hp.eps2, sp["metric"], hp.threshold_search,
                graph=graph, scale=scale, fold_bn=fold, recalibrate=recal,
            )  # fmt: skip
            thresholded, th = tres.model, tres.to_dict()
        runner.save(thresholded, path, {"step": "thresholded", "phase": phase.name, "threshold": th})
        table(
            "thresholded",
            thresholded,
            th["metric"] if th["metric"] is not None else float("nan"),
            {"threshold": th},
        )
    record["threshold"] = th
    if "budget" in th:
        record["budget"] = th["budget"]
        record["budget_met"] = bool(th["budget"]["met"])

    # 3 + 4. selection on Θ_L1^th, surgery on Θ_L1 (backing off to smaller k while out of tolerance)
    path = pdir / "pruned.pt"
    if resume and path.is_file():
        pruned, extra = _load(path)
        pruned = pruned.to(device)
        sel, pruned_metric = extra["selection"], extra["metric"]
        record["selection_k"] = extra.get("selection_k", th.get("k"))
    else:
        tau1, tau2, tau3 = th.get("tau") or (hp.tau1, hp.tau2, hp.tau3)
        scored = (th.get("budget") or {}).get("metric")  # the budget search scored this very model
        floor = sp["metric"] - hp.eps_pruned * POINT
        ks = [th["k"]] + sorted((k for k in hp.k_range if k < th["k"]), reverse=True)
        if scored is not None or th["k"] == 0:
            ks = ks[:1]
        attempts: list[dict[str, Any]] = []
        for k in ks:
            th_model = thresholded if k == th["k"] else make_threshold(k)
            result = select_filters(
                th_model, rp.prune_layers, graph, tau1, tau2, tau3, min_keep=hp.min_keep, align=hp.align,
                min_keep_fraction=hp.min_keep_fraction, fold_bn=fold,
            )  # fmt: skip
            pruned = prune_channels(
                sparse, result.keep, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule
            )
            pruned_metric = runner.recalibrated_metric(pruned) if scored is None else float(scored)
            cut = {
                n: f"{st['filters']}->{st['kept']}"
                for n, st in result.stats.items()
                if st["kept"] < st["filters"]
            }
            attempts.append(
                {"k": k, "metric": pruned_metric, "params": model_stats(pruned)["params"], "cut": cut}
            )
            if pruned_metric >= floor:
                break
            log.warning(
                "phase %s: the model pruned at k=%g scores %.4f, more than eps_pruned = %.1f points below "
                "Θ_L1 (%.4f)%s; layers cut: %s%s", phase.name, k, pruned_metric, hp.eps_pruned, sp["metric"],
                se_text(runner.se(pruned_metric)), cut or "none", "; trying a smaller k" if k != ks[-1] else "",
            )  # fmt: skip
        else:
            tried = ", ".join(f"k={a['k']:g}: {a['metric']:.4f}" for a in attempts)
            msg = (
                f"phase {phase.name}: the pruned model is out of tolerance at every k tried ({tried}; "
                f"floor {floor:.4f}); layers cut at the last: {attempts[-1]['cut'] or 'none'}"
            )
            if hp.strict:
                raise PhaseToleranceError(msg)
            log.warning("%s; going on with it (retraining may recover)", msg)
        record["selection_k"] = attempts[-1]["k"]
        record["selection_attempts"] = attempts
        sel = {n: {k: v for k, v in st.items()} for n, st in result.stats.items()}
        runner.save(
            pruned, path, {"step": "pruned", "phase": phase.name, "selection": sel, "metric": pruned_metric,
                           "selection_k": record["selection_k"]},
        )  # fmt: skip
        table("pruned", pruned, pruned_metric, {"selection": sel})
        if runner.main:
            from prunekit.prune.diagnostics import phase_diagnostics, write_diagnostics

            write_diagnostics(
                pdir, phase_diagnostics(sparse, th_model, graph, rp, sel, hp.tau1, fold), phase.name
            )
    record["selection"] = {n: {k: v for k, v in st.items() if k not in ("filter_sparsity", "outgoing_sparsity")}
                           for n, st in sel.items()}  # fmt: skip
    record["pruned_metric"] = pruned_metric

    # 5. retraining without L1
    path = pdir / "retrained.pt"
    before = copy.deepcopy(pruned) if hp.retrain_keep_better else None
    if resume and path.is_file():
        retrained, extra = _load(path)
        retrained = retrained.to(device)
        metric = extra["metric"]
    else:
        retrained = pruned
        runner.train(retrained, None, "retrain", f"{phase.name}/retrain")
        retrained = retrained.to(memory_format=torch.contiguous_format)
        metric = runner.metric(retrained)
        runner.save(retrained, path, {"step": "retrained", "phase": phase.name, "metric": metric})
        table("retrained", retrained, metric)
    record["retrained_metric"] = metric
    record["retrain_kept"] = "retrained"
    margin = runner.se(metric) or 0.0  # within one standard error the two are a tie: keep the trained one
    if before is not None and metric < pruned_metric - margin:
        # Measured on CIFAR-10 VGG16 (fcs.r2, distilled): 83.18 pruned, 80.48 after three epochs.
        kept = runner.recalibrated_metric(before)
        if kept > metric + margin:
            log.warning(
                "phase %s: retraining lowered the validation metric from %.4f (the pruned model, BN "
                "statistics re-estimated) to %.4f%s; keeping the pruned model (--no-retrain-keep-better "
                "keeps the retrained one)", phase.name, kept, metric, se_text(runner.se(metric)),
            )  # fmt: skip
            record.update(retrain_kept="pruned", retrained_metric_discarded=metric, retrained_metric=kept)
            retrained, metric = before, kept
    record["stats"] = model_stats(retrained)
    record["filters"] = {r["layer"]: r["filters_after"] for r in layer_table(retrained)}
    runner.write_json(pdir / "record.json", record)
    return retrained, record, metric


def run_phases(
    model: nn.Module,
    phases: Sequence[Phase] | str | os.PathLike,
    trainer: Trainer,
    hp: PruneConfig | None = None,
    out_dir: str | os.PathLike = "phases",
    resume: bool = False,
    allow_vacuous: bool = False,
) -> nn.Module:
    """Run every phase on ``model`` (not modified) and return the final pruned, retrained model.

    ``trainer`` (:class:`prunekit.prune.trainer.Trainer`) trains, scores and recalibrates;
    :class:`~prunekit.prune.trainer.FnTrainer` wraps plain ``train_fn`` / ``eval_fn`` callables.

    ``phases``: :class:`Phase` objects, a preset name or a YAML/JSON file. Files go under
    ``out_dir`` (``pN/`` per phase, ``summary.{json,md}``). With ``resume`` a phase whose
    ``retrained.pt`` exists is loaded instead of recomputed, and an unfinished phase restarts after
    its last saved step; the hyper-parameters must be the same as the first run (checked).
    A model scoring below the largest tolerance is refused (:class:`ToleranceFloorError`) unless
    ``allow_vacuous`` (``--force-compress``), which only warns.
    """
    hp = hp or PruneConfig()
    out = Path(out_dir)
    original = copy.deepcopy(model)
    if hp.distill:
        from prunekit.evaluate import is_detector

        if is_detector(model):
            raise ValueError("distill: distillation is implemented for classifiers only, not for detectors")
        distill_from = getattr(trainer, "distill_from", None)
        if distill_from is None:
            raise ValueError(
                f"distill needs a trainer with distill_from(); {type(trainer).__name__} has none"
            )
        distill_from(original, alpha=hp.distill_alpha, temperature=hp.distill_temperature)
    if hp.keep_detection_layers is not None:
        # pruned-Kdet first: the phases then prune (and retrain) the network that will ship
        model = keep_detection_layers(model, hp.keep_detection_layers)
    if hp.fold_bn:
        from prunekit.prune.fold import fold_batchnorm

        model = fold_batchnorm(model)
    phases = resolve_phases(phases, model) if isinstance(phases, str | os.PathLike) else list(phases)
    if hp.rounds > 1:
        # each pass is the same phase list again on the retrained model; names say which pass
        phases = [dataclasses.replace(p, name=f"{p.name}.r{r + 1}") for r in range(hp.rounds) for p in phases]
    per_round = len(phases) // hp.rounds
    runner = _Runner(trainer, hp, out)
    _check_resume(out, hp, phases, resume, runner)
    runner.original_channels = {r["layer"]: r["filters_before"] for r in layer_table(original)}
    runner.table = load_table_for(hp, original)
    runner.budget = _budget_plan(hp, original, phases, runner.table)
    current = model
    t0 = time.perf_counter()
    metric, metrics = runner.evaluate(current)
    summary: dict[str, Any] = {
        "config": hp.to_dict(),
        "phases": [p.to_dict() for p in phases],
        "original": {**model_stats(original), "metric": metric, "metrics": metrics},
        "records": [],
    }
    _check_floors(hp, metric, allow_vacuous)
    already: set[str] = set()
    for i, phase in enumerate(phases):
        if i % per_round == 0:
            already = set()  # a new pass: every layer may be cut again
        current, record, metric = run_phase(current, phase, i, runner, original, already, metric, resume)
        already |= set(record.get("prune_layers", []))
        summary["records"].append(record)
        log.info("phase %s done: metric %.4f, %s", phase.name, metric, model_stats(current))
    summary["final"] = {**model_stats(current), "metric": metric}
    if runner.budget is not None:
        summary["budget"] = _final_budget(runner.budget, current)
    summary["seconds"] = time.perf_counter() - t0
    if runner.main:
        rows = cost_rows(current, original, runner.table)
        atomic_write_json(out / "summary.json", _json_safe({**summary, "layers": rows}))
        atomic_write_text(out / "summary.md", render_summary(summary, rows))
    return current


def _check_floors(hp: PruneConfig, metric: float, allow: bool = False) -> None:
    """Refuse tolerances that reach below zero: a check against a negative floor always passes.

    The model before pruning scores ``metric``; ε1, ε2 and ``eps_pruned`` are subtracted from
    (roughly) it. A model near zero (an untrained detector's AP50) would pass every check.
    """
    worst = max(hp.eps1, hp.eps2, hp.eps_pruned)
    if metric - worst * POINT < 0:
        msg = (
            f"the model scores {metric:.4f} before pruning, so a tolerance of {worst:g} points "
            f"(max of eps1 {hp.eps1:g}, eps2 {hp.eps2:g}, eps_pruned {hp.eps_pruned:g}) reaches below zero "
            "and every check would pass"
        )
        if not allow:
            raise ToleranceFloorError(f"{msg}; train the model further or give smaller tolerances")
        log.warning("%s: the tolerance checks of this run are VACUOUS (forced)", msg)


def _final_budget(plan: _BudgetPlan, model: nn.Module) -> dict[str, Any]:
    cost = plan.cost(model)
    ratio = cost / plan.original_cost
    met = ratio <= plan.target + plan.eps
    msg = (
        f"{plan.kind} budget {plan.target:.3f} x original {'met' if met else 'NOT met'}: the final model "
        f"costs {ratio:.3f} x original (eps {plan.eps:.3f})"
    )
    (log.info if met else log.warning)(msg)
    return {**plan.to_dict(), "final_cost": cost, "final_ratio": ratio, "met": met, "message": msg}


def _check_resume(out: Path, hp: PruneConfig, phases: Sequence[Phase], resume: bool, runner: _Runner) -> None:
    cfg_path = out / "prune_config.json"
    current = {"config": hp.to_dict(), "phases": [p.to_dict() for p in phases]}
    if resume and cfg_path.is_file():
        previous = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(previous.get("config"), dict):  # runs from before a setting existed used its default
            defaults = PruneConfig().to_dict()
            previous["config"] = {**defaults, **previous["config"]}
        if _json_safe(previous) != _json_safe(current):
            raise ValueError(
                f"{cfg_path}: the earlier run used other hyper-parameters or phases; "
                "use a new --out or the same settings to resume"
            )
    runner.write_json(cfg_path, current)


def phase_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per phase of a ``summary.json`` (λ, k and the validation metric after each step)."""
    return [
        {
            "phase": r["phase"],
            "lam": r.get("sparsity", {}).get("lam"),
            "lam_trials": r.get("sparsity", {}).get("trials"),
            "k": r.get("threshold", {}).get("k"),
            "val_before": r.get("before"),
            "val_sparse": r.get("sparsity", {}).get("metric"),
            "val_thresholded": r.get("threshold", {}).get("metric"),
            "val_pruned": r.get("pruned_metric"),
            "val_retrained": r.get("retrained_metric"),
            "kept": r.get("retrain_kept", "retrained"),
            "val_retrained_discarded": r.get("retrained_metric_discarded"),
            "params": r.get("stats", {}).get("params"),
        }
        for r in summary["records"]
    ]


def _kept_note(record: Mapping[str, Any]) -> str:
    if record.get("retrain_kept") != "pruned":
        return ""
    return f" (pruned kept; retrained {100 * float(record['retrained_metric_discarded']):.2f})"


def render_summary(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown view of ``summary.json``: per-phase metrics after each step, then the layer table."""
    pct = lambda v: "-" if v is None else f"{100 * float(v):.2f}"  # noqa: E731
    lines = [
        "# Multi-layer pruning",
        "",
        "| phase | before | λ | sparse | k | thresholded | pruned | retrained | params |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in summary["records"]:
        if r.get("skipped"):
            lines.append(f"| {r['phase']} | {pct(r.get('before'))} | (nothing to prune) | | | | | | |")
            continue
        sp, th = r.get("sparsity", {}), r.get("threshold", {})
        lines.append(
            f"| {r['phase']} | {pct(r.get('before'))} | {sp.get('lam', '-')} | {pct(sp.get('metric'))} | "
            f"{th.get('k', '-')} | {pct(th.get('metric'))} | {pct(r.get('pruned_metric'))} | "
            f"{pct(r.get('retrained_metric'))}{_kept_note(r)} | {r.get('stats', {}).get('params', 0):,} |"
        )
    lines.append("")
    budget = summary.get("budget")
    if budget:
        lines += ["## Budget", "", f"- {budget['message']}"]
        for r in summary["records"]:
            if r.get("budget"):
                b = r["budget"]
                lines.append(f"- {r['phase']} (target {b['phase_target']:.3f} x original): {b['message']}")
        lines.append("")
    totals = {"original": summary["original"], "pruned": summary["final"]}
    from prunekit.prune.layer_costs import render_cost_markdown

    cost_md = render_cost_markdown(list(rows))
    body = render_markdown(rows, totals, "Filters per layer")
    return "\n".join(lines) + "\n" + body + ("\n" + cost_md if cost_md else "")
