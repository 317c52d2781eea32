"""Full-width SSD300 on one NVIDIA GPU: the original, the paper's pruned-6det and prunekit's cut.

    sh benchmarks/gpu.sh                 # on the GPU machine (torch preinstalled); < 8 minutes on an H100
    python -m benchmarks.gpu --dry-run --out /tmp/gpu.json   # CPU, one iteration: checks the script

The three architectures (``benchmarks/configs/gpu_architectures.json``: the original 26.3M
parameters, Singh et al.'s SSD300-pruned-6det from their Table 1, and the kept fractions of
``compress-and-export --seed 0`` applied at full width) are built with random weights: speed and
memory do not depend on the weights, and no trained full-width SSD exists here. Each runs the
network (backbone and heads, the part pruning changes; the decode and NMS are the same for all)
in PyTorch eager FP32 and FP16, ``torch.compile`` FP16, at batch 1 and 32; ONNX Runtime CUDA and
TensorRT (FP16) run too where they are installed, and are recorded as skipped with the reason
where not. Timing: CUDA events, median over the measured iterations after warm-up; peak memory
from the torch allocator. Writes ``benchmarks/results/gpu.json`` with the device named.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
ARCHS = ROOT / "configs" / "gpu_architectures.json"
RESULT = ROOT / "results" / "gpu.json"
log = logging.getLogger("gpu")


def build(name: str, table: dict[str, Any]) -> Any:
    """The raw network (images -> box regression, class logits) of one architecture, eval mode."""
    import prunekit
    from prunekit.models import SSDRaw, get_config, ssd300_vgg16

    cfg = get_config(ssd300_vgg16(num_classes=21, width=1.0))
    cfg.channels.update(table[name])
    return SSDRaw(prunekit.build_model(cfg)).eval()


def measure(
    fn: Any, batch: int, iters: int, warmup: int, budget_s: float, cuda: bool = False
) -> dict[str, Any]:
    """Median latency (ms) and throughput of ``fn`` through prunekit's own timer: CUDA events on a GPU,
    the wall clock otherwise; ``iters`` calls at most, fewer once ``budget_s`` seconds have passed."""
    from prunekit.bench.timing import TimingConfig, cuda_event_timer, perf_counter_timer, time_callable

    cfg = TimingConfig(
        warmup_iters=warmup, min_iters=iters, min_time_s=0.0, max_time_s=budget_s, max_iters=iters
    )
    stats = time_callable(fn, batch, cfg, cuda_event_timer() if cuda else perf_counter_timer)
    return {"latency_ms": stats.p50_ms, "fps": 1e3 * batch / stats.p50_ms, "iterations": stats.n_iters}


def time_torch(model: Any, x: Any, iters: int, warmup: int, budget_s: float) -> dict[str, Any]:
    """:func:`measure` of the network on ``x``, in inference mode; peak device memory (MB) on a GPU."""
    import torch

    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = measure(lambda: model(x), x.shape[0], iters, warmup, budget_s, cuda)
    if cuda:
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def onnx_backends(
    model: Any, batch: int, device: str, iters: int, warmup: int, budget_s: float
) -> dict[str, Any]:
    """ORT CUDA (FP32) and TensorRT (FP16) where installed; otherwise the reason they were skipped."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        ort, has_cuda = None, False
    try:
        import tensorrt  # noqa: F401

        has_trt = device.startswith("cuda")
    except ImportError:
        has_trt = False
    if not has_cuda:
        out["ort-cuda"] = {"skipped": "onnxruntime-gpu not installed (too large to carry to the lent GPU)"}
    if not has_trt:
        out["trt"] = {"skipped": "tensorrt not installed" if device.startswith("cuda") else "no GPU"}
    if not (has_cuda or has_trt):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        x = torch.randn(batch, 3, 300, 300)
        torch.onnx.export(model.cpu().float(), x, str(path), input_names=["images"], opset_version=17,
                          dynamo=False)  # fmt: skip
        feed = {"images": x.numpy().astype(np.float32)}
        if has_cuda:
            sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            out["ort-cuda"] = {**measure(lambda: sess.run(None, feed), batch, iters, warmup, budget_s),
                               "note": "host I/O included"}  # fmt: skip
        if has_trt:
            from prunekit.deploy import get_runner

            with get_runner("trt", path, precision="fp16", max_batch=batch, opt_batch=batch) as r:
                out["trt:fp16"] = {**measure(lambda: r.infer(feed), batch, iters, warmup, budget_s),
                                   "note": "host I/O included"}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, FP32 eager, batch 1, one iteration: checks the script"
    )
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=4.0, help="most seconds of timed runs per measurement")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from benchmarks.common import command_line

    t_start, cpu0 = time.perf_counter(), time.process_time()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        print("benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False); nothing run. --dry-run checks "
              "the script on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if cuda else "cpu"
    batches = [1] if a.dry_run else [int(b) for b in a.batches.split(",")]
    iters, warmup = (1, 1) if a.dry_run else (a.iters, 10)
    table = json.loads(ARCHS.read_text())
    names = [k for k in table if not k.startswith("_")]
    res: dict[str, Any] = {
        "benchmark": "gpu",
        "command": command_line(),
        "dry_run": a.dry_run,
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "architectures": {},
    }
    import prunekit

    for name in names:
        model = build(name, table)
        entry: dict[str, Any] = {"params": prunekit.count_params(model), "runs": {}}
        variants = [("torch", torch.float32, False)]
        if not a.dry_run:
            variants += [("torch:fp16", torch.float16, False)]
            if not a.no_compile:
                variants += [("torch-compile:fp16", torch.float16, True)]
        for label, dtype, compiled in variants:
            m = build(name, table).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
            run = torch.compile(m) if compiled else m
            for b in batches:
                x = torch.randn(b, 3, 300, 300, device=device, dtype=dtype).to(
                    memory_format=torch.channels_last
                )
                t0 = time.perf_counter()
                r = time_torch(run, x, iters, warmup, a.budget_s)
                r["wall_s"] = round(time.perf_counter() - t0, 2)
                entry["runs"][f"{label}@b{b}"] = r
                log.info("%s %s b%d: %.3f ms (%.0f img/s)", name, label, b, r["latency_ms"], r["fps"])
            del m, run
            if cuda:
                torch.cuda.empty_cache()
        for b in batches:
            for k, v in onnx_backends(model, b, device, iters, warmup, a.budget_s).items():
                entry["runs"][f"{k}@b{b}"] = v
        res["architectures"][name] = entry
    base = res["architectures"]["original"]["runs"]
    for entry in res["architectures"].values():
        entry["speedup_vs_original"] = {
            k: round(v["fps"] / base[k]["fps"], 3)
            for k, v in entry["runs"].items()
            if "fps" in v and "fps" in base.get(k, {})
        }
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["cpu_s"] = round(time.process_time() - cpu0, 1)
    res["loadavg_start"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps({n: e["speedup_vs_original"] for n, e in res["architectures"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
