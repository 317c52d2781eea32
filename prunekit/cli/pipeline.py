"""``prunekit compress-and-export``: the one command."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from prunekit.cli.common import UserError, friendly_errors
from prunekit.cli.prune import prune_config_options
from prunekit.cli.train import joint_options
from prunekit.pipeline import JOINT_MIN_EPOCHS


def _ints(s: str | None) -> list[int] | None:
    return None if s is None else [int(x) for x in s.split(",") if x]


def _strs(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


@click.command("compress-and-export")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory (artifacts, manifest).",
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML with any of the options below."
)
@click.option(
    "--model", help="ssd300 | ssd512 | vgg16, or a prunekit checkpoint (.pt). Default: ssd300 trained here."
)
@click.option("--weights", help="Plain state dict for a named model (e.g. torchvision's SSD300 COCO .pth).")
@click.option("--width", type=float, help="Channel width multiplier for a model built here.")
@click.option(
    "--data",
    help="synth | voc:DIR | yolo:DATA.yaml | coco:ANN.json,IMAGES | gtsdb:DIR | cifar10:DIR | folder:DIR",
)
@click.option(
    "--skip-bad", is_flag=True, default=None, help="Skip malformed annotations (counted) instead of failing."
)
@click.option("--phases", help="Phase preset (ssd300, ssd512, vgg16) or a YAML/JSON file of layer names.")
@prune_config_options
@click.option(
    "--schedule", type=click.Choice(["auto", "post", "joint"]),
    help="post: train (or take) the original, then prune it; joint: prune while training; "
    f"auto (default): joint when the original is trained here for at least {JOINT_MIN_EPOCHS} epochs, else post.",
)  # fmt: skip
@joint_options
@click.option(
    "--epochs-train",
    type=int,
    help="Epochs for an original trained here (default: sized by --train-steps, then restarts to a plateau).",
)
@click.option("--train-steps", type=int, help="Optimizer steps that size the default schedule (700).")
@click.option(
    "--max-train-steps",
    type=int,
    help="Cap on all steps, restarts included, while the validation metric still moves (2400).",
)
@click.option("--plateau", type=float, help="Points between the last two epochs that count as settled (1.0).")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--prune-lr", type=float, help="Sparsity stages' peak lr (default: --lr).")
@click.option("--retrain-lr", type=float, help="Retraining stages' peak lr (default: --lr).")
@click.option(
    "--backends", help="Comma-separated: ort-cpu,ort-cuda,ort-trt,trt,torch (default: all available)."
)
@click.option("--precision", help="Comma-separated: fp32,fp16,int8.")
@click.option(
    "--int8-target", type=click.Choice(["portable", "ort-cpu"]),
    help="INT8 layout: portable (int8 symmetric; ORT and TensorRT, the default) or ort-cpu (uint8 "
    "activations, ReLU/pooling in INT8; faster on x86 CPUs, not for TensorRT).",
)  # fmt: skip
@click.option("--bench-batch", help="Comma-separated batch sizes for the benchmark.")
@click.option("--device", help="cpu | cuda | cuda:N")
@click.option("--seed", type=int)
@click.option(
    "--force-compress", is_flag=True, default=None,
    help="Compress even an original whose validation metric is near chance (refused by default).",
)  # fmt: skip
@click.option(
    "--control/--no-control", default=None,
    help="Train the original for the compressed model's extra epochs, to judge it against (default: on "
    "when the original is trained here; pruned while training, the original itself is the control).",
)  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue a run in --out from its last completed stage.")
@click.option("--force", is_flag=True, help="Delete an existing --out and start over.")
@friendly_errors
def compress_and_export(out: Path, config_file: Path | None, resume: bool, force: bool, **opts: Any) -> None:
    """Compress a trained SSD/VGG16 and leave a verified ONNX, engines and a side-by-side benchmark.

    With only --out it runs the embedded default: a synthetic VOC-format set and a narrow SSD300
    trained here first.
    """
    from prunekit.pipeline import Interrupted, PipelineConfig, run_pipeline

    if resume and force:
        raise UserError("--resume and --force contradict each other; pick one")
    from prunekit.cli.options import collect, given_names
    from prunekit.prune.config import PruneConfig
    from prunekit.prune.joint import JointConfig

    values: dict[str, Any] = PipelineConfig.from_yaml(config_file) if config_file else {}
    # an option both the run and the method have (--seed) is the run's, which passes it on to the
    # method: collected as the method's only, it left the model's initialisation and data order unseeded
    run_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    values["prune"] = collect(
        PruneConfig, {k: v for k, v in opts.items() if k not in run_fields}, values.get("prune")
    )
    values["joint"] = collect(JointConfig, opts, values.get("joint"), prefix="joint_")
    method_fields = {f.name for f in dataclasses.fields(PruneConfig)} - run_fields
    method_fields |= given_names(JointConfig, "joint_")
    convert = {"backends": _strs, "precision": _strs, "bench_batch": _ints}
    for key, val in opts.items():
        if val is not None and key not in method_fields:
            values[key] = convert.get(key, lambda v: v)(val)
    cfg = PipelineConfig(**values)
    try:
        manifest = run_pipeline(cfg, out, resume=resume, force=force)
    except Interrupted as e:
        click.echo(f"Interrupted ({e}); {out}/manifest.json records where. Continue with --resume.", err=True)
        sys.exit(130)
    _print_summary(out, manifest)


def _print_summary(out: Path, manifest: Any) -> None:
    from prunekit import distributed as D

    if not D.is_main_process():
        return
    bench = out / "bench.json"
    if bench.is_file():
        from prunekit.bench.report import load_bench, terminal_tables

        click.echo("\n" + terminal_tables(load_bench(bench)))
    from prunekit.summary import render_summary

    click.echo("\n" + render_summary(out, manifest))
    report = out / "REPORT.md"
    click.echo(f"\nreport: {report if report.is_file() else out}", file=sys.stdout)


COMMANDS = [compress_and_export]
