"""The trace of a prune-while-training run: its size and validation metric per epoch, each pruning
point's decision, as JSON, a picture and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunekit.fileio import atomic_write
from prunekit.prune.joint_state import Book
from prunekit.prune.report import model_stats


def build_trace(book: Book, history: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Per epoch: size of the model trained in it and its validation metric; the pruning points."""
    epochs = []
    for e in history.get("epochs", []):
        size = book.d["sizes"].get(str(e["epoch"]), {})
        epochs.append({"epoch": e["epoch"], "params": size.get("params"), "macs": size.get("macs"),
                       "val_metric": e.get("val_metric"), "loss": e.get("loss"), "lr": e.get("lr"),
                       "time_s": e.get("time_s"), "cpu_time_s": e.get("cpu_time_s")})  # fmt: skip
    final = model_stats(model)
    orig = book.d["original"]
    return {
        "config": book.d["config"],
        "original": {"params": orig["params"], "macs": orig["macs"]},
        "final": {
            "params": final["params"],
            "macs": final["macs"],
            "params_ratio": orig["params"] / max(final["params"], 1),
            "macs_ratio": orig["macs"] / max(final["macs"], 1),
        },  # fmt: skip
        "stopped": book.d["stopped"],
        "lam": book.d.get("lam"),
        "points": book.d["points"],
        "epochs": epochs,
        "cpu_s": sum(float(e.get("cpu_time_s") or 0.0) for e in history.get("epochs", [])),
    }


def plot_trace(trace: dict[str, Any], path: Path) -> Path | None:
    """Parameters and MACs (fraction of the original, left) and validation metric (right) per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in trace["epochs"] if r.get("params") is not None]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = [r["epoch"] for r in rows]
    o = trace["original"]
    ax.step(x, [r["params"] / o["params"] for r in rows], where="post", label="parameters", color="C0")
    ax.step(x, [r["macs"] / o["macs"] for r in rows], where="post", label="MACs", color="C1")
    for p in trace["points"]:
        if str(p.get("decision", "")).startswith("pruned"):
            ax.axvline(p["epoch"], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of the original")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    vals = [(r["epoch"], r["val_metric"]) for r in rows if r.get("val_metric") is not None]
    if vals:
        ax2.plot([v[0] for v in vals], [100 * v[1] for v in vals], "o-", color="C2", ms=3, label="validation")
        ax2.set_ylabel("validation metric (%)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    f = trace["final"]
    ax.set_title(
        f"pruned while training: {f['params_ratio']:.2f}x fewer parameters, {f['macs_ratio']:.2f}x fewer MACs"
    )
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def trace_markdown(trace: dict[str, Any], plot: str | None = None) -> str:
    """The trace as markdown: the outcome, each pruning point, the curves' picture (a relative path)."""
    from prunekit.markdown import markdown_table

    f, o = trace["final"], trace["original"]

    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    body = [[str(p["epoch"]), f"{p.get('params_before', 0):,}", f"{p.get('params_after', 0):,}",
             pct(p.get("metric_before")), pct(p.get("metric_after")), p["decision"]] for p in trace["points"]]  # fmt: skip
    header = ["epoch", "params before", "params after", "val before", "val after", "decision"]
    stopped = "ran to the end of its schedule" if trace["stopped"] is None else "stopped: " + trace["stopped"]
    lines = [
        "## Pruned while training",
        "",
        f"{o['params']:,} -> {f['params']:,} parameters ({f['params_ratio']:.2f}x fewer), MACs "
        f"{f['macs_ratio']:.2f}x fewer; pruning {stopped}.",
        "",
        markdown_table(header, body),
    ]
    if plot:
        lines += ["", f"![size and validation metric per epoch]({plot})"]
    return "\n".join(lines) + "\n"
