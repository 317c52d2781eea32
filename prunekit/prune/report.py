"""Size and cost of a model, per layer and in total: the data behind the paper's Table 1.

Results are data first (``model_stats`` / ``layer_table`` return JSON-able dicts); the markdown
renderer is a view of them. MACs are multiply-adds counted by ``torch.utils.flop_counter`` (its
FLOPs / 2) on a meta-device copy of the raw network at the config's input size (batch 1), so
counting a full-size SSD300 costs no compute. ``size_mb`` is the FP32 size of the parameters,
``params * 4 / 2**20`` (MiB), which is what a checkpoint of the weights occupies, give or take
the BatchNorm buffers and a few kB of container.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.fileio import atomic_write_json, atomic_write_text
from prunekit.markdown import markdown_table
from prunekit.prune.graph import example_input, layer_names_of, traced_network

BYTES_PER_PARAM = 4  # FP32


def _meta_network(model: nn.Module) -> nn.Module:
    return copy.deepcopy(traced_network(model)).to("meta").eval()


_MACS_CACHE: dict[str, tuple[int, dict[str, int]]] = {}


def _cache_key(model: nn.Module, example: torch.Tensor | None) -> str | None:
    """MACs of a prunekit model depend only on its architecture config (and the input size)."""
    cfg = getattr(model, "prunekit_config", None)
    if cfg is None or example is not None:
        return None
    d = cfg.to_dict()
    d.pop("class_names", None)
    return json.dumps(d, sort_keys=True)


def module_macs(model: nn.Module, example: torch.Tensor | None = None) -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per module path) of one forward at batch 1."""
    key = _cache_key(model, example)
    if key is not None and key in _MACS_CACHE:
        total, per = _MACS_CACHE[key]
        return total, dict(per)
    net = _meta_network(model)
    x = example_input(model) if example is None else example
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.empty(x.shape, device="meta"))
    root = type(net).__name__
    per = {}
    for fqn, ops in counter.get_flop_counts().items():
        if fqn.startswith(root + "."):
            per[fqn[len(root) + 1 :]] = int(sum(ops.values())) // 2
    total = int(counter.get_total_flops()) // 2
    if key is not None:
        if len(_MACS_CACHE) > 256:
            _MACS_CACHE.clear()
        _MACS_CACHE[key] = (total, dict(per))
    return total, per


def model_stats(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, Any]:
    """``{"params", "size_mb", "macs"}``: parameter count, FP32 MiB of parameters, multiply-adds."""
    params = sum(p.numel() for p in model.parameters())
    macs, _ = module_macs(model, example)
    return {"params": int(params), "size_mb": params * BYTES_PER_PARAM / 2**20, "macs": macs}


def _width(m: nn.Module) -> int:
    return int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)


def layer_table(
    model: nn.Module,
    original: nn.Module | None = None,
    original_channels: Mapping[str, int] | None = None,
    example: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One row per conv/linear layer (forward order, paper names where the model has them).

    Columns: ``layer``, ``type``, ``filters_before``/``filters_after`` (before = ``original`` or
    ``original_channels``; else the same as after), ``params`` and ``macs`` of the layer now,
    and with ``original`` also ``params_before``/``macs_before``. A layer the original has and the
    model lost (pruned-Kdet) has 0 after.
    """
    names = layer_names_of(model)
    mods = dict(model.named_modules())
    _, macs = module_macs(model, example)
    rows: dict[str, dict[str, Any]] = {}
    for name, path in names.items():
        m = mods[path]
        if not isinstance(m, nn.Conv2d | nn.Linear):
            continue
        rows[name] = {
            "layer": name,
            "type": "conv" if isinstance(m, nn.Conv2d) else "linear",
            "filters_before": _width(m),
            "filters_after": _width(m),
            "params": sum(p.numel() for p in m.parameters()),
            "macs": macs.get(path, 0),
        }
    if original_channels:
        for name, c in original_channels.items():
            if name in rows:
                rows[name]["filters_before"] = int(c)
    if original is not None:
        onames = layer_names_of(original)
        omods = dict(original.named_modules())
        _, omacs = module_macs(original, example)
        merged: dict[str, dict[str, Any]] = {}
        for name, path in onames.items():
            m = omods[path]
            if not isinstance(m, nn.Conv2d | nn.Linear):
                continue
            row = rows.get(name) or {
                "layer": name,
                "type": "conv" if isinstance(m, nn.Conv2d) else "linear",
                "filters_after": 0,
                "params": 0,
                "macs": 0,
            }
            row["filters_before"] = _width(m)
            row["params_before"] = sum(p.numel() for p in m.parameters())
            row["macs_before"] = omacs.get(path, 0)
            merged[name] = row
        for name, row in rows.items():  # layers only the new model has (unusual)
            merged.setdefault(name, row)
        rows = merged
    for row in rows.values():
        before = row["filters_before"]
        row["kept_pct"] = 100.0 * row["filters_after"] / before if before else 100.0
    return list(rows.values())


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_macs(n: float) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render_markdown(
    table: Sequence[Mapping[str, Any]],
    totals: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
) -> str:
    """Markdown for a layer table, plus a totals table (``{"original": stats, "pruned": stats}``)."""
    lines = [f"## {title}", ""] if title else []
    has_before = any("params_before" in r for r in table)
    head = ["layer", "filters before", "filters after", "kept %", "params", "MACs"]
    if has_before:
        head[4:4] = ["params before"]
        head += ["MACs before"]
    body = []
    for r in table:
        cells = [r["layer"], str(r["filters_before"]), str(r["filters_after"]), f"{r['kept_pct']:.1f}",
                 _fmt_int(r["params"]), _fmt_macs(r["macs"])]  # fmt: skip
        if has_before:
            cells[4:4] = [_fmt_int(r.get("params_before", 0))]
            cells += [_fmt_macs(r.get("macs_before", 0))]
        body.append(cells)
    lines.append(markdown_table(head, body))
    if totals:
        keys = list(totals)
        rows = []
        for label, key, fmt in (
            ("parameters", "params", _fmt_int),
            ("size (MiB, fp32)", "size_mb", lambda v: f"{v:.2f}"),
            ("MACs", "macs", _fmt_macs),
            ("metric", "metric", lambda v: f"{100 * v:.2f}"),
        ):
            if any(key in totals[k] and totals[k][key] is not None for k in keys):
                rows.append(
                    [label] + [fmt(totals[k][key]) if totals[k].get(key) is not None else "-" for k in keys]
                )
        lines += ["", markdown_table(["", *keys], rows)]
    return "\n".join(lines) + "\n"


def write_table(
    out_stem: str | os.PathLike,
    table: Sequence[Mapping[str, Any]],
    totals: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (the data) and ``<stem>.md`` (its view), atomically."""
    stem = Path(out_stem)
    js = atomic_write_json(
        stem.with_suffix(".json"), {"layers": list(table), "totals": dict(totals or {}), **dict(extra or {})}
    )
    md = atomic_write_text(stem.with_suffix(".md"), render_markdown(table, totals, title))
    return js, md


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Layer name -> its current filter count (the widths the keep floors are fractions of)."""
    return {r["layer"]: int(r["filters_after"]) for r in layer_table(model)}


def removed_filters(before: nn.Module, after: nn.Module) -> dict[str, str]:
    """Layer name -> "before->after" filter counts of every layer a surgery narrowed."""
    a = {r["layer"]: r["filters_after"] for r in layer_table(after)}
    return {r["layer"]: f"{r['filters_after']}->{a[r['layer']]}" for r in layer_table(before)
            if a.get(r["layer"], r["filters_after"]) != r["filters_after"]}  # fmt: skip
