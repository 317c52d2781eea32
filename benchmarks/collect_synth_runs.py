"""Copy the small artifacts of `compress-and-export` runs into benchmarks/results and compare them.

    python benchmarks/collect_synth_runs.py runs/synth_paper runs/synth_hw

The runs themselves are reproduced with (same trained original, same data, same seed):

    prunekit compress-and-export --config benchmarks/configs/synth_paper.yaml --out runs/synth_paper
    prunekit compress-and-export --config benchmarks/configs/synth_hw.yaml --out runs/synth_hw

For each run it copies manifest.json, config.yaml, verify.json, bench.json, REPORT.md, the plots
and the per-phase summary (files of a few KB; checkpoints and ONNX stay out of git), then writes
``speed_aware_synth.{json,md}``: params, MACs, mAP50 and ORT CPU latency per run, from whatever
stages finished (an unfinished run is reported as such, with the phases it completed).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from prunekit.fileio import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = ["manifest.json", "config.yaml", "verify.json", "bench.json", "REPORT.md"]


def collect(run: Path) -> dict[str, Any]:
    dst = RESULTS / run.name
    dst.mkdir(parents=True, exist_ok=True)
    for name in SMALL + [p.name for p in run.glob("*.png")]:
        if (run / name).is_file():
            shutil.copy2(run / name, dst / name)
    phases = run / "phases"
    for name in ("summary.json", "summary.md"):
        if (phases / name).is_file():
            shutil.copy2(phases / name, dst / f"phases_{name}")
    records = []
    for pdir in sorted(phases.glob("p*")):
        tables = sorted(pdir.glob("table_*.json"))
        rec_file = pdir / "record.json"
        records.append({"phase": pdir.name, "steps_done": [t.stem for t in tables],
                        "record": json.loads(rec_file.read_text()) if rec_file.is_file() else None})  # fmt: skip
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    row: dict[str, Any] = {
        "run": run.name,
        "config": manifest["meta"].get("config", {}),
        "status": {k: v["status"] for k, v in stages.items()},
        "original": stages["eval_original"]["metrics"],
        "compressed": stages["prune"]["metrics"] if stages["prune"]["status"] == "done" else None,
        "phases": records,
    }
    bench = run / "bench.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        row["models"] = {
            k: {m: v.get(m) for m in ("params", "macs", "file_size_bytes")} for k, v in b["models"].items()
        }
        row["runs"] = [
            {k: r.get(k) for k in ("model", "backend", "precision", "batch_size")}
            | {k: round((r.get("timing") or {}).get(k) or 0, 2) for k in ("fps", "p50_ms", "p99_ms")}
            for r in b["runs"]
        ]
        row["accuracy"] = b.get("accuracy")
        row["comparisons"] = b.get("comparisons")
    return row


def main(argv: list[str]) -> None:
    rows = [collect(Path(a)) for a in argv]
    atomic_write_json(RESULTS / "speed_aware_synth.json", {"runs": rows})
    lines = ["# Paper settings vs hardware-aware settings, synthetic set (SSD300 width 0.125, ORT CPU)", ""]
    lines += ["| run | align | cost-aware | status | params orig -> compressed | mAP50 orig -> compressed |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c, o, p = r["config"], r["original"], r["compressed"] or {}
        done = [s for s, v in r["status"].items() if v == "done"]
        lines.append(
            f"| {r['run']} | {c.get('align')} | {c.get('cost_aware')} | stages done: {', '.join(done)} | "
            f"{o.get('params', '?'):,} -> {p.get('params', 'unfinished')} | {o.get('map50')} -> {p.get('map50', '-')} |"
        )
    for r in rows:
        if r.get("runs"):
            lines += [
                "",
                f"## {r['run']}: ORT CPU",
                "",
                "| model | batch | FPS | p50 ms | p99 ms |",
                "|---|---|---|---|---|",
            ]
            for x in r["runs"]:
                lines.append(
                    f"| {x['model']} | {x['batch_size']} | {x['fps']} | {x['p50_ms']} | {x['p99_ms']} |"
                )
    atomic_write_text(RESULTS / "speed_aware_synth.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
