"""Memory of one model on one backend, measured in a fresh process.

``ru_maxrss`` is a process-lifetime peak, and in the benchmarking process several models (and
the allocator's recycled pages) share it, so in-process numbers mix models. Here a child
process imports the libraries, notes its RSS (the baseline), loads the runner, runs each batch
size (ascending) a few times and reports after each: the peak RSS (the RAM a process serving
this model needs, sampled every few ms), the peak minus the baseline (what the model and its
runtime added) and the device memory (torch allocator peak, or NVML's used-memory delta for other GPU
backends). Run as ``python -m prunekit.bench.memprobe REQUEST_JSON``; prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_PREFIX = "PRUNEKIT_MEMPROBE "


def measure_memory_subprocess(
    backend: str,
    artifact: str | os.PathLike,
    precision: str,
    batch_sizes: Sequence[int],
    input_size: Sequence[int],
    runner_kwargs: dict[str, Any] | None = None,
    calls: int = 3,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the probe in a child process; returns its JSON (``{"error": ...}`` if it failed)."""
    req = {
        "backend": backend,
        "artifact": str(artifact),
        "precision": precision,
        "batch_sizes": sorted(int(b) for b in batch_sizes),
        "input_size": [int(v) for v in input_size],
        "runner_kwargs": runner_kwargs or {},
        "calls": calls,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "prunekit.bench.memprobe", json.dumps(req, default=str)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"memory probe exited with {proc.returncode}: {tail[0]}"}


def probe(req: dict[str, Any]) -> dict[str, Any]:
    """The child's side: measure and return the result dict (see the module docstring)."""
    import numpy as np

    from prunekit.bench.memory import (
        DeviceMemoryProbe,
        current_rss_bytes,
        device_memory_kind,
        process_peak_rss_bytes,
        rss_monitor,
    )
    from prunekit.deploy import get_runner

    backend = req["backend"]
    # Libraries the backend needs are loaded before the baseline: they are not the model's memory.
    for mod in {"torch": ["torch"], "ort": ["onnxruntime"], "trt": ["tensorrt"]}.get(
        backend.split("-")[0], []
    ):
        try:
            __import__(mod)
        except ImportError:
            pass
    runner = get_runner(backend, Path(req["artifact"]), precision=req["precision"], **req["runner_kwargs"])
    kind = device_memory_kind(backend, getattr(runner.info, "device", None))
    if kind == "torch":
        import torch

        torch.cuda.init()  # the CUDA context is not the model's memory; create it before the baseline
    baseline = current_rss_bytes()
    with rss_monitor() as rss_load, DeviceMemoryProbe(kind) as dev_load:
        runner.load()
    kind = device_memory_kind(backend, getattr(runner.info, "device", None))
    out: dict[str, Any] = {
        "method": "subprocess",
        "baseline_rss_bytes": baseline,
        "load_rss_bytes": rss_load.peak_delta,
        "load_device_bytes": dev_load.peak_delta,
        "device_probe": kind,
        "process_peak_rss_bytes": None,
        "batches": {},
    }
    name = runner.input_spec[0].name
    h, w = req["input_size"]
    rng = np.random.default_rng(0)
    peak = rss_load.peak
    for b in req["batch_sizes"]:
        x = rng.standard_normal((b, 3, h, w)).astype(np.float32)
        with rss_monitor() as rss, DeviceMemoryProbe(kind) as dev:
            for _ in range(max(1, int(req["calls"]))):
                runner.infer({name: x})
                runner.synchronize()
        # Batch sizes run ascending, so the running maximum is the peak at this batch size.
        peak = max(v for v in (peak, rss.peak) if v is not None) if (peak or rss.peak) else None
        out["batches"][str(b)] = {
            "peak_rss_bytes": peak,
            "rss_added_bytes": _delta(peak, baseline),
            "device_bytes": None
            if dev.peak_delta is None and dev_load.peak_delta is None
            else (dev_load.peak_delta or 0) + (dev.peak_delta or 0),
        }
    out["process_peak_rss_bytes"] = process_peak_rss_bytes()
    runner.close()
    return out


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(0, a - b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m prunekit.bench.memprobe REQUEST_JSON", file=sys.stderr)
        return 2
    result = probe(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
