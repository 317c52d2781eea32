"""The closing summary of ``compress-and-export``: what a user reads first, at the end of the run and
at the top of ``REPORT.md``.

One glance, every figure from this run's own files (manifest, ``bench.json``, ``verify.json``):
how much smaller and faster, the accuracy of the original, its control and the compressed model,
whether the exported graph was verified, and where each artifact is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.manifest import Manifest
from prunekit.paired import resolves
from prunekit.prune.trainer import standard_error


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}{unit}"
    return f"{v:g}{unit}"


def summary_data(out: Path, manifest: Manifest) -> dict[str, Any]:
    """The summary's figures as a dict (also stored in the manifest's report stage)."""
    st = manifest.stages
    orig_m, comp_m = st["eval_original"].metrics, st["prune"].metrics
    key = "map50" if "map50" in orig_m else "top1"
    d: dict[str, Any] = {"metric": "AP50" if key == "map50" else "top-1", "metric_key": key}
    bench_path = out / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    if bench:
        models = bench["models"]
        o, c = models.get("original", {}), models.get("compressed", {})
        d["params"] = (o.get("params"), c.get("params"))
        d["macs"] = (o.get("macs"), c.get("macs"))
        d["file_bytes"] = (o.get("file_size_bytes"), c.get("file_size_bytes"))
        fps: dict[str, tuple[float, float]] = {}
        for r in bench.get("runs", []):
            if r.get("precision") != "fp32" or r["model"] not in ("original", "compressed"):
                continue
            slot = fps.setdefault(f"{r['backend']} b{r['batch_size']}", (0.0, 0.0))
            val = r["timing"]["fps"]
            fps[f"{r['backend']} b{r['batch_size']}"] = (
                (val, slot[1]) if r["model"] == "original" else (slot[0], val)
            )
        d["fps"] = fps
    else:
        d["params"] = (orig_m.get("params"), comp_m.get("params"))
    d["n_images"] = orig_m.get("num_images")
    d["acc"] = {"original": _pct(orig_m.get(key)), "compressed": _pct(comp_m.get(key))}
    ctrl = st["control"].metrics if "control" in st else {}
    if ctrl.get(key) is not None:
        d["acc"]["control"] = _pct(ctrl[key])
        d["control_note"] = ctrl.get("note", "")
    else:
        d["control_note"] = ctrl.get("note") or "no control trained"
    train = st["train"].metrics
    if train.get("trained_here"):
        d["training"] = {
            k: train.get(k) for k in ("epochs", "steps", "plateau", "plateau_change", "val_curve")
        }
    search = out / "search" / "search.json"
    if search.is_file():
        state = json.loads(search.read_text())
        kept = state["points"][state.get("kept") or 0]
        n = kept.get("val_images")
        d["budget"] = {
            "max_drop": state["config"]["max_drop"], "target": state["config"].get("target"),
            "kept": state.get("kept"), "points_evaluated": len(state["points"]) - 1,
            "drop": kept.get("drop", 0.0), "stopped": state.get("stopped"), "message": state.get("message"),
            "drop_se": kept.get("drop_se"), "margin_se": state["config"].get("margin_se", 0.0),
            "val_images": n, "compressed": bool(state.get("kept")),
        }  # fmt: skip
    test_path = out / "test.json"
    if test_path.is_file():
        d["test"] = json.loads(test_path.read_text())
    ver_path = out / "verify.json"
    if ver_path.is_file():
        d["verify"] = bool(json.loads(ver_path.read_text()).get("passed"))
    d["wall_s"] = sum((r.wall_s or 0.0) for r in st.values())
    return d


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * float(v)


def render_summary(out: Path, manifest: Manifest) -> str:
    """The summary block (markdown that also reads as plain text in a terminal)."""
    d = summary_data(out, manifest)
    lines = ["# Summary: original vs compressed, this run", ""]
    p, m = d.get("params", (None, None)), d.get("macs", (None, None))
    lines.append(f"- parameters: {_num(p[0])} -> {_num(p[1])} (**{_ratio(p[0], p[1])} fewer**)")
    if m[0]:
        lines.append(f"- multiply-adds per image: {_num(m[0])} -> {_num(m[1])} ({_ratio(m[0], m[1])} fewer)")
    f = d.get("file_bytes", (None, None))
    if f[0]:
        lines.append(
            f"- file size (ONNX): {f[0] / 2**20:.2f} MiB -> {f[1] / 2**20:.2f} MiB ({_ratio(f[0], f[1])} smaller)"
        )
    for name, (a, b) in sorted(d.get("fps", {}).items()):
        lines.append(f"- {name}: {a:.1f} -> {b:.1f} images/s (**{_ratio(b, a)} faster**)")
    acc, n = d["acc"], int(d.get("n_images") or 0)
    err = standard_error((acc["original"] or 0.0) / 100.0, n)
    se = "" if err is None else f" (± ~{100 * err:.1f} SE on {n} images)"
    parts = [f"original {acc['original']:.2f}"]
    if "control" in acc:
        parts.append(f"control {acc['control']:.2f}")
    parts.append(f"compressed {acc['compressed']:.2f}")
    lines.append(f"- {d['metric']} (%) on validation, where the search selected: " + " / ".join(parts) + se)
    lines.append(f"  - control: {d['control_note']}")
    t = d.get("training")
    if t:
        curve = ", ".join(f"{v:.1f}" for v in (t.get("val_curve") or [])[-3:])
        state = {True: "at a plateau", False: "NOT at a plateau", None: "plateau not checked (no validation)"}
        lines.append(f"  - original trained here: {t['epochs']} epochs, {t['steps']} steps; validation {d['metric']} "
                     f"of its last epochs {curve}: {state[t.get('plateau')]}")  # fmt: skip
    if d.get("test"):
        lines += _test_lines(d["test"], d["metric"])
    b = d.get("budget")
    if b:
        lines += _budget_lines(b, d["metric"], out)
    if "verify" in d:
        lines.append(
            f"- ONNX verified against PyTorch: {'passed' if d['verify'] else 'FAILED'} (verify.json)"
        )
    lines.append(
        f"- artifacts in {out}: model.onnx (deploy), model.pt (PyTorch), original.onnx, engines/, bench.json, "
        "verify.json, REPORT.md"
    )
    return "\n".join(lines) + "\n"


def _test_lines(t: dict[str, Any], metric: str) -> list[str]:
    """The test split's figures: the ones to quote, since no selection has seen those images."""
    ref = t["reference"]
    names = [k for k in ("original", "control", "compressed") if f"metric_{k}" in t]
    lines = [f"- on the test split '{t['split']}' ({t['images']} images, unseen by any selection), {metric} (%): "
             + " / ".join(f"{k} {t[f'metric_{k}']:.2f}" for k in names),
             f"  - compressed vs {ref}: {t['drop']:+.2f} ± {t['drop_se']:.2f} points below (paired standard error)"]  # fmt: skip
    if "budget_met" in t:
        verdict = "met" if t["budget_met"] else "**NOT met**"
        lines[-1] += f"; budget {t['max_drop']:g}: {verdict}"
        if t.get("compressed") is False:
            lines.append("  - nothing was compressed: the model handed back is the original")
        elif t["resolvable"] is False:
            lines.append(f"  - {t['images']} test images cannot resolve a {t['max_drop']:g}-point difference "
                         f"(2 SE = {2 * t['drop_se']:.2f}): read the verdict as a range, not a fact")  # fmt: skip
        if not t["budget_met"]:
            lines.append(f"  - **WARNING: on the test split the compressed model lost more than the budget** "
                         f"({t['drop']:.2f} > {t['max_drop']:g}); a smaller --max-drop or a larger "
                         "validation split makes the search more careful")  # fmt: skip
    return lines


def _budget_lines(b: dict[str, Any], metric: str, out: Path) -> list[str]:
    """The budget, what the search kept and whether the data can resolve it at all."""
    target = f", target {b['target']}" if b.get("target") else ""
    lines = [f"- budget: at most {b['max_drop']:g} points of validation {metric} below the control{target}; "
             f"{b['points_evaluated']} points evaluated (search/search.json, REPORT.md's Pareto table)"]  # fmt: skip
    if not b["compressed"]:
        lines.append(f"  - **WARNING: nothing was compressed**: {b['message']}")
    else:
        se = "" if b["drop_se"] is None else (
            f" (± {b['drop_se']:.2f} paired, on {b['val_images']} validation images; passed with "
            f"{b['margin_se']:g} SE of margin)")  # fmt: skip
        lines.append(f"  - kept point c{b['kept']}: {b['drop']:+.2f} points below the control{se}; stopped: "
                     f"{b['stopped']}")  # fmt: skip
        if b["drop_se"] is not None and not resolves(b["drop_se"], b["max_drop"]):
            lines.append(f"  - the validation set cannot resolve a {b['max_drop']:g}-point budget (a difference "
                         f"has an error of ~{b['drop_se']:.1f} points): the check is as coarse as the data")  # fmt: skip
    state = json.loads((out / "search" / "search.json").read_text())
    from prunekit.bench.points import pareto_head

    lines += ["", "Operating points (the Pareto front's head; every point in REPORT.md):", "",
              pareto_head(state, metric), ""]  # fmt: skip
    if b.get("target") and "NOT reached" in (b.get("message") or ""):
        lines.append(f"  - **WARNING: the target {b['target']} was not reached within the budget**")
    return lines
