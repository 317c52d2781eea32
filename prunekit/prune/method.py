"""The phase runner: the paper's multi-layer pruning (section 3), one phase after another.

For each phase: (1) sparsity induction with L1 on the phase's layers, λ from a grid within ε1;
(2) one global threshold k * std, the largest k within ε2 of Θ_L1; (3) filter selection by
zero-row statistics of Θ_L1^th (τ1, τ2, τ3); (4) surgery from Θ_L1 into a dense, smaller model;
(5) retraining without L1. Every step leaves a checkpoint ``<out>/pN/{sparse,thresholded,pruned,
retrained}.pt`` and a per-layer table ``<out>/pN/table_<step>.{json,md}``; ``resume=True`` picks up
after the last completed step. ``<out>/summary.{json,md}`` holds the whole run.

Training and evaluation are callables so that the runner knows no data: ``train_fn(model,
regularizer)`` or ``train_fn(model, regularizer, epochs, tag)`` trains in place (``regularizer`` is
None for retraining); ``eval_fn(model)`` returns the validation metric in [0, 1] or a metrics dict
(reduced with :func:`prunekit.evaluate.primary_metric`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.phases import Phase, ResolvedPhase, resolve, resolve_phases
from prunekit.prune.report import layer_table, model_stats, render_markdown, write_table
from prunekit.prune.selection import TAU1, TAU2, TAU3, check_taus, select_filters
from prunekit.prune.sparsity import induce_sparsity, weight_sparsity
from prunekit.prune.surgery import keep_detection_layers, prune_channels
from prunekit.prune.threshold import search_threshold

log = logging.getLogger(__name__)
STEPS = ("sparse", "thresholded", "pruned", "retrained")


@dataclass
class PruneConfig:
    """Every hyper-parameter of the method (JSON-safe). ε in points of the metric (0.01)."""

    eps1: float = 1.0
    eps2: float = 15.0
    lam_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    k_range: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    threshold_search: str = "scan"  # "scan" | "bisect"
    tau1: float = TAU1
    tau2: float = TAU2
    tau3: float = TAU3
    min_keep: int = 1
    align: int = 1  # round kept counts to multiples of this (1 = the paper)
    epochs_sparsity: int = 10
    epochs_retrain: int = 10
    layer_weights: dict[str, float] | None = None  # per-layer L1 multipliers (cost-aware)
    cost_aware: str | None = None  # None | "macs" | "latency": layer_weights from prunekit.prune.cost
    latency_table: str | None = None  # JSON file of `prunekit profile` (cost_aware="latency")
    target_flops: float | None = None  # accepted for the pipeline; budgets are not applied here yet
    target_latency: float | None = None
    keep_detection_layers: int | None = None  # pruned-Kdet after the phases (then retrained)
    stop_early: bool = True  # λ search stops at the first inadmissible λ
    seed: int = 0

    def __post_init__(self) -> None:
        check_taus(self.tau1, self.tau2, self.tau3)
        if self.eps1 < 0 or self.eps2 < 0:
            raise ValueError(f"eps1/eps2 must be >= 0 points, got {self.eps1}, {self.eps2}")
        if not self.lam_grid or not self.k_range:
            raise ValueError("lam_grid and k_range must not be empty")
        if self.align < 1 or self.min_keep < 1:
            raise ValueError(f"align and min_keep must be >= 1, got {self.align}, {self.min_keep}")
        if self.cost_aware not in (None, "macs", "latency"):
            raise ValueError(f"cost_aware must be None, 'macs' or 'latency', got {self.cost_aware!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pruning hyper-parameters {sorted(unknown)}")
        return cls(**dict(d))


TrainFn = Callable[..., Any]
EvalFn = Callable[[nn.Module], Any]


def _takes_epochs(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4


class _Runner:
    """State of one run (callables adapted, metrics cached, files written on rank 0 only)."""

    def __init__(self, train_fn: TrainFn, eval_fn: EvalFn, hp: PruneConfig, out: Path):
        self.train_fn, self.eval_fn, self.hp, self.out = train_fn, eval_fn, hp, out
        self.four_args = _takes_epochs(train_fn)
        self.main = _is_main_process()
        self.original_channels: dict[str, int] = {}

    def train(self, model: nn.Module, regularizer: Any, stage: str, tag: str) -> None:
        epochs = self.hp.epochs_sparsity if stage == "sparsity" else self.hp.epochs_retrain
        torch.manual_seed(self.hp.seed)
        t0 = time.perf_counter()
        if self.four_args:
            self.train_fn(model, regularizer, epochs, tag)
        else:
            self.train_fn(model, regularizer)
        log.info("%s: trained %s in %.1f s", tag, stage, time.perf_counter() - t0)

    def evaluate(self, model: nn.Module) -> tuple[float, dict[str, Any] | None]:
        res = self.eval_fn(model)
        if isinstance(res, Mapping):
            from prunekit.evaluate import primary_metric

            return float(primary_metric(dict(res))), _json_safe(res)
        return float(res), None

    def metric(self, model: nn.Module) -> float:
        return self.evaluate(model)[0]

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


def _layer_weights(model: nn.Module, rp: ResolvedPhase, hp: PruneConfig) -> dict[str, float] | None:
    if hp.layer_weights:
        return {n: float(w) for n, w in hp.layer_weights.items() if n in rp.l1_layers}
    if hp.cost_aware is None:
        return None
    from prunekit.prune.cost import l1_layer_weights

    table = None
    if hp.cost_aware == "latency":
        if not hp.latency_table:
            raise ValueError("cost_aware='latency' needs latency_table (a `prunekit profile` JSON file)")
        from prunekit.prune.profile import load_latency_table

        table = load_latency_table(hp.latency_table)
    return l1_layer_weights(model, rp.l1_layers, kind=hp.cost_aware, table=table)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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

    def table(step: str, m: nn.Module, metric: float, extra: dict[str, Any] | None = None) -> None:
        if not runner.main:
            return
        rows = layer_table(m, original=original)
        if step in ("sparse", "thresholded"):
            zeros = weight_sparsity(m, rp.l1_layers)
            for r in rows:
                if r["layer"] in zeros:
                    r["zero_weights_pct"] = 100.0 * zeros[r["layer"]]
        totals = {
            "original": {**model_stats(original), "metric": None},
            step: {**model_stats(m), "metric": metric},
        }
        write_table(
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
        weights = _layer_weights(model, rp, hp)

        def train_sparse(m: nn.Module, reg: Any) -> None:
            runner.train(m, reg, "sparsity", f"{phase.name}/sparsity")

        res = induce_sparsity(
            model, rp.l1_layers, hp.lam_grid, train_sparse, runner.metric, hp.eps1, before_metric, weights,
            stop_early=hp.stop_early,
        )  # fmt: skip
        sparse, sp = res.model, {**res.to_dict(), "layer_weights": weights}
        runner.save(
            sparse, path, {"step": "sparse", "phase": phase.name, "sparsity": sp, "metric": res.metric}
        )
        table("sparse", sparse, res.metric, {"sparsity": sp})
    record["sparsity"] = sp

    # 2. global threshold
    path = pdir / "thresholded.pt"
    if resume and path.is_file():
        thresholded, extra = _load(path)
        th = extra["threshold"]
    else:
        tres = search_threshold(
            sparse, rp.l1_layers, hp.k_range, runner.metric, hp.eps2, sp["metric"], hp.threshold_search
        )
        thresholded, th = tres.model, tres.to_dict()
        runner.save(thresholded, path, {"step": "thresholded", "phase": phase.name, "threshold": th})
        table(
            "thresholded",
            thresholded,
            th["metric"] if th["metric"] is not None else float("nan"),
            {"threshold": th},
        )
    record["threshold"] = th

    # 3 + 4. selection on Θ_L1^th, surgery on Θ_L1
    path = pdir / "pruned.pt"
    if resume and path.is_file():
        pruned, extra = _load(path)
        pruned = pruned.to(device)
        sel, pruned_metric = extra["selection"], extra["metric"]
    else:
        result = select_filters(
            thresholded,
            rp.prune_layers,
            graph,
            hp.tau1,
            hp.tau2,
            hp.tau3,
            min_keep=hp.min_keep,
            align=hp.align,
        )
        pruned = prune_channels(sparse, result.keep, graph)
        pruned_metric = runner.metric(pruned)
        sel = {n: {k: v for k, v in s.items()} for n, s in result.stats.items()}
        runner.save(
            pruned, path, {"step": "pruned", "phase": phase.name, "selection": sel, "metric": pruned_metric}
        )
        table("pruned", pruned, pruned_metric, {"selection": sel})
    record["selection"] = sel
    record["pruned_metric"] = pruned_metric

    # 5. retraining without L1
    path = pdir / "retrained.pt"
    if resume and path.is_file():
        retrained, extra = _load(path)
        retrained = retrained.to(device)
        metric = extra["metric"]
    else:
        retrained = pruned
        runner.train(retrained, None, "retrain", f"{phase.name}/retrain")
        metric = runner.metric(retrained)
        runner.save(retrained, path, {"step": "retrained", "phase": phase.name, "metric": metric})
        table("retrained", retrained, metric)
    record["retrained_metric"] = metric
    record["stats"] = model_stats(retrained)
    record["filters"] = {r["layer"]: r["filters_after"] for r in layer_table(retrained)}
    runner.write_json(pdir / "record.json", record)
    return retrained, record, metric


def run_phases(
    model: nn.Module,
    phases: Sequence[Phase] | str | os.PathLike,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    hp: PruneConfig | None = None,
    out_dir: str | os.PathLike = "phases",
    resume: bool = False,
) -> nn.Module:
    """Run every phase on ``model`` (not modified) and return the final pruned, retrained model.

    ``phases``: :class:`Phase` objects, a preset name or a YAML/JSON file. Files go under
    ``out_dir`` (``pN/`` per phase, ``summary.{json,md}``). With ``resume`` a phase whose
    ``retrained.pt`` exists is loaded instead of recomputed, and an unfinished phase restarts after
    its last saved step; the hyper-parameters must be the same as the first run (checked).
    """
    hp = hp or PruneConfig()
    if hp.target_flops is not None or hp.target_latency is not None:
        log.warning("target_flops/target_latency are not applied by run_phases yet; pruning by ε/τ only")
    out = Path(out_dir)
    phases = resolve_phases(phases, model) if isinstance(phases, str | os.PathLike) else list(phases)
    runner = _Runner(train_fn, eval_fn, hp, out)
    _check_resume(out, hp, phases, resume, runner)
    original = copy.deepcopy(model)
    runner.original_channels = {r["layer"]: r["filters_before"] for r in layer_table(original)}
    current = model
    t0 = time.perf_counter()
    metric, metrics = runner.evaluate(current)
    summary: dict[str, Any] = {
        "config": hp.to_dict(),
        "phases": [p.to_dict() for p in phases],
        "original": {**model_stats(original), "metric": metric, "metrics": metrics},
        "records": [],
    }
    already: set[str] = set()
    for i, phase in enumerate(phases):
        current, record, metric = run_phase(current, phase, i, runner, original, already, metric, resume)
        already |= set(record.get("prune_layers", []))
        summary["records"].append(record)
        log.info("phase %s done: metric %.4f, %s", phase.name, metric, model_stats(current))
    if hp.keep_detection_layers is not None:
        current, rec, metric = _detection_cut(current, runner, hp.keep_detection_layers, resume)
        summary["records"].append(rec)
    summary["final"] = {**model_stats(current), "metric": metric}
    summary["seconds"] = time.perf_counter() - t0
    if runner.main:
        rows = layer_table(current, original=original)
        atomic_write_json(out / "summary.json", _json_safe({**summary, "layers": rows}))
        atomic_write_text(out / "summary.md", render_summary(summary, rows))
    return current


def _detection_cut(
    model: nn.Module, runner: _Runner, k: int, resume: bool
) -> tuple[nn.Module, dict[str, Any], float]:
    ddir = runner.out / f"det{k}"
    path = ddir / "retrained.pt"
    if resume and path.is_file():
        cut, extra = _load(path)
        return cut.to(_device_of(model)), extra["record"], extra["metric"]
    cut = keep_detection_layers(model, k)
    cut_metric = runner.metric(cut)
    runner.save(cut, ddir / "pruned.pt", {"step": "pruned", "metric": cut_metric})
    runner.train(cut, None, "retrain", f"det{k}/retrain")
    metric = runner.metric(cut)
    rec = {"phase": f"keep {k} detection layers", "dir": ddir.name, "pruned_metric": cut_metric,
           "retrained_metric": metric, "stats": model_stats(cut)}  # fmt: skip
    runner.save(cut, path, {"step": "retrained", "metric": metric, "record": rec})
    return cut, rec, metric


def _check_resume(out: Path, hp: PruneConfig, phases: Sequence[Phase], resume: bool, runner: _Runner) -> None:
    cfg_path = out / "prune_config.json"
    current = {"config": hp.to_dict(), "phases": [p.to_dict() for p in phases]}
    if resume and cfg_path.is_file():
        previous = json.loads(cfg_path.read_text(encoding="utf-8"))
        if _json_safe(previous) != _json_safe(current):
            raise ValueError(
                f"{cfg_path}: the earlier run used other hyper-parameters or phases; "
                "use a new --out or the same settings to resume"
            )
    runner.write_json(cfg_path, current)


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
            f"{pct(r.get('retrained_metric'))} | {r.get('stats', {}).get('params', 0):,} |"
        )
    lines.append("")
    totals = {"original": summary["original"], "pruned": summary["final"]}
    return "\n".join(lines) + "\n" + render_markdown(rows, totals, "Filters per layer")


def make_train_eval(
    train_set: Any,
    val_set: Any,
    train_config: Any,
    eval_batch_size: int = 16,
    max_val_images: int | None = None,
    progress: bool = False,
) -> tuple[TrainFn, EvalFn]:
    """``(train_fn, eval_fn)`` for :func:`run_phases` on real data with :mod:`prunekit.train`.

    ``train_config`` is a :class:`prunekit.train.TrainConfig`; its ``epochs`` is replaced by each
    stage's (``epochs_sparsity`` / ``epochs_retrain``). ``eval_fn`` returns the full metrics dict.
    """
    from prunekit.evaluate import evaluate
    from prunekit.train import train

    def train_fn(model: nn.Module, regularizer: Any, epochs: int, tag: str) -> None:
        if epochs <= 0:
            return
        cfg = dataclasses.replace(train_config, epochs=epochs)
        train(model, train_set, cfg, regularizer=regularizer, progress=progress)

    def eval_fn(model: nn.Module) -> dict[str, Any]:
        return evaluate(
            model,
            val_set,
            batch_size=eval_batch_size,
            device=train_config.device,
            progress=progress,
            max_images=max_val_images,
        )

    return train_fn, eval_fn
