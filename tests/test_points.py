"""The operating points' report: the Pareto front ranks by the same-run speed-up (not by
milliseconds timed minutes apart), and every drop shows its paired error."""

from __future__ import annotations

from pathlib import Path

from prunekit.bench.points import plot_points, point_rows, points_markdown


def _state() -> dict:
    def pt(name, params, ratio, ms, metric, decision, drop=None, se=None):
        return {"name": name, "params": params, "params_ratio": 1000 / params, "macs": params * 10,
                "macs_ratio": 1000 / params, "latency_ms": ms, "latency_ratio": ratio, "metric": metric,
                "metric_se": 0.01, "drop": drop, "drop_se": se, "decision": decision, "checkpoint": None}  # fmt: skip

    return {
        "config": {"max_drop": 1.0, "target": None},
        "points": [
            pt("original", 1000, 1.0, 6.0, 0.96, "reference"),
            # timed in a quiet moment: fewer ms than c2, but a smaller speed-up over the original
            pt("c1", 500, 1.20, 4.0, 0.955, "accepted", 0.5, 0.3),
            pt("c2", 250, 1.50, 4.5, 0.955, "kept", 0.5, 0.3),
            pt("c3", 200, 1.60, 4.2, 0.90, "rejected: 6.00 ± 1.00 points below", 6.0, 1.0),
        ],
        "controls": {"0": {"metric": 0.96}, "1": {"metric": 0.96}},
        "message": "kept candidate 2",
    }


def test_pareto_uses_the_same_run_speed_up_and_shows_paired_errors(tmp_path: Path) -> None:
    front = [r["point"] for r in point_rows(_state(), only_pareto=True)]
    assert front == [
        "c3",
        "c2",
        "original",
    ]  # fastest first; c1 is dominated by c2 (same metric, less speed-up)
    md = points_markdown(_state(), "AP50")
    assert "| c2 | 250 |" in md and "+0.50 ± 0.30" in md and "+6.00 ± 1.00" in md
    assert plot_points(_state(), tmp_path / "p.png", "AP50").stat().st_size > 1000
