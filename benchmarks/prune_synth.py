"""Multi-layer pruning of the synthetic-set SSD300 vs L1-norm and random baselines at the same size.

    python benchmarks/prune_synth.py --out runs/prune_synth

Starts from the checkpoint that ``benchmarks/train_synth.py`` recorded in
``benchmarks/results/train_synth.json`` (or ``--checkpoint``; with neither, it trains one first),
runs the paper's four SSD300 phases (sparsity induction, global threshold, zero-row selection,
surgery, retraining), then prunes the ORIGINAL model with the L1-norm ranking (Li et al.) and with
random filter removal (RRF) to the same parameter count and retrains each with as many steps as the
multi-layer run trained in all (sparsity + retraining). Everything is evaluated on the full
synthetic val split. Writes ``benchmarks/results/prune_synth.json`` and ``prune_synth.md``.

Steps, not epochs, set the training budget, so the default run fits a shared 2-core CPU; the
thresholds and λ search use the first ``--search-images`` val images, the reported mAP all of them.
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
from prunekit.data.transforms import Compose, RandomHorizontalFlip
from prunekit.data.voc import VOCDetection
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.baselines import prune_baseline
from prunekit.prune.method import PruneConfig, run_phases
from prunekit.prune.report import layer_table, model_stats
from prunekit.prune.trainer import FnTrainer
from prunekit.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import float_list  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("map50", "map", "voc07_ap")


def _source(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint, synthetic data dir): from the flags, the train_synth record, or a fresh run."""
    record = RESULTS / "train_synth.json"
    if args.checkpoint is not None:
        if args.data_dir is None:
            raise SystemExit("--checkpoint needs --data-dir (the synthetic set it was trained on)")
        return args.checkpoint, args.data_dir
    if record.is_file():
        r = json.loads(record.read_text())
        if not r.get("complete", True):
            print(
                f"warning: {record} records an unfinished training ({r.get('epochs_done')} epochs, "
                f"mAP50 {r['val']['map50']:.3f}); pruning an untrained model measures little",
                flush=True,
            )
        return Path(r["checkpoint"]), Path(r["data"]["dir"])
    print(f"{record} not found: training the starting model with benchmarks/train_synth.py", flush=True)
    import train_synth

    r = train_synth.main(["--out", str(args.out / "train"), "--epochs", str(args.train_epochs)])
    return Path(r["checkpoint"]), Path(r["data"]["dir"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/prune_synth"))
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--train-epochs", type=int, default=4, help="only when no checkpoint exists")
    ap.add_argument("--sparsity-steps", type=int, default=12)
    ap.add_argument("--retrain-steps", type=int, default=8)
    ap.add_argument("--final-retrain-steps", type=int, default=24, help="extra retraining after phase 4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lam-grid", default="5e-3,2e-2")
    ap.add_argument("--k-range", default="0.25,0.5,0.75,1,1.25,1.5,2")
    ap.add_argument("--eps1", type=float, default=1.0)
    ap.add_argument("--eps2", type=float, default=15.0)
    ap.add_argument("--tau1", type=float, default=0.9)
    ap.add_argument("--tau2", type=float, default=0.7)
    ap.add_argument("--tau3", type=float, default=0.9)
    ap.add_argument("--align", type=int, default=1, help="1 = the paper's selection exactly")
    ap.add_argument("--search-images", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--result", type=Path, default=RESULTS / "prune_synth.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    ckpt, data_dir = _source(args)
    record = RESULTS / "train_synth.json"
    source_record = None
    if args.checkpoint is None and record.is_file():
        r = json.loads(record.read_text())
        source_record = {
            "complete": r.get("complete"),
            "epochs_done": r.get("epochs_done"),
            "val": r.get("val"),
        }
    original = prunekit.load(ckpt)
    train_set = VOCDetection(data_dir, "train", transforms=Compose([RandomHorizontalFlip()]))
    val_set = VOCDetection(data_dir, "val")
    steps_used = {"n": 0}

    def tcfg(steps: int) -> TrainConfig:
        return TrainConfig(
            epochs=1000, max_steps=steps, lr=args.lr, warmup_iters=0, schedule="cosine",
            batch_size=args.batch_size, grad_clip=None, seed=args.seed, log_every=5,
        )  # fmt: skip

    def train_fn(model: torch.nn.Module, regularizer: Any, epochs: int, tag: str) -> None:
        steps = args.sparsity_steps if regularizer is not None else args.retrain_steps
        print(f"[{time.perf_counter() - t_start:7.0f}s] {tag}: {steps} steps", flush=True)
        train(model, train_set, tcfg(steps), regularizer=regularizer, progress=False)
        steps_used["n"] += steps

    def search_eval(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, val_set, batch_size=16, progress=False, max_images=args.search_images)

    def full_eval(model: torch.nn.Module) -> dict[str, float]:
        m = evaluate(model, val_set, batch_size=16, progress=False)
        return {k: float(m[k]) for k in METRICS}

    def row(model: torch.nn.Module, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
        return {**model_stats(model), **metrics, **extra}

    print(f"original {ckpt}: {model_stats(original)}", flush=True)
    rows: dict[str, dict[str, Any]] = {"original": row(original, full_eval(original))}
    print(f"original: {rows['original']}", flush=True)

    hp = PruneConfig(
        eps1=args.eps1, eps2=args.eps2, lam_grid=float_list(args.lam_grid), k_range=float_list(args.k_range),
        threshold_search="bisect", tau1=args.tau1, tau2=args.tau2, tau3=args.tau3,
        epochs_sparsity=1, epochs_retrain=1, align=args.align, seed=args.seed,
    )  # fmt: skip
    pruned = run_phases(
        original, "ssd300", FnTrainer(train_fn, search_eval), hp, args.out / "phases", resume=args.resume
    )
    after_phases = full_eval(pruned)
    final_path = args.out / "multilayer.pt"
    if args.final_retrain_steps:
        if args.resume and final_path.is_file():
            pruned = prunekit.load(final_path)
        else:
            print(
                f"[{time.perf_counter() - t_start:7.0f}s] final retrain: {args.final_retrain_steps} steps",
                flush=True,
            )
            train(pruned, train_set, tcfg(args.final_retrain_steps), progress=False)
            prunekit.save(pruned, final_path)
        steps_used["n"] += args.final_retrain_steps
    summary = json.loads((args.out / "phases" / "summary.json").read_text())
    # steps of a resumed run are not re-counted by train_fn: take them from the records
    n_stages = sum(1 for r in summary["records"] if not r.get("skipped"))
    method_steps = n_stages * (args.sparsity_steps + args.retrain_steps) + args.final_retrain_steps
    extra_lams = sum(len(r["sparsity"]["trials"]) - 1 for r in summary["records"] if "sparsity" in r)
    rows["multi-layer (ours)"] = row(
        pruned, full_eval(pruned), train_steps=method_steps, after_phases_map50=after_phases["map50"]
    )
    print(f"multi-layer: {rows['multi-layer (ours)']}", flush=True)

    target = rows["multi-layer (ours)"]["params"]
    baselines: dict[str, Any] = {}
    for method, label in (("l1", "L1-norm (Li et al.)"), ("random", "random (RRF)")):
        path = args.out / f"baseline_{method}.pt"
        model, info = prune_baseline(original, method, target_params=target, seed=args.seed)
        before = full_eval(model)
        if args.resume and path.is_file():
            model = prunekit.load(path)
        else:
            print(
                f"[{time.perf_counter() - t_start:7.0f}s] {method} baseline: retrain {method_steps} steps",
                flush=True,
            )
            train(model, train_set, tcfg(method_steps), progress=False)
            prunekit.save(model, path)
        rows[label] = row(
            model, full_eval(model), train_steps=method_steps, before_retrain_map50=before["map50"]
        )
        baselines[method] = {k: v for k, v in info.items() if k != "filters"} | {"filters": info["filters"]}
        print(f"{label}: {rows[label]}", flush=True)

    ours, orig = rows["multi-layer (ours)"], rows["original"]
    verdict = {
        "compression_x": orig["params"] / ours["params"],
        "macs_reduction_x": orig["macs"] / ours["macs"],
        "map50_drop_points": 100 * (orig["map50"] - ours["map50"]),
        "target_5x_params_within_2_points": orig["params"] / ours["params"] >= 5
        and 100 * (orig["map50"] - ours["map50"]) <= 2,
        "beats_l1_baseline": ours["map50"] > rows["L1-norm (Li et al.)"]["map50"],
        "beats_random_baseline": ours["map50"] > rows["random (RRF)"]["map50"],
    }
    result = {
        "benchmark": "prune_synth",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "source_checkpoint": str(ckpt),
        "source_training": source_record,
        "data": {"dir": str(data_dir), "n_train": len(train_set), "n_val": len(val_set)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prune_config": hp.to_dict(),
        "models": rows,
        "verdict": verdict,
        "phases": [
            {
                "phase": r["phase"],
                "before": r.get("before"),
                "lam": r.get("sparsity", {}).get("lam"),
                "lam_trials": r.get("sparsity", {}).get("trials"),
                "sparse": r.get("sparsity", {}).get("metric"),
                "k": r.get("threshold", {}).get("k"),
                "thresholded": r.get("threshold", {}).get("metric"),
                "pruned": r.get("pruned_metric"),
                "retrained": r.get("retrained_metric"),
                "params": r.get("stats", {}).get("params"),
            }
            for r in summary["records"]
        ],
        "extra_lambda_trainings": extra_lams,
        "layers": layer_table(pruned, original=original),
        "baselines": baselines,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
    }
    atomic_write_json(args.result, result)
    atomic_write_text(args.result.with_suffix(".md"), render(result))
    print(json.dumps(verdict, indent=2))
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown view of the result JSON."""
    lines = [
        "# Multi-layer pruning on the synthetic set (SSD300)",
        "",
        f"`{result['command']}` - {result['wall_s'] / 60:.1f} min on {result['machine']['threads']} CPU threads "
        f"(load average {result['machine']['loadavg_before'][0]:.1f} at start). mAP on the full synthetic val "
        f"split ({result['data']['n_val']} images). Size = FP32 parameters in MiB; MACs at 300x300.",
        "",
        "| model | params | size (MiB) | GMACs | mAP50 | mAP | VOC07 AP | train steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['size_mb']:.2f} | {r['macs'] / 1e9:.3f} | {100 * r['map50']:.2f} | "
            f"{100 * r['map']:.2f} | {100 * r['voc07_ap']:.2f} | {r.get('train_steps', '-')} |"
        )
    v = result["verdict"]
    lines += [
        "",
        f"Compression {v['compression_x']:.2f}x parameters, {v['macs_reduction_x']:.2f}x MACs, mAP50 drop "
        f"{v['map50_drop_points']:.2f} points. Target (>= 5x at <= 2 points): "
        f"{'met' if v['target_5x_params_within_2_points'] else 'NOT met'}; better than L1-norm: "
        f"{'yes' if v['beats_l1_baseline'] else 'no'}; better than random: {'yes' if v['beats_random_baseline'] else 'no'}.",
        "",
        "## Phases (metric = mAP50 on the search subset)",
        "",
        "| phase | before | λ | sparse | k | thresholded | pruned | retrained | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for p in result["phases"]:
        lines.append(
            f"| {p['phase']} | {pct(p['before'])} | {p['lam']} | {pct(p['sparse'])} | {p['k']} | "
            f"{pct(p['thresholded'])} | {pct(p['pruned'])} | {pct(p['retrained'])} | {p['params'] or '-'} |"
        )
    lines += ["", "## Filters per layer", "", "| layer | original | pruned |", "|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['filters_before']} | {r['filters_after']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
