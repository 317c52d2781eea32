"""Compression without tuning: the product's command with its defaults, on every data set.

    python -m benchmarks.no_tuning --cases synth_seed0,synth_seed1,synth_seed2   # ~28 min each, 2 cores
    python -m benchmarks.no_tuning --cases bccd,bccd_model                       # hours on 2 cores

Each case runs ``prunekit compress-and-export`` (the command users run) with only data, model,
width, seed, budget and output flags; every flag given is recorded in the row (``flags``) and any
other would be listed as a deviation. The run's own files give the sizes, the ORT CPU speed-up
(original and compressed timed interleaved in the same run) and the search's points; the test
split (which no selection sees; the run's own ``test.json``) gives the accuracies: original,
control (the original trained through the kept point's stages at λ = 0) and compressed, with the
drop against the control and its paired standard error (detection: bootstrap over test images;
classification: per image).

``*_model`` cases pass the original of the matching trained-here case back with ``--model``: the
flow of a user who brings a trained model. A case whose run folder is complete is only collected
again, so the script resumes across sessions. Writes ``benchmarks/results/no_tuning.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, RESULTS, git_commit, machine_info
from prunekit.fileio import atomic_write_json

log = logging.getLogger("no_tuning")
ALLOWED = {"--data", "--model", "--width", "--seed", "--max-drop", "--epochs-train", "--out"}
RESULT = RESULTS / "no_tuning.json"


def cases(data: Path, runs: Path) -> dict[str, list[str]]:
    """Case name -> the flags of its command (``--out`` added by :func:`run_case`)."""
    cifar = f"folder:{data}/cifar10-jpg-{{split}}.tar.gz"
    out = {f"synth_seed{s}": ["--seed", str(s)] for s in range(3)}
    out["bccd"] = ["--data", f"voc:{data}/BCCD", "--width", "0.25"]
    # width 0.25 as BCCD: at 0.125 the original stayed at chance (docs/results.md, compression without tuning, 6)
    out["helmet"] = ["--data", f"voc:{data}/helmet", "--width", "0.25"]
    out["cifar10"] = ["--model", "vgg16", "--data", cifar, "--width", "0.25"]
    # not one of the rows: the embedded default's original passed back in (the post-training flow)
    out["synth_seed0_model"] = ["--model", str(runs / "synth_seed0" / "original.pt")]
    for name in ("bccd", "helmet", "cifar10"):
        flags = list(out[name])
        if "--model" in flags:
            i = flags.index("--model")
            del flags[i : i + 2]
        out[f"{name}_model"] = ["--model", str(runs / name / "original.pt"), *flags]
    return out


def run_case(name: str, flags: list[str], runs: Path) -> dict[str, Any]:
    """Run (or resume) one case's command; returns wall and CPU seconds of this invocation."""
    out = runs / name
    cmd = [sys.executable, "-m", "prunekit.cli", "compress-and-export", *flags, "--out", str(out)]
    manifest = out / "manifest.json"
    if manifest.is_file():
        stages = json.loads(manifest.read_text())["stages"]
        if all(s["status"] in ("done", "skipped") for s in stages.values()):
            return {"reused": True}
        cmd.append("--resume")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    t0 = time.perf_counter()
    log.info("%s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, text=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (runs / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return {"exit_code": proc.returncode, "wall_s": time.perf_counter() - t0, "load_avg_start": list(load),
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "error": (proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else None}  # fmt: skip


def collect(name: str, flags: list[str], runs: Path, timing: dict[str, Any]) -> dict[str, Any]:
    """The row of one finished case, from its run folder (manifest, bench, search and test records)."""
    out = runs / name
    manifest = json.loads((out / "manifest.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    search = json.loads((out / "search" / "search.json").read_text())
    kept = search["points"][search["kept"]]
    models = bench["models"]
    fps = {(r["model"], r["backend"], r["batch_size"]): r["timing"]["fps"] for r in bench["runs"]
           if r.get("precision", "fp32") == "fp32"}  # fmt: skip
    row: dict[str, Any] = {
        "flags": flags + ["--out"], "deviations": [f for f in flags if f.startswith("--") and f not in ALLOWED],
        "max_drop": search["config"]["max_drop"],
        "params_ratio": models["original"]["params"] / models["compressed"]["params"],
        "macs_ratio": models["original"]["macs"] / models["compressed"]["macs"],
        "ort_b1_ratio": fps[("compressed", "ort-cpu", 1)] / fps[("original", "ort-cpu", 1)],
        "points_evaluated": len(search["points"]) - 1, "kept_point": search["kept"],
        "search_stopped": search.get("stopped"), "val_drop_vs_control": kept.get("drop", 0.0),
        "search_lr_scale": search.get("lr_scale", 1.0),
        "stage_wall_s": {k: v.get("wall_s") for k, v in manifest["stages"].items()},
    }  # fmt: skip
    row["wall_s"] = sum(v or 0.0 for v in row["stage_wall_s"].values())
    row.update(
        {k: v for k, v in timing.items() if k in ("cpu_s", "load_avg_start", "exit_code", "invocations")}
    )
    # the run's own test stage: original, control and compressed on the test split it never selected on
    test_path = out / "test.json"
    if not test_path.is_file():
        raise SystemExit(f"{test_path}: missing (a run from before the test stage existed): rerun the case")
    test = json.loads(test_path.read_text())
    row.update({"metric": test["metric"], "split": test["split"], "test_images": test["images"],
                "metric_original": test["metric_original"], "metric_control": test.get("metric_control"),
                "metric_compressed": test["metric_compressed"], "reference": test["reference"],
                "drop_vs_control": test["drop"], "drop_se": test["drop_se"],
                "val_drop_se": kept.get("drop_se")})  # fmt: skip
    row["budget_met"], row["resolvable"] = test["budget_met"], test["resolvable"]
    row["compressed"] = test.get("compressed", row.get("params_ratio", 1.0) > 1.0)
    return row


def stages_so_far(out: Path) -> dict[str, Any]:
    """What a refused or interrupted run measured before it stopped: each stage's status and wall
    time, and the training stage's record (epochs, steps, the validation metric by epoch)."""
    path = out / "manifest.json"
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text())["stages"]
    return {"stage_status": {k: v.get("status") for k, v in stages.items()},
            "stage_wall_s": {k: v.get("wall_s") for k, v in stages.items() if v.get("wall_s")},
            "train": stages.get("train", {}).get("metrics")}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="synth_seed0,synth_seed1,synth_seed2")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--runs", type=Path, default=Path("runs/no_tuning"))
    ap.add_argument("--result", type=Path, default=RESULT)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    table = cases(a.data_dir.resolve(), a.runs.resolve())
    whole = json.loads(a.result.read_text()) if a.result.is_file() else {}
    whole["machine"] = machine_info("cpu", torch.get_num_threads())
    whole["command"] = "python -m benchmarks.no_tuning --cases NAME[,NAME...]"
    for name in [c for c in a.cases.split(",") if c]:
        if name not in table:
            raise SystemExit(f"unknown case {name!r}; known: {', '.join(table)}")
        a.runs.mkdir(parents=True, exist_ok=True)
        timing = run_case(name, table[name], a.runs.resolve())
        prev = whole.get(name, {})
        # an interrupted or refused invocation that --resume then continued: its time counts too
        earlier = list(prev.get("invocations", [])) if prev.get("exit_code") else []
        if not timing.get("reused"):
            timing["commit"] = git_commit()
            earlier.append(
                {
                    k: timing.get(k)
                    for k in ("exit_code", "wall_s", "cpu_s", "load_avg_start", "error", "commit")
                }
            )
        if timing.get("exit_code"):
            whole[name] = {"flags": table[name], "exit_code": timing["exit_code"], "error": timing["error"],
                           "invocations": earlier, **stages_so_far(a.runs.resolve() / name)}  # fmt: skip
        else:
            if timing.get("reused"):  # collected again: keep the timing of the invocation(s) that ran it
                timing = {
                    k: prev[k] for k in ("cpu_s", "load_avg_start", "exit_code", "invocations") if k in prev
                }
            elif len(earlier) > 1:
                timing = {**timing, "cpu_s": sum(i["cpu_s"] or 0.0 for i in earlier), "invocations": earlier}
            whole[name] = collect(name, table[name], a.runs.resolve(), timing)
        atomic_write_json(a.result, whole)
        log.info("%s: %s", name, json.dumps(whole[name])[:400])
    return whole


if __name__ == "__main__":
    main()
