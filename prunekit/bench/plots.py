"""PNG plots of a ``bench.json``: speed vs accuracy, latency distributions, channels per layer.

Figures are made with matplotlib's object API on the Agg canvas, never through pyplot, so
rendering neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunekit.fileio import atomic_write

log = logging.getLogger(__name__)

MARKERS = "osD^vP*Xh<>"
ACCURACY_KEYS = (("map50", "AP50"), ("top1", "top-1"), ("map", "mAP@[.5:.95]"), ("voc07_ap", "VOC07 AP"))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def accuracy_key(bench: dict[str, Any]) -> tuple[str, str] | None:
    """The accuracy metric the report leads with (AP50 for detectors, top-1 for classifiers)."""
    for key, name in ACCURACY_KEYS:
        if any(isinstance(a["metrics"].get(key), (int, float)) for a in bench.get("accuracy", [])):
            return key, name
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    front = []
    for p in sorted(points, key=lambda q: (-q[0], -q[1])):
        if not front or p[1] > front[-1][1]:
            front.append(p)
    return sorted(front)


def plot_fps_vs_accuracy(bench: dict[str, Any], path: Path) -> Path | None:
    """FPS (x) vs accuracy (y): one marker per backend/precision, one colour per model, labels
    per batch size; the dashed line is the Pareto front. None when nothing has accuracy."""
    ak = accuracy_key(bench)
    if ak is None:
        return None
    key, name = ak
    accs = {(a["backend"], a["model"]): a["metrics"].get(key) for a in bench["accuracy"]}
    labels = list(bench["models"])
    backends = list(dict.fromkeys(r["backend"] for r in bench["runs"]))
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(labels))]
    pts = []
    for r in bench["runs"]:
        y = accs.get((r["backend"], r["model"]))
        if not isinstance(y, (int, float)):
            continue
        x = r["timing"]["fps"]
        ax.scatter(
            x,
            100 * y,
            marker=MARKERS[backends.index(r["backend"]) % len(MARKERS)],
            color=colors[labels.index(r["model"])],
            s=60,
            edgecolors="black",
            linewidths=0.5,
        )
        ax.annotate(
            f"b{r['batch_size']}", (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
        pts.append((x, 100 * y))
    if not pts:
        return None
    front = pareto_front(pts)
    ax.plot(
        [p[0] for p in front], [p[1] for p in front], "--", color="gray", linewidth=1, label="Pareto front"
    )
    for i, lab in enumerate(labels):
        ax.scatter([], [], color=colors[i], marker="o", label=lab)
    for j, b in enumerate(backends):
        ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[j % len(MARKERS)], label=b)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(f"Speed vs accuracy ({bench['machine'].get('device', '')})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_latency(bench: dict[str, Any], path: Path) -> Path | None:
    """Box plots of the per-call latency samples, one panel per backend x batch size."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in bench["runs"]:
        if r["timing"].get("samples_ms"):
            groups.setdefault((r["backend"], r["batch_size"]), []).append(r)
    if not groups:
        return None
    n = len(groups)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, ((backend, batch), runs) in enumerate(groups.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        names = [r["model"] for r in runs]
        kw = {"tick_labels": names} if _has_tick_labels() else {"labels": names}
        ax.boxplot([r["timing"]["samples_ms"] for r in runs], showfliers=True, whis=(1, 99), **kw)
        ax.set_title(f"{backend}, batch {batch}", fontsize=9)
        ax.set_ylabel("latency per call (ms)")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _has_tick_labels() -> bool:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def plot_channels(bench: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars of output channels per layer, one bar per model (the paper's Table 1 view)."""
    labels = [lab for lab in bench["models"] if bench["models"][lab].get("layers")]
    if not labels:
        return None
    layers = list(dict.fromkeys(name for lab in labels for name in bench["models"][lab]["layers"]))
    layers = [n for n in layers if "mbox" not in n]  # head convs' widths are fixed by anchors x classes
    if not layers:
        return None
    fig = Figure(figsize=(max(6.0, 0.42 * len(layers) * max(1, len(labels)) / 1.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        vals = [bench["models"][lab]["layers"].get(n, 0) for n in layers]
        ax.bar([k + (i - (len(labels) - 1) / 2) * width for k in range(len(layers))], vals, width, label=lab)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("output channels")
    ax.set_title("Filters per layer", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def render_plots(bench: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write every plot that has data; returns {plot name: file name} for the report."""
    out = Path(out_dir)
    written = {}
    for name, fn in (
        ("fps_vs_accuracy", plot_fps_vs_accuracy),
        ("latency", plot_latency),
        ("channels", plot_channels),
    ):
        try:
            p = fn(bench, out / f"{name}.png")
        except Exception as e:  # noqa: BLE001 - a plot failing must not lose the report
            log.warning("plot %s failed: %s", name, e)
            continue
        if p is not None:
            written[name] = p.name
    return written
