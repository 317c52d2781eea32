"""Pruning and INT8 together: the CIFAR-10 VGG16 baseline and its pruned model, FP32 and Q/DQ INT8.

    python benchmarks/int8_cifar10.py                       # after benchmarks/cifar10_vgg16.py
    python benchmarks/int8_cifar10.py --run runs/cifar10_vgg16 --calib-images 512

Takes ``baseline.pt`` and ``paper.pt`` from the CIFAR-10 benchmark's run folder, exports both,
quantizes both with ``prunekit quantize``'s defaults (per-channel symmetric weights, symmetric
activations calibrated on seeded random *training* images, the last layer kept float), then:

* top-1 of all four ONNX models through ONNX Runtime CPU on the 10,000 test images (with the
  standard error), and the INT8 models' top-1 agreement with their FP32 source;
* ONNX Runtime CPU throughput at batch 1 and 8, the four models interleaved in one run;
* file sizes; the CPU's instruction set (INT8 speed depends on VNNI / AMX).

Writes ``benchmarks/results/int8_cifar10.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import prunekit
from prunekit.bench.machine import cpu_isa
from prunekit.deploy.quantize import QuantizeConfig, dataset_batches, quantize_model
from prunekit.deploy.runtime import read_metadata
from prunekit.export import export_onnx
from prunekit.fileio import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, RESULTS, load_cifar, machine_info, standard_error  # noqa: E402
from speed_aware import time_ort_interleaved  # noqa: E402

log = logging.getLogger("int8_cifar10")
MODELS = ("baseline_fp32", "baseline_int8", "paper_fp32", "paper_int8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--run", type=Path, default=Path("runs/cifar10_vgg16"), help="the CIFAR benchmark's --out")
    ap.add_argument("--result", type=Path, default=RESULTS / "int8_cifar10.json")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    ap.add_argument("--rounds", type=int, default=200, help="timing rounds per model and batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _top1(sess: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    preds = [sess.run(None, {"images": x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)]
    return np.concatenate(preds)


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    train_set, _, test_set = load_cifar(a.data_dir, 45000, 5000, a.test_images, a.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "int8_cifar10",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info("cpu", a.threads),
        "cpu_isa": cpu_isa(),
        "loadavg_start": list(os.getloadavg()),
        "quantization": {"method": a.method, "calibration_images": a.calib_images, "calibration_split": "train"},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, Path] = {}
        for stage in ("baseline", "paper"):
            ckpt = a.run / f"{stage}.pt"
            if not ckpt.is_file():
                raise SystemExit(f"{ckpt}: not found; run benchmarks/cifar10_vgg16.py first (--run)")
            fp32 = Path(tmp) / f"{stage}_fp32.onnx"
            export_onnx(prunekit.load(ckpt).eval(), fp32, check=False)
            batches = dataset_batches(train_set, read_metadata(fp32), a.calib_images, 16, a.seed)
            int8 = Path(tmp) / f"{stage}_int8.onnx"
            rep = quantize_model(fp32, int8, batches, QuantizeConfig(method=a.method, calib_images=a.calib_images))
            paths[f"{stage}_fp32"], paths[f"{stage}_int8"] = fp32, int8
            res["models"][f"{stage}_int8"] = {"quantized_nodes": rep["quantized_nodes"], "kept_float": rep["kept_float"]}
        meta = read_metadata(paths["baseline_fp32"])
        x = np.concatenate(dataset_batches(test_set, meta, len(test_set), 256, a.seed))
        order = np.random.default_rng(a.seed).permutation(len(test_set))[: len(x)]
        y = np.asarray([int(test_set[int(i)][1]) for i in order])
        res["test_images"] = len(y)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = a.threads
        preds = {}
        for name in MODELS:
            sess = ort.InferenceSession(str(paths[name]), so, providers=["CPUExecutionProvider"])
            preds[name] = _top1(sess, x)
            top1 = 100.0 * float((preds[name] == y).mean())
            res["models"].setdefault(name, {}).update(
                top1=top1,
                top1_se=standard_error(top1, len(y)),
                size_bytes=paths[name].stat().st_size,
                params=prunekit.count_params(prunekit.load(a.run / f"{name.split('_')[0]}.pt")),
            )
            log.info("%s: top-1 %.2f", name, top1)
        for stage in ("baseline", "paper"):
            agree = float((preds[f"{stage}_int8"] == preds[f"{stage}_fp32"]).mean())
            res["models"][f"{stage}_int8"]["top1_agreement_with_fp32"] = agree
        res["timing"] = {}
        for batch in (1, 8):
            res["timing"][f"b{batch}"] = time_ort_interleaved(
                {n: paths[n] for n in MODELS}, rounds=a.rounds, warmup=10, batch=batch, threads=a.threads
            )
    t1 = res["timing"]["b1"]
    base = t1["baseline_fp32"]["fps"]
    res["fps_ratio_b1_vs_baseline_fp32"] = {n: t1[n]["fps"] / base for n in MODELS}
    t8 = res["timing"]["b8"]
    res["fps_ratio_b8_vs_baseline_fp32"] = {n: t8[n]["fps"] / t8["baseline_fp32"]["fps"] for n in MODELS}
    res["wall_s"] = round(time.perf_counter() - wall0, 1)
    res["cpu_s"] = round(time.process_time() - cpu0, 1)
    atomic_write_json(a.result, res)
    atomic_write_text(a.result.with_suffix(".md"), render(res))
    print(render(res))


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    isa = ", ".join(k for k, v in r["cpu_isa"].items() if v) or "unknown"
    lines = [
        "# CIFAR-10 VGG16-BN (width 0.25): pruning and INT8 (Q/DQ) together, ONNX Runtime CPU",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), ISA: {isa}; onnxruntime {m['versions'].get('onnxruntime')}. "
        f"INT8: {r['quantization']['method']} calibration on {r['quantization']['calibration_images']} training "
        f"images, per-channel symmetric weights, the last layer float. Top-1 on {r['test_images']:,} test images; throughput "
        f"interleaved in one run. Wall {r['wall_s']} s, CPU {r['cpu_s']} s.",
        "",
        "| model | params | file MB | top-1 (%) | ± SE | agrees with FP32 | img/s b1 | x b1 | img/s b8 | x b8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in MODELS:
        x = r["models"][n]
        agree = x.get("top1_agreement_with_fp32")
        lines.append(
            f"| {n} | {x['params']:,} | {x['size_bytes'] / 1e6:.2f} | {x['top1']:.2f} | {x['top1_se']:.2f} | "
            f"{'-' if agree is None else f'{100 * agree:.2f}%'} | {r['timing']['b1'][n]['fps']:.0f} | "
            f"{r['fps_ratio_b1_vs_baseline_fp32'][n]:.2f} | {r['timing']['b8'][n]['fps']:.0f} | "
            f"{r['fps_ratio_b8_vs_baseline_fp32'][n]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
