"""``REPORT.md`` and terminal tables, rendered from a ``bench.json`` alone (re-renderable).

Layout: one model table (size, compute, accuracy per backend), one speed/memory table per
backend and batch size, per-layer filter counts, skipped/failed backends with their reasons,
and the plots. Columns are the models in run order, then ``label / reference`` ratio columns;
accuracy rows show the difference in points instead of a ratio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.bench.plots import accuracy_key, render_plots
from prunekit.fileio import atomic_write_text
from prunekit.markdown import markdown_table

Row = tuple[str, dict[str, Any], Callable[[Any], str], str]  # name, {label: value}, fmt, "ratio"|"delta"|""


def load_bench(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: benchmark JSON not found")
    try:
        bench = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(bench, dict) or bench.get("format") != "prunekit-bench":
        raise ValueError(f"{p}: not a prunekit benchmark file (no format 'prunekit-bench')")
    return bench


# --------------------------------------------------------------------------- formatting


def _num(x: Any, fmt: str) -> str:
    return "-" if not isinstance(x, (int, float)) else format(x, fmt)


def fmt_count(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def fmt_bytes(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.2f}"


def _ratio_cell(v: Any, ref: Any, kind: str) -> str:
    if not isinstance(v, (int, float)) or not isinstance(ref, (int, float)):
        return "-"
    if kind == "delta":
        return f"{100 * (v - ref):+.2f} pt"
    if kind == "ratio" and ref:
        return f"{v / ref:.3f}x"
    return "-"


def build_table(rows: list[Row], labels: list[str], reference: str) -> tuple[list[str], list[list[str]]]:
    """Header and string cells: metric | each label | each ``label / reference``."""
    others = [lab for lab in labels if lab != reference]
    header = ["metric", *labels, *[f"{lab} / {reference}" for lab in others]]
    body = []
    for name, vals, fmt, kind in rows:
        cells = [name, *[fmt(vals.get(lab)) for lab in labels]]
        cells += [_ratio_cell(vals.get(lab), vals.get(reference), kind) if kind else "" for lab in others]
        body.append(cells)
    return header, body


# --------------------------------------------------------------------------- tables


def model_rows(bench: dict[str, Any]) -> list[Row]:
    models = bench["models"]
    rows: list[Row] = [
        ("parameters", {k: m.get("params") for k, m in models.items()}, fmt_count, "ratio"),
        ("multiply-adds (1 image)", {k: m.get("macs") for k, m in models.items()}, fmt_count, "ratio"),
        ("file size", {k: m.get("file_size_bytes") for k, m in models.items()}, fmt_bytes, "ratio"),
    ]
    if any(m.get("artifacts", {}).get("onnx_size_bytes") for m in models.values()):
        rows.append(
            (
                "ONNX size",
                {k: m.get("artifacts", {}).get("onnx_size_bytes") for k, m in models.items()},
                fmt_bytes,
                "ratio",
            )
        )
    backends = list(dict.fromkeys(a["backend"] for a in bench.get("accuracy", [])))
    names = (
        ("map", "mAP@[.5:.95] (%)"),
        ("map50", "AP50 (%)"),
        ("voc07_ap", "VOC07 AP (%)"),
        ("top1", "top-1 (%)"),
    )
    for b in backends:
        per = {a["model"]: a["metrics"] for a in bench["accuracy"] if a["backend"] == b}
        for key, name in names:
            vals = {lab: m.get(key) for lab, m in per.items()}
            if any(isinstance(v, (int, float)) for v in vals.values()):
                rows.append((f"{name}, {b}", vals, fmt_pct, "delta"))
    return rows


def run_rows(runs: list[dict[str, Any]]) -> list[Row]:
    by = {r["model"]: r for r in runs}

    def t(key: str) -> dict[str, Any]:
        return {lab: r["timing"].get(key) for lab, r in by.items()}

    def m(key: str) -> dict[str, Any]:
        return {lab: r["memory"].get(key) for lab, r in by.items()}

    ms = lambda x: _num(x, ".3f")  # noqa: E731
    rows: list[Row] = [
        ("throughput (images/s)", t("fps"), lambda x: _num(x, ".1f"), "ratio"),
        ("latency mean (ms)", t("mean_ms"), ms, "ratio"),
        ("latency p50 (ms)", t("p50_ms"), ms, "ratio"),
        ("latency p90 (ms)", t("p90_ms"), ms, "ratio"),
        ("latency p99 (ms)", t("p99_ms"), ms, "ratio"),
        ("latency max (ms)", t("max_ms"), ms, "ratio"),
        ("spread: IQR (ms)", t("iqr_ms"), ms, ""),
        ("spread: CV (%)", t("cv"), fmt_pct, ""),
        ("timed iterations", t("n_iters"), lambda x: _num(x, "d"), ""),
        ("host RSS added by the model", m("host_rss_bytes"), fmt_bytes, "ratio"),
    ]
    if any(v is not None for v in m("host_peak_rss_bytes").values()):
        rows.append(("host peak RSS (own process)", m("host_peak_rss_bytes"), fmt_bytes, "ratio"))
    if any(v is not None for v in m("device_bytes").values()):
        rows.append(("device memory (peak)", m("device_bytes"), fmt_bytes, "ratio"))
    if any(v is not None for v in m("engine_device_bytes").values()):
        rows.append(("engine device memory", m("engine_device_bytes"), fmt_bytes, "ratio"))
    return rows


def run_groups(bench: dict[str, Any]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in bench["runs"]:
        groups.setdefault((r["backend"], r["batch_size"]), []).append(r)
    return groups


def layer_rows(bench: dict[str, Any], reference: str) -> tuple[list[str], list[list[str]]] | None:
    labels = [lab for lab, m in bench["models"].items() if m.get("layers")]
    if not labels or reference not in labels:
        return None
    layers = list(dict.fromkeys(n for lab in labels for n in bench["models"][lab]["layers"]))
    others = [lab for lab in labels if lab != reference]
    header = ["layer", *labels, *[f"{lab} kept" for lab in others]]
    body = []
    for n in layers:
        vals = {lab: bench["models"][lab]["layers"].get(n) for lab in labels}
        ref = vals[reference]
        body.append(
            [
                n,
                *[_num(vals[lab], "d") for lab in labels],
                *[
                    f"{100 * vals[lab] / ref:.0f}%" if isinstance(vals[lab], int) and ref else "-"
                    for lab in others
                ],
            ]
        )
    return header, body


def summary_lines(bench: dict[str, Any]) -> list[str]:
    """The headline: speedup and accuracy change of each model vs the reference, per run."""
    lines = []
    key = accuracy_key(bench)
    for lab, c in bench.get("comparisons", {}).items():
        mr = c["model"]
        parts = [
            f"params {_num(mr.get('params'), '.3f')}x",
            f"MACs {_num(mr.get('macs'), '.3f')}x",
        ]
        for r in c["runs"]:
            parts.append(f"{r['backend']} b{r['batch_size']} speedup {_num(r['speedup'], '.2f')}x")
        for a in c.get("accuracy", []):
            if key and f"{key[0]}_delta_points" in a:
                parts.append(f"{key[1]} {a[f'{key[0]}_delta_points']:+.2f} pt ({a['backend']})")
        lines.append(f"- **{lab}** vs {c['reference']}: " + ", ".join(parts))
    return lines


def to_markdown(bench: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    labels = list(bench["models"])
    ref = bench.get("settings", {}).get("reference") or labels[0]
    mach = bench.get("machine", {})
    libs = mach.get("libraries", {})
    st = bench.get("settings", {})
    tm = st.get("timing", {})
    data = st.get("data") or {}
    gpus = ", ".join(f"{g.get('name')} (driver {g.get('driver')})" for g in mach.get("gpus", []))
    out = [
        f"# Benchmark: {' vs '.join(labels)}",
        "",
        f"Device: **{mach.get('device', '?')}**. Created {bench.get('created', '?')}.",
        "",
        f"- CPU: {mach.get('cpu', '?')} ({mach.get('cpu_usable', '?')} usable cores), GPU: {gpus or 'none'}",
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v),
        f"- Timing: warm-up {tm.get('warmup_iters')} calls / {tm.get('warmup_time_s')} s, then at least "
        f"{tm.get('min_iters')} calls and {tm.get('min_time_s')} s per model (cap {tm.get('max_time_s')} s), "
        "models interleaved round by round (ONNX Runtime sessions with thread spinning off, so an idle "
        "session's pool does not take the timed one's cores). FPS = images/s = batch size / mean latency "
        "per call.",
        f"- Accuracy: {data.get('num_images', 0)} images of "
        f"{'`' + str(data['spec']) + '`' if data.get('spec') else 'the given dataset'} ({data.get('split')}), "
        "measured through each backend's own runner (runtime pre/post-processing)."
        if data
        else "- Accuracy: not measured (no --data).",
        f"- Ratios are `model / {ref}`, from this run only; accuracy rows show the change in points.",
        "- Memory: "
        + (
            "host RSS and device memory per model measured in a fresh process each "
            "(peak minus the process's RSS before loading)."
            if st.get("memory_method") == "subprocess"
            else "sampled in the benchmarking process (approximate: models share allocator pages)."
        ),
        "",
    ]
    summ = summary_lines(bench)
    if summ:
        out += ["## Summary", "", *summ, ""]
    out += ["## Model", "", markdown_table(*build_table(model_rows(bench), labels, ref)), ""]
    for (backend, batch), runs in run_groups(bench).items():
        present = [lab for lab in labels if any(r["model"] == lab for r in runs)]
        out += [
            f"## {backend}, batch {batch}",
            "",
            markdown_table(*build_table(run_rows(runs), present, ref if ref in present else present[0])),
            "",
        ]
    if bench.get("skipped"):
        out += ["## Skipped", ""]
        out += [
            f"- {s['backend']}{' / ' + s['model'] if s.get('model') else ''}: {s['reason']}"
            for s in bench["skipped"]
        ]
        out.append("")
    if bench.get("failed"):
        out += ["## Failed", ""]
        out += [
            f"- {f['backend']} / {f['model']} ({f.get('stage')}"
            f"{', batch ' + str(f['batch_size']) if f.get('batch_size') else ''}): {f['error']}"
            for f in bench["failed"]
        ]
        out.append("")
    lt = layer_rows(bench, ref)
    if lt:
        out += ["## Filters per layer", "", markdown_table(*lt), ""]
    if plots:
        out += ["## Plots", ""]
        titles = {
            "fps_vs_accuracy": "Throughput vs accuracy (Pareto view)",
            "latency": "Latency distribution per call",
            "channels": "Filters per layer, before/after",
        }
        out += [f"![{titles.get(k, k)}]({v})" for k, v in plots.items()]
        out.append("")
    return "\n".join(out)


def render_report(bench_json_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``REPORT.md`` and the PNG plots for a ``bench.json`` into ``out_dir`` (default: beside it)."""
    src = Path(bench_json_path)
    bench = load_bench(src)
    out = Path(out_dir) if out_dir is not None else src.parent
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(bench, out)
    return atomic_write_text(out / "REPORT.md", to_markdown(bench, plots) + "\n")


def terminal_tables(bench: dict[str, Any]) -> str:
    """The main tables for a terminal: rich tables when rich is installed, else markdown text."""
    labels = list(bench["models"])
    ref = bench.get("settings", {}).get("reference") or labels[0]
    tables = [("Model", build_table(model_rows(bench), labels, ref))]
    for (backend, batch), runs in run_groups(bench).items():
        present = [lab for lab in labels if any(r["model"] == lab for r in runs)]
        tables.append(
            (
                f"{backend}, batch {batch}",
                build_table(run_rows(runs), present, ref if ref in present else present[0]),
            )
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return "\n\n".join(f"{title}\n\n{markdown_table(*tb)}" for title, tb in tables)
    console = Console(record=True, width=160)
    with console.capture():
        for title, (header, body) in tables:
            t = Table(title=title)
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i == 0 else "right")
            for row in body:
                t.add_row(*row)
            console.print(t)
    return console.export_text()
