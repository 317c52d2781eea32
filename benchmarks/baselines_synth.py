"""L1-norm (Li et al.) and random (RRF) baselines at the parameter count of a pruned model.

    python benchmarks/baselines_synth.py --original runs/synth_paper/original.pt \
        --pruned runs/synth_paper/model.pt --data synth --epochs 8

Each baseline is cut from the original to the pruned model's parameter count through the same
surgery, then retrained with the same schedule the multi-layer run used after its cuts
(``--epochs``: one retraining epoch per phase plus the sparsity epochs, by default 4 * (2 + 2) in
the `compress-and-export` runs recorded next to it), and evaluated on the same val split.
Writes ``benchmarks/results/baselines_synth.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.data import build_dataset
from prunekit.data.transforms import Compose, RandomHorizontalFlip
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.baselines import prune_baseline
from prunekit.prune.report import model_stats
from prunekit.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("map50", "map", "voc07_ap")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--pruned", type=Path, required=True)
    ap.add_argument("--data", default="synth")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result", type=Path, default=RESULTS / "baselines_synth.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    train_set = build_dataset(args.data, "train", train=True, transforms=Compose([RandomHorizontalFlip()]))
    val_set = build_dataset(args.data, "val")
    original, pruned = prunekit.load(args.original), prunekit.load(args.pruned)

    def scores(model: torch.nn.Module) -> dict[str, float]:
        m = evaluate(model, val_set, batch_size=16, progress=False)
        return {k: round(float(m[k]), 5) for k in METRICS}

    rows: dict[str, dict[str, Any]] = {
        "original": {**model_stats(original), **scores(original)},
        "multi-layer (ours)": {**model_stats(pruned), **scores(pruned)},
    }
    target = rows["multi-layer (ours)"]["params"]
    cfg = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, warmup_iters=25,
        grad_clip=10.0, channels_last=True,
    )  # fmt: skip
    for method, label in (("l1", "L1-norm (Li et al.)"), ("random", "random (RRF)")):
        model, info = prune_baseline(original, method, target_params=target, seed=args.seed)
        before = scores(model)
        torch.manual_seed(args.seed)
        train(model, train_set, cfg, progress=False)
        rows[label] = {**model_stats(model), **scores(model), "map50_before_retrain": before["map50"]}
        print(label, rows[label], flush=True)

    ours = rows["multi-layer (ours)"]
    result = {
        "benchmark": "baselines_synth",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": rows,
        "beats_l1": ours["map50"] > rows["L1-norm (Li et al.)"]["map50"],
        "beats_random": ours["map50"] > rows["random (RRF)"]["map50"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_end": os.getloadavg(),
        },  # fmt: skip
    }
    atomic_write_json(args.result, result)
    lines = [
        "# Baselines at the multi-layer model's parameter count (synthetic set, SSD300)",
        "",
        f"`{result['command']}`; mAP on the full synthetic val split; {result['wall_s'] / 60:.1f} min.",
        "",
        "| model | params | GMACs | mAP50 | mAP | VOC07 AP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['macs'] / 1e9:.3f} | {r['map50']:.4f} | {r['map']:.4f} | "
            f"{r['voc07_ap']:.4f} |"
        )
    atomic_write_text(args.result.with_suffix(".md"), "\n".join(lines) + "\n")
    print(json.dumps({k: result[k] for k in ("beats_l1", "beats_random")}))
    return result


if __name__ == "__main__":
    main()
