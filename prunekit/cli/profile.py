"""``prunekit profile``: measure a per-layer latency table for cost-aware pruning and budgets."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prunekit.cli.common import friendly_errors


def _load_model(model: str, num_classes: int, width: float):
    from prunekit.models import create_model, load
    from prunekit.models.io import ALIASES, ARCHS

    if Path(model).exists() or model.endswith((".pt", ".pth")):
        return load(model)
    if model in ARCHS or model in ALIASES:
        return create_model(model, num_classes, width)
    raise FileNotFoundError(
        f"{model}: neither a checkpoint file nor a model name ({sorted(ARCHS + tuple(ALIASES))})"
    )


@click.command("profile")
@click.argument("model")
@click.option("--backend", type=click.Choice(["ort-cpu", "torch"]), default="ort-cpu", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (torch backend).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed runs per layer (median).")
@click.option(
    "--sweep",
    default="",
    help="Comma-separated width fractions also measured per layer (e.g. 0.25,0.5,0.75), for estimates.",
)
@click.option("--threads", type=int, default=0, show_default=True, help="ORT intra-op threads (0 = default).")
@click.option("--channels-last", is_flag=True, help="torch: NHWC memory format (GPU tensor cores).")
@click.option("--num-classes", type=int, default=21, show_default=True, help="When MODEL is a model name.")
@click.option("--width", type=float, default=1.0, show_default=True, help="When MODEL is a model name.")
@click.option(
    "--out", "out", type=click.Path(dir_okay=False), required=True, help="Latency table JSON (cache)."
)
@friendly_errors
def profile_cmd(
    model: str,
    backend: str,
    device: str,
    precision: str,
    batch: int,
    warmup: int,
    repeats: int,
    sweep: str,
    threads: int,
    channels_last: bool,
    num_classes: int,
    width: float,
    out: str,
) -> None:
    """Time every prunable conv of MODEL (checkpoint or model name) alone at its real input shape.

    The table is added to --out under a key of backend, device, precision and architecture, and is
    what `--cost latency` and `--target-latency` read.
    """
    from prunekit.prune.profile import profile_model, save_latency_table

    try:
        fractions = tuple(float(s) for s in sweep.split(",") if s.strip())
    except ValueError as e:
        raise ValueError(f"--sweep: expected comma-separated fractions, got {sweep!r}") from e
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError("--repeats and --batch must be >= 1 and --warmup >= 0")
    m = _load_model(model, num_classes, width)
    table = profile_model(
        m,
        backend=backend,
        device=device,
        precision=precision,
        batch=batch,
        warmup=warmup,
        repeats=repeats,
        sweep=fractions,
        threads=threads,
        channels_last=channels_last,
        progress=sys.stderr.isatty(),
    )
    path = save_latency_table(out, table)
    total = table.total_ms
    click.echo(f"{table.key}: {len(table.layers)} layers, {total:.2f} ms in prunable layers -> {path}")
    top = sorted(table.layers.items(), key=lambda kv: -kv[1]["ms"])[:5]
    for name, row in top:
        click.echo(f"  {name:20s} {row['ms']:9.3f} ms  {100 * row['ms'] / total:5.1f} %")


COMMANDS = [profile_cmd]
