"""The operating points of the budget search, as a user reads them: a Pareto table and one plot.

Views of ``search/search.json`` (written by :mod:`prunekit.prune.search`): every candidate the
search trained and scored, the original and the control, with measured ORT CPU latency. Any point
with a checkpoint can be exported afterwards (``prunekit compress-and-export --model
RUN/search/points/cNN.pt ...`` or ``prunekit export``) without recomputing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.markdown import markdown_table
from prunekit.prune.search import pareto

PLOT_FILE = "operating_points.png"


def load_points(run_dir: str | Path) -> dict[str, Any] | None:
    """The search state of a run (None when the run used another schedule)."""
    path = Path(run_dir) / "search" / "search.json"
    return json.loads(path.read_text()) if path.is_file() else None


def point_rows(state: dict[str, Any], only_pareto: bool = False) -> list[dict[str, Any]]:
    """One flat row per scored point: name, params, MACs, latency, metric ± SE, drop, decision."""
    points = [p for p in state["points"] if "metric" in p]
    if only_pareto and points and all(p.get("latency_ratio") for p in points):
        # each point's speed-up was timed interleaved with the original in its own call: the ratio
        # is comparable across points, the milliseconds (of calls minutes apart) are not
        points = pareto([dict(p, latency_rel=1 / p["latency_ratio"]) for p in points], "latency_rel")
    elif only_pareto:
        points = pareto(points, "macs")
    return [
        {
            "point": p["name"],
            "params": p["params"],
            "params_ratio": p["params_ratio"],
            "macs": p["macs"],
            "macs_ratio": p["macs_ratio"],
            "ort_b1_ms": p.get("latency_ms"),
            "ort_b1_ratio": p.get("latency_ratio"),
            "metric": 100 * p["metric"],
            "metric_se": None if p.get("metric_se") is None else 100 * p["metric_se"],
            "drop_vs_control": p.get("drop"),
            "drop_se": p.get("drop_se"),  # paired, on the same validation images
            "decision": p.get("decision", ""),
            "checkpoint": p.get("checkpoint"),
        }  # fmt: skip
        for p in points
    ]


def _table(rows: list[dict[str, Any]], metric: str) -> str:
    body = [[r["point"], f"{r['params']:,}", f"{r['params_ratio']:.2f}x", f"{r['macs_ratio']:.2f}x",
             "n/a" if r["ort_b1_ms"] is None else f"{r['ort_b1_ms']:.2f}",
             "n/a" if r["ort_b1_ratio"] is None else f"{r['ort_b1_ratio']:.2f}x",
             f"{r['metric']:.2f} ± {r['metric_se'] or 0:.2f}",
             _drop(r), r["decision"]]
            for r in rows]  # fmt: skip
    header = ["point", "params", "params ratio", "MACs ratio", "ORT CPU b1 ms", "speed-up", f"val {metric}",
              "drop vs control", "decision"]  # fmt: skip
    return markdown_table(header, body)


def _drop(r: dict[str, Any]) -> str:
    if r["drop_vs_control"] is None:
        return ""
    return f"{r['drop_vs_control']:+.2f}" + ("" if r.get("drop_se") is None else f" ± {r['drop_se']:.2f}")


def pareto_head(state: dict[str, Any], metric: str, n: int = 5) -> str:
    """The Pareto front's ``n`` most compressed points: the summary's view of the search."""
    front = sorted(point_rows(state, only_pareto=True), key=lambda r: -r["params_ratio"])[:n]
    return _table(front, metric)


def points_markdown(
    state: dict[str, Any], metric: str, plot: str | None = None, head: int | None = None
) -> str:
    """The Pareto table (``head`` rows at most) and, below it, every point evaluated."""

    front = point_rows(state, only_pareto=True)
    front = sorted(front, key=lambda r: -r["params_ratio"])[:head] if head else front
    cfg = state["config"]
    lines = [
        "## Operating points (budget search)",
        "",
        f"Budget: at most {cfg['max_drop']:g} points of validation {metric} below the control"
        + (f"; target {cfg['target']}" if cfg.get("target") else "")
        + f". {len(state['points']) - 1} candidates evaluated; {state.get('message', '')}.",
        "",
        "Pareto front (no other point is both faster and more accurate); speed-up measured interleaved with "
        "the original in the same run:",
        "",
        _table(front, metric),
        "",
    ]
    if plot:
        lines += [f"![{metric} vs measured latency]({plot})", ""]
    if not head:
        lines += ["Every point evaluated:", "", _table(point_rows(state), metric), ""]
        lines.append("Drop vs control: the control is the original trained through the same stages at λ = 0 "
                     "(the same extra epochs). A point with a checkpoint can be exported as it is: "
                     "`--model RUN/search/<checkpoint>`.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_points(state: dict[str, Any], path: str | Path, metric: str) -> Path | None:
    """Metric vs measured latency (relative to the original's, timed in the same call) for every
    point, original and control marked; None without latency."""
    pts = [p for p in state["points"] if "metric" in p and p.get("latency_ratio")]
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in pts[1:]:
        ok = not str(p.get("decision", "")).startswith("rejected")
        ax.scatter(
            1 / p["latency_ratio"],
            100 * p["metric"],
            c="tab:green" if ok else "tab:red",
            marker="o" if ok else "x",
        )
        ax.annotate(
            p["name"],
            (1 / p["latency_ratio"], 100 * p["metric"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    o = pts[0]
    ax.scatter(1.0, 100 * o["metric"], c="black", marker="s", label="original")
    controls = state.get("controls", {})
    for d, c in controls.items():
        if d != "0" and c.get("metric") is not None:
            ax.axhline(100 * c["metric"], color="grey", lw=0.6, ls=":")
    if len(controls) > 1:
        ax.plot([], [], color="grey", lw=0.6, ls=":", label="control (per depth)")
    ax.axhline(100 * o["metric"] - state["config"]["max_drop"], color="tab:orange", lw=0.8, ls="--",
               label=f"original - {state['config']['max_drop']:g}")  # fmt: skip
    ax.scatter([], [], c="tab:green", label="within budget")
    ax.scatter([], [], c="tab:red", marker="x", label="rejected")
    # relative: each point was timed interleaved with the original in its own call
    ax.set_xlabel("ORT CPU latency at batch 1, relative to the original")
    ax.set_ylabel(f"validation {metric} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
