"""The paper's VGG16 / CIFAR-10 experiment (its Table 8) on the real CIFAR-10 images.

    python benchmarks/real_cifar10.py --width 0.25 --train-images 5000 --epochs 12      # CPU
    python benchmarks/real_cifar10.py --device cuda --width 1.0 --train-images 50000 --epochs 160

Stages (``--stages``, in this order; ``--resume`` reuses the finished ones from ``--out``):

* ``baseline``: VGG16 trained from scratch on ``--train-images`` of the train split (a seeded,
  class-mixed subset; the next ``--val-images`` are held out as the validation set that the λ and
  threshold searches score on). ``--variant imagenet`` (default) is the paper's network: the
  torchvision layout whose 25088-4096-4096 classifier makes it 134.3M parameters at width 1;
  ``--variant cifar`` is the common 512-512 CIFAR head. Batch norm is on in both (from-scratch
  training on short schedules needs it; the paper's Table 8 model has it too).
* ``paper``: the two VGG16 phases (conv1_1..conv5_3, then fc6/fc7), each sparsity -> threshold
  -> selection -> surgery -> retraining, with the paper's settings (``align=1``, uniform L1).
* ``hw``: the same with the hardware-aware settings (``align=8``, MACs-weighted L1).
* ``l1``: the L1-norm filter ranking (Li et al.) cut from the baseline to the ``paper`` model's
  parameter count and retrained for as many epochs as the ``paper`` run trained in all.

Top-1 is reported on ``--test-images`` of the test split (default all 10,000). The images are the
JPEG re-encoded copy in ``../shared/data`` (about 1-2 points below the original pickles), read
through ``prunekit.data`` (the archive is decoded once into a uint8 tensor). Writes
``benchmarks/results/real_cifar10.{json,md}`` (``--result``) with device, versions, wall time and
the command. ``--smoke`` shrinks everything to a few hundred images and one epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit.data import ImageFolder, TensorImageDataset, build_dataset, cached_uint8
from prunekit.data.transforms import classification_train_transforms
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.models import build_model
from prunekit.models.vgg import CIFAR_MEAN, CIFAR_STD, vgg16_config
from prunekit.prune.baselines import prune_baseline
from prunekit.prune.method import PruneConfig, phase_rows, run_phases
from prunekit.prune.report import layer_table, model_stats
from prunekit.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ("baseline", "paper", "hw", "l1", "control")
LABELS = {
    "baseline": "baseline (unpruned)",
    "paper": "multi-layer, paper settings (align 1)",
    "hw": "multi-layer, hardware-aware (align 8, MACs-weighted L1)",
    "l1": "L1-norm (Li et al.) at the paper model's size",
    "control": "control: baseline + the paper run's epochs, unpruned",
}
log = logging.getLogger("real_cifar10")


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """Where the figures were measured: CPU model, cores, load, library versions (and the GPU)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "onnxruntime", "onnx", "numpy", "pycocotools"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            versions[mod] = None
    versions["prunekit"] = getattr(prunekit, "__version__", "?")
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "loadavg": list(os.getloadavg()),
        "versions": versions,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def load_cifar(
    data_dir: Path, n_train: int, n_val: int, n_test: int | None, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """(train, val, test) from the JPEG archives, decoded once into memory.

    Train and val are disjoint seeded random subsets of the train split (class-mixed: the archive
    is sorted by class); test is a seeded random subset of the test split (all of it by default).
    """
    spec = f"folder:{data_dir}/cifar10-jpg-{{split}}.tar.gz"
    tr = build_dataset(spec, "train")
    te = build_dataset(spec, "test")
    assert isinstance(tr, ImageFolder) and isinstance(te, ImageFolder)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/real_cifar10"))
    ap.add_argument("--result", type=Path, default=RESULTS / "real_cifar10.json")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--resume", action="store_true", help="reuse finished stages in --out")
    ap.add_argument("--variant", choices=("imagenet", "cifar"), default="imagenet")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--epochs", type=int, default=12, help="baseline training epochs")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--prune-lr", type=float, default=0.01, help="sparsity and retraining lr")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sparsity-epochs", type=int, default=2)
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--lam-grid", default="2e-4,1e-3")
    ap.add_argument("--k-range", default="0.25,0.5,0.75,1,1.25,1.5,2")
    ap.add_argument("--eps1", type=float, default=1.0)
    ap.add_argument("--eps2", type=float, default=15.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few hundred images, one epoch: plumbing only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_images, args.val_images, args.test_images = 256, 64, 128
        args.epochs = args.sparsity_epochs = args.retrain_epochs = 1
        args.lam_grid, args.k_range = "1e-3", "0.5,1"
    stages = [s for s in args.stages.split(",") if s]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; choose from {STAGES}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def stamp(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    train_set, val_set, test_set = load_cifar(
        args.data_dir, args.train_images, args.val_images, args.test_images, args.seed
    )
    stamp(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test images")
    is_cuda = args.device.startswith("cuda")

    def tcfg(epochs: int, lr: float, warmup: int = 0) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, lr=lr, warmup_iters=warmup, schedule="cosine", batch_size=args.batch_size,
            device=args.device, seed=args.seed, log_every=20, channels_last=True, amp=is_cuda,
        )  # fmt: skip

    def top1(model: nn.Module, ds: TensorImageDataset) -> float:
        return float(evaluate(model, ds, batch_size=256, device=args.device, progress=False)["top1"])

    saved = out / "stages.json"
    done: dict[str, Any] = json.loads(saved.read_text()) if (args.resume and saved.is_file()) else {}
    rows: dict[str, dict[str, Any]] = {}

    def record(stage: str, model: nn.Module, path: Path, **extra: Any) -> None:
        prunekit.save(model, path)
        rows[stage] = {"checkpoint": str(path), **model_stats(model), "top1": top1(model, test_set), **extra}
        rows[stage]["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        rows[stage]["wall_time_end"] = time.strftime("%Y-%m-%d %H:%M:%S")
        done[stage] = rows[stage]
        atomic_write_json(saved, done)
        stamp(f"{stage}: {rows[stage]}")

    # baseline
    base_path = out / "baseline.pt"
    if "baseline" in done and base_path.is_file():
        baseline = prunekit.load(base_path)
        rows["baseline"] = done["baseline"]
    elif "baseline" in stages:
        baseline = make_vgg(args.variant, args.width, train_set.classes)
        stamp(f"baseline: training {args.variant} VGG16-BN width {args.width} for {args.epochs} epochs")
        t0 = time.perf_counter()
        hist = train(baseline, train_set, tcfg(args.epochs, args.lr, warmup=50), progress=False)
        record("baseline", baseline, base_path, epochs=args.epochs, train_s=time.perf_counter() - t0,
               train_loss=hist["epochs"][-1]["loss"] if hist["epochs"] else None,
               filters={r["layer"]: r["filters_after"] for r in layer_table(baseline)})  # fmt: skip
    else:
        raise SystemExit(f"{base_path} not found: run the baseline stage first")
    baseline = baseline.to(args.device)
    base_params = rows["baseline"]["params"]

    def pruning(stage: str, align: int, cost_aware: str | None) -> None:
        path = out / f"{stage}.pt"
        if stage in done and path.is_file():
            rows[stage] = done[stage]
            return
        epochs_used = {"n": 0}

        def train_fn(model: nn.Module, regularizer: Any, epochs: int, tag: str) -> None:
            stamp(f"{stage} {tag}: {epochs} epochs")
            train(model, train_set, tcfg(epochs, args.prune_lr), regularizer=regularizer, progress=False)
            epochs_used["n"] += epochs

        def eval_fn(model: nn.Module) -> dict[str, Any]:
            return evaluate(model, val_set, batch_size=256, device=args.device, progress=False)

        hp = PruneConfig(
            eps1=args.eps1, eps2=args.eps2, lam_grid=_floats(args.lam_grid), k_range=_floats(args.k_range),
            threshold_search="scan", align=align, cost_aware=cost_aware,
            epochs_sparsity=args.sparsity_epochs, epochs_retrain=args.retrain_epochs, seed=args.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        pruned = run_phases(baseline, "vgg16", train_fn, eval_fn, hp, out / stage, resume=args.resume)
        summary = json.loads((out / stage / "summary.json").read_text())
        phases = phase_rows(summary)
        # epochs of a resumed run are not re-counted by train_fn: take them from the records
        epochs = sum(
            len(r.get("sparsity", {}).get("trials", [])) * args.sparsity_epochs + args.retrain_epochs
            for r in summary["records"]
            if not r.get("skipped")
        )
        pruned_before = {r["phase"]: r.get("pruned_metric") for r in summary["records"]}
        record(stage, pruned, path, epochs=epochs, prune_s=time.perf_counter() - t0, prune_config=hp.to_dict(),
               phases=phases, val_pruned_before_retrain=pruned_before,
               filters={r["layer"]: r["filters_after"] for r in layer_table(pruned)})  # fmt: skip

    if "paper" in stages:
        pruning("paper", align=1, cost_aware=None)
    if "hw" in stages:
        pruning("hw", align=8, cost_aware="macs")
    if "l1" in stages and "l1" not in done:
        if "paper" not in rows:
            raise SystemExit("the l1 stage needs the paper stage (its parameter count and epochs)")
        target, epochs = rows["paper"]["params"], rows["paper"]["epochs"]
        model, info = prune_baseline(baseline, "l1", target_params=target, seed=args.seed)
        before = top1(model, test_set)
        stamp(f"l1: {info['params']} params (target {target}), top-1 before retraining {before:.4f}")
        if epochs:
            train(model, train_set, tcfg(epochs, args.prune_lr), progress=False)
        record("l1", model, out / "l1.pt", epochs=epochs, top1_before_retrain=before,
               ratio=info["ratio"], filters=info["filters"])  # fmt: skip
    elif "l1" in done:
        rows["l1"] = done["l1"]

    if "control" in stages and "control" not in done and "paper" in rows:
        # The short CPU baseline is not converged: the pruned models' extra epochs alone raise top-1.
        # The control gets the same extra training without pruning, so drops can also be read against it.
        import copy

        model, epochs = copy.deepcopy(baseline), rows["paper"]["epochs"]
        stamp(f"control: {epochs} more epochs of the unpruned baseline")
        if epochs:
            train(model, train_set, tcfg(epochs, args.prune_lr), progress=False)
        record("control", model, out / "control.pt", epochs=args.epochs + epochs)
    elif "control" in done:
        rows["control"] = done["control"]

    base = rows["baseline"]
    verdict: dict[str, Any] = {}
    for stage in ("paper", "hw", "l1"):
        if stage in rows:
            r = rows[stage]
            x = base_params / r["params"]
            drop = 100 * (base["top1"] - r["top1"])
            verdict[stage] = {
                "compression_x": x,
                "macs_reduction_x": base["macs"] / r["macs"],
                "top1_drop_points": drop,
                "target_50x_within_1_point": bool(x >= 50 and drop <= 1.0),
            }
            if "control" in rows:
                verdict[stage]["top1_drop_vs_control_points"] = 100 * (rows["control"]["top1"] - r["top1"])
    result = {
        "benchmark": "real_cifar10",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "smoke": args.smoke,
        "model": {
            "arch": "vgg16",
            "variant": args.variant,
            "batch_norm": True,
            "width": args.width,
            "input_size": [32, 32],
            "note": "imagenet variant = torchvision layout (7x7 pool, 25088-4096-4096 head at width 1), "
            "the paper's Table 8 network; width scales every conv and fc6/fc7",
        },
        "data": {
            "source": f"{args.data_dir}/cifar10-jpg-{{train,test}}.tar.gz (JPEG q~75 re-encoded CIFAR-10)",
            "train_images": len(train_set),
            "val_images": len(val_set),
            "test_images": len(test_set),
            "split_seed": args.seed,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {LABELS[s]: {"stage": s, **rows[s]} for s in STAGES if s in rows},
        "verdict": verdict,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": {**machine_info(args.device, args.threads), "loadavg_before": load_before},
    }
    atomic_write_json(args.result, result)
    atomic_write_text(args.result.with_suffix(".md"), render(result))
    print(json.dumps(verdict, indent=2))
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown view of the result JSON."""
    m, d, mach = result["model"], result["data"], result["machine"]
    base = next(iter(result["models"].values()))
    lines = [
        "# VGG16 on real CIFAR-10 (JPEG copy)" + (" - SMOKE RUN, not a result" if result["smoke"] else ""),
        "",
        f"`{result['command']}`",
        "",
        *[f"- stage {k} ran as `{r['command']}`" for k, r in result["models"].items() if r.get("command")],
        "",
        f"VGG16-BN ({m['variant']} layout) at width {m['width']}, trained from scratch on {d['train_images']:,} "
        f"train images; λ/threshold searches on {d['val_images']:,} held-out train images; top-1 on "
        f"{d['test_images']:,} test images. Device: {mach['device']} ({mach['cpu']}, {mach['torch_threads']} "
        f"threads, load average {mach['loadavg_before'][0]:.1f} at start); torch {mach['versions']['torch']}; "
        f"wall time of this invocation {result['wall_s'] / 60:.1f} min (per-stage times in the JSON). Size = FP32 parameters in MiB; MACs at 32x32.",
        "",
        "| model | params | size (MiB) | MMACs | top-1 | drop (pts) | params x | MACs x | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['size_mb']:.2f} | {r['macs'] / 1e6:.1f} | {100 * r['top1']:.2f} | "
            f"{100 * (base['top1'] - r['top1']):.2f} | {base['params'] / r['params']:.1f} | "
            f"{base['macs'] / r['macs']:.1f} | {r.get('epochs', '-')} |"
        )
    for stage, v in result["verdict"].items():
        if stage == "l1":
            continue
        lines.append("")
        lines.append(
            f"- {stage}: {v['compression_x']:.1f}x fewer parameters, {v['macs_reduction_x']:.1f}x fewer MACs, "
            f"top-1 drop {v['top1_drop_points']:.2f} points"
            + (
                f" ({v['top1_drop_vs_control_points']:.2f} against the control)"
                if "top1_drop_vs_control_points" in v
                else ""
            )
            + "; target (>= 50x at <= 1 point) "
            f"{'met' if v['target_50x_within_1_point'] else 'NOT met'}."
        )
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for name, r in result["models"].items():
        if not r.get("phases"):
            continue
        lines += [
            "",
            f"## {name}: phases (validation top-1)",
            "",
            "| phase | λ | k | before | sparse | thresholded | pruned | retrained | params |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in r["phases"]:
            lines.append(
                f"| {p['phase']} | {p['lam']} | {p['k']} | {pct(p['val_before'])} | {pct(p['val_sparse'])} | "
                f"{pct(p['val_thresholded'])} | {pct(p['val_pruned'])} | {pct(p['val_retrained'])} | "
                f"{p['params'] or '-'} |"
            )
    names = [n for n, r in result["models"].items() if r.get("filters")]
    if names:
        layers = list(result["models"][names[0]]["filters"])
        lines += ["", "## Filters per layer", "", "| layer | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---:|" * len(names))
        for layer in layers:
            vals = [str(result["models"][n]["filters"].get(layer, "-")) for n in names]
            lines.append(f"| {layer} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
