"""prunekit against Torch-Pruning, from what the product hands back: equal parameters, MACs and latency.

    pip install -e ".[peers]"                                    # torch-pruning, benchmark-only
    python -m benchmarks.peers --task helmet_ssd300              # from runs/no_tuning/helmet
    python -m benchmarks.peers --task cifar10_vgg16              # from runs/no_tuning/cifar10
    python -m benchmarks.peers --task helmet_ssd300 --dry-run    # the plan; no data, no training
    python -m benchmarks.peers --smoke --out /tmp/peers          # plumbing, ~2 min on one thread

The source is a run folder of ``prunekit compress-and-export`` (the product's command with a
budget and no tuning flags, as ``python -m benchmarks.no_tuning`` writes it). Read from it:
``config.yaml`` (data, splits, batch, learning rates, opset: the trainer's settings),
``original.pt`` (the unpruned model trained in that run: every Torch-Pruning lineage starts from
it), ``model.pt`` (prunekit's side: the kept point of the budget search, as handed back),
``search/search.json`` (the kept point's depth and the epochs per stage) and ``test.json`` (the
run's own test figures, recorded beside ours as a cross-check).

Methods: ``prunekit`` (the run's ``model.pt``); ``tp_magnitude`` (``MagnitudePruner`` +
``GroupMagnitudeImportance(p=1)``); ``tp_bnscale`` (``BNScalePruner`` + ``BNScaleImportance``,
with its own sparse training: ``pruner.regularize`` on the gradients); ``tp_groupnorm``
(``GroupNormPruner`` + ``GroupMagnitudeImportance(p=2)``, its sparse training likewise).

Matchings, each a row: ``equal_params`` and ``equal_macs`` (within ``--tolerance``, 3%) and
``equal_latency``: ONNX Runtime CPU at batch 1 of the model exported by prunekit's exporter, timed
interleaved with prunekit's model in the same call, within ``--latency-tolerance`` (5%); the
pruning ratio is searched on the measured latency (seeded at the ratio that matches prunekit's
MACs, then bracketed and bisected).

Epochs: prunekit's kept model went through ``depth`` cuts, each a sparsity stage and a retraining
stage of ``epochs_per_stage`` epochs: ``E = 2 x depth x epochs_per_stage`` epochs, ``S = depth x
epochs_per_stage`` of them under a sparsity term. Every Torch-Pruning lineage gets ``E`` epochs,
``S`` of them under its own sparsity term where it has one (magnitude: ``E`` of fine-tuning),
through prunekit's own trainer built as the run built it (``DataTrainer``: the sparsity stages at
the run's prune lr, cosine, no warm-up; fine-tuning at its retrain lr with the search's warm-up),
BN statistics re-estimated before scoring when the run's ``prune.recalibrate_bn`` says so, and
distilled from the original only where the source was (``prune.distill``, classifiers only).

Torch-Pruning's strongest recipe per criterion and matching is picked on the validation split
among: ``global`` and ``uniform`` pruning ratios, each one-shot (``x1``: sparse training, one cut,
fine-tuning) or iterative (``xR``, R = max(depth, 2) rounds of sparse share, cut, fine-tuning
share: a fresh pruner per round, its ratio searched on the current model so that round ``i``
reaches the geometric step ``c0 (c/c0)^(i/R)`` of the matched cost, the last round the matched
criterion itself; Torch-Pruning's own ``iterative_steps`` fixes its ratio schedule up front, and
a model fine-tuned between rounds could then not be matched). At most 7/8 of any layer goes
(prunekit's ``min_keep_fraction``; per round ``1 - (1/8)^(1/R)``), the classifier's last layer /
the SSD heads are ignored, SSD's L2Norm scale is an unwrapped parameter, channels are not rounded.
The picked model is exported and verified (``prunekit.deploy.verify`` on ORT CPU) through
prunekit's path; a Torch-Pruning model is rebuilt as a prunekit model (strict state-dict load).

On the test split (which no selection saw), each row has ``params``, ``macs``, ``ort_b1_ms`` (all
models timed interleaved in one run), ``metric`` (AP50 or top-1, percent), ``cpu_s`` and, on each
Torch-Pruning row, ``paired_diff`` / ``paired_se``: prunekit minus it on the same test images
(detection: bootstrap over images, :func:`benchmarks.paired.paired_detection`; classification:
per-image, :func:`benchmarks.common.paired_classification`). ``cpu_s`` is process CPU: for
prunekit the run's whole budget search (rejected candidates and its controls included, from
``search.json``), for a peer its picked lineage (``cpu_s_recipes``: all its recipes). The
``targets`` block per task and matching: prunekit >= the best peer + 1 point with the difference
> 2 SE, recorded as measured, with what would close a miss.

Writes ``benchmarks/results/peers.{json,md}`` (``result[task][method][matching][field]``; a
task's result is merged in). Each recipe is a checkpoint + JSON record under ``--out``
(``<method>/<matching>/<recipe>.{pt,json}``), each matching's pick a ``selected.json``: a killed
run resumes where it was; the closing timing and pairing are recomputed each time.

Cost, on 2 cores: 3 methods x 3 matchings x 4 recipes = 36 lineages of ``E`` epochs; the one-shot
sparse stage (and an iterative recipe's first sparse share) is shared across matchings and
scopes, so about ``29 E`` training epochs in all (magnitude 12 E, each sparse method ~8.5 E);
plus per lineage a validation pass and the ratio searches (Torch-Pruning traces the model once
per trial: ~15 trials a cut), per latency cut up to 10 exports and 1 s timings, and at the end
the export + verification of 9 models, one interleaved ORT timing and the paired test scoring
of 10. Helmet (1,635 train images, SSD300 w0.125 at batch 8:
~90 s an epoch, measured in its no_tuning run): ~44 E min + ~45 min, so ~3.7 h at depth 2 (E = 4),
~5.2 h at depth 3. CIFAR-10 (VGG16-BN w0.25) scales with its epoch time the same way.
``--dry-run`` prints the epochs it will train and the estimate from the source's own CPU time per
training epoch (its manifest).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks.common import RESULTS, command_line, machine_info, save_result
from prunekit.fileio import atomic_write_json
from prunekit.markdown import markdown_table
from prunekit.models import build_model
from prunekit.models.io import count_params, layer_names
from prunekit.prune.report import model_stats

METHODS = ("prunekit", "tp_magnitude", "tp_bnscale", "tp_groupnorm")
TP_METHODS = METHODS[1:]
MATCHINGS = ("equal_params", "equal_macs", "equal_latency")
SCOPES = ("global", "uniform")
FIELDS = ("params", "macs", "ort_b1_ms", "metric", "cpu_s")
TASKS = {"helmet_ssd300": Path("runs/no_tuning/helmet"), "cifar10_vgg16": Path("runs/no_tuning/cifar10")}
SOURCE_FILES = ("config.yaml", "manifest.json", "search/search.json", "test.json", "original.pt", "model.pt")
# prunekit keeps at least 1/8 of every layer (min_keep_fraction): the same cap for Torch-Pruning. Without
# it a global threshold above every channel of a layer makes Torch-Pruning skip that layer whole, and
# no ratio reaches the budget (measured on a tiny VGG: BN-scale stuck at +81% parameters).
MAX_RATIO = 0.875
log = logging.getLogger("peers")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="helmet_ssd300")
    ap.add_argument("--source", type=Path, default=None, help="a compress-and-export run folder")
    ap.add_argument("--out", type=Path, default=None, help="default runs/peers/<task>")
    ap.add_argument("--result", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--methods", default=",".join(TP_METHODS), help="the Torch-Pruning methods to run")
    ap.add_argument("--matchings", default=",".join(MATCHINGS))
    ap.add_argument("--scopes", default=",".join(SCOPES), help="global and/or uniform pruning ratios")
    ap.add_argument("--rounds", default="1,auto", help="one-shot and iterative rounds (auto: max(depth, 2))")
    ap.add_argument("--tolerance", type=float, default=0.03, help="relative match of params / MACs")
    ap.add_argument("--latency-tolerance", type=float, default=0.05, help="relative match of ORT latency")
    ap.add_argument("--latency-time", type=float, default=1.0, help="seconds of timing per model per trial")
    ap.add_argument("--reg", type=float, default=5e-4, help="Torch-Pruning sparse-training coefficient")
    ap.add_argument("--ort-rounds", type=int, default=100, help="interleaved rounds of the closing timing")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples of the detection pairing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny VGG: generated images, the product's command on them, every method x matching",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no data, no training: the plan (source files, epochs, methods, matchings, recipes, cost)",
    )
    ap.add_argument("--adapter", action="store_true",
                    help="with --dry-run: each method's adapter on an untrained model of the task's architecture")  # fmt: skip
    return ap.parse_args(argv)


# --- Torch-Pruning, driven through its public API ----------------------------------------------


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - the benchmark's only extra
        raise SystemExit(f'torch-pruning is not installed ({e}); pip install -e ".[peers]"') from None
    return torch_pruning


def traced_view(
    model: nn.Module,
) -> tuple[nn.Module, torch.Tensor, list[nn.Module], list[tuple[nn.Parameter, int]]]:
    """(module Torch-Pruning traces, example input, ignored layers, unwrapped parameters).

    A detector is traced through :class:`prunekit.models.ssd.SSDRaw` (backbone + heads, which
    share their modules with ``model``, so pruning the view prunes the model): torchvision's
    pre/post-processing (resize, anchor decoding, NMS) is not a tensor graph.
    """
    cfg = model.prunekit_config
    h, w = cfg.input_size
    example = torch.randn(1, 3, h, w)
    if cfg.is_detector:
        from prunekit.models.ssd import SSDRaw

        view = SSDRaw(model)
        ignored = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
        return view, example, ignored, [(model.backbone.scale_weight, 0)]
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return model, example, [last], []


def make_pruner(
    method: str,
    model: nn.Module,
    ratio: float,
    reg: float,
    scope: str = "global",
    cap: float = MAX_RATIO,
    for_regularizer: bool = False,
) -> Any:
    """The Torch-Pruning pruner of ``method`` over ``model`` (``scope`` global or uniform ratios).

    ``for_regularizer``: the pruner only regularises; layers of one channel are left out, where
    ``GroupNormPruner.regularize`` scales by 1 / (max - min) of the group's importances, 0 / 0 (a
    layer cut to one channel by an earlier round: NaN gradients, the loss NaN a step later).
    """
    tp = _tp()
    view, example, ignored, unwrapped = traced_view(model)
    if for_regularizer:
        ignored = ignored + [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
                             and (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) < 2]  # fmt: skip
    common = dict(
        example_inputs=example, pruning_ratio=ratio, global_pruning=scope == "global", ignored_layers=ignored,
        max_pruning_ratio=cap, unwrapped_parameters=unwrapped or None,
    )  # fmt: skip
    if method == "tp_magnitude":
        return tp.pruner.MagnitudePruner(
            view, importance=tp.importance.GroupMagnitudeImportance(p=1), **common
        )
    if method == "tp_bnscale":
        return tp.pruner.BNScalePruner(view, importance=tp.importance.BNScaleImportance(), reg=reg, **common)
    if method == "tp_groupnorm":
        return tp.pruner.GroupNormPruner(
            view, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg, **common
        )
    raise ValueError(f"unknown method {method!r}")


def as_prunekit(model: nn.Module) -> nn.Module:
    """A prunekit model rebuilt from the pruned module shapes, its weights loaded strictly.

    The strict load is the check that Torch-Pruning left a consistent network: every layer's
    shape must be what prunekit's own builder makes from the new channel counts.
    """
    cfg = model.prunekit_config
    mods = dict(model.named_modules())
    channels = dict(cfg.channels)
    for name, path in layer_names(model).items():
        if name in channels or (cfg.is_detector and "mbox" not in name):
            m = mods[path]
            channels[name] = int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
    new = build_model(dataclasses.replace(cfg, channels=channels))
    new.load_state_dict(model.state_dict(), strict=True)
    return new


def pruned_at(method: str, model: nn.Module, ratio: float, scope: str, cap: float, reg: float) -> nn.Module:
    """A copy of ``model`` cut by ``method`` at ``ratio``, rebuilt as a prunekit model (``model`` unchanged)."""
    m = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if ratio > 0:
        make_pruner(method, m, ratio, reg, scope, cap).step()
    return as_prunekit(m)


class TPRegularizer:
    """Torch-Pruning's sparse training in prunekit's loop: ``pruner.regularize`` on the gradients."""

    proximal = False

    def __init__(self, pruner: Any, model: nn.Module, reg: float):
        self.pruner, self.lam = pruner, reg
        self.view = traced_view(model)[0]  # shares model's modules

    def __call__(self, m: nn.Module) -> torch.Tensor:
        return torch.zeros(())

    def after_backward(self, m: nn.Module) -> None:
        self.pruner.regularize(self.view)


def search_ratio(
    cost: Callable[[float], float], target: float, tol: float, start: float | None = None, trials: int = 30
) -> tuple[float, float, list[dict[str, float]]]:
    """(ratio, cost, every trial): the pruning ratio whose ``cost`` comes closest to ``target``.

    ``cost`` falls with the ratio, mostly: under global pruning a layer whose every channel falls
    below the threshold is skipped whole, so past some ratio layers spring back to full width
    (the CIFAR-10 VGG16: 392,282 parameters at 0.80, 574,730 at 0.85). So the first crossing is
    bracketed by steps of 0.05 (up from 0, or from ``start`` either way), then bisected until
    within ``tol`` or ``trials`` calls are spent.
    """
    seen: dict[float, float] = {}

    def at(r: float) -> float:
        r = round(min(max(r, 0.0), 0.95), 5)
        if r not in seen:
            seen[r] = cost(r)
        return seen[r]

    def close(r: float) -> bool:
        return abs(seen[r] / target - 1) <= tol

    r = 0.0 if start is None else start
    lo, hi = (r, None) if at(r) > target else (None, r)
    while (hi is None or lo is None) and not close(r) and len(seen) < trials:
        r = round(r + (0.05 if hi is None else -0.05), 5)
        if not 0.0 <= r <= 0.95:
            break
        if at(r) > target:
            lo = r
        else:
            hi = r
    for _ in range(trials - len(seen)):
        if lo is None or hi is None or any(close(x) for x in seen):
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
    best = min(seen, key=lambda x: (abs(seen[x] / target - 1), x))
    return best, seen[best], [{"ratio": x, "cost": seen[x]} for x in seen]


# --- the source run -----------------------------------------------------------------------------


def lineage(search: dict[str, Any], rounds: str = "1,auto") -> dict[str, Any]:
    """Epochs of prunekit's kept model along its search path (``search.json``), and the recipes' rounds."""
    kept = search["points"][int(search.get("kept", search.get("current", 0)))]
    depth, per = int(kept.get("depth", 0)), int(search["epochs_per_stage"])
    epochs, sparse = 2 * depth * per, depth * per
    options = []
    for r in rounds.split(","):
        n = max(depth, 2) if r == "auto" else int(r)
        if 1 <= n <= max(1, epochs - sparse) and n not in options:  # a round needs a fine-tuning epoch
            options.append(n)
    return {"kept_point": kept.get("index", 0), "depth": depth, "epochs_per_stage": per, "epochs": epochs,
            "sparse_epochs": sparse, "rounds": options, "search_cpu_s": search.get("cpu_s"),
            "search_wall_s": search.get("wall_s")}  # fmt: skip


def distillation(config: dict[str, Any], detector: bool) -> dict[str, float] | None:
    """The source's soft-target settings: the search and the phases distil where ``prune.distill``,
    a classifier only (the search trains a detector on its labels alone; the phases refuse it)."""
    prune = config.get("prune") or {}
    if detector or not prune.get("distill"):
        return None
    return {"alpha": float(prune["distill_alpha"]), "temperature": float(prune["distill_temperature"])}


class Source:
    """A ``compress-and-export`` run folder, read: its config, search state, test record, and the
    run's own data and trainer (a :class:`prunekit.pipeline.Pipeline` over the folder, which
    writes nothing until it runs)."""

    def __init__(self, path: Path, rounds: str):
        from prunekit.pipeline import Pipeline, PipelineConfig, model_is_detector

        missing = [f for f in SOURCE_FILES if not (path / f).is_file()]
        if missing:
            raise SystemExit(f"{path}: not a finished compress-and-export run (missing {', '.join(missing)})")
        self.path = path
        self.raw = PipelineConfig.from_yaml(path / "config.yaml")
        self.config = PipelineConfig(**self.raw)
        self.search = json.loads((path / "search" / "search.json").read_text())
        self.test_record = json.loads((path / "test.json").read_text())
        self.lineage = lineage(self.search, rounds)
        if self.lineage["depth"] == 0:
            raise SystemExit(f"{path}: the run handed back its original uncompressed: nothing to compare")
        self.pipeline = Pipeline(self.config, path)
        self.distill = distillation(self.raw, model_is_detector(self.config.model))

    def datasets(self) -> tuple[Any, Any, Any]:
        train, val = self.pipeline._datasets()
        test = self.pipeline._test_set()
        if test is None:
            raise SystemExit(f"{self.path}: the run's data has no test split {self.config.test_split!r}")
        return train, val, test

    def trainer(self, original: nn.Module) -> Any:
        """prunekit's trainer as the run's budget search built it (``pipeline._prune_search``)."""
        t = self.pipeline.search_trainer()  # with the task's recipe filled in, as the run used it
        if self.distill:
            t.distill_from(original, **self.distill)
        return t


# --- one recipe, one matching, one method -----------------------------------------------------


def split_epochs(total: int, rounds: int, front: bool) -> list[int]:
    """``total`` epochs over ``rounds``, the remainder to the first rounds (``front``) or the last."""
    base, extra = divmod(total, rounds)
    out = [base + (i < extra) for i in range(rounds)]
    return out if front else out[::-1]


class Bench:
    """One task's run: the source, the trainer, the out folder and the latency meter."""

    def __init__(self, args: argparse.Namespace, source: Source):
        self.args, self.src = args, source
        self.out: Path = args.out
        self.original = prunekit.load(source.path / "original.pt").cpu()
        self.prunekit_model = prunekit.load(source.path / "model.pt").cpu()
        self.trainer = source.trainer(self.original)
        self.hp = source.config.prune
        self.target = {"params": float(count_params(self.prunekit_model)),
                       "macs": float(model_stats(self.prunekit_model)["macs"])}  # fmt: skip
        (self.out / "onnx").mkdir(parents=True, exist_ok=True)
        self.ref_onnx = self.out / "onnx" / "prunekit.onnx"
        if not self.ref_onnx.is_file():
            self.export(self.prunekit_model, self.ref_onnx, check=True)
        self._latency: dict[tuple[int, ...], float] = {}
        # what a recipe's record was made with: a record of other settings is run again, not reused
        a, lin = args, source.lineage
        self.settings = {"source": str(source.path), "epochs": lin["epochs"], "sparse_epochs": lin["sparse_epochs"],
                         "reg": a.reg, "tolerance": a.tolerance, "latency_tolerance": a.latency_tolerance}  # fmt: skip
        self.t0 = time.perf_counter()

    def stamp(self, msg: str) -> None:
        log.info("[%7.0fs] %s", time.perf_counter() - self.t0, msg)

    def export(self, model: nn.Module, path: Path, check: bool = False, source: Path | None = None) -> None:
        from prunekit.export import export_onnx

        export_onnx(
            model, path, form="raw", opset=self.src.config.opset, check=check, source_checkpoint=source
        )

    def latency_ratio(self, model: nn.Module) -> float:
        """ORT CPU batch-1 latency of ``model`` over prunekit's model's, timed interleaved in one call."""
        from prunekit.bench.latency import ort_cpu_latency
        from prunekit.bench.timing import TimingConfig

        key = tuple(p.shape[0] for p in model.parameters())
        if key not in self._latency:
            trial = self.out / "onnx" / "trial.onnx"
            self.export(model, trial)
            cfg = TimingConfig(
                warmup_iters=5, min_iters=20, min_time_s=self.args.latency_time, max_time_s=60.0
            )
            t = ort_cpu_latency({"prunekit": self.ref_onnx, "candidate": trial}, 1, cfg)
            self._latency[key] = t["candidate"]["p50_ms"] / t["prunekit"]["p50_ms"]
        return self._latency[key]

    def cost(self, model: nn.Module, kind: str) -> float:
        if kind == "latency":
            return self.latency_ratio(model)
        return float(count_params(model) if kind == "params" else model_stats(model)["macs"])

    def cut(
        self, method: str, model: nn.Module, scope: str, cap: float, kind: str, target: float
    ) -> tuple[nn.Module, dict[str, Any]]:
        """``model`` cut to ``target`` of ``kind`` (params, macs; latency: the ratio to prunekit's)."""
        reg = self.args.reg

        def cost_at(kind_: str) -> Callable[[float], float]:
            return lambda r: self.cost(pruned_at(method, model, r, scope, cap, reg), kind_)

        if kind == "latency":  # seeded where the MACs match: few exports and timings
            start, _, _ = search_ratio(cost_at("macs"), self.target["macs"], self.args.tolerance)
            ratio, got, trials = search_ratio(
                cost_at("latency"), target, self.args.latency_tolerance, start, 10
            )
            tol = self.args.latency_tolerance
        else:
            ratio, got, trials = search_ratio(cost_at(kind), target, self.args.tolerance)
            tol = self.args.tolerance
        info = {"ratio": ratio, "kind": kind, "target": target, "got": got,
                "off_pct": 100 * (got / target - 1), "matched": abs(got / target - 1) <= tol, "trials": trials}  # fmt: skip
        return pruned_at(method, model, ratio, scope, cap, reg), info

    def train(self, model: nn.Module, epochs: int, method: str | None, tag: str) -> None:
        """``epochs`` of prunekit's trainer: under ``method``'s sparsity term when given, else fine-tuning."""
        if epochs <= 0:
            return
        reg = None
        if method is not None:
            pruner = make_pruner(method, model, 0.5, self.args.reg, for_regularizer=True)
            reg = TPRegularizer(pruner, model, self.args.reg)
        self.trainer.train(model, epochs, reg, tag)
        model.cpu().to(memory_format=torch.contiguous_format)

    def sparse_start(self, method: str, epochs: int) -> tuple[nn.Module, float]:
        """The original after ``epochs`` of ``method``'s sparse training (shared by its recipes), and its CPU s."""
        path = self.out / method / f"sparse_e{epochs}.pt"
        rec = path.with_suffix(".json")
        if path.is_file() and rec.is_file():
            return prunekit.load(path).cpu(), float(json.loads(rec.read_text())["cpu_s"])
        cpu0 = time.process_time()
        model = copy.deepcopy(self.original)
        self.stamp(f"{method}: {epochs} epochs of Torch-Pruning sparse training (reg {self.args.reg:g})")
        self.train(model, epochs, method, f"{method}: sparse training")
        prunekit.save(model, path)
        cpu = time.process_time() - cpu0
        atomic_write_json(rec, {"cpu_s": cpu, "epochs": epochs, "reg": self.args.reg})
        return model, cpu

    def recipe(self, method: str, matching: str, scope: str, rounds: int) -> dict[str, Any]:
        """One lineage: ``rounds`` x (sparse share, cut, fine-tuning share), scored on validation."""
        from prunekit.evaluate import primary_metric

        name = f"{scope}_x{rounds}"
        ck = self.out / method / matching / f"{name}.pt"
        path = ck.with_suffix(".json")
        if path.is_file() and ck.is_file():
            done = json.loads(path.read_text())
            if done.get("settings") == self.settings:
                return done
            log.warning("%s: made with other settings (%s); run again", path, done.get("settings"))
        ck.parent.mkdir(parents=True, exist_ok=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        lin = self.src.lineage
        sparse_total = lin["sparse_epochs"] if method != "tp_magnitude" else 0
        sparse = split_epochs(sparse_total, rounds, front=True)
        fine = split_epochs(lin["epochs"] - sparse_total, rounds, front=False)
        cap = 1 - (1 - MAX_RATIO) ** (1 / rounds)
        kind = matching.removeprefix("equal_")
        proxy = "macs" if kind == "latency" else kind
        c0 = self.cost(self.original, proxy)
        extra_cpu, model, cuts = 0.0, self.original, []
        torch.manual_seed(self.hp.seed)
        for i in range(rounds):
            if sparse[i] and i == 0:
                model, extra_cpu = self.sparse_start(method, sparse[0])
            elif sparse[i]:
                self.train(model, sparse[i], method, f"{method} {matching} {name}: round {i + 1} sparse")
            last = i == rounds - 1
            step_kind = kind if last else proxy
            goal = 1.0 if last and kind == "latency" else c0 * (self.target[proxy] / c0) ** ((i + 1) / rounds)
            model, info = self.cut(method, model, scope, cap, step_kind, goal)
            cuts.append(info)
            self.stamp(f"{method} {matching} {name}: round {i + 1}/{rounds} cut at ratio {info['ratio']:.3f} to "
                       f"{info['got']:,.4g} {step_kind} ({info['off_pct']:+.1f}%), {fine[i]} epochs of fine-tuning")  # fmt: skip
            self.train(model, fine[i], None, f"{method} {matching} {name}: round {i + 1} fine-tuning")
        if self.hp.recalibrate_bn:
            self.trainer.recalibrate(model)
        val = 100 * float(primary_metric(self.trainer.evaluate(model)))
        prunekit.save(model, ck, extra={"peers": {"method": method, "matching": matching, "recipe": name}})
        stats = model_stats(model)
        rec = {"recipe": name, "scope": scope, "rounds": rounds, "cap_per_round": cap, "params": stats["params"],
               "macs": stats["macs"], "val_metric": val, "matched": cuts[-1]["matched"],
               "off_pct": cuts[-1]["off_pct"], "ratio": [c["ratio"] for c in cuts], "cuts": cuts,
               "epochs": lin["epochs"], "sparse_epochs": sum(sparse), "fine_epochs": fine, "sparse_rounds": sparse,
               "cpu_s": time.process_time() - cpu0 + extra_cpu, "wall_s": time.perf_counter() - wall0,
               "checkpoint": str(ck), "settings": self.settings}  # fmt: skip
        atomic_write_json(path, rec)
        self.stamp(f"{method} {matching} {name}: val {val:.2f}, {stats['params']:,} params, "
                   f"{'matched' if rec['matched'] else 'NOT matched'} ({rec['off_pct']:+.1f}%)")  # fmt: skip
        return rec

    def entry(self, method: str, matching: str) -> dict[str, Any]:
        """The best recipe on validation among those that match (else the closest), exported and verified."""
        path = self.out / method / matching / "selected.json"
        recs = [
            self.recipe(method, matching, s, r) for s in self.args.scopes for r in self.src.lineage["rounds"]
        ]
        if path.is_file():
            done = json.loads(path.read_text())
            if (
                sorted(done["recipes"]) == sorted(r["recipe"] for r in recs)
                and done.get("settings") == self.settings
            ):
                return done
        matched = [r for r in recs if r["matched"]]
        # none matched: the closest to the criterion, reported as not matched
        pick = max(matched or [min(recs, key=lambda r: abs(r["off_pct"]))], key=lambda r: r["val_metric"])
        ck = Path(pick["checkpoint"])
        onnx = self.out / "onnx" / f"{method}.{matching}.onnx"
        sel = {**{k: pick[k] for k in ("recipe", "scope", "rounds", "ratio", "matched", "off_pct", "val_metric",
                                       "epochs", "sparse_epochs", "cpu_s", "checkpoint")},
               "cpu_s_recipes": sum(r["cpu_s"] for r in recs),
               "recipes": {r["recipe"]: {k: r[k] for k in ("val_metric", "matched", "off_pct", "params", "macs")}
                           for r in recs}, "onnx": str(onnx), "verify": self.verify(ck, onnx), "settings": self.settings}  # fmt: skip
        atomic_write_json(path, sel)
        return sel

    def verify(self, ck: Path, onnx: Path) -> dict[str, Any]:
        """prunekit's export (self-check on) and its ORT CPU verification on validation images."""
        from prunekit.deploy.verify import verify

        c = self.src.config
        try:
            self.export(prunekit.load(ck), onnx, check=True, source=ck)
            report = verify(ck, onnx, data=c.data, split=c.val_split, backends=["ort-cpu"],
                            num_images=c.verify_images, out=onnx.with_suffix(".verify.json"))  # fmt: skip
            return {"passed": bool(report["passed"])}
        except Exception as e:  # recorded, not fatal: a model that does not export faithfully is a finding
            log.error("%s: export / verification failed: %s", ck, e)
            return {"passed": False, "error": f"{type(e).__name__}: {e}"}


# --- the closing measurements and the result ---------------------------------------------------


def closing(b: Bench, entries: dict[str, dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ORT timing, paired test scores) of prunekit's model and every pick, in one run each."""
    from benchmarks.common import ort_interleaved, paired_classification
    from benchmarks.paired import paired_detection

    onnx = {"prunekit": b.ref_onnx}
    cks = {"prunekit": b.src.path / "model.pt"}
    for m, per in entries.items():
        for k, e in per.items():
            if Path(e["onnx"]).is_file():
                onnx[f"{m}.{k}"] = Path(e["onnx"])
            cks[f"{m}.{k}"] = Path(e["checkpoint"])
    b.stamp(f"ORT CPU batch 1, {len(onnx)} models interleaved, {b.args.ort_rounds} rounds")
    timing = ort_interleaved(onnx, rounds=b.args.ort_rounds, warmup=5)
    _, _, test = b.src.datasets()
    b.stamp(f"paired test scores: {len(cks)} models on {len(test)} images")
    if b.prunekit_model.prunekit_config.is_detector:
        paired = paired_detection(cks, test, "prunekit", b.args.bootstrap, b.src.config.seed)
    else:
        paired = paired_classification(cks, test, "prunekit")
    return timing, paired


def assemble(
    b: Bench, entries: dict[str, Any], timing: dict[str, Any], paired: dict[str, Any]
) -> dict[str, Any]:
    metric = paired["metric"]
    src, lin = b.src, b.src.lineage
    pk = {"params": int(b.target["params"]), "macs": int(b.target["macs"]),
          "ort_b1_ms": timing["prunekit"]["latency_ms_median"], "metric": paired["prunekit"][metric],
          "cpu_s": lin["search_cpu_s"], "metric_run_test_json": src.test_record.get("metric_compressed")}  # fmt: skip
    res: dict[str, Any] = {"prunekit": dict.fromkeys(MATCHINGS, pk)}
    for m, per in entries.items():
        res[m] = {}
        for k, e in per.items():
            key, model = f"{m}.{k}", prunekit.load(e["checkpoint"])
            stats = model_stats(model)
            t = timing.get(key, {})
            res[m][k] = {"params": stats["params"], "macs": stats["macs"], "ort_b1_ms": t.get("latency_ms_median"),
                         "metric": paired[key][metric], "cpu_s": e["cpu_s"],
                         "paired_diff": paired[key]["diff_reference_minus_this"], "paired_se": paired[key]["diff_se"],
                         "latency_ratio_to_prunekit": None if not t else t["latency_ms_median"] / pk["ort_b1_ms"],
                         **{f: e[f] for f in ("recipe", "matched", "off_pct", "val_metric", "ratio", "epochs",
                                              "sparse_epochs", "cpu_s_recipes", "recipes", "verify")}}  # fmt: skip
    res["targets"] = targets(res)
    res["setup"] = {
        "source": str(src.path), "data": src.config.data, "model": src.config.model, "width": src.config.width,
        "val_split": src.config.val_split, "test_split": src.config.test_split, "test_images": paired["images"],
        "metric": metric, "lineage": lin, "distillation": src.distill, "scopes": b.args.scopes,
        "tolerance": b.args.tolerance, "latency_tolerance": b.args.latency_tolerance, "reg": b.args.reg,
        "max_pruning_ratio": MAX_RATIO, "round_to": None, "bootstrap": paired.get("bootstrap"),
        "original_test_metric": src.test_record.get("metric_original"),
        "control_test_metric": src.test_record.get("metric_control"),
        "torch_pruning": getattr(_tp(), "__version__", "?"),
    }  # fmt: skip
    res["command"] = command_line()
    res["machine"] = machine_info("cpu", b.args.threads)
    return res


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """Per matching: prunekit >= the best peer + 1 point, the paired difference > 2 SE; as measured."""
    out: dict[str, Any] = {}
    for k in MATCHINGS:
        rows = {m: res[m][k] for m in TP_METHODS if k in res.get(m, {})}
        if not rows:
            continue
        best = max(rows, key=lambda m: rows[m]["metric"])
        diff, se = rows[best]["paired_diff"], rows[best]["paired_se"]
        ahead, resolved = diff >= 1.0, diff > 2 * se
        close = None
        if not ahead:
            close = f"prunekit needs {1.0 - diff:.2f} more points against {best}"
        elif not resolved:
            close = f"not resolved: the paired SE ({se:.2f}) would have to fall below {diff / 2:.2f} (more test images)"
        out[k] = {"best_peer": best, "paired_diff": diff, "paired_se": se, "ahead_by_1": ahead,
                  "resolved_2se": resolved, "met": ahead and resolved, "to_close": close}  # fmt: skip
    out["all_met"] = all(v["met"] for v in out.values())
    return out


def render(whole: dict[str, Any]) -> str:
    lines = ["# prunekit against Torch-Pruning: equal parameters, MACs and measured latency", ""]
    for task, r in whole.items():
        s = r["setup"]
        lin = s["lineage"]
        lines += [f"## {task}", "", f"`{r['command']}`", "",
                  f"Source `{s['source']}` ({s['model']} w{s['width']}, {s['data']}); test split `{s['test_split']}` "
                  f"({s['test_images']} images), recipes picked on `{s['val_split']}`. Every lineage {lin['epochs']} "
                  f"epochs ({lin['sparse_epochs']} under a sparsity term where the method has one), as prunekit's "
                  f"kept point (depth {lin['depth']} x 2 stages x {lin['epochs_per_stage']} epochs); distillation "
                  f"{s['distillation']}. Torch-Pruning {s['torch_pruning']}, scopes {s['scopes']}, rounds "
                  f"{lin['rounds']}. ORT CPU batch 1, all models interleaved. CPU s: prunekit's whole budget search "
                  "(controls included); a peer's picked lineage.", ""]  # fmt: skip
        head = ["method", "matching", "params", "MACs", "ORT b1 ms", s["metric"], "prunekit minus it",
                "recipe (off)", "CPU s"]  # fmt: skip
        body = []
        for m in METHODS:
            for k in MATCHINGS:
                x = r.get(m, {}).get(k)
                if x is None:
                    continue
                diff = "-" if "paired_diff" not in x else f"{x['paired_diff']:+.2f} ± {x['paired_se']:.2f}"
                rec = "-" if "recipe" not in x else f"{x['recipe']} ({x['off_pct']:+.1f}%)" + (
                    "" if x["matched"] else " NOT matched")  # fmt: skip
                body.append([m, k, f"{x['params']:,}", f"{x['macs'] / 1e6:,.2f}M", _num(x["ort_b1_ms"], 3),
                             f"{x['metric']:.2f}", diff, rec, _num(x["cpu_s"], 0)])  # fmt: skip
        lines.append(markdown_table(head, body, align="llrrrrrlr"))
        t = r["targets"]
        lines += ["", "Targets (prunekit >= best peer + 1, difference > 2 SE): " + ("all met" if t["all_met"] else "NOT all met"), ""]  # fmt: skip
        for k in MATCHINGS:
            if k in t:
                v = t[k]
                lines.append(f"- {k}: best peer {v['best_peer']}, {v['paired_diff']:+.2f} ± {v['paired_se']:.2f}: "
                             + ("met" if v["met"] else f"NOT met ({v['to_close']})"))  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


# --- the plan, the smoke source, main --------------------------------------------------------


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What ``--dry-run`` prints: the source files, the epochs, methods, matchings, recipes and a cost estimate."""
    import yaml

    src = args.source
    out: dict[str, Any] = {"task": args.task, "source": str(src), "out": str(args.out), "result": str(args.result),
                           "files": {f: (src / f).is_file() for f in SOURCE_FILES},
                           "methods": ["prunekit", *args.methods], "matchings": args.matchings, "scopes": args.scopes}  # fmt: skip
    if (src / "config.yaml").is_file():
        raw = yaml.safe_load((src / "config.yaml").read_text()) or {}
        out["config"] = {k: raw.get(k) for k in ("model", "data", "width", "batch_size", "lr", "val_split",
                                                  "test_split", "schedule", "opset", "seed")}  # fmt: skip
        from prunekit.pipeline import PipelineConfig, model_is_detector

        model = str(raw.get("model") or PipelineConfig.model)  # the run's default where config.yaml has none
        out["distillation"] = distillation(raw, model_is_detector(model))
    if (src / "search" / "search.json").is_file():
        lin = out["lineage"] = lineage(json.loads((src / "search" / "search.json").read_text()), args.rounds)
        n = len(args.methods) * len(args.matchings) * len(args.scopes) * len(lin["rounds"])
        out["recipes"] = [f"{s}_x{r}" for s in args.scopes for r in lin["rounds"]]
        epochs = training_epochs(lin, args.methods, len(args.matchings) * len(args.scopes))
        out["estimate"] = {"lineages": n, "epochs": epochs}
        train = _manifest_train(src)
        if train.get("cpu_s") and train.get("epochs"):
            per = train["cpu_s"] / train["epochs"]
            out["estimate"].update(cpu_s_per_epoch=per, cpu_h=epochs * per * 1.15 / 3600,
                                   note="the epochs trained x the source's CPU per training epoch, +15% for "
                                   "scoring, the ratio and latency searches, export and verification")  # fmt: skip
    else:
        out["lineage"] = "unknown until search/search.json is written (the source run has not pruned yet)"
    return out


def training_epochs(lin: dict[str, Any], methods: list[str], per_recipe: int) -> int:
    """Epochs the plan trains: every lineage's ``E``, its first sparse share trained once per method
    (:meth:`Bench.sparse_start`); ``per_recipe`` lineages (matchings x scopes) per round count."""
    total = 0
    for m in methods:
        sparse = 0 if m == "tp_magnitude" else lin["sparse_epochs"]
        shared = set()
        for r in lin["rounds"]:
            first = split_epochs(sparse, r, front=True)[0]
            shared.add(first)
            total += per_recipe * (lin["epochs"] - first)
        total += sum(shared)
    return total


def _manifest_train(src: Path) -> dict[str, Any]:
    try:
        return json.loads((src / "manifest.json").read_text())["stages"]["train"].get("metrics") or {}
    except (OSError, KeyError, ValueError):
        return {}


def adapter_check(task: str) -> dict[str, Any]:
    """Each method's adapter, both scopes, on an untrained model of the task's architecture (width
    0.125, BN scales drawn at random: untrained ones are all 1, a tie for BN-scale pruning), cut to a
    quarter of its parameters."""
    from benchmarks.common import make_vgg

    torch.manual_seed(0)
    if task == "helmet_ssd300":
        from prunekit.models import ssd300_vgg16

        model = ssd300_vgg16(num_classes=3, width=0.125, batch_norm=True, class_names=["a", "b"])
    else:
        model = make_vgg("cifar", 0.125, [str(i) for i in range(10)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    target = count_params(model) // 4
    out: dict[str, Any] = {"params": count_params(model), "target": target}
    for method in TP_METHODS:
        for scope in SCOPES:

            def size(r: float, s: str = scope, me: str = method) -> float:
                return count_params(pruned_at(me, model, r, s, MAX_RATIO, 5e-4))

            ratio, _, _ = search_ratio(size, target, 0.05)
            pruned = pruned_at(method, model, ratio, scope, MAX_RATIO, 5e-4).eval()
            row: dict[str, Any] = {"ratio": ratio, "params": count_params(pruned)}
            with torch.no_grad():
                if pruned.prunekit_config.is_detector:
                    row.update(l2norm_scale=pruned.backbone.scale_weight.numel(),
                               conv4_3=pruned.prunekit_config.channels["conv4_3"],
                               heads_kept=_head_widths(pruned) == _head_widths(model),
                               outputs=sorted(pruned([torch.rand(3, 300, 300)])[0]))  # fmt: skip
                else:
                    row["outputs"] = list(pruned(torch.rand(1, 3, 32, 32)).shape)
            out[f"{method}.{scope}"] = row
    return out


def _head_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.head.modules() if isinstance(m, nn.Conv2d)]


SMOKE_CONFIG = {
    "model": "vgg16", "width": 0.0625, "epochs_train": 8, "batch_size": 32, "lr": 0.05,
    "search": {"stage_steps": 16, "max_candidates": 2, "first_step": 0.5, "min_step": 0.2, "max_drop": 30.0},
    "bench_batch": [1], "bench_min_time": 0.2, "verify_images": 16, "backends": ["ort-cpu"],
}  # fmt: skip


def smoke_source(out: Path) -> Path:
    """The product's command on generated, learnable 32x32 images (4 classes, brightness-coded) with a
    tiny VGG and a short search: a real run folder, in ~20 s on one thread."""
    import yaml
    from PIL import Image

    data, src = out / "smoke_data", out / "source"
    if not (data / "test").is_dir():
        g = torch.Generator().manual_seed(0)
        for split, n in (("train", 256), ("val", 96), ("test", 96)):
            y = torch.randint(0, 4, (n,), generator=g)
            x = torch.randint(0, 80, (n, 32, 32, 3), generator=g) + (y * 40).view(-1, 1, 1, 1)
            for i in range(n):
                d = data / split / "abcd"[int(y[i])]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i].to(torch.uint8).numpy()).save(d / f"{i:04d}.png")
    if not (src / "test.json").is_file():
        cfg = out / "smoke_config.yaml"
        cfg.write_text(yaml.safe_dump({**SMOKE_CONFIG, "data": f"folder:{data.resolve()}"}))
        cmd = [sys.executable, "-m", "prunekit.cli", "compress-and-export", "--config", str(cfg)]
        cmd += ["--out", str(src)]
        if (src / "manifest.json").is_file():
            cmd.append("--resume")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"smoke source: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return src


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.methods = [m for m in args.methods.split(",") if m]
    args.matchings = [k for k in args.matchings.split(",") if k]
    args.scopes = [s for s in args.scopes.split(",") if s]
    for given, known in ((args.methods, TP_METHODS), (args.matchings, MATCHINGS), (args.scopes, SCOPES)):
        if set(given) - set(known):
            raise SystemExit(f"unknown {sorted(set(given) - set(known))}; choose from {known}")
    task = "smoke" if args.smoke else args.task
    args.out = args.out or Path("runs/peers") / task
    args.source = args.source or (args.out / "source" if args.smoke else TASKS[args.task])
    if args.dry_run:
        res = plan(args)
        if args.adapter:
            res["adapter"] = adapter_check(args.task)
        print(json.dumps(res, indent=1))
        return res
    _tp()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.source = smoke_source(args.out)
        args.result = args.out / "peers.json"
        args.latency_time, args.ort_rounds = min(args.latency_time, 0.1), min(args.ort_rounds, 10)
        args.bootstrap = min(args.bootstrap, 100)
    b = Bench(args, Source(args.source, args.rounds))
    lin = b.src.lineage
    b.stamp(f"peers {task}: source {args.source}, E = {lin['epochs']} epochs, S = {lin['sparse_epochs']}, rounds "
            f"{lin['rounds']}, prunekit {int(b.target['params']):,} params, {int(b.target['macs']):,} MACs")  # fmt: skip
    entries = {m: {k: b.entry(m, k) for k in args.matchings} for m in args.methods}
    timing, paired = closing(b, entries)
    res = assemble(b, entries, timing, paired)
    whole = json.loads(args.result.read_text()) if args.result.is_file() else {}
    earlier = sorted(k for k, v in whole.items() if not (isinstance(v, dict) and "setup" in v))
    if earlier:  # one current result per benchmark: the former design's rows stay in git history
        log.warning("%s: dropping %s, results of the former design (git keeps them)", args.result, earlier)
    whole = {k: v for k, v in whole.items() if k not in earlier}
    whole[task] = res
    save_result(args.result, whole, render)
    b.stamp("done: " + ", ".join(f"{k}: {v['paired_diff']:+.2f} ± {v['paired_se']:.2f} vs {v['best_peer']}"
                                 for k, v in res["targets"].items() if isinstance(v, dict)))  # fmt: skip
    return res


if __name__ == "__main__":
    main()
