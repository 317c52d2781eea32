"""Latency of ONNX models on ONNX Runtime CPU, measured side by side: the search's operating points.

Each candidate of the budget search is timed interleaved with the original in the same call, so
its speed-up is a ratio measured under the same load (these machines are noisy), with the
thread pools' spinning off (an idle session busy-waiting steals the cores the timed one needs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.bench.timing import TimingConfig, TimingStats, time_interleaved


def ort_cpu_stats(
    models: Mapping[str, str | Path],
    batch: int = 1,
    config: TimingConfig | None = None,
    threads: int | None = None,
) -> dict[str, TimingStats]:
    """Name -> :class:`TimingStats` for each ONNX file on ONNX Runtime CPU, timed interleaved at ``batch``.

    Inputs are seeded random images of each model's own input shape (the latency of a dense
    convolutional network does not depend on the pixel values); ``threads`` is ORT's intra-op
    thread count (its default, one per core, when None).
    """
    import onnxruntime as ort

    from prunekit.deploy.ort import session_options

    so = session_options("all", threads, spinning=False)
    runs: dict[str, Any] = {}
    for name, path in models.items():
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [batch, *[int(d) for d in inp.shape[1:]]]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        runs[name] = lambda s=sess, f=feed: s.run(None, f)
    return time_interleaved(runs, batch, config)


def ort_cpu_latency(
    models: Mapping[str, str | Path], batch: int = 1, config: TimingConfig | None = None
) -> dict[str, dict[str, float]]:
    """Name -> ``{"p50_ms", "p90_ms", "fps"}`` for each ONNX file, timed interleaved at ``batch``
    (:func:`ort_cpu_stats`; ``fps`` from the median latency)."""
    stats = ort_cpu_stats(models, batch, config or TimingConfig(min_time_s=1.0, max_time_s=20.0))
    return {
        n: {"p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "fps": 1000.0 * batch / s.p50_ms}
        for n, s in stats.items()
    }
