"""Per-layer costs from multiply-adds or a measured latency table: the multipliers of cost-aware
sparsity (:func:`l1_layer_weights`) and the report's cost columns (:func:`cost_columns`).

Kept apart from :mod:`prunekit.prune.cost` (shapes and MACs), which the latency profiler builds
on: this module reads both, neither reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from prunekit.markdown import markdown_table
from prunekit.models import get_config
from prunekit.prune.cost import _prunable_modules, cost_shares, layer_macs
from prunekit.prune.profile import LatencyTable, layer_latency_estimates

if TYPE_CHECKING:
    from prunekit.prune.config import PruneConfig

KINDS = ("macs", "latency")
PER = ("weight", "layer")


def l1_layer_weights(
    model: nn.Module,
    layers: list[str],
    kind: str = "macs",
    table: LatencyTable | None = None,
    alpha: float = 1.0,
    per: str = "weight",
) -> dict[str, float]:
    """Per-layer multipliers of the L1 term for a phase's ``layers``; their mean is 1.

    The regulariser becomes ``λ Σ_l w_l ||W_l||_1``. With ``per="weight"`` (default) ``w_l`` is
    proportional to the cost one weight of layer l carries: MACs / parameters (= the output map's
    area for a conv) or latency / parameters, so ``Σ_l w_l ||W_l||_1`` is an L1 relaxation of the
    phase's total cost, and a filter's pull toward zero grows with the cost its removal saves
    (its own MACs and, through ``W_{l+1}[:, i]``, its consumer's). With ``per="layer"`` ``w_l`` is
    the layer's cost share (the issue's literal reading; it also favours large layers).
    ``alpha`` interpolates from uniform (0, the paper) to fully cost-proportional (1). Normalising
    to mean 1 over the phase keeps λ's meaning, so the paper's λ grid still applies.
    ``kind="latency"`` needs a ``table`` from :mod:`prunekit.prune.profile` measured on this
    model's architecture.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; expected one of {KINDS}")
    if per not in PER:
        raise ValueError(f"unknown cost normalisation {per!r}; expected one of {PER}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not layers:
        return {}
    if kind == "macs":
        costs: dict[str, float] = {k: float(v) for k, v in layer_macs(model).items()}
    else:
        if table is None:
            raise ValueError("kind='latency' needs a latency table (run `prunekit profile` first)")
        cfg = get_config(model)
        costs = layer_latency_estimates(cfg.channels, table, cfg=cfg)
    missing = [n for n in layers if n not in costs]
    if missing:
        raise ValueError(f"no cost known for layers {missing} (names must be the model's layer names)")
    if per == "weight":
        mods = _prunable_modules(model)
        costs = {n: costs[n] / max(1, mods[n].weight.numel()) for n in layers}
    else:
        costs = {n: costs[n] for n in layers}
    mean = sum(costs.values()) / len(costs)
    if mean <= 0:
        return {n: 1.0 for n in layers}
    return {n: (1.0 - alpha) + alpha * costs[n] / mean for n in layers}


def cost_columns(
    model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Per-layer cost columns for the pruning report, keyed by the original's layer names.

    ``macs_before``/``macs_after`` (a layer the pruned model dropped, e.g. pruned-Kdet, has 0
    after), their shares of each model's total, and with a latency ``table`` the estimated
    ``latency_ms_before/after`` and ``latency_share_before/after``.
    """
    before = layer_macs(original)
    after = layer_macs(model)
    sb, sa = cost_shares(before), cost_shares(after)
    cols: dict[str, dict[str, float | int | None]] = {}
    for name in before:
        cols[name] = {
            "macs_before": before[name],
            "macs_after": after.get(name, 0),
            "macs_share_before": sb[name],
            "macs_share_after": sa.get(name, 0.0),
        }
    if table is not None:
        lb = layer_latency_estimates(get_config(original).channels, table, cfg=get_config(original))
        la = layer_latency_estimates(get_config(model).channels, table, cfg=get_config(model))
        slb, sla = cost_shares(lb), cost_shares(la)
        for name, col in cols.items():
            col["latency_ms_before"] = lb.get(name)
            col["latency_ms_after"] = la.get(name, 0.0)
            col["latency_share_before"] = slb.get(name)
            col["latency_share_after"] = sla.get(name, 0.0)
    return cols


def add_cost_columns(
    rows: list[dict[str, Any]], model: nn.Module, original: nn.Module, table: LatencyTable | None = None
) -> list[dict[str, Any]]:
    """Merge :func:`cost_columns` into ``layer_table`` rows in place (rows without a column are
    left alone); returns ``rows``. Both models must be prunekit models (they have a config)."""
    cols = cost_columns(model, original, table)
    for row in rows:
        row.update(cols.get(row["layer"], {}))
    return rows


def render_cost_markdown(rows: list[dict[str, Any]], title: str = "Cost per layer") -> str:
    """Markdown of the cost columns of ``rows`` (MACs and their shares, latency when present);
    empty when the rows carry no cost columns."""
    rows = [r for r in rows if "macs_share_before" in r]
    if not rows:
        return ""
    lat = any(r.get("latency_ms_before") is not None for r in rows)
    head = ["layer", "MACs before", "MACs after", "MACs share before %", "MACs share after %"]
    if lat:
        head += ["latency ms before", "latency ms after", "latency share before %", "latency share after %"]
    pct = lambda v: "-" if v is None else f"{100 * float(v):.1f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{float(v):.3f}"  # noqa: E731
    body = []
    for r in rows:
        cells = [r["layer"], f"{int(r['macs_before']):,}", f"{int(r['macs_after']):,}", pct(r["macs_share_before"]),
                 pct(r["macs_share_after"])]  # fmt: skip
        if lat:
            cells += [ms(r.get("latency_ms_before")), ms(r.get("latency_ms_after")),
                      pct(r.get("latency_share_before")), pct(r.get("latency_share_after"))]  # fmt: skip
        body.append(cells)
    return f"## {title}\n\n" + markdown_table(head, body) + "\n"


def l1_weights_for(
    model: nn.Module, l1_layers: Sequence[str], hp: PruneConfig, table: LatencyTable | None = None
) -> dict[str, float] | None:
    """The per-layer L1 multipliers ``hp`` asks for on ``l1_layers``: given ones, cost-aware ones
    (MACs or a latency table), or None (uniform)."""
    if hp.layer_weights:
        return {n: float(w) for n, w in hp.layer_weights.items() if n in l1_layers}
    if hp.cost_aware is None:
        return None
    if hp.cost_aware == "latency" and table is None:
        raise ValueError("cost_aware='latency' needs latency_table (a `prunekit profile` JSON file)")
    return l1_layer_weights(
        model,
        l1_layers,
        kind=hp.cost_aware,
        table=table if hp.cost_aware == "latency" else None,
        alpha=hp.cost_alpha,
        per=hp.cost_per,
    )
