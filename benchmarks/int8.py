"""Pruning and INT8 together: the pruning benchmarks' originals and pruned models, FP32 and Q/DQ INT8.

    python -m benchmarks.int8      # after python -m benchmarks.cifar10_vgg16 and python -m benchmarks.bccd_ssd300
    python -m benchmarks.int8 --cifar-run runs/cifar10_v3 --bccd-run runs/bccd_v3

For CIFAR-10 VGG16 (``baseline.pt``, ``paper.pt``) and BCCD SSD300 (``original.pt``, ``paper.pt``):
exports both and quantizes them (``VARIANTS``: the ORT CPU layout with every compute layer INT8
for the headline rows, and TensorRT's explicit-quantization layout, heads float or not; each with
its TensorRT lint), calibrating on the
validation split (images held out of training, inside the training data: CIFAR's 5,000, BCCD's
87 trainval images; no augmentation); then, in one run on ONNX Runtime CPU:

* accuracy of every model through the ORT runner on the test split (top-1 on CIFAR's 10,000
  images, pycocotools AP50 on BCCD's 72), with the standard error;
* throughput at batch 1, the models of one task interleaved;
* file sizes; the CPU's instruction set (INT8 speed depends on VNNI / AMX).

Writes ``benchmarks/results/int8.{json,md}``: per task ``original_fp32``, ``compressed_fp32``,
``compressed_int8`` (and ``original_int8`` and the other layouts), each with ``size_mb``, ``fps_b1`` and ``top1`` /
``ap50`` in percent, plus ``cpu_isa`` and the targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS,
    command_line,
    load_bccd,
    load_cifar,
    machine_info,
    ort_interleaved,
    save_result,
    standard_error,
)
from prunekit.bench.accuracy import load_samples, runner_accuracy
from prunekit.bench.machine import cpu_isa
from prunekit.deploy import get_runner
from prunekit.deploy.quantize import QuantizeConfig, dataset_batches, quantize_model
from prunekit.deploy.runtime import read_metadata
from prunekit.deploy.trt_lint import lint_file
from prunekit.export import export_onnx
from prunekit.fileio import file_sha256
from prunekit.markdown import markdown_table

log = logging.getLogger("int8")
# Every INT8 row: (source model, QuantizeConfig settings beyond the method and calibration size).
# compressed_int8 / original_int8 are the ORT CPU layout (``--target ort-cpu --quantize-heads``):
# this benchmark runs on ORT CPU, and on a pruned SSD the heads are a large share of what is left
# (their outputs are fixed by anchors x classes), so heads kept float keep much of the file float.
# The other rows show what each choice does: the tensorrt layout (TensorRT's explicit quantization:
# int8 symmetric, float bias, Q/DQ on layer inputs) with the heads float is what
# `compress-and-export --precision int8` writes by default. Every row carries its TensorRT lint.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "original_int8": ("original", {"target": "ort-cpu", "keep_heads_float": False}),
    "compressed_int8": ("compressed", {"target": "ort-cpu", "keep_heads_float": False}),
    "compressed_int8_cpu_heads_float": ("compressed", {"target": "ort-cpu"}),
    "compressed_int8_tensorrt": ("compressed", {"target": "tensorrt"}),
    "compressed_int8_tensorrt_heads": ("compressed", {"target": "tensorrt", "keep_heads_float": False}),
}
ROWS = ("original_fp32", "original_int8", "compressed_fp32", *list(VARIANTS)[1:])


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cifar-run", type=Path, default=Path("runs/cifar10_v3"))
    ap.add_argument("--bccd-run", type=Path, default=Path("runs/bccd_v3"))
    ap.add_argument(
        "--cifar-files", default="baseline.pt,paper.pt", help="original,compressed in --cifar-run"
    )
    ap.add_argument("--bccd-files", default="original.pt,paper.pt", help="original,compressed in --bccd-run")
    ap.add_argument("--tasks", default="cifar10_vgg16,bccd_ssd300")
    ap.add_argument("--result", type=Path, default=RESULTS / "int8.json")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--test-images", type=int, default=None, help="CIFAR only; default: all 10,000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def measure(task: str, ckpts: dict[str, Path], calib: Any, test: Any, metric: str, a: argparse.Namespace,
            rounds: int) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"calibration_images": min(a.calib_images, len(calib)), "test_images": len(test)}
    samples = load_samples(test)
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, Path] = {}
        batches = None
        for role, ckpt in ckpts.items():
            if not ckpt.is_file():
                raise SystemExit(f"{ckpt}: not found; run the {task} benchmark first")
            model = prunekit.load(ckpt).eval()
            fp32 = Path(tmp) / f"{role}_fp32.onnx"
            export_onnx(model, fp32, check=False)
            paths[f"{role}_fp32"] = fp32
            out[f"{role}_fp32"] = {
                "params": prunekit.count_params(model),
                "tensorrt_lint": lint_file(fp32),
            }
            out.setdefault("source", {})[role] = {"checkpoint": str(ckpt), "sha256": file_sha256(ckpt)}
            if batches is None:  # pruning keeps the input contract: one set of batches serves both
                batches = dataset_batches(calib, read_metadata(fp32), a.calib_images, 8, a.seed)
        for row, (role, settings) in VARIANTS.items():
            cfg = QuantizeConfig(method=a.method, calib_images=a.calib_images, **settings)
            paths[row] = Path(tmp) / f"{row}.onnx"
            rep = quantize_model(paths[f"{role}_fp32"], paths[row], batches, cfg)
            out[row] = {"params": out[f"{role}_fp32"]["params"], "target": cfg.target,
                        "heads": "float" if cfg.keep_heads_float else "int8", "kept_float": len(rep["kept_float"]),
                        "tensorrt_lint": rep["tensorrt_lint"]}  # fmt: skip
        for row in ROWS:
            meta = read_metadata(paths[row])
            with get_runner("ort-cpu", paths[row], intra_op_threads=a.threads) as r:
                acc = runner_accuracy(r, samples, meta, batch_size=8)
            key = "top1" if metric == "top1" else "map50"
            value = 100.0 * float(acc[key])
            out[row].update({metric: value, f"{metric}_se": standard_error(value, len(samples)),
                             "size_mb": paths[row].stat().st_size / 2**20})  # fmt: skip
            if metric == "ap50":
                out[row]["map"] = 100.0 * float(acc["map"])
            log.info("%s %s: %s %.2f", task, row, metric, value)
        timing = ort_interleaved(paths, rounds=rounds, warmup=10, batch=1, threads=a.threads)
    for row in ROWS:
        out[row]["fps_b1"] = timing[row]["fps"]
        out[row]["latency_ms_b1"] = timing[row]["latency_ms_median"]
    o, c32 = out["original_fp32"], out["compressed_fp32"]
    out["targets"] = _targets(o, c32, out["compressed_int8"], metric)
    out["targets_tensorrt"] = _targets(o, c32, out["compressed_int8_tensorrt"], metric)
    return out


def _targets(o: dict[str, Any], c32: dict[str, Any], q: dict[str, Any], metric: str) -> dict[str, Any]:
    """The issue's targets for an INT8 model ``q``: accuracy against the pruned FP32, speed and size
    against the original FP32."""
    return {
        "int8_within_1_of_fp32": abs(q[metric] - c32[metric]) <= 1.0,
        "fps_x": q["fps_b1"] / o["fps_b1"],
        "fps_ge_3x": q["fps_b1"] >= 3 * o["fps_b1"],
        "size_x": o["size_mb"] / q["size_mb"],
        "size_ge_10x": o["size_mb"] / q["size_mb"] >= 10,
    }


def _lint(findings: list[dict[str, str]] | None) -> str:
    if findings is None:
        return "not run"
    rules = sorted({f["rule"] for f in findings})
    return "clean" if not findings else f"{len(findings)}: {', '.join(rules)}"


def _shown(targets: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k}: {'met' if v else 'NOT met'}"
                     for k, v in targets.items())  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "int8",
        "command": command_line(),
        "machine": machine_info("cpu", a.threads),
        "cpu_isa": cpu_isa(),
        "loadavg_start": list(os.getloadavg()),
        "quantization": {
            "method": a.method,
            "calibration": "validation split (held out of training), no augmentation",
        },
    }
    tasks = [t for t in a.tasks.split(",") if t]
    if "cifar10_vgg16" in tasks:
        _, val, test = load_cifar(a.data_dir, 45000, 5000, a.test_images, a.seed)
        orig, comp = a.cifar_files.split(",")
        ckpts = {"original": a.cifar_run / orig, "compressed": a.cifar_run / comp}
        res["cifar10_vgg16"] = measure("cifar10_vgg16", ckpts, val, test, "top1", a, rounds=300)
    if "bccd_ssd300" in tasks:
        _, val, test = load_bccd(a.data_dir / "BCCD", "none", train_split="trainval")
        orig, comp = a.bccd_files.split(",")
        ckpts = {"original": a.bccd_run / orig, "compressed": a.bccd_run / comp}
        res["bccd_ssd300"] = measure("bccd_ssd300", ckpts, val, test, "ap50", a, rounds=300)
    res["wall_s"] = round(time.perf_counter() - wall0, 1)
    res["cpu_s"] = round(time.process_time() - cpu0, 1)
    if a.result.is_file():  # keep the entries of tasks this call did not measure (e.g. bccd_ssd300_joint)
        old = json.loads(a.result.read_text())
        res = {
            **{k: v for k, v in old.items() if k not in res and isinstance(v, dict) and "original_fp32" in v},
            **res,
        }
    save_result(a.result, res, render)
    print(render(res))


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    isa = ", ".join(k for k, v in r["cpu_isa"].items() if v) or "unknown"
    lines = [
        "# Pruning and INT8 (Q/DQ) together, ONNX Runtime CPU",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), ISA: {isa}; onnxruntime {m['versions'].get('onnxruntime')}. "
        f"INT8: {r['quantization']['method']} calibration on the {r['quantization']['calibration']}, per-channel "
        "symmetric weights. `original_int8` and `compressed_int8`: `prunekit quantize --target ort-cpu "
        "--quantize-heads` (uint8 activations, ReLU and pooling INT8, the heads INT8; the decode float). "
        "`tensorrt`: TensorRT's explicit quantization (int8 symmetric, float bias, Q/DQ on the compute "
        "layers' inputs), heads float unless `_heads`; `lint`: the TensorRT lint's findings. Accuracy through the ORT runner on the test split; batch-1 throughput with the models "
        "of a task interleaved in one run, thread spinning off. "
        f"Wall {r['wall_s']} s, CPU {r['cpu_s']} s.",
    ]
    for task, metric in (("cifar10_vgg16", "top1"), ("bccd_ssd300", "ap50")):
        if task not in r:
            continue
        t = r[task]
        base = t["original_fp32"]["fps_b1"]
        head = ["model", "params", "file MB", f"{metric} (%)", "± SE", "img/s b1", "x original FP32", "TensorRT lint"]  # fmt: skip
        body = [[row, f"{x['params']:,}", f"{x['size_mb']:.2f}", f"{x[metric]:.2f}", f"{x[metric + '_se']:.2f}",
                 f"{x['fps_b1']:.1f}", f"{x['fps_b1'] / base:.2f}", _lint(x.get("tensorrt_lint"))]
                for row, x in ((row, t[row]) for row in ROWS if row in t)]  # fmt: skip
        lines += ["", f"## {task} (test: {t['test_images']:,} images, calibration: {t['calibration_images']})", "",
                  markdown_table(head, body)]  # fmt: skip
        lines += ["", "Targets (compressed_int8): " + _shown(t["targets"])]
        if "targets_tensorrt" in t:
            lines += ["", "The same targets for compressed_int8_tensorrt (the pipeline's default INT8): "
                      + _shown(t["targets_tensorrt"])]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
