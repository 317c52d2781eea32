"""What the benchmark scripts share: the data, the machine record, ONNX Runtime timing, paired
scores and the stage bookkeeping.

Each script is a list of stages (train the original, compress, control, baselines, ONNX Runtime
timing); every stage leaves a checkpoint and a row in ``<out>/stages.json``, so a later invocation
reuses what is done and a killed run loses one stage at most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit.bench.latency import ort_cpu_stats
from prunekit.bench.machine import describe_machine
from prunekit.bench.timing import TimingConfig
from prunekit.data import ImageFolder, TensorImageDataset, build_dataset, cached_uint8
from prunekit.data.transforms import Compose, RandomHorizontalFlip, classification_train_transforms
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.markdown import markdown_table
from prunekit.models import build_model
from prunekit.models.vgg import CIFAR_MEAN, CIFAR_STD, vgg16_config
from prunekit.paired import paired_difference
from prunekit.prune.report import layer_table, model_stats
from prunekit.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def command_line() -> str:
    """This run's command as it was typed: ``python -m benchmarks.NAME`` and its arguments."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    how = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return " ".join([Path(sys.executable).name, *how, *sys.argv[1:]])


def float_list(text: str) -> list[float]:
    """A comma list flag (``--shrink-grid 1,1.5,2``); kept a string in argparse so settings record it as typed."""
    return [float(x) for x in text.split(",") if x]


def standard_error(pct: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy of ``pct`` percent measured on ``n`` items."""
    p = pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """:func:`prunekit.bench.machine.describe_machine` (CPU model and ISA, cores, memory, GPUs, library
    versions) with this run's device, torch threads and load; ``versions`` is ``libraries``, under the
    name the results' renderers read."""
    info = describe_machine()
    info.update(
        device=device, torch_threads=threads, loadavg=list(os.getloadavg()), versions=info["libraries"]
    )
    return info


def ort_interleaved(
    paths: dict[str, Path], rounds: int = 30, warmup: int = 3, batch: int = 1, threads: int = 0
) -> dict[str, dict[str, float]]:
    """Median / p90 / min latency (ms) and FPS (from the median) per ONNX file on ONNX Runtime CPU:
    :func:`prunekit.bench.latency.ort_cpu_stats`, ``warmup`` calls each, then exactly ``rounds``
    interleaved rounds (the order rotated each round); ``threads`` 0 is ORT's default."""
    cfg = TimingConfig(
        warmup_iters=warmup, min_iters=rounds, max_iters=rounds, min_time_s=0.0, max_time_s=math.inf
    )
    stats = ort_cpu_stats(paths, batch, cfg, threads or None)
    return {
        n: {"latency_ms_median": s.p50_ms, "latency_ms_p90": s.p90_ms, "latency_ms_min": s.min_ms,
            "fps": 1000.0 * batch / s.p50_ms, "runs": s.n_iters}
        for n, s in stats.items()
    }  # fmt: skip


def paired_classification(models: dict[str, Path], test: Any, reference: str) -> dict[str, Any]:
    """Top-1 of each checkpoint on the same ``test`` images, and ``reference``'s minus each other's
    with its paired standard error (:func:`prunekit.paired.paired_difference`), in points."""
    from prunekit.evaluate import evaluate

    cards = {name: evaluate(prunekit.load(path), test, batch_size=256, progress=False, per_image=True)["scorecard"]
             for name, path in models.items()}  # fmt: skip
    out: dict[str, Any] = {"metric": "top1", "images": len(test), "reference": reference}
    out |= {name: {"top1": 100 * float(card.value())} for name, card in cards.items()}
    for name in models:
        if name == reference:
            continue
        diff, se = paired_difference(cards[reference], cards[name])
        out[name]["diff_reference_minus_this"] = 100 * diff
        out[name]["diff_se"] = 100 * se
    return out


def load_cifar(
    data_dir: Path, n_train: int, n_val: int, n_test: int | None, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """(train, val, test) from the JPEG archives, decoded once into memory.

    Train and val are disjoint seeded random subsets of the train split (class-mixed: the archive
    is sorted by class); test is a seeded random subset of the test split (all of it by default).
    """
    # the whole train archive, split here (build_dataset's "train" would be its held-out 90%)
    tr = ImageFolder(data_dir / "cifar10-jpg-train.tar.gz", "train")
    te = ImageFolder(data_dir / "cifar10-jpg-test.tar.gz", "test")
    x_tr, y_tr = cached_uint8(tr)
    x_te, y_te = cached_uint8(te)
    if n_train + n_val > len(x_tr):
        raise ValueError(f"--train-images + --val-images = {n_train + n_val} > {len(x_tr)} train images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_tr), generator=g)
    i_tr, i_val = perm[:n_train], perm[n_train : n_train + n_val]
    i_te = torch.randperm(len(x_te), generator=g)[: n_test or len(x_te)]
    aug = classification_train_transforms(32)
    return (
        TensorImageDataset(x_tr[i_tr], y_tr[i_tr], tr.classes, aug, source=tr.source),
        TensorImageDataset(x_tr[i_val], y_tr[i_val], tr.classes, None, source=tr.source),
        TensorImageDataset(x_te[i_te], y_te[i_te], te.classes, None, source=te.source),
    )


def make_vgg(variant: str, width: float, classes: list[str]) -> nn.Module:
    """VGG16 (BN) for 32x32 inputs: the config's input size and statistics are CIFAR's for either
    variant, so MACs are counted at 32x32 and the export takes 32x32 images."""
    cfg = vgg16_config(len(classes), variant=variant, width=width, batch_norm=True, class_names=classes)
    cfg = dataclasses.replace(
        cfg, input_size=(32, 32), image_mean=list(CIFAR_MEAN), image_std=list(CIFAR_STD)
    )
    return build_model(cfg)


def load_bccd(
    root: Path, augment: str, limit: int | None = None, train_split: str = "train"
) -> tuple[Any, Any, Any]:
    """(train, val, test) BCCD splits; ``augment`` "flip" (short schedules) or "ssd" (the full SSD
    augmentation, for long ones). ``limit`` keeps the first images of each split (smoke runs)."""
    spec = f"voc:{root}"
    tf = {"transforms": Compose([RandomHorizontalFlip()])} if augment == "flip" else {}
    train_set = build_dataset(spec, train_split, train=True, skip_bad=True, **tf)
    val_set = build_dataset(spec, "val", skip_bad=True)
    test_set = build_dataset(spec, "test", skip_bad=True)
    if limit:
        train_set, val_set, test_set = head(train_set, limit), head(val_set, limit), head(test_set, limit)
    return train_set, val_set, test_set


def head(ds: Any, n: int) -> Any:
    """The first ``n`` items of ``ds`` (smoke runs), keeping its class names."""
    from torch.utils.data import Subset

    sub = Subset(ds, range(min(n, len(ds))))
    sub.classes = ds.classes  # type: ignore[attr-defined]
    return sub


class Stages:
    """The stages' shared state: the datasets, the stage records (``stages.json``), the timers.

    ``datasets`` is ``(train, val, test)``; ``score(model, dataset)`` returns the metrics of a
    model in percent, with the primary one under ``primary`` (``top1`` / ``ap50``).
    """

    def __init__(
        self,
        args: Any,
        datasets: tuple[Any, Any, Any],
        score: Callable[[nn.Module, Any], dict[str, float]],
        primary: str,
    ):
        self.args, self.score, self.primary = args, score, primary
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.train_set, self.val_set, self.test_set = datasets
        self.saved = self.out / "stages.json"
        self.done: dict[str, Any] = json.loads(self.saved.read_text()) if self.saved.is_file() else {}
        self.stamp(f"data: {len(self.train_set)} train / {len(self.val_set)} val / {len(self.test_set)} test")

    def stamp(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f}s] {msg}", flush=True)

    def tcfg(
        self, epochs: int, lr: float, schedule: str = "cosine", warmup: int = 0, **kw: Any
    ) -> TrainConfig:
        a = self.args
        return TrainConfig(
            epochs=epochs, lr=lr, warmup_iters=warmup, schedule=schedule, batch_size=a.batch_size,
            device=a.device, seed=a.seed, log_every=50, channels_last=True, amp=a.device.startswith("cuda"), **kw,
        )  # fmt: skip

    def record(self, stage: str, model: nn.Module, cpu0: float, wall0: float, **extra: Any) -> dict[str, Any]:
        """Save ``model`` as ``<out>/<stage>.pt`` and its row: size, test metrics (+ SE), val metric."""
        path = self.out / f"{stage}.pt"
        prunekit.save(model, path)
        test = self.score(model, self.test_set)
        val = self.score(model, self.val_set)
        row = {
            **model_stats(model),
            **test,
            f"{self.primary}_se": standard_error(test[self.primary], len(self.test_set)),
            f"val_{self.primary}": val[self.primary],
            "checkpoint": str(path),
            "filters": {r["layer"]: r["filters_after"] for r in layer_table(model)},
            "dropout": {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)},
            "wall_s": round(time.perf_counter() - wall0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1),
            "loadavg_end": list(os.getloadavg()),
            **extra,
        }
        self.done[stage] = row
        atomic_write_json(self.saved, self.done)
        self.stamp(
            f"{stage}: params {row['params']:,}, MACs {row['macs']:,}, {self.primary} {test[self.primary]:.2f} "
            f"± {row[self.primary + '_se']:.2f}"
        )
        return row

    def model(self, stage: str) -> nn.Module:
        path = self.out / f"{stage}.pt"
        if stage not in self.done or not path.is_file():
            raise SystemExit(f"{path}: stage {stage!r} has not run yet (add it to --stages)")
        return prunekit.load(path).to(self.args.device)

    def ort_timing(self, names: Sequence[str], rounds: int) -> dict[str, dict[str, float]]:
        """ONNX Runtime CPU at batch 1 of the stages ``names``, exported and timed interleaved."""
        import tempfile

        from prunekit.export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for stage in names:
                paths[stage] = Path(tmp) / f"{stage}.onnx"
                export_onnx(self.model(stage).cpu(), paths[stage], check=False)
            return ort_interleaved(paths, rounds=rounds, warmup=5)

    def ort_ratio(self, names: tuple[str, str], rounds: int) -> dict[str, Any]:
        """ONNX Runtime CPU at batch 1: ``names[1]``'s throughput over ``names[0]``'s, interleaved."""
        timing = self.ort_timing(names, rounds)
        row = {
            "timing": timing,
            "fps_ratio_b1": timing[names[1]]["fps"] / timing[names[0]]["fps"],
            "loadavg": list(os.getloadavg()),
        }
        self.done["ort"] = row
        atomic_write_json(self.saved, self.done)
        self.stamp(
            f"ort: {names[1]} {timing[names[1]]['fps']:.1f} img/s vs {names[0]} {timing[names[0]]['fps']:.1f}"
        )
        return row


def save_result(path: Path, res: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """``res`` as ``path`` (JSON) and its markdown view ``render(res)`` beside it (``.md``)."""
    atomic_write_json(path, res)
    atomic_write_text(path.with_suffix(".md"), render(res))


def render_head(r: dict[str, Any], title: str, about: str) -> list[str]:
    """A result's markdown head: its title (marked when a smoke run), its command, what it measured where."""
    return [
        title + (" - SMOKE RUN, not a result" if r["smoke"] else ""),
        "",
        f"`{r['command']}`",
        "",
        about,
        "",
    ]


def render_tail(
    r: dict[str, Any], base: str, compressed: str, stages: tuple[str, ...], what: str
) -> list[str]:
    """The markdown after a result's main table: ORT line, targets, the phases, filters per layer."""
    lines: list[str] = []
    if "ort_cpu_fps_ratio_b1" in r:
        t = r["ort_timing"]
        lines += ["", f"ONNX Runtime CPU, batch 1, interleaved: {compressed} {t[compressed]['fps']:.1f} img/s, "
                  f"{base} {t[base]['fps']:.1f} img/s: **{r['ort_cpu_fps_ratio_b1']:.2f}x**."]  # fmt: skip
    if "targets" in r:
        shown = [f"{k} = {v:.2f}" if isinstance(v, float) else f"{k}: {'met' if v else 'NOT met'}"
                 for k, v in r["targets"].items()]  # fmt: skip
        lines += ["", "Targets: " + ", ".join(shown)]
    if compressed in r and r[compressed].get("phases"):
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        head = ["phase", "λ", "k", "before", "sparse", "thresholded", "pruned", "retrained", "params"]
        body = [[p["phase"], f"{p['lam']:.4g}", str(p["k"]), pct(p["val_before"]), pct(p["val_sparse"]),
                 pct(p["val_thresholded"]), pct(p["val_pruned"]), pct(p["val_retrained"]), f"{p['params']:,}"]
                for p in r[compressed]["phases"]]  # fmt: skip
        lines += ["", f"## {compressed}: phases (validation {what})", "", markdown_table(head, body)]
    if base in r:
        shown_stages = [s for s in stages if s in r]
        body = [
            [layer, *(str(r[s]["filters"].get(layer, "-")) for s in shown_stages)]
            for layer in r[base]["filters"]
        ]
        lines += ["", "## Filters per layer", "", markdown_table(["layer", *shown_stages], body)]
    return lines


def run_stages(
    b: Stages, names: list[str], known: tuple[str, ...], fns: dict[str, Any], write: Any,
    rerun: tuple[str, ...] = ("ort",),
) -> None:  # fmt: skip
    """Run the stages ``names`` in order (``fns["stage_<name>"](b)``), skipping the done ones except
    ``rerun`` (measurements of other stages' models, such as the ``ort`` timing: those models may
    have changed since), and rewrite the result after each."""
    for stage in names:
        if stage not in known:
            raise SystemExit(f"unknown stage {stage!r}; choose from {known}")
        if stage in b.done and stage not in rerun:
            b.stamp(f"{stage}: reused from {b.saved}")
            continue
        fns[f"stage_{stage}"](b)
        write(b)


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when files differ from it): which code made a result."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")
