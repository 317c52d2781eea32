"""Original vs pruned SSD on one NVIDIA GPU (written for the H100): batch 1 and 32.

Backends: PyTorch eager FP32 / FP16, ``torch.compile`` FP32 / FP16, ONNX Runtime CUDA EP
(FP32); with ``--trt`` also ONNX Runtime's TensorRT EP and TensorRT itself at FP16. Torch
timings use CUDA events; peak device memory comes from the torch allocator (torch backends) or
NVML (others, when pynvml is installed). Results go to
``benchmarks/results/bench_gpu_<gpu>/``. Exits with status 2 and a message when there is no
CUDA device.

    python benchmarks/bench_gpu.py [--original A.pt --pruned B.pt] [--data synth] [--trt]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from bench_cpu import RESULTS, find_prune_checkpoints

BACKENDS = ["torch", "torch:fp16", "torch-compile", "torch-compile:fp16", "ort-cuda"]
TRT_BACKENDS = ["ort-trt:fp16", "trt:fp16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original")
    ap.add_argument("--pruned")
    ap.add_argument("--data", default="synth")
    ap.add_argument("--max-images", type=int, default=100)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--trt", action="store_true", help="also ORT TensorRT EP and TensorRT at FP16")
    ap.add_argument("--min-iters", type=int, default=50)
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--max-time", type=float, default=120.0)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/bench_gpu_<gpu name>")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device available (torch.cuda.is_available() is False); nothing run",
            file=sys.stderr,
        )
        return 2
    orig, pruned, _ = find_prune_checkpoints()
    orig, pruned = args.original or orig, args.pruned or pruned
    if not orig or not pruned:
        print(
            "bench_gpu: pass --original and --pruned (no prune_synth*.json with checkpoints)", file=sys.stderr
        )
        return 2
    gpu = torch.cuda.get_device_name(0)
    out = Path(args.out or RESULTS / f"bench_gpu_{re.sub(r'[^a-z0-9]+', '_', gpu.lower()).strip('_')}")

    from prunekit.bench import TimingConfig, run_benchmark
    from prunekit.bench.report import terminal_tables

    res = run_benchmark(
        {"original": orig, "pruned": pruned},
        backends=BACKENDS + (TRT_BACKENDS if args.trt else []),
        batch_sizes=[int(b) for b in args.batch.split(",")],
        data_spec=args.data,
        out_dir=out,
        timing=TimingConfig(
            warmup_iters=20,
            warmup_time_s=1.0,
            min_iters=args.min_iters,
            min_time_s=args.min_time,
            max_time_s=args.max_time,
        ),  # fmt: skip
        max_images=args.max_images,
        device="cuda",
        progress=sys.stderr.isatty(),
    )
    print(terminal_tables(res))
    print(f"device: {res['machine']['device']}; wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
