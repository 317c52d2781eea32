"""Speed-aware pruning benchmark: does a pruned SSD300 actually run faster?

Two parts:

``arch``  (no training, minutes): SSD300 full width on random weights, ONNX Runtime CPU, batch 1.
          The original vs the paper's pruned-6det channel counts (Table 1, VOC) as they are,
          aligned to 8 (nearest, prunekit's default; and rounded up), a cost-aware-looking config
          (conv1..conv4 at most half width) and every layer halved. Each model is exported with
          ``torch.onnx.export`` to a temp dir and timed in interleaved rounds (one run of each
          model per round, order rotated), so a noisy shared machine hits all models alike; the
          median is reported. Writes ``results/speed_aware_ortcpu_architectures.{json,md}``.

``synth`` (training, needs the pruning core): on the synthetic set, the paper's settings
          (uniform L1, align 1) vs cost-aware + aligned settings (MAC-weighted L1, align 8), each
          at its own mAP50, with params, MACs and ORT CPU latency/FPS at batch 1. Writes
          ``results/speed_aware_synth.{json,md}``.

    python benchmarks/speed_aware.py arch [--rounds 30]
    python benchmarks/speed_aware.py synth [--epochs 12]

GPU (torch FP16, batch 1/32, CUDA events) is not measured here: this machine has no GPU.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.models import SSDRaw, build_model, count_params, default_config, get_config
from prunekit.prune.align import align_counts
from prunekit.prune.cost import layer_macs, total_macs
from prunekit.prune.profile import device_name, estimate_latency, profile_model, save_latency_table

log = logging.getLogger("speed_aware")
RESULTS = Path(__file__).resolve().parent / "results"

# Singh et al., WACV 2019, Table 1: SSD300-pruned-6det on PASCAL VOC (07+12), filters per layer.
PAPER_VOC_SSD300_6DET = {
    "conv1_1": 64, "conv1_2": 56, "conv2_1": 107, "conv2_2": 121, "conv3_1": 193, "conv3_2": 158,
    "conv3_3": 195, "conv4_1": 263, "conv4_2": 181, "conv4_3": 331, "conv5_1": 98, "conv5_2": 108,
    "conv5_3": 78, "conv6": 146, "conv7": 106, "conv8_1": 34, "conv8_2": 198, "conv9_1": 12,
    "conv9_2": 36, "conv10_1": 22, "conv10_2": 41, "conv11_1": 22, "conv11_2": 66,
}  # fmt: skip
HIGH_RES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]
HIGH_RES += ["conv4_1", "conv4_2", "conv4_3"]


def _round_up(counts: dict[str, int], original: dict[str, int], multiple: int) -> dict[str, int]:
    return {n: min(original[n], -(-c // multiple) * multiple) for n, c in counts.items()}


def arch_variants(num_classes: int = 21) -> dict[str, dict[str, int]]:
    """Channel configs compared by the ``arch`` part (SSD300, 6 detection layers)."""
    original = dict(default_config("ssd300", num_classes).channels)
    paper = dict(PAPER_VOC_SSD300_6DET)
    aligned = align_counts(paper, original, 8)
    cost_aware = dict(aligned)
    for n in HIGH_RES:  # the paper barely prunes these; a cost-aware run pushes them to half width
        cost_aware[n] = min(aligned[n], original[n] // 2)
    return {
        "original": original,
        "paper_6det": paper,
        "paper_6det_align8": aligned,
        "paper_6det_align8_up": _round_up(paper, original, 8),
        "cost_aware_like_align8": cost_aware,
        "half_every_layer": {n: c // 2 for n, c in original.items()},
    }


# ------------------------------------------------------------------------------------- timing


def export_raw_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Raw SSD graph (images -> bbox_regression, cls_logits), dynamic batch, opset 17."""
    cfg = get_config(model)
    net = SSDRaw(model).eval() if cfg.is_detector else model.eval()
    x = torch.zeros(1, 3, *cfg.input_size)
    outs = ["bbox_regression", "cls_logits"] if cfg.is_detector else ["logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw: dict[str, Any] = dict(
            input_names=["images"],
            output_names=outs,
            opset_version=17,
            dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outs}},
        )
        try:
            torch.onnx.export(net, (x,), str(path), dynamo=False, **kw)
        except TypeError:  # an older torch without the dynamo switch
            torch.onnx.export(net, (x,), str(path), **kw)
    return path


def time_ort_interleaved(
    paths: dict[str, Path], rounds: int = 30, warmup: int = 3, batch: int = 1, threads: int = 0
) -> dict[str, dict[str, float]]:
    """Median/p90 latency (ms) and FPS per model, ORT CPU, models run in rotated interleaved order."""
    import onnxruntime as ort

    from prunekit.deploy.ort import session_options

    # Idle sessions must not busy-wait: on 2 cores their spinning threads slowed the timed model
    # (BCCD SSD300 original / pruned: 2.03x with spinning, 2.78x without, same run).
    so = session_options("all", threads if threads > 0 else None, spinning=False)
    sessions = {
        n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()
    }
    feeds = {}
    for n, s in sessions.items():
        shape = [batch, *[int(d) for d in s.get_inputs()[0].shape[1:]]]
        feeds[n] = {"images": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for n, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for n, ts in times.items():
        med = statistics.median(ts)
        out[n] = {
            "latency_ms_median": med,
            "latency_ms_p90": float(np.percentile(ts, 90)),
            "latency_ms_min": min(ts),
            "fps": 1000.0 * batch / med,
            "runs": len(ts),
        }
    return out


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "cpu": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_threads": "default (one per core)",
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "note": "CPU shared with other processes; interleaved rounds keep ratios fair, absolutes are noisy",
    }


# ------------------------------------------------------------------------------------- arch


def run_arch(rounds: int, warmup: int, threads: int, out_dir: Path, profile: bool = True) -> dict[str, Any]:
    variants = arch_variants()
    base_cfg = default_config("ssd300", 21)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prunekit-speed-") as tmp:
        paths = {}
        for name, channels in variants.items():
            cfg = copy.deepcopy(base_cfg)
            cfg.channels = dict(channels)
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            macs = layer_macs(model)
            rows[name] = {
                "channels": channels,
                "params": count_params(model),
                "macs_prunable": sum(macs.values()),
                "macs_total": total_macs(model),
                "multiple_of_8": sum(c % 8 == 0 for c in channels.values()),
                "layers": len(channels),
            }
            paths[name] = export_raw_onnx(model, Path(tmp) / f"{name}.onnx")
            rows[name]["onnx_mb"] = paths[name].stat().st_size / 2**20
            log.info(
                "%s: %.2fM params, %.2f GMACs",
                name,
                rows[name]["params"] / 1e6,
                rows[name]["macs_total"] / 1e9,
            )
        timing = time_ort_interleaved(paths, rounds=rounds, warmup=warmup, threads=threads)
    table = None
    if profile:
        # The per-layer latency model (what --cost latency / --target-latency use), checked against
        # the measured whole-network speed-ups.
        torch.manual_seed(0)
        table = profile_model(build_model(base_cfg), "ort-cpu", warmup=2, repeats=7, sweep=(0.25, 0.5))
        save_latency_table(out_dir / "speed_aware_latency_table_ortcpu.json", table)
        for name, channels in variants.items():
            rows[name]["estimated_conv_ms"] = estimate_latency(channels, table, base_cfg)
    ref = rows["original"]
    ref_t = timing["original"]["latency_ms_median"]
    for name, row in rows.items():
        row.update(timing[name])
        row["params_reduction_x"] = ref["params"] / row["params"]
        row["macs_reduction_x"] = ref["macs_total"] / row["macs_total"]
        row["speedup_x"] = ref_t / row["latency_ms_median"]
        if table is not None:
            row["estimated_speedup_x"] = ref["estimated_conv_ms"] / row["estimated_conv_ms"]
    result = {
        "benchmark": "speed_aware/arch",
        "what": "SSD300 (21 classes, 6 detection layers, random weights), raw graph, ORT CPU fp32, batch 1",
        "command": f"python benchmarks/speed_aware.py arch --rounds {rounds} --warmup {warmup}"
        + ("" if profile else " --no-profile"),
        "device": environment(),
        "gpu": "not measured: no GPU in this environment (torch FP16 batch 1/32 on H100 left to a GPU run)",
        "rounds": rounds,
        "warmup": warmup,
        "models": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "speed_aware_ortcpu_architectures.json", result)
    atomic_write_text(out_dir / "speed_aware_ortcpu_architectures.md", arch_markdown(result))
    return result


def arch_markdown(result: dict[str, Any]) -> str:
    dev = result["device"]
    lines = [
        "# Speed-aware pruning: SSD300 architectures on ONNX Runtime CPU (batch 1)",
        "",
        f"Device: {dev['cpu']} ({dev['cpu_count']} cores), onnxruntime {dev['onnxruntime']}, "
        f"torch {dev['torch']}. {result['rounds']} interleaved rounds, median. {dev['note']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| model | params (M) | GMACs | params x | MACs x | layers %8 | median ms | FPS | speed-up "
        "| table estimate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f} | {r['macs_total'] / 1e9:.2f} | {r['params_reduction_x']:.2f} | "
            f"{r['macs_reduction_x']:.2f} | {r['multiple_of_8']}/{r['layers']} | {r['latency_ms_median']:.1f} | "
            f"{r['fps']:.2f} | {r['speedup_x']:.2f}x | {_x(r.get('estimated_speedup_x'))} |"
        )
    lines += [
        "",
        "params x / MACs x / speed-up: original / model. table estimate: speed-up predicted by the "
        "per-layer ORT CPU latency table of the original (`prunekit profile`, sweep 0.25/0.5), prunable "
        "layers only.",
        "",
        f"GPU: {result['gpu']}.",
        "",
    ]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------------------------- synth


def _export_for_timing(model: torch.nn.Module, path: Path) -> Path:
    """E1's exporter (the shipped raw graph) when present, else a plain ``torch.onnx.export``."""
    try:
        from prunekit.export import export_onnx
    except ImportError:
        return export_raw_onnx(model, path)
    export_onnx(model, path, form="raw")
    return path


def run_synth(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Paper settings vs cost-aware + aligned settings on the synthetic set.

    Uses the pruning core (``prunekit.prune.run_phases``), data (``prunekit.data``), training and
    evaluation (``prunekit.train``/``prunekit.evaluate``) and, when present, E1's ONNX exporter.
    A base model is trained first (or loaded from ``<work-dir>/base.pt``); each setting then runs
    the four SSD300 phases from it with the same λ grid, k range, τ and epochs.
    """
    try:
        from prunekit.data import build_dataset
        from prunekit.data.synth import make_synth_voc
        from prunekit.evaluate import evaluate, primary_metric
        from prunekit.models import create_model, load, save
        from prunekit.prune import FnTrainer, PruneConfig, run_phases
        from prunekit.train import TrainConfig, train
    except ImportError as e:
        raise SystemExit(f"synth part needs the pruning core, data and training code: {e}") from e

    work = Path(args.work_dir)
    data_dir = work / "synth"
    if not data_dir.exists():
        make_synth_voc(data_dir, n_train=args.n_train, n_val=args.n_val, n_test=args.n_val, seed=0)
    train_set = build_dataset(f"synth:{data_dir}", "train", train=True)
    val_set = build_dataset(f"synth:{data_dir}", "val")

    def tcfg(epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, lr=lr, batch_size=args.batch_size, device=args.device, max_steps=args.max_steps
        )

    def eval_fn(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, val_set, batch_size=args.batch_size, device=args.device, progress=False)

    def train_fn(model: torch.nn.Module, regularizer: Any, epochs: int, tag: str) -> None:
        log.info("training %s for %d epochs", tag, epochs)
        train(model, train_set, tcfg(epochs, args.lr / 2), regularizer=regularizer, progress=False)

    base_ckpt = work / "base.pt"
    if base_ckpt.is_file():
        base = load(base_ckpt)
    else:
        base = create_model("ssd300", train_set.num_classes, args.width, class_names=list(train_set.classes))
        train(base, train_set, tcfg(args.epochs, args.lr), out_dir=work / "base_train", progress=False)
        save(base, base_ckpt)
    base = base.to(args.device)
    settings = {
        "paper": dict(align=1, cost_aware=None),
        "cost_aware_align8": dict(align=8, cost_aware="macs"),
    }
    rows: dict[str, dict[str, Any]] = {"original": {"model": base.cpu().eval(), "settings": None}}
    for name, s in settings.items():
        hp = PruneConfig(
            epochs_sparsity=args.prune_epochs,
            epochs_retrain=args.prune_epochs,
            lam_grid=[float(v) for v in args.lam_grid.split(",")],
            **s,
        )
        pruned = run_phases(
            copy.deepcopy(base), "ssd300", FnTrainer(train_fn, eval_fn), hp, out_dir=work / name
        )
        rows[name] = {"model": pruned.cpu().eval(), "settings": s}
    with tempfile.TemporaryDirectory(prefix="prunekit-speed-") as tmp:
        paths = {}
        for name, row in rows.items():
            m = row["model"]
            metrics = eval_fn(m)
            row.update(
                map50=float(metrics["map50"]),
                metric=float(primary_metric(metrics)),
                params=count_params(m),
                macs_total=total_macs(m),
                channels=dict(get_config(m).channels),
            )
            paths[name] = _export_for_timing(m.cpu(), Path(tmp) / f"{name}.onnx")
        timing = time_ort_interleaved(paths, rounds=args.rounds)
    ref = rows["original"]
    out_rows = {}
    for name, row in rows.items():
        row.pop("model")
        row.update(timing[name])
        row["speedup_x"] = ref["latency_ms_median"] / row["latency_ms_median"]
        row["params_reduction_x"] = ref["params"] / row["params"]
        row["macs_reduction_x"] = ref["macs_total"] / row["macs_total"]
        row["map50_drop_points"] = 100 * (ref["map50"] - row["map50"])
        out_rows[name] = row
    result = {
        "benchmark": "speed_aware/synth",
        "command": " ".join(["python", *sys.argv]),
        "device": environment(),
        "gpu": "not measured: no GPU in this environment",
        "width": args.width,
        "models": out_rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "speed_aware_synth.json", result)
    atomic_write_text(out_dir / "speed_aware_synth.md", synth_markdown(result))
    return result


def synth_markdown(result: dict[str, Any]) -> str:
    dev = result["device"]
    lines = [
        f"# Speed-aware pruning on the synthetic set (SSD300 width {result['width']})",
        "",
        f"Device: {dev['cpu']} ({dev['cpu_count']} cores), ORT CPU fp32 batch 1, median of interleaved runs.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| model | params | GMACs | mAP50 | drop (pts) | median ms | FPS | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['macs_total'] / 1e9:.3f} | {100 * r['map50']:.2f} | "
            f"{r['map50_drop_points']:.2f} | {r['latency_ms_median']:.2f} | {r['fps']:.1f} | {r['speedup_x']:.2f}x |"
        )
    lines += ["", f"GPU: {result['gpu']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("arch", help="architectures only, random weights, ORT CPU")
    a.add_argument("--rounds", type=int, default=30)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--threads", type=int, default=0)
    a.add_argument("--no-profile", action="store_true", help="skip the per-layer latency table check")
    s = sub.add_parser("synth", help="train + prune on the synthetic set (paper vs cost-aware + aligned)")
    s.add_argument("--work-dir", default="runs/speed_aware")
    s.add_argument("--width", type=float, default=0.25)
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--prune-epochs", type=int, default=3)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--n-train", type=int, default=200)
    s.add_argument("--n-val", type=int, default=50)
    s.add_argument("--device", default="cpu")
    s.add_argument("--rounds", type=int, default=30)
    s.add_argument("--lam-grid", default="1e-4,3e-4,1e-3")
    s.add_argument(
        "--max-steps", type=int, default=None, help="cap optimizer steps per training (smoke runs)"
    )
    for q in (a, s):
        q.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_dir = Path(args.out_dir)
    if args.part == "arch":
        res = run_arch(args.rounds, args.warmup, args.threads, out_dir, profile=not args.no_profile)
        print(arch_markdown(res))
    else:
        res = run_synth(args, out_dir)
        print(synth_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
