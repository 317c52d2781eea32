"""The README's main command, run as a user would, measured: time, compression, speed, accuracy.

    python benchmarks/demo.py                      # a fresh runs/demo_bench, then results/demo.json
    python benchmarks/demo.py --out /tmp/d --force

Runs the first ``bash`` block of the README's quick start exactly, with only its ``--out`` folder
replaced by a fresh one, and times it (wall, CPU seconds of the child processes, load average at
the start). Then reads the run's ``bench.json`` (ONNX Runtime CPU, original and compressed in
the same run) and ``verify.json``, and the run's own **control** (the pipeline's control stage:
the original given as many extra epochs as the compressed model's lineage trained, or the original
itself when the run pruned while training from its initialisation for the same epochs). The three
models are then scored by one evaluator (PyTorch, pycocotools) on every validation image of the set, not
the pipeline's quick subset, with the SE of AP50 beside each.

Writes ``benchmarks/results/demo.{json,md}`` with the keys the showcase issue names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, standard_error  # noqa: E402


def readme_command(readme: Path = REPO / "README.md") -> str:
    """The first ```bash block of the README: the quick start's main command."""
    m = re.search(r"```bash\n(.+?)\n```", readme.read_text(), re.S)
    if m is None:
        raise SystemExit(f"{readme}: no ```bash block found")
    return m.group(1).strip()


def with_out(cmd: str, out: Path) -> str:
    """``cmd`` with its ``--out X`` replaced by ``--out <out>`` (exactly one must be there)."""
    new, n = re.subn(r"--out\s+\S+", f"--out {shlex.quote(str(out))}", cmd)
    if n != 1:
        raise SystemExit(f"the README command must have exactly one --out, found {n}: {cmd}")
    return new


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_readme(out: Path, extra: str = "") -> dict[str, Any]:
    cmd = with_out(readme_command(), out) + (f" {extra}" if extra else "")
    load = list(os.getloadavg())
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall0, _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the README command failed with exit {proc.returncode}: {cmd}")
    start = proc.stdout.find("# Summary")
    return {"command": cmd, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_avg_start": load,
            "summary": proc.stdout[start:].strip() if start >= 0 else proc.stdout[-3000:]}  # fmt: skip


def _ratio(bench: dict[str, Any], batch: int) -> float | None:
    for r in bench["comparisons"]["compressed"]["runs"]:
        if r["backend"] == "ort-cpu" and r["batch_size"] == batch:
            return float(r["speedup"])
    return None


def _ap50(bench: dict[str, Any], model: str) -> float | None:
    for a in bench["accuracy"]:
        if a["backend"] == "ort-cpu" and a["model"] == model and a.get("precision", "fp32") == "fp32":
            return 100.0 * float(a["metrics"]["map50"])
    return None


def control_and_scores(out: Path, threads: int) -> dict[str, Any]:
    """Original / control / compressed, scored by one evaluator on all val images.

    The control is the run's own: ``control.pt`` from the pipeline's control stage (the original
    given the compressed lineage's extra epochs), or the original itself when the run pruned
    while training from its initialisation for the same epochs.
    """
    import torch

    import prunekit
    from prunekit.evaluate import evaluate
    from prunekit.manifest import Manifest
    from prunekit.pipeline import STAGES, Pipeline, PipelineConfig

    torch.set_num_threads(threads)
    import yaml

    cfg = PipelineConfig(**yaml.safe_load((out / "config.yaml").read_text()))
    _, val_set = Pipeline(cfg, out)._datasets()
    ctrl = Manifest.load(out, STAGES).stages["control"]
    path = out / "control.pt" if (out / "control.pt").is_file() else out / "original.pt"
    scores = {}
    for name, ckpt in (
        ("original", out / "original.pt"),
        ("control", path),
        ("compressed", out / "model.pt"),
    ):
        m = evaluate(prunekit.load(ckpt), val_set, batch_size=16, progress=False)
        ap = 100.0 * float(m["map50"])
        n = int(m["num_images"])
        scores[name] = {"ap50": ap, "ap50_se": standard_error(ap, n), "images": n}
    training = {"wall_s": ctrl.wall_s, "note": ctrl.metrics.get("note")}
    return {"control_epochs": ctrl.metrics.get("epochs", 0), "control_training": training, "scores": scores}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo_bench")
    ap.add_argument("--result", type=Path, default=RESULTS / "demo.json")
    ap.add_argument("--force", action="store_true", help="delete --out first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--append",
        default="",
        help="options appended to the README command (e.g. '--seed 1' "
        "for a variance check; write it to another --result)",
    )
    args = ap.parse_args(argv)
    if args.out.exists():
        if not args.force:
            raise SystemExit(f"{args.out} exists: the demo must run in a fresh folder (--force deletes it)")
        shutil.rmtree(args.out)
    run = run_readme(args.out, args.append)
    bench = json.loads((args.out / "bench.json").read_text())
    verify = json.loads((args.out / "verify.json").read_text())
    models = bench["models"]
    extra = control_and_scores(args.out, args.threads)
    s = extra["scores"]
    res: dict[str, Any] = {
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "load_avg_start": run["load_avg_start"],
        "params_ratio": models["original"]["params"] / models["compressed"]["params"],
        "macs_ratio": models["original"]["macs"] / models["compressed"]["macs"],
        "fps_ratio_ort_cpu_b1": _ratio(bench, 1),
        "fps_ratio_ort_cpu_b8": _ratio(bench, 8),
        "ap50_original": s["original"]["ap50"],
        "ap50_control": s["control"]["ap50"],
        "ap50_compressed": s["compressed"]["ap50"],
        "ap50_se": {k: v["ap50_se"] for k, v in s.items()},
        "ap50_images": s["compressed"]["images"],
        "ap50_ort_pipeline_subset": {
            "original": _ap50(bench, "original"),
            "compressed": _ap50(bench, "compressed"),
        },
        "verify_passed": all(b.get("passed") for b in verify["backends"].values()),
        **{k: extra[k] for k in ("control_epochs", "control_training")},
        "command": run["command"],
        "summary": run["summary"],
        "machine": machine_info("cpu", args.threads),
    }
    res["targets"] = {
        "params_ratio_ge_3": res["params_ratio"] >= 3,
        "fps_ratio_ort_cpu_b1_ge_1.5": (res["fps_ratio_ort_cpu_b1"] or 0) >= 1.5,
        "ap50_compressed_within_1_of_control": res["ap50_compressed"] >= res["ap50_control"] - 1.0,
        "wall_s_le_600": res["wall_s"] <= 600,
        "verify_passed": res["verify_passed"],
    }
    from prunekit.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(args.result, res)
    atomic_write_text(args.result.with_suffix(".md"), render(res))
    print(render(res))
    return res


def _control_label(r: dict[str, Any]) -> str:
    if r["control_epochs"]:
        return f"original + {r['control_epochs']} epochs"
    return "the original: pruned while training from its initialisation, same epochs"


def render(r: dict[str, Any]) -> str:
    se = r["ap50_se"]
    return "\n".join([
        "# The README's main command, measured", "", f"`{r['command']}`", "",
        f"Load average at start {r['load_avg_start'][0]:.2f}; wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s "
        f"(children); {r['machine']['cpu']}.", "",
        "| | value |", "|---|---:|",
        f"| params ratio | {r['params_ratio']:.2f}x |", f"| MACs ratio | {r['macs_ratio']:.2f}x |",
        f"| ORT CPU fps ratio, batch 1 | {r['fps_ratio_ort_cpu_b1']:.2f}x |",
        f"| ORT CPU fps ratio, batch 8 | {r['fps_ratio_ort_cpu_b8']:.2f}x |",
        f"| AP50 original | {r['ap50_original']:.2f} ± {se['original']:.2f} |",
        f"| AP50 control ({_control_label(r)}) | {r['ap50_control']:.2f} ± {se['control']:.2f} |",
        f"| AP50 compressed | {r['ap50_compressed']:.2f} ± {se['compressed']:.2f} |",
        f"| verify passed | {r['verify_passed']} |", "",
        f"AP50 on all {r['ap50_images']} validation images, one evaluator (PyTorch + pycocotools). Targets: "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items()), "",
        "What the command printed:", "", r["summary"], "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
