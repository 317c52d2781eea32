"""Train ``ssd300_vgg16(width=0.25)`` on the synthetic VOC set on CPU; record time and val mAP.

    python benchmarks/train_synth.py --out runs/train_synth

Writes ``benchmarks/results/train_synth.json`` (wall and CPU seconds, mAP50 / mAP / VOC07 AP on
the synthetic val split, the settings) and the trained checkpoint ``OUT/last.pt``, whose path the
JSON records so that the pruning benchmark can start from it. CPU time is the process's
user+system time over all its threads: on a shared machine it is the fairer figure, the wall time
grows with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from prunekit.data.synth import make_synth_voc
from prunekit.data.transforms import Compose, PhotometricDistort, RandomHorizontalFlip, ssd_train_transforms
from prunekit.data.voc import VOCDetection
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json
from prunekit.models import count_params, ssd300_vgg16
from prunekit.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/train_synth"))
    ap.add_argument("--data-dir", type=Path, default=None, help="synthetic set folder (default OUT/data)")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup-iters", type=int, default=20)
    ap.add_argument("--grad-clip", type=float, default=10.0)
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--aug", choices=["flip", "photo", "ssd"], default="flip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-max-images", type=int, default=50, help="per-epoch validation subset (0: none)")
    ap.add_argument("--stop-after-epoch", type=int, default=None, help="pause here; --resume continues")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--note", default=None, help="free text stored in the result (e.g. machine load)")
    ap.add_argument("--result", type=Path, default=RESULTS / "train_synth.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or args.out / "data"
    if not (data_dir / "synth.json").is_file():
        make_synth_voc(data_dir, n_train=args.n_train, n_val=args.n_val, n_test=0, seed=0, image_size=300)
    aug = {
        "flip": Compose([RandomHorizontalFlip()]),
        "photo": Compose([PhotometricDistort(), RandomHorizontalFlip()]),
        "ssd": ssd_train_transforms(),
    }[args.aug]
    train_set = VOCDetection(data_dir, "train", transforms=aug)
    val_set = VOCDetection(data_dir, "val")

    torch.manual_seed(args.seed)
    model = ssd300_vgg16(
        num_classes=train_set.num_classes,
        width=args.width,
        batch_norm=args.batch_norm,
        class_names=train_set.classes,
    )
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        warmup_iters=args.warmup_iters,
        schedule="cosine",
        batch_size=args.batch_size,
        grad_clip=args.grad_clip,
        seed=args.seed,
        log_every=5,
        stop_after_epoch=args.stop_after_epoch,
        eval_max_images=args.val_max_images or None,
        channels_last=args.channels_last,
    )
    load_before = os.getloadavg()
    wall0 = time.perf_counter()
    hist = train(
        model,
        train_set,
        cfg,
        out_dir=args.out,
        val_set=val_set if args.val_max_images else None,
        resume=args.resume,
    )
    this_wall = time.perf_counter() - wall0
    wall1, cpu1 = time.perf_counter(), time.process_time()
    metrics = evaluate(model, val_set, batch_size=16)
    eval_wall, eval_cpu = time.perf_counter() - wall1, time.process_time() - cpu1

    result = {
        "benchmark": "train_synth",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "arch": "ssd300_vgg16",
            "width": args.width,
            "batch_norm": args.batch_norm,
            "params": count_params(model),
        },  # fmt: skip
        "data": {
            "dir": str(data_dir),
            "n_train": len(train_set),
            "n_val": len(val_set),
            "classes": train_set.classes,
            "augmentation": args.aug,
        },  # fmt: skip
        "train_config": cfg.to_dict(),
        "epochs_done": len(hist["epochs"]),
        "complete": len(hist["epochs"]) == cfg.epochs,
        "steps": hist["steps"],
        "images_seen": hist["steps"] * cfg.batch_size,
        # summed over epochs and resumed runs (per-epoch validation on the subset included)
        "train_wall_s": round(hist["time_s"], 1),
        "train_cpu_s": round(hist["cpu_time_s"], 1) if "cpu_time_s" in hist else None,
        "this_run_wall_s": round(this_wall, 1),
        "eval_wall_s": round(eval_wall, 1),
        "eval_cpu_s": round(eval_cpu, 1),
        "val": {k: metrics[k] for k in ("map50", "map", "map75", "voc07_ap", "num_images", "num_gt")},
        "val_per_class_ap50": {k: v["ap50"] for k, v in metrics["per_class"].items()},
        "per_epoch": [
            {
                k: e.get(k)
                for k in (
                    "epoch",
                    "loss",
                    "bbox_regression",
                    "classification",
                    "val_metric",
                    "time_s",
                    "cpu_time_s",
                )
            }
            for e in hist["epochs"]
        ],
        "checkpoint": str(args.out / "last.pt"),
        "note": args.note,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },  # fmt: skip
    }
    atomic_write_json(args.result, result)
    print(json.dumps({k: result[k] for k in ("steps", "train_wall_s", "train_cpu_s", "val")}, indent=2))
    return result


if __name__ == "__main__":
    main()
