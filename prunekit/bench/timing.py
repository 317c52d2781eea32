"""Timing loops: warm-up, then timed iterations until a minimum count AND a minimum time are met.

A workload is a zero-argument callable that does one complete, synchronised inference (for a
runner: ``infer`` followed by ``synchronize``), so the time measured is the time a caller waits.
Several workloads (original and compressed models) are timed *interleaved*, round by round, so
that a machine that slows down or speeds up during the run (thermal throttling, a neighbour on
a shared host) shifts all of them alike and their ratio stays honest.

Units: latencies are per call (one batch) in milliseconds; ``fps`` is images per second,
``batch_size / mean latency``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Workload = Callable[[], Any]
# A timer runs the workload once and returns the seconds it took.
Timer = Callable[[Workload], float]


@dataclass
class TimingConfig:
    """When to stop warming up and when to stop measuring.

    Warm-up runs until ``warmup_iters`` calls AND ``warmup_time_s`` seconds are done. Measuring
    runs until every workload has ``min_iters`` calls AND ``min_time_s`` seconds of measured
    time, unless ``max_time_s`` (wall clock for the whole measurement, all workloads together)
    or ``max_iters`` (per workload) is reached first; hitting a cap is recorded in the stats.
    """

    warmup_iters: int = 5
    warmup_time_s: float = 0.0
    min_iters: int = 20
    min_time_s: float = 1.0
    max_time_s: float = 60.0
    max_iters: int | None = None
    max_samples: int = 2000  # per-iteration samples kept in the stats (evenly subsampled beyond)

    def __post_init__(self) -> None:
        if self.min_iters < 1:
            raise ValueError(f"min_iters must be >= 1, got {self.min_iters}")
        if self.warmup_iters < 0 or self.warmup_time_s < 0 or self.min_time_s < 0:
            raise ValueError("warm-up counts and times must be >= 0")
        if self.max_iters is not None and self.max_iters < self.min_iters:
            raise ValueError(f"max_iters ({self.max_iters}) < min_iters ({self.min_iters})")


@dataclass
class TimingStats:
    """Latency statistics of one workload (milliseconds per call) and its throughput."""

    batch_size: int
    n_iters: int
    total_time_s: float  # sum of measured latencies
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    iqr_ms: float  # p75 - p25: the spread, robust to a few outliers
    cv: float  # std / mean: the spread, relative
    fps: float  # images per second = batch_size / mean latency
    timer: str = "perf_counter"
    warmup_iters: int = 0
    capped: bool = False  # stopped by max_time_s / max_iters before min_iters and min_time held
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(
        cls, samples_s: list[float] | np.ndarray, batch_size: int = 1, max_samples: int = 2000, **kw: Any
    ) -> TimingStats:
        a = np.asarray(samples_s, dtype=np.float64) * 1e3
        if a.size == 0:
            raise ValueError("no timing samples")
        mean = float(a.mean())
        p25, p50, p75, p90, p99 = (float(x) for x in np.percentile(a, [25, 50, 75, 90, 99]))
        return cls(
            batch_size=batch_size,
            n_iters=int(a.size),
            total_time_s=float(a.sum() / 1e3),
            mean_ms=mean,
            std_ms=float(a.std(ddof=1)) if a.size > 1 else 0.0,
            min_ms=float(a.min()),
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            max_ms=float(a.max()),
            iqr_ms=p75 - p25,
            cv=float(a.std(ddof=1) / mean) if a.size > 1 and mean > 0 else 0.0,
            fps=batch_size * 1e3 / mean if mean > 0 else math.inf,
            samples_ms=_subsample(a, max_samples),
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _subsample(a: np.ndarray, n: int) -> list[float]:
    if a.size > n > 0:
        a = a[np.linspace(0, a.size - 1, n).round().astype(int)]
    return [round(float(x), 6) for x in a]


def perf_counter_timer(fn: Workload) -> float:
    """Wall clock around one synchronised call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_event_timer(device: Any = None) -> Timer:
    """A timer using CUDA events on the current stream (for torch CUDA runners).

    The events bracket the call on the device's stream and ``synchronize`` on the end event, so
    the time is what the GPU spent between them, free of host scheduling jitter after the launch.
    """
    import torch

    def timer(fn: Workload) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timer


def timer_name(timer: Timer) -> str:
    return "perf_counter" if timer is perf_counter_timer else "cuda-events"


def time_callable(
    fn: Workload, batch_size: int = 1, config: TimingConfig | None = None, timer: Timer | None = None
) -> TimingStats:
    """Time one workload (see :func:`time_interleaved`)."""
    return time_interleaved({"w": fn}, {"w": batch_size}, config, {"w": timer} if timer else None)["w"]


def time_interleaved(
    workloads: Mapping[str, Workload],
    batch_size: int | Mapping[str, int] = 1,
    config: TimingConfig | None = None,
    timers: Mapping[str, Timer] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, TimingStats]:
    """Warm each workload up, then time them in alternating rounds; returns stats per name.

    Each round calls every workload that still needs samples once; the starting workload rotates
    from round to round (A B, B A, A B...), so neither model systematically runs right after the
    other (cache and clock effects). A workload that reached its minimum count and time keeps
    running until all have, as long as the caps allow, so all are sampled over the same period.
    """
    cfg = config or TimingConfig()
    names = list(workloads)
    if not names:
        raise ValueError("no workloads to time")
    sizes = {n: batch_size[n] if isinstance(batch_size, Mapping) else batch_size for n in names}
    tms = {n: (timers or {}).get(n) or perf_counter_timer for n in names}

    warm = dict.fromkeys(names, 0)
    for n in names:
        t0 = time.perf_counter()
        while warm[n] < cfg.warmup_iters or time.perf_counter() - t0 < cfg.warmup_time_s:
            workloads[n]()
            warm[n] += 1

    samples: dict[str, list[float]] = {n: [] for n in names}

    def satisfied(n: str) -> bool:
        return len(samples[n]) >= cfg.min_iters and sum(samples[n]) >= cfg.min_time_s

    start = time.perf_counter()
    capped = False
    rnd = 0
    while not all(satisfied(n) for n in names):
        # At least one round, so every workload has a sample even under a zero time cap.
        if (
            rnd > 0
            and (time.perf_counter() - start >= cfg.max_time_s)
            or (cfg.max_iters is not None and min(len(s) for s in samples.values()) >= cfg.max_iters)
        ):
            capped = True
            break
        k = rnd % len(names)
        for n in names[k:] + names[:k]:
            if cfg.max_iters is not None and len(samples[n]) >= cfg.max_iters:
                continue
            samples[n].append(tms[n](workloads[n]))
        rnd += 1
        if on_round is not None:
            on_round(rnd)
    if capped:
        log.warning(
            "timing stopped at the cap (%.1f s / %s iters) before min_iters=%d and min_time=%.1f s held",
            cfg.max_time_s,
            cfg.max_iters,
            cfg.min_iters,
            cfg.min_time_s,
        )
    return {
        n: TimingStats.from_samples(
            samples[n],
            sizes[n],
            cfg.max_samples,
            timer=timer_name(tms[n]),
            warmup_iters=warm[n],
            capped=capped and not satisfied(n),
        )
        for n in names
    }
