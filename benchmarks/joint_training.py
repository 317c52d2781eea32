"""Prune while training against train-then-prune, from scratch, on the embedded set and on BCCD.

    python -m benchmarks.joint_training --data synth                     # both schedules (~20 min)
    python -m benchmarks.joint_training --data bccd --reuse-train-then-prune benchmarks/results/bccd_ssd300.json  # ~15 min
    python -m benchmarks.joint_training --data synth --smoke             # plumbing only

Stages (each a checkpoint in ``--out``, reused by a later invocation):

* ``train_then_prune``: the post-training method from scratch: train ``--epochs``, then the
  model's phases (sparsity induction with its λ search, threshold, selection, surgery, retraining).
  On BCCD ``--reuse-train-then-prune`` takes it from ``bccd_ssd300.json`` instead (its
  ``original`` + ``paper`` stages, the same model, data and training settings: 70 minutes of CPU
  not spent twice); the figures say where they come from.
* ``joint``: :func:`prunekit.prune.joint.train_joint`, the same ``--epochs`` and learning-rate
  schedule, pruned on the way.
* ``original``: the dense model of the same epochs and settings (train-then-prune's first half; on
  synth from the same initialisation too), scored by the same evaluator: the joint model's control.
* ``ort``: ONNX Runtime CPU throughput at batch 1 of ``joint`` over ``original``, interleaved.

``cpu_s`` is the process CPU time of the whole stage (training, every evaluation and search);
``ap50`` is on the test split (synth: 100 generated images; BCCD: 72), which neither schedule sees.
Writes ``benchmarks/results/joint_training.{json,md}`` under the key ``synth`` or ``bccd``, with
the targets: joint ``params`` within 1.2x of train_then_prune's, ``ap50`` within 1 point, ``cpu_s``
<= 0.6x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS,
    Stages,
    command_line,
    head,
    load_bccd,
    machine_info,
    save_result,
)
from prunekit.data import build_dataset
from prunekit.data.transforms import Compose, RandomHorizontalFlip
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json
from prunekit.markdown import markdown_table
from prunekit.models import ssd300_vgg16
from prunekit.prune.config import PruneConfig
from prunekit.prune.joint import JointConfig, trace_markdown, train_joint
from prunekit.prune.method import run_phases
from prunekit.prune.phase_report import phase_rows
from prunekit.prune.trainer import DataTrainer
from prunekit.train import train

STAGES = ("train_then_prune", "joint", "original", "ort")
COMPARED = ("train_then_prune", "joint")
log = logging.getLogger("joint_training")

# Per data set: the settings of the post-training runs this is compared with (the embedded
# pipeline's defaults; the BCCD benchmark's), so that only the schedule differs.
PRESETS: dict[str, dict[str, Any]] = {
    "synth": {"width": 0.125, "epochs": 16, "lr": 0.05, "batch_size": 16, "warmup": 50,
              "prune": {"epochs_sparsity": 1, "epochs_retrain": 1}, "prune_lr": 0.05, "retrain_lr": 0.05,
              "recalibration_images": 1024, "joint": {"lam": 0.2, "warmup_epochs": 2, "tolerance": 2.0},
              "original": "ttp_train/last.pt"},
    "bccd": {"width": 0.25, "epochs": 40, "lr": 0.05, "batch_size": 8, "warmup": 100,
             "prune": {"epochs_sparsity": 2, "epochs_retrain": 2, "eps1": 5.0, "eps2": 15.0,
                       "shrink_grid": [0.5, 1.0, 1.5, 2.0, 3.0]}, "prune_lr": 0.05, "retrain_lr": 0.02,
             "recalibration_images": 256, "joint": {"lam": 0.1, "warmup_epochs": 8, "prune_every": 2, "tolerance": 5.0},
             "original": "../bccd_v2/original.pt"},
}  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=sorted(PRESETS), required=True)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA / "BCCD", help="BCCD's folder")
    ap.add_argument("--out", type=Path, default=None, help="default runs/joint_<data>")
    ap.add_argument("--result", type=Path, default=RESULTS / "joint_training.json")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--epochs", type=int, default=None, help="both schedules (default: the preset's)")
    ap.add_argument(
        "--reuse-train-then-prune",
        type=Path,
        default=None,
        help="bccd_ssd300.json: its original + paper stages are train_then_prune",
    )
    for f in JointConfig.__dataclass_fields__.values():
        if f.name != "target_params":
            typ = float if f.default is None else type(f.default)
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None,
                            help=f"default: the preset's, else {f.default}")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS[args.data]
    args.epochs = args.epochs or preset["epochs"]
    args.batch_size = preset["batch_size"]
    args.out = args.out or Path(f"runs/joint_{args.data}{'_smoke' if args.smoke else ''}")
    if args.smoke:
        args.epochs = 3
    return args


def datasets(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    if args.data == "bccd":
        return load_bccd(args.data_dir, "flip", 8 if args.smoke else None, train_split="trainval")
    tf = Compose([RandomHorizontalFlip()])
    sets = (build_dataset("synth", "train", train=True, transforms=tf), build_dataset("synth", "val"),
            build_dataset("synth", "test"))  # fmt: skip
    if args.smoke:
        sets = (head(sets[0], 32), head(sets[1], 8), head(sets[2], 8))
    return sets


def make_stages(args: argparse.Namespace) -> Stages:
    def score(model: nn.Module, ds: Any) -> dict[str, float]:
        m = evaluate(model, ds, batch_size=8, device=args.device, progress=False)
        return {"ap50": 100 * float(m["map50"]), "map": 100 * float(m["map"])}

    return Stages(args, datasets(args), score, "ap50")


def _tcfg(b: Stages) -> Any:
    p = PRESETS[b.args.data]
    return b.tcfg(b.args.epochs, p["lr"], warmup=p["warmup"], grad_clip=10.0)


def _fresh_model(b: Stages) -> nn.Module:
    classes = list(b.train_set.classes)
    torch.manual_seed(b.args.seed)  # both schedules start from the same initialisation
    return ssd300_vgg16(num_classes=len(classes) + 1, width=PRESETS[b.args.data]["width"], batch_norm=True,
                        class_names=classes)  # fmt: skip


def stage_train_then_prune(b: Stages) -> None:
    a, p = b.args, PRESETS[b.args.data]
    if a.reuse_train_then_prune is not None:
        src = json.loads(a.reuse_train_then_prune.read_text())
        o, q = src["original"], src["paper"]
        if src["settings"]["epochs"] != a.epochs or src["model"]["width"] != p["width"]:
            raise SystemExit(f"{a.reuse_train_then_prune}: trained {src['settings']['epochs']} epochs at width "
                             f"{src['model']['width']}, this run {a.epochs} at {p['width']}")  # fmt: skip
        b.done["train_then_prune"] = {
            "params": q["params"], "macs": q["macs"], "ap50": q["ap50"], "map": q["map"], "ap50_se": q["ap50_se"],
            "cpu_s": round(o["cpu_s"] + q["cpu_s"], 1), "wall_s": round(o["wall_s"] + q["wall_s"], 1),
            "source": f"{a.reuse_train_then_prune}: original ({o['cpu_s']} CPU s) + paper ({q['cpu_s']} CPU s)",
            "epochs": a.epochs + q["epochs"], "original": {k: o[k] for k in ("params", "macs", "ap50")},
            "filters": q["filters"],
        }  # fmt: skip
        atomic_write_json(b.saved, b.done)
        b.stamp(f"train_then_prune: reused from {a.reuse_train_then_prune}")
        return
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model = _fresh_model(b)
    b.stamp(f"train_then_prune: train {a.epochs} epochs, then the phases")
    train(
        model,
        b.train_set,
        _tcfg(b),
        out_dir=b.out / "ttp_train",
        val_set=b.val_set,
        resume=True,
        progress=False,
    )
    original = b.score(model, b.test_set)
    trainer = DataTrainer(
        b.train_set, b.val_set, b.tcfg(1, p["retrain_lr"], warmup=0, grad_clip=10.0), sparsity_lr=p["prune_lr"],
        retrain_lr=p["retrain_lr"], eval_batch_size=8, recalibration_images=p["recalibration_images"],
    )  # fmt: skip
    hp = PruneConfig.from_dict({**p["prune"], "seed": a.seed})
    pruned = run_phases(
        model, "ssd300", trainer, hp, b.out / "ttp_phases", resume=True, allow_vacuous=a.smoke
    )
    summary = json.loads((b.out / "ttp_phases" / "summary.json").read_text())
    b.record("train_then_prune", pruned, cpu0, wall0, epochs=a.epochs + trainer.epochs_trained,
             phases=phase_rows(summary), original={"ap50": original["ap50"]})  # fmt: skip


def joint_config(a: argparse.Namespace) -> JointConfig:
    """The preset's schedule (the settings each recorded run used), then the command line's."""
    given = {f: getattr(a, f) for f in JointConfig.__dataclass_fields__ if getattr(a, f, None) is not None}
    if "shrink" in given and "lam" not in given:
        given["lam"] = None  # the strength given as a shrink replaces the preset's λ
    return JointConfig(**{**PRESETS[a.data]["joint"], **given})


def stage_joint(b: Stages) -> None:
    a, p = b.args, PRESETS[b.args.data]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    jc = joint_config(a)
    b.stamp(f"joint: {a.epochs} epochs pruned while training, {jc.to_dict()}")
    hp = PruneConfig.from_dict(
        {k: v for k, v in p["prune"].items() if k not in ("eps1", "eps2", "shrink_grid")}
    )
    res = train_joint(_fresh_model(b), b.train_set, _tcfg(b), jc, hp, "ssd300", b.out / "joint",
                      val_set=b.val_set, resume=True, progress=False)  # fmt: skip
    b.record("joint", res.model, cpu0, wall0, epochs=a.epochs, points=res.trace["points"],
             stopped=res.trace["stopped"], joint_config=jc.to_dict(), trace_final=res.trace["final"],
             trace_original=res.trace["original"],
             val_curve=[e["val_metric"] for e in res.trace["epochs"]])  # fmt: skip


def stage_original(b: Stages) -> None:
    """The dense model of the same epochs and settings (train_then_prune's first half; on synth also
    the same initialisation): the joint model's control, scored by the same evaluator, not re-timed."""
    import prunekit

    src = (b.out / PRESETS[b.args.data]["original"]).resolve()
    b.record("original", prunekit.load(src), time.process_time(), time.perf_counter(), epochs=b.args.epochs,
             source=str(src))  # fmt: skip


def stage_ort(b: Stages) -> None:
    b.ort_ratio(("original", "joint"), rounds=5 if b.args.smoke else 60)


def write_result(b: Stages) -> None:
    path = b.args.result
    res: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    keys = ("params", "macs", "ap50", "map", "ap50_se", "cpu_s", "wall_s", "epochs", "source", "stopped",
            "joint_config", "points", "original", "filters", "val_curve", "trace_final", "trace_original")  # fmt: skip
    entry: dict[str, Any] = {
        "command": command_line(),
        "smoke": b.args.smoke,
        "data": {"train_images": len(b.train_set), "val_images": len(b.val_set), "test_images": len(b.test_set)},
        "model": {"arch": "ssd300_vgg16", "batch_norm": True, "width": PRESETS[b.args.data]["width"]},
        "machine": machine_info(b.args.device, b.args.threads),
        "load_avg_start": b.load_avg_start,
    }  # fmt: skip
    for stage in (*COMPARED, "original"):
        if stage in b.done:
            entry[stage] = {k: b.done[stage][k] for k in keys if k in b.done[stage]}
    if "ort" in b.done:
        entry["ort_cpu_fps_ratio_b1"] = b.done["ort"]["fps_ratio_b1"]  # joint over the dense original
        entry["ort_timing"] = b.done["ort"]["timing"]
    if all(s in entry for s in COMPARED):
        t, j = entry["train_then_prune"], entry["joint"]
        entry["targets"] = {
            "params_ratio": j["params"] / t["params"],
            "ap50_diff": j["ap50"] - t["ap50"],
            "cpu_ratio": j["cpu_s"] / t["cpu_s"],
            "params_within_1.2x": j["params"] <= 1.2 * t["params"],
            "ap50_within_1": j["ap50"] >= t["ap50"] - 1.0,
            "cpu_le_0.6x": j["cpu_s"] <= 0.6 * t["cpu_s"],
        }
    res[b.args.data if not b.args.smoke else f"{b.args.data}_smoke"] = entry
    save_result(path, res, render)


def render(res: dict[str, Any]) -> str:
    lines = ["# Prune while training (joint) against train-then-prune, SSD300-VGG16-BN from scratch", ""]
    for key, e in res.items():
        lines += [f"## {key}", "", f"`{e['command']}`", "",
                  f"{e['data']['train_images']} train / {e['data']['val_images']} val / {e['data']['test_images']} "
                  f"test images, width {e['model']['width']}; {e['machine'].get('cpu')} ({e['machine'].get('cpu_count')} "
                  f"cores), load average at start {e.get('load_avg_start')}.", ""]  # fmt: skip
        body = []
        for s in [s for s in (*COMPARED, "original") if s in e]:
            r, dense = e[s], s == "original"
            body.append(["original (dense, same epochs)" if dense else s, f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}",
                         f"{r['ap50']:.2f} ± {r.get('ap50_se', 0):.2f}", "-" if dense else f"{r['cpu_s']:.0f}",
                         "-" if dense else f"{r['wall_s']:.0f}", str(r.get("epochs"))])  # fmt: skip
        head = ["schedule", "params", "MMACs", "test AP50 ± SE", "CPU s", "wall s", "epochs"]
        lines.append(markdown_table(head, body))
        if "ort_cpu_fps_ratio_b1" in e:
            t = e["ort_timing"]
            lines += ["", f"ONNX Runtime CPU, batch 1, interleaved: joint {t['joint']['fps']:.1f} img/s, dense original "
                      f"{t['original']['fps']:.1f} img/s: **{e['ort_cpu_fps_ratio_b1']:.2f}x**."]  # fmt: skip
        if e.get("note"):
            lines += ["", f"Note: {e['note']}"]
        if "source" in e.get("train_then_prune", {}):
            lines += ["", f"train_then_prune: {e['train_then_prune']['source']}."]
        if "targets" in e:
            t = e["targets"]
            lines += ["", f"joint / train_then_prune: params {t['params_ratio']:.2f}x (target <= 1.2: "
                      f"{'met' if t['params_within_1.2x'] else 'NOT met'}), AP50 {t['ap50_diff']:+.2f} points (target "
                      f">= -1: {'met' if t['ap50_within_1'] else 'NOT met'}), CPU {t['cpu_ratio']:.2f}x (target <= 0.6: "
                      f"{'met' if t['cpu_le_0.6x'] else 'NOT met'})."]  # fmt: skip
        j = e.get("joint")
        if j and j.get("points") and "trace_final" in j:
            trace = {"final": j["trace_final"], "original": j["trace_original"], "stopped": j.get("stopped"),
                     "points": j["points"]}  # fmt: skip
            lines += [
                "",
                trace_markdown(trace).replace(
                    "## Pruned while training", "### The joint run's pruning points"
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    load = list(os.getloadavg())
    b = make_stages(args)
    b.load_avg_start = load  # type: ignore[attr-defined]
    b.stamp(f"load average at start {load}")
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {STAGES}")
        if stage in b.done:
            b.stamp(f"{stage}: reused from {b.saved}")
        else:
            globals()[f"stage_{stage}"](b)
        write_result(b)


if __name__ == "__main__":
    main()
