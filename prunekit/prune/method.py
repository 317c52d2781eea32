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

With a budget (``target_flops`` / ``target_latency``) steps 2 and 3 are searched together under a
per-phase cost cap instead of by ε2: :mod:`prunekit.prune.phase_budget`. Without one the paper's
method runs unchanged.

The parts are shared with prune-while-training (:mod:`prunekit.prune.joint`): what is coupled
(:mod:`~prunekit.prune.graph`), what to remove (:class:`prunekit.prune.selectors.TauRule` on a
threshold from :mod:`~prunekit.prune.threshold`), how to remove it (:mod:`~prunekit.prune.surgery`).
This module only drives them, step by step, with a checkpoint after each.

Training, evaluation and BN recalibration go through one :class:`prunekit.prune.trainer.Trainer`
built by the caller, so the runner knows no data; its ``evaluate`` returns the validation metric in
[0, 1] or a metrics dict (reduced with :func:`prunekit.evaluate.primary_metric`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.layer_costs import l1_weights_for
from prunekit.prune.phase_budget import budget_plan, budget_search, final_budget, load_table_for
from prunekit.prune.phase_report import cost_rows, render_summary, write_step_table
from prunekit.prune.phases import Phase, resolve, resolve_phases
from prunekit.prune.report import layer_table, model_stats
from prunekit.prune.runner import (
    Runner,
    ToleranceFloorError,
    check_floors,
    check_resume,
    device_of,
    json_safe,
    load_checkpoint,
)
from prunekit.prune.selectors import TauRule, statistic_layers, threshold_at, threshold_settings
from prunekit.prune.sparsity import (
    POINT,
    Sparsity,
    induce_sparsity,
    se_text,
    sparsity_targets,
    weight_sparsity,
)
from prunekit.prune.surgery import keep_detection_layers, prune_channels
from prunekit.prune.threshold import search_threshold
from prunekit.prune.trainer import Trainer

__all__ = ["STEPS", "PhaseToleranceError", "PruneConfig", "ToleranceFloorError", "run_phase", "run_phases"]

log = logging.getLogger(__name__)
STEPS = ("sparse", "thresholded", "pruned", "retrained")


class PhaseToleranceError(RuntimeError):
    """Raised under ``strict`` when a phase's pruned model loses more than ``eps_pruned``."""


def run_phase(
    model: nn.Module,
    phase: Phase,
    index: int,
    runner: Runner,
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
    device = device_of(model)
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
        write_step_table(
            pdir / f"table_{step}", rows, totals, f"{phase.name}: {step}", {"step": step, **(extra or {})}
        )

    # 1. sparsity induction
    path = pdir / "sparse.pt"
    if resume and path.is_file():
        sparse, extra = load_checkpoint(path)
        sparse = sparse.to(device)
        sp = extra["sparsity"]
        log.info("phase %s: resumed %s", phase.name, path)
    else:
        weights = l1_weights_for(model, rp.l1_layers, hp, runner.table)
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
        thresholded, extra = load_checkpoint(path)
        th = extra["threshold"]
    else:
        if runner.budget is not None:
            thresholded, th = budget_search(
                sparse,
                rp,
                graph,
                hp,
                runner.budget,
                runner.recalibrated_metric,
                index,
                phase.name,
                sp["metric"],
                make_threshold,
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
        pruned, extra = load_checkpoint(path)
        pruned = pruned.to(device)
        sel, pruned_metric = extra["selection"], extra["metric"]
        record["selection_k"] = extra.get("selection_k", th.get("k"))
    else:
        rule = TauRule.from_config(hp, th.get("tau"))
        scored = (th.get("budget") or {}).get("metric")  # the budget search scored this very model
        floor = sp["metric"] - hp.eps_pruned * POINT
        ks = [th["k"]] + sorted((k for k in hp.k_range if k < th["k"]), reverse=True)
        if scored is not None or th["k"] == 0:
            ks = ks[:1]
        attempts: list[dict[str, Any]] = []
        for k in ks:
            th_model = thresholded if k == th["k"] else make_threshold(k)
            result = rule.select(th_model, rp.prune_layers, graph)
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
        retrained, extra = load_checkpoint(path)
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
    runner = Runner(trainer, hp, out)
    check_resume(out, hp, phases, resume, runner)
    runner.original_channels = {r["layer"]: r["filters_before"] for r in layer_table(original)}
    runner.table = load_table_for(hp, original)
    runner.budget = budget_plan(hp, original, phases, runner.table)
    current = model
    t0 = time.perf_counter()
    metric, metrics = runner.evaluate(current)
    summary: dict[str, Any] = {
        "config": hp.to_dict(),
        "phases": [p.to_dict() for p in phases],
        "original": {**model_stats(original), "metric": metric, "metrics": metrics},
        "records": [],
    }
    check_floors(hp, metric, allow_vacuous)
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
        summary["budget"] = final_budget(runner.budget, current)
    summary["seconds"] = time.perf_counter() - t0
    if runner.main:
        rows = cost_rows(current, original, runner.table)
        atomic_write_json(out / "summary.json", json_safe({**summary, "layers": rows}))
        atomic_write_text(out / "summary.md", render_summary(summary, rows))
    return current
