"""``prunekit compress-and-export``: the one command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from prunekit.cli.common import UserError, friendly_errors
from prunekit.cli.options import dataclass_options
from prunekit.pipeline import PIPELINE_HELP, PIPELINE_JOINT, PIPELINE_PRUNE, RUN_CHOICES, PipelineConfig
from prunekit.prune.config import FIELD_CHOICES, FIELD_HELP, JOINT_HELP, JointConfig, PruneConfig
from prunekit.prune.search import SEARCH_HELP, SearchConfig


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
@dataclass_options(PipelineConfig, PIPELINE_HELP, RUN_CHOICES, exclude=("prune", "joint", "search"))
@dataclass_options(SearchConfig, help=SEARCH_HELP)
@dataclass_options(PruneConfig, FIELD_HELP, FIELD_CHOICES, exclude=("seed",), defaults=PIPELINE_PRUNE)
@dataclass_options(JointConfig, JOINT_HELP, prefix="joint_", defaults=PIPELINE_JOINT)
@click.option(
    "--resume", is_flag=True,
    help="Continue a run in --out: reuse each stage whose settings, model file, data files and outputs are "
    "unchanged; rerun from the first that differs.",
)  # fmt: skip
@click.option(
    "--force", is_flag=True,
    help="Replace a previous run in --out: deletes only what prunekit wrote there (refused for any other folder).",
)  # fmt: skip
@friendly_errors
def compress_and_export(out: Path, config_file: Path | None, resume: bool, force: bool, **opts: Any) -> None:
    """Compress a trained SSD/VGG16 and leave a verified ONNX, engines and a side-by-side benchmark.

    With only --out it runs the embedded default: a synthetic VOC-format set and a narrow SSD300
    trained here first.
    """
    from prunekit.cli.options import collect
    from prunekit.pipeline import Interrupted, run_pipeline

    if resume and force:
        raise UserError("--resume and --force contradict each other; pick one")
    values: dict[str, Any] = PipelineConfig.from_yaml(config_file) if config_file else {}
    # --seed is the run's, which passes it on to the method (collected as the method's only, it
    # left the model's initialisation and data order unseeded)
    values = collect(PipelineConfig, opts, values)
    values["prune"] = collect(PruneConfig, opts, values.get("prune"))
    values["joint"] = collect(JointConfig, opts, values.get("joint"), prefix="joint_")
    values["search"] = collect(SearchConfig, opts, values.get("search"))
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
