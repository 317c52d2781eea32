"""``prunekit bench`` (measure original vs compressed) and ``prunekit report`` (re-render a bench.json)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prunekit.cli.common import UserError, friendly_errors


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as e:
        raise UserError(f"--batch expects comma-separated integers, got {value!r}") from e


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--backends",
    default="ort-cpu",
    show_default=True,
    help="Comma-separated deploy backends, optionally with precision: ort-cpu,torch,torch:fp16,trt:int8.",
)
@click.option("--batch", "batch", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option(
    "--data", "data_spec", default=None, help="Dataset spec for accuracy (synth, voc:DIR, coco:ANN,IMG...)."
)
@click.option("--split", default="val", show_default=True)
@click.option("--max-images", type=int, default=50, show_default=True, help="Images used for accuracy.")
@click.option(
    "--labels", default=None, help="Comma-separated labels, one per model (default: original,compressed...)."
)
@click.option("--reference", default=None, help="Label the others are compared with (default: the first).")
@click.option("--out", "out_dir", default="bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--warmup", type=int, default=5, show_default=True, help="Warm-up calls per model.")
@click.option("--warmup-time", type=float, default=0.0, show_default=True, help="Minimum warm-up seconds.")
@click.option("--min-iters", type=int, default=20, show_default=True, help="Minimum timed calls per model.")
@click.option(
    "--min-time", type=float, default=1.0, show_default=True, help="Minimum timed seconds per model."
)
@click.option(
    "--max-time", type=float, default=60.0, show_default=True, help="Cap on timing seconds (all models)."
)
@click.option("--device", default=None, help="Device for torch backends (cpu, cuda, cuda:1).")
@click.option("--form", "export_form", type=click.Choice(["raw", "decoded"]), default="raw", show_default=True,
              help="ONNX form exported for checkpoints run on ONNX backends.")  # fmt: skip
@friendly_errors
def bench(
    models: tuple[str, ...],
    backends: str,
    batch: str,
    data_spec: str | None,
    split: str,
    max_images: int,
    labels: str | None,
    reference: str | None,
    out_dir: str,
    warmup: int,
    warmup_time: float,
    min_iters: int,
    min_time: float,
    max_time: float,
    device: str | None,
    export_form: str,
) -> None:
    """Benchmark MODEL files (checkpoints, ONNX or plans) side by side: speed, memory, size, accuracy.

    Writes OUT/bench.json, OUT/REPORT.md and plots; prints the tables.
    """
    from prunekit.bench import TimingConfig, run_benchmark
    from prunekit.bench.report import terminal_tables
    from prunekit.deploy import BACKENDS

    for b in _csv(backends):  # checked before any model is loaded: a typo is not a skipped backend
        name, _, precision = b.partition(":")
        if name not in BACKENDS:
            raise UserError(f"--backends: unknown backend {name!r}; expected some of {', '.join(BACKENDS)}")
        if precision and precision not in ("fp32", "fp16", "int8"):
            raise UserError(
                f"--backends: unknown precision {precision!r} in {b!r}; expected fp32, fp16 or int8"
            )
    names = _csv(labels) if labels else _default_labels(len(models))
    if len(names) != len(models):
        raise UserError(f"--labels has {len(names)} names for {len(models)} models")
    if len(set(names)) != len(names):
        raise UserError(f"--labels must be unique, got {names}")
    timing = TimingConfig(
        warmup_iters=warmup,
        warmup_time_s=warmup_time,
        min_iters=min_iters,
        min_time_s=min_time,
        max_time_s=max_time,
    )
    result = run_benchmark(
        dict(zip(names, models)),
        backends=_csv(backends),
        batch_sizes=_ints(batch),
        data_spec=data_spec,
        out_dir=out_dir,
        timing=timing,
        max_images=max_images,
        reference=reference,
        split=split,
        export_form=export_form,
        device=device,
        progress=sys.stderr.isatty(),
    )
    click.echo(terminal_tables(result))
    for s in result["skipped"]:
        click.echo(
            f"skipped {s['backend']}{' / ' + s['model'] if s.get('model') else ''}: {s['reason']}", err=True
        )
    for f in result["failed"]:
        click.echo(f"FAILED {f['backend']} / {f['model']} ({f['stage']}): {f['error']}", err=True)
    click.echo(f"wrote {Path(out_dir) / 'bench.json'} and {Path(out_dir) / 'REPORT.md'}")


def _default_labels(n: int) -> list[str]:
    if n == 1:
        return ["model"]
    if n == 2:
        return ["original", "compressed"]
    return ["original", *[f"compressed{i}" for i in range(1, n)]]


@click.command("report")
@click.argument("bench_json", type=click.Path(dir_okay=False))
@click.option(
    "--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Default: beside the JSON."
)
@friendly_errors
def report(bench_json: str, out_dir: str | None) -> None:
    """Re-render REPORT.md and the plots from a bench.json (no measuring)."""
    from prunekit.bench.report import load_bench, render_report, terminal_tables

    path = render_report(bench_json, out_dir)
    click.echo(terminal_tables(load_bench(bench_json)))
    click.echo(f"wrote {path}")


COMMANDS = [bench, report]
