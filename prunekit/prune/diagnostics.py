"""Why a phase pruned what it pruned: zero-row statistics against chance, BN scales, filters kept.

A run that prunes nothing must show why. Per layer of a phase this records the share ``p`` of
zero weights in Θ_L1^th, the zero-row fraction a filter would have by chance if those zeros fell
at random (``p ** k_w``: a row is ``k_w`` weights), the histogram of the filters' actual zero-row
fractions ``s(W_l[i])`` against τ1, the distribution of |gamma| of the layer's BatchNorm in Θ_L1,
and the filters kept. Zeros with structure put filters near 1 while the chance level sits lower;
zeros at chance (a BN cancelling an L1 on its conv, measured before) pile up at ``p ** k_w``.
Written as ``pN/diagnostics.json`` (data first), ``diagnostics.md`` and ``diagnostics.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileio import atomic_write, atomic_write_json, atomic_write_text
from prunekit.prune.fold import folded_weights, producer_norms
from prunekit.prune.graph import DependencyGraph

log = logging.getLogger(__name__)
BINS = 20


def phase_diagnostics(
    sparse: nn.Module,
    thresholded: nn.Module,
    graph: DependencyGraph,
    rp: Any,
    selection: Mapping[str, Mapping[str, Any]],
    tau1: float,
    fold: bool = True,
) -> dict[str, Any]:
    """JSON-able diagnostics of one phase (see the module docstring)."""
    weights = folded_weights(thresholded, graph, fold)
    norms = producer_norms(sparse, graph)
    layers: list[dict[str, Any]] = []
    for name, st in selection.items():
        group = graph.group(name)
        path = group.producers[0]
        w = weights[path]
        p = float((w == 0).float().mean())
        kw = int(w.shape[-1]) if w.dim() == 4 else 1
        s = torch.tensor(st.get("filter_sparsity") or [], dtype=torch.float32)
        hist = torch.histc(s, bins=BINS, min=0.0, max=1.0).int().tolist() if len(s) else []
        row: dict[str, Any] = {
            "layer": name,
            "filters": st["filters"],
            "kept": st["kept"],
            "kept_by_rule": st.get("kept_by_rule"),
            "floor": st.get("floor"),
            "zero_weights": p,
            "chance_zero_rows": p**kw,
            "row_length": kw,
            "mean_zero_rows": float(s.mean()) if len(s) else None,
            "max_zero_rows": float(s.max()) if len(s) else None,
            "above_tau1": int((s > tau1).sum()) if len(s) else 0,
            "zero_rows_hist": hist,
        }
        bn = norms.get(path)
        if bn is not None:
            g = sparse.get_submodule(bn).weight.detach().abs().float()
            row["gamma_zero"] = int((g == 0).sum())
            row["gamma_quantiles"] = [
                float(q) for q in torch.quantile(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
            ]
            row["gamma"] = [round(float(v), 5) for v in g]
        layers.append(row)
    return {"phase": rp.name, "tau1": tau1, "bins": BINS, "layers": layers}


def render_diagnostics(d: Mapping[str, Any]) -> str:
    """Markdown of :func:`phase_diagnostics`: why the τ rule kept what it kept, layer by layer."""
    from prunekit.markdown import markdown_table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = [
        "layer",
        "filters",
        "kept",
        "p zero",
        "chance rows",
        "mean rows",
        "max rows",
        "> τ1",
        "γ = 0",
        "γ median",
    ]
    body = []
    for r in d["layers"]:
        gq = r.get("gamma_quantiles")
        body.append([r["layer"], str(r["filters"]), str(r["kept"]), f(r["zero_weights"]), f(r["chance_zero_rows"]),
                     f(r["mean_zero_rows"]), f(r["max_zero_rows"]), str(r["above_tau1"]), str(r.get("gamma_zero", "-")),
                     f(gq[2]) if gq else "-"])  # fmt: skip
    lines = [
        f"# {d['phase']}: why these filters",
        "",
        "Zero weights p in the thresholded model, the zero-row fraction a filter gets by chance (p^k_w), "
        f"the filters' mean and largest zero-row fraction, how many pass τ1 = {d['tau1']}, BN scales at zero.",
        "",
        markdown_table(head, body),
    ]
    return "\n".join(lines) + "\n"


def plot_diagnostics(d: Mapping[str, Any], path: Path) -> None:
    """One row per layer: zero-row histogram with chance and τ1 marked; |gamma| histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = d["layers"]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 1.6 * len(rows) + 0.6), squeeze=False)
    edges = [i / d["bins"] for i in range(d["bins"])]
    for (a, b), r in zip(axes, rows):
        a.bar(edges, r["zero_rows_hist"], width=1 / d["bins"], align="edge", color="#4c72b0")
        a.axvline(r["chance_zero_rows"], color="#dd8452", ls="--", label="chance p^k")
        a.axvline(d["tau1"], color="#c44e52", label="τ1")
        a.set_ylabel(r["layer"], fontsize=7)
        a.set_xlim(0, 1)
        a.tick_params(labelsize=6)
        if "gamma" in r:
            b.hist(r["gamma"], bins=30, color="#55a868")
            b.set_title(f"|γ| ({r['gamma_zero']} at 0), kept {r['kept']}/{r['filters']}", fontsize=7)
        else:
            b.set_axis_off()
            b.text(0.5, 0.5, f"no BN; kept {r['kept']}/{r['filters']}", ha="center", va="center", fontsize=7)
        b.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    axes[0][0].set_title("filters' zero-row fraction s(W_l[i])", fontsize=8)
    fig.suptitle(d["phase"], fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def write_diagnostics(pdir: Path, d: Mapping[str, Any], phase: str) -> None:
    atomic_write_json(pdir / "diagnostics.json", d)
    atomic_write_text(pdir / "diagnostics.md", render_diagnostics(d))
    try:
        plot_diagnostics(d, pdir / "diagnostics.png")
    except Exception as e:  # noqa: BLE001 - a plot must never fail a run; the JSON has the data
        log.warning("%s: diagnostics plot not written (%s: %s)", phase, type(e).__name__, e)
    for r in d["layers"]:
        if r["kept"] == r["filters"] and r["max_zero_rows"] is not None and r["max_zero_rows"] <= d["tau1"]:
            log.info(
                "%s/%s: nothing pruned: largest zero-row fraction %.3f <= τ1 %.2f (chance level %.3f)",
                phase, r["layer"], r["max_zero_rows"], d["tau1"], r["chance_zero_rows"],
            )  # fmt: skip
