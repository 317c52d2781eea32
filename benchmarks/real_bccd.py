"""SSD300 on BCCD (real blood-cell microscope images, PASCAL VOC layout): train, compress, measure.

    python benchmarks/real_bccd.py --width 0.125 --epochs 20                 # CPU, ~20 min
    python benchmarks/real_bccd.py --device cuda --width 1.0 --epochs 120    # the GPU run

Trains SSD300-VGG16 (batch norm) from scratch on the ``train`` split (205 images; its one
zero-size box is skipped), compresses it with the paper's four SSD300 phases (λ and threshold
searches score mAP50 on ``val``), retrains, and reports on the ``test`` split (72 images) AP50 and
AP@[.5:.95] (pycocotools) and VOC07 11-point AP, parameters, MACs, and the frame rate of both
models exported to ONNX (``prunekit.export.export_onnx``, raw form) on ONNX Runtime CPU at batch 1
(``--bench-device`` picks ort-cuda on a GPU machine): the two models are timed in alternating
rounds and the median per-image latency is reported. Writes ``benchmarks/results/real_bccd.{json,md}``.
``--resume`` reuses the finished stages in ``--out``; ``--smoke`` is a few images and one epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import prunekit
from prunekit.data import build_dataset
from prunekit.data.transforms import Compose, RandomHorizontalFlip
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.models import ssd300_vgg16
from prunekit.prune.method import PruneConfig, phase_rows, run_phases
from prunekit.prune.report import layer_table, model_stats
from prunekit.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cifar10 import DEFAULT_DATA, RESULTS, machine_info  # noqa: E402

METRICS = ("map50", "map", "map75", "voc07_ap")
log = logging.getLogger("real_bccd")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def load_bccd(root: Path, augment: str, limit: int | None = None) -> tuple[Any, Any, Any]:
    """(train, val, test) BCCD splits; ``augment`` "flip" (short schedules) or "ssd" (the full SSD
    augmentation, for long ones). ``limit`` keeps the first images of each split (smoke runs)."""
    spec = f"voc:{root}"
    tf = {"transforms": Compose([RandomHorizontalFlip()])} if augment == "flip" else {}
    train_set = build_dataset(spec, "train", train=True, skip_bad=True, **tf)
    val_set = build_dataset(spec, "val", skip_bad=True)
    test_set = build_dataset(spec, "test", skip_bad=True)
    if limit:
        from torch.utils.data import Subset

        def cut(ds: Any) -> Any:
            sub = Subset(ds, range(min(limit, len(ds))))
            sub.classes = ds.classes  # type: ignore[attr-defined]
            return sub

        train_set, val_set, test_set = cut(train_set), cut(val_set), cut(test_set)
    return train_set, val_set, test_set


def time_ort(paths: dict[str, Path], backend: str, threads: int, rounds: int, iters: int) -> dict[str, Any]:
    """Per-image latency of each ONNX file at batch 1, models alternating round by round.

    Each round runs ``iters`` inferences of every model back to back (order alternating), so a
    change in machine load hits both models alike; the median over all timed inferences is the
    figure, FPS = 1 / median.
    """
    from prunekit.deploy import get_runner

    runners = {k: get_runner(backend, p, intra_op_threads=threads).load() for k, p in paths.items()}
    try:
        feeds = {}
        for k, r in runners.items():
            spec = r.input_spec[0]
            shape = [1 if not isinstance(d, int) else d for d in spec.shape]
            feeds[k] = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for k, r in runners.items():  # warm-up
            for _ in range(3):
                r.infer(feeds[k])
        times: dict[str, list[float]] = {k: [] for k in runners}
        order = list(runners)
        for i in range(rounds):
            for k in order if i % 2 == 0 else order[::-1]:
                for _ in range(iters):
                    t0 = time.perf_counter()
                    runners[k].infer(feeds[k])
                    runners[k].synchronize()
                    times[k].append(time.perf_counter() - t0)
    finally:
        for r in runners.values():
            r.close()
    out: dict[str, Any] = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {
            "median_ms": 1000 * med,
            "p90_ms": 1000 * float(np.percentile(ts, 90)),
            "fps": 1.0 / med,
            "n": len(ts),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA / "BCCD")
    ap.add_argument("--out", type=Path, default=Path("runs/real_bccd"))
    ap.add_argument("--result", type=Path, default=RESULTS / "real_bccd.json")
    ap.add_argument("--resume", action="store_true", help="reuse finished stages in --out")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--epochs", type=int, default=20, help="baseline training epochs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--prune-lr", type=float, default=0.01, help="sparsity and retraining lr")
    ap.add_argument("--augment", choices=("flip", "ssd"), default="flip")
    ap.add_argument("--sparsity-epochs", type=int, default=1)
    ap.add_argument("--retrain-epochs", type=int, default=1)
    ap.add_argument("--final-epochs", type=int, default=4, help="extra retraining after the last phase")
    ap.add_argument("--lam-grid", default="1e-3,4e-3")
    ap.add_argument("--k-range", default="0.25,0.5,0.75,1,1.25,1.5,2")
    ap.add_argument("--eps1", type=float, default=1.0)
    ap.add_argument("--eps2", type=float, default=15.0)
    ap.add_argument("--align", type=int, default=1, help="1 = the paper's selection exactly")
    ap.add_argument("--cost-aware", choices=("none", "macs"), default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bench-backend", default="ort-cpu", help="ort-cpu, or ort-cuda on a GPU machine")
    ap.add_argument("--bench-rounds", type=int, default=10)
    ap.add_argument("--bench-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few images, one epoch: plumbing only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs = args.sparsity_epochs = args.retrain_epochs = 1
        args.final_epochs, args.bench_rounds, args.bench_iters = 0, 2, 2
        args.lam_grid, args.k_range = "1e-3", "0.5,1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    is_cuda = args.device.startswith("cuda")

    def stamp(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    train_set, val_set, test_set = load_bccd(args.data_dir, args.augment, 8 if args.smoke else None)
    classes = list(train_set.classes)
    stamp(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test images, {classes}")

    def tcfg(epochs: int, lr: float, warmup: int = 0) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, lr=lr, warmup_iters=warmup, schedule="cosine", batch_size=args.batch_size,
            grad_clip=10.0, device=args.device, seed=args.seed, log_every=10, channels_last=True, amp=is_cuda,
        )  # fmt: skip

    def scores(model: nn.Module) -> dict[str, Any]:
        m = evaluate(model, test_set, batch_size=8, device=args.device, progress=False)
        return {**{k: float(m[k]) for k in METRICS}, "per_class": m.get("per_class")}

    saved = out / "stages.json"
    done: dict[str, Any] = json.loads(saved.read_text()) if (args.resume and saved.is_file()) else {}
    rows: dict[str, dict[str, Any]] = {}

    def record(stage: str, model: nn.Module, path: Path, **extra: Any) -> None:
        prunekit.save(model, path)
        rows[stage] = {"checkpoint": str(path), **model_stats(model), **scores(model), **extra}
        rows[stage]["filters"] = {r["layer"]: r["filters_after"] for r in layer_table(model)}
        rows[stage]["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        rows[stage]["wall_time_end"] = time.strftime("%Y-%m-%d %H:%M:%S")
        done[stage] = rows[stage]
        atomic_write_json(saved, done)
        stamp(
            f"{stage}: " + ", ".join(f"{k}={rows[stage][k]:.4f}" for k in METRICS) + f", {model_stats(model)}"
        )

    # 1. baseline
    base_path = out / "baseline.pt"
    if "baseline" in done and base_path.is_file():
        baseline = prunekit.load(base_path)
        rows["baseline"] = done["baseline"]
    else:
        baseline = ssd300_vgg16(
            num_classes=len(classes) + 1, width=args.width, batch_norm=True, class_names=classes
        )
        stamp(f"baseline: SSD300-VGG16-BN width {args.width}, {args.epochs} epochs")
        t0 = time.perf_counter()
        hist = train(baseline, train_set, tcfg(args.epochs, args.lr, warmup=50), progress=False)
        record("baseline", baseline, base_path, epochs=args.epochs, train_s=time.perf_counter() - t0,
               train_loss=hist["epochs"][-1]["loss"] if hist["epochs"] else None)  # fmt: skip
    baseline = baseline.to(args.device)

    # 2. multi-layer pruning, four SSD300 phases
    comp_path = out / "compressed.pt"
    if "compressed" in done and comp_path.is_file():
        compressed = prunekit.load(comp_path)
        rows["compressed"] = done["compressed"]
    else:

        def train_fn(model: nn.Module, regularizer: Any, epochs: int, tag: str) -> None:
            stamp(f"{tag}: {epochs} epochs")
            train(model, train_set, tcfg(epochs, args.prune_lr), regularizer=regularizer, progress=False)

        def eval_fn(model: nn.Module) -> dict[str, Any]:
            return evaluate(model, val_set, batch_size=8, device=args.device, progress=False)

        hp = PruneConfig(
            eps1=args.eps1, eps2=args.eps2, lam_grid=_floats(args.lam_grid), k_range=_floats(args.k_range),
            threshold_search="scan", align=args.align,
            cost_aware=None if args.cost_aware == "none" else args.cost_aware,
            epochs_sparsity=args.sparsity_epochs, epochs_retrain=args.retrain_epochs, seed=args.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        compressed = run_phases(baseline, "ssd300", train_fn, eval_fn, hp, out / "phases", resume=args.resume)
        after_phases = scores(compressed)
        if args.final_epochs:
            stamp(f"final retraining: {args.final_epochs} epochs")
            train(compressed, train_set, tcfg(args.final_epochs, args.prune_lr), progress=False)
        summary = json.loads((out / "phases" / "summary.json").read_text())
        phases = phase_rows(summary)
        epochs = args.final_epochs + sum(
            len(r.get("sparsity", {}).get("trials", [])) * args.sparsity_epochs + args.retrain_epochs
            for r in summary["records"]
            if not r.get("skipped")
        )
        record("compressed", compressed, comp_path, epochs=epochs, prune_s=time.perf_counter() - t0,
               prune_config=hp.to_dict(), phases=phases,
               test_after_phases={k: after_phases[k] for k in METRICS})  # fmt: skip

    # 3. export both, time them on ONNX Runtime
    from prunekit.export import export_onnx

    onnx_paths = {}
    for stage, model in (("baseline", baseline), ("compressed", compressed)):
        p = out / f"{stage}.onnx"
        summ = export_onnx(model.cpu(), p, form="raw")
        onnx_paths[stage] = p
        rows[stage]["onnx"] = {"path": str(p), "bytes": p.stat().st_size, "self_check": summ.self_check}
    stamp(f"timing {args.bench_backend}: {args.bench_rounds} rounds x {args.bench_iters} images per model")
    timing = time_ort(onnx_paths, args.bench_backend, args.threads, args.bench_rounds, args.bench_iters)
    for stage, t in timing.items():
        rows[stage]["latency"] = {"backend": args.bench_backend, "batch": 1, **t}

    base, comp = rows["baseline"], rows["compressed"]
    x = base["params"] / comp["params"]
    drop = 100 * (base["map50"] - comp["map50"])
    verdict = {
        "compression_x": x,
        "macs_reduction_x": base["macs"] / comp["macs"],
        "map50_drop_points": drop,
        "map_drop_points": 100 * (base["map"] - comp["map"]),
        "fps_ratio": comp["latency"]["fps"] / base["latency"]["fps"],
        "fps_backend": args.bench_backend,
        "target_4x_within_2_points": bool(x >= 4 and drop <= 2.0),
    }
    result = {
        "benchmark": "real_bccd",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "smoke": args.smoke,
        "model": {
            "arch": "ssd300_vgg16",
            "batch_norm": True,
            "width": args.width,
            "num_classes": len(classes) + 1,
        },
        "data": {
            "source": str(args.data_dir),
            "classes": classes,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "test_images": len(test_set),
            "augment": args.augment,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": rows,
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
    m, d, mach, v = result["model"], result["data"], result["machine"], result["verdict"]
    lines = [
        "# SSD300 on BCCD (real microscope images)"
        + (" - SMOKE RUN, not a result" if result["smoke"] else ""),
        "",
        f"`{result['command']}`",
        "",
        *[f"- stage {k} ran as `{r['command']}`" for k, r in result["models"].items() if r.get("command")],
        "",
        f"SSD300-VGG16-BN at width {m['width']}, trained from scratch on BCCD train ({d['train_images']} images, "
        f"augmentation: {d['augment']}); searches on val ({d['val_images']}); metrics on test ({d['test_images']} "
        f"images). AP50 and AP@[.5:.95] by pycocotools, VOC07 = 11-point AP at IoU 0.5. Latency: raw ONNX on "
        f"{v['fps_backend']}, batch 1, {mach['torch_threads']} threads, median of alternating rounds. Device: "
        f"{mach['device']} ({mach['cpu']}, load average {mach['loadavg_before'][0]:.1f} at start); torch "
        f"{mach['versions']['torch']}, onnxruntime {mach['versions']['onnxruntime']}; wall time "
        f"{result['wall_s'] / 60:.1f} min.",
        "",
        "| model | params | size (MiB) | GMACs | AP50 | AP@[.5:.95] | VOC07 AP | ms/img | FPS | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        lat = r.get("latency", {})
        lines.append(
            f"| {name} | {r['params']:,} | {r['size_mb']:.2f} | {r['macs'] / 1e9:.3f} | {100 * r['map50']:.2f} | "
            f"{100 * r['map']:.2f} | {100 * r['voc07_ap']:.2f} | {lat.get('median_ms', float('nan')):.1f} | "
            f"{lat.get('fps', float('nan')):.1f} | {r.get('epochs', '-')} |"
        )
    lines += [
        "",
        f"Compression {v['compression_x']:.2f}x parameters, {v['macs_reduction_x']:.2f}x MACs, "
        f"{v['fps_ratio']:.2f}x FPS on {v['fps_backend']}; AP50 drop {v['map50_drop_points']:.2f} points "
        f"(AP@[.5:.95] {v['map_drop_points']:.2f}). Target (>= 4x at <= 2 points AP50): "
        f"{'met' if v['target_4x_within_2_points'] else 'NOT met'}.",
    ]
    comp = result["models"].get("compressed", {})
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    if comp.get("phases"):
        lines += [
            "",
            "## Phases (validation AP50)",
            "",
            "| phase | λ | k | before | sparse | thresholded | pruned | retrained | params |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in comp["phases"]:
            lines.append(
                f"| {p['phase']} | {p['lam']} | {p['k']} | {pct(p['val_before'])} | {pct(p['val_sparse'])} | "
                f"{pct(p['val_thresholded'])} | {pct(p['val_pruned'])} | {pct(p['val_retrained'])} | "
                f"{p['params'] or '-'} |"
            )
    base = result["models"].get("baseline", {})
    if base.get("per_class") and comp.get("per_class"):
        lines += ["", "## Per class (test AP50)", "", "| class | baseline | compressed |", "|---|---:|---:|"]
        for name, b in base["per_class"].items():
            c = comp["per_class"].get(name, {})
            lines.append(f"| {name} | {pct(b.get('ap50'))} | {pct(c.get('ap50'))} |")
    if base.get("filters") and comp.get("filters"):
        lines += ["", "## Filters per layer", "", "| layer | baseline | compressed |", "|---|---:|---:|"]
        for layer, n in base["filters"].items():
            lines.append(f"| {layer} | {n} | {comp['filters'].get(layer, '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
