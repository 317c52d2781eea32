"""Benchmark harness: speed, memory, size and accuracy of original vs compressed models.

``run_benchmark`` measures and writes ``bench.json``; ``report.render_report`` turns that JSON
into ``REPORT.md`` and PNG plots (so a report can be re-rendered without re-measuring).
"""

from prunekit.bench.harness import run_benchmark
from prunekit.bench.timing import TimingConfig, TimingStats, time_callable, time_interleaved

__all__ = ["TimingConfig", "TimingStats", "run_benchmark", "time_callable", "time_interleaved"]
