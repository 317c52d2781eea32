"""Speed-aware pruning: does a pruned SSD300 actually run faster?

    python -m benchmarks.speed_aware arch [--rounds 30]     # no training, minutes

SSD300 full width on random weights, ONNX Runtime CPU, batch 1. The original vs the paper's
pruned-6det channel counts (Table 1, VOC) as they are, aligned to 8 (nearest, prunekit's default;
and rounded up), a cost-aware-looking config (conv1..conv4 at most half width) and every layer
halved. Each model is exported with ``torch.onnx.export`` to a temp dir and timed in interleaved
rounds (one run of each model per round, order rotated), so a noisy shared machine hits all
models alike; the median is reported. The per-layer latency table of the original (what
``--cost latency`` / ``--target-latency`` use) is checked against the measured speed-ups. Writes
``results/speed_aware_ortcpu_architectures.{json,md}`` and ``results/speed_aware_latency_table_ortcpu.json``.

GPU (torch FP16, batch 1/32, CUDA events) is not measured here: ``python -m benchmarks.gpu`` is the GPU run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine_info, ort_interleaved
from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.markdown import markdown_table
from prunekit.models import SSDRaw, build_model, count_params, default_config, get_config
from prunekit.prune.cost import layer_macs, total_macs
from prunekit.prune.profile import estimate_latency, profile_model, save_latency_table
from prunekit.prune.selection import align_counts

log = logging.getLogger("speed_aware")
NOTE = "CPU shared with other processes; interleaved rounds keep ratios fair, absolutes are noisy"

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
        timing = ort_interleaved(paths, rounds=rounds, warmup=warmup, threads=threads)
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
        "command": f"python -m benchmarks.speed_aware arch --rounds {rounds} --warmup {warmup}"
        + ("" if profile else " --no-profile"),
        "machine": {
            **machine_info("cpu", torch.get_num_threads()),
            "ort_threads": threads or "default (one per core)",
        },
        "note": NOTE,
        "gpu": "not measured here: python -m benchmarks.gpu is the GPU run",
        "rounds": rounds,
        "warmup": warmup,
        "models": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "speed_aware_ortcpu_architectures.json", result)
    atomic_write_text(out_dir / "speed_aware_ortcpu_architectures.md", arch_markdown(result))
    return result


def arch_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Speed-aware pruning: SSD300 architectures on ONNX Runtime CPU (batch 1)",
        "",
        f"Device: {m['cpu']} ({m['cpu_count']} cores), onnxruntime {m['versions']['onnxruntime']}, "
        f"torch {m['versions']['torch']}. {result['rounds']} interleaved rounds, median. {result['note']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        markdown_table(
            ["model", "params (M)", "GMACs", "params x", "MACs x", "layers %8", "median ms", "FPS", "speed-up",
             "table estimate"],
            [[name, f"{r['params'] / 1e6:.2f}", f"{r['macs_total'] / 1e9:.2f}", f"{r['params_reduction_x']:.2f}",
              f"{r['macs_reduction_x']:.2f}", f"{r['multiple_of_8']}/{r['layers']}", f"{r['latency_ms_median']:.1f}",
              f"{r['fps']:.2f}", f"{r['speedup_x']:.2f}x", _x(r.get("estimated_speedup_x"))]
             for name, r in result["models"].items()],
        ),
    ]  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("arch", help="architectures only, random weights, ORT CPU")
    a.add_argument("--rounds", type=int, default=30)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--threads", type=int, default=0)
    a.add_argument("--no-profile", action="store_true", help="skip the per-layer latency table check")
    a.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run_arch(args.rounds, args.warmup, args.threads, Path(args.out_dir), profile=not args.no_profile)
    print(arch_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
