"""What a post-training run writes for people: each step's layer table and the run's summary.

Data first, as in :mod:`prunekit.prune.report`: the phase records of ``summary.json`` become flat
rows (:func:`phase_rows`, what the benchmarks tabulate) and markdown views of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.prune.report import layer_table, render_markdown

if TYPE_CHECKING:
    from prunekit.prune.profile import LatencyTable


def write_step_table(
    stem: Path,
    rows: Sequence[Mapping[str, Any]],
    totals: Mapping[str, Mapping[str, Any]],
    title: str,
    extra: Mapping[str, Any],
) -> None:
    """``write_table`` plus the cost columns' markdown (the JSON carries them in the rows)."""
    from prunekit.prune.layer_costs import render_cost_markdown

    atomic_write_json(
        stem.with_suffix(".json"), {"layers": list(rows), "totals": dict(totals), **dict(extra)}
    )
    md = render_markdown(rows, totals, title)
    cost_md = render_cost_markdown(list(rows))
    atomic_write_text(stem.with_suffix(".md"), md + ("\n" + cost_md if cost_md else ""))


def cost_rows(
    model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> list[dict[str, Any]]:
    """``layer_table(model, original)`` with the cost columns of
    :func:`prunekit.prune.layer_costs.cost_columns` merged in (MACs shares; latency with a ``table``).
    Models without a prunekit config get the plain layer table."""
    rows = layer_table(model, original=original)
    if hasattr(model, "prunekit_config") and hasattr(original, "prunekit_config"):
        from prunekit.prune.layer_costs import add_cost_columns

        add_cost_columns(rows, model, original, table)
    return rows


def phase_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per phase of a ``summary.json`` (λ, k and the validation metric after each step)."""
    return [
        {
            "phase": r["phase"],
            "lam": r.get("sparsity", {}).get("lam"),
            "lam_trials": r.get("sparsity", {}).get("trials"),
            "k": r.get("threshold", {}).get("k"),
            "val_before": r.get("before"),
            "val_sparse": r.get("sparsity", {}).get("metric"),
            "val_thresholded": r.get("threshold", {}).get("metric"),
            "val_pruned": r.get("pruned_metric"),
            "val_retrained": r.get("retrained_metric"),
            "kept": r.get("retrain_kept", "retrained"),
            "val_retrained_discarded": r.get("retrained_metric_discarded"),
            "params": r.get("stats", {}).get("params"),
        }
        for r in summary["records"]
    ]


def _kept_note(record: Mapping[str, Any]) -> str:
    if record.get("retrain_kept") != "pruned":
        return ""
    return f" (pruned kept; retrained {100 * float(record['retrained_metric_discarded']):.2f})"


def render_summary(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown view of ``summary.json``: per-phase metrics after each step, then the layer table."""
    from prunekit.markdown import markdown_table
    from prunekit.prune.layer_costs import render_cost_markdown

    pct = lambda v: "-" if v is None else f"{100 * float(v):.2f}"  # noqa: E731
    body: list[list[str]] = []
    for r in summary["records"]:
        if r.get("skipped"):
            body.append([r["phase"], pct(r.get("before")), "(nothing to prune)", "", "", "", "", "", ""])
            continue
        sp, th = r.get("sparsity", {}), r.get("threshold", {})
        body.append([
            r["phase"], pct(r.get("before")), str(sp.get("lam", "-")), pct(sp.get("metric")), str(th.get("k", "-")),
            pct(th.get("metric")), pct(r.get("pruned_metric")), pct(r.get("retrained_metric")) + _kept_note(r),
            f"{r.get('stats', {}).get('params', 0):,}",
        ])  # fmt: skip
    header = ["phase", "before", "λ", "sparse", "k", "thresholded", "pruned", "retrained", "params"]
    lines = ["# Multi-layer pruning", "", markdown_table(header, body), ""]
    budget = summary.get("budget")
    if budget:
        lines += ["## Budget", "", f"- {budget['message']}"]
        for r in summary["records"]:
            if r.get("budget"):
                b = r["budget"]
                lines.append(f"- {r['phase']} (target {b['phase_target']:.3f} x original): {b['message']}")
        lines.append("")
    totals = {"original": summary["original"], "pruned": summary["final"]}
    cost_md = render_cost_markdown(list(rows))
    table = render_markdown(rows, totals, "Filters per layer")
    return "\n".join(lines) + "\n" + table + ("\n" + cost_md if cost_md else "")
