"""``prunekit export``: a prunekit checkpoint to a clean, checked ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prunekit.cli.common import UserError, friendly_errors


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option(
    "--form",
    type=click.Choice(["raw", "decoded", "trt"]),
    default="raw",
    show_default=True,
    help="raw: network outputs + anchors; decoded: + decode and ONNX NMS; trt: + EfficientNMS_TRT.",
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (>= 17).")
@click.option("--score-thresh", type=float, help="decoded/trt: score threshold [model config].")
@click.option("--iou-thresh", type=float, help="decoded/trt: NMS IoU threshold [model config].")
@click.option("--max-detections", type=int, help="decoded/trt: detections per image [model config].")
@click.option("--no-check", is_flag=True, help="Skip the ONNX Runtime vs PyTorch self-check.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@friendly_errors
def export(
    model: str,
    out: str,
    form: str,
    opset: int,
    score_thresh: float | None,
    iou_thresh: float | None,
    max_detections: int | None,
    no_check: bool,
    as_json: bool,
    force: bool,
) -> None:
    """Export MODEL (a prunekit .pt, stock or pruned) to ONNX with a dynamic batch axis."""
    import prunekit
    from prunekit.export import export_onnx

    if Path(out).exists() and not force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    net = prunekit.load(model)
    summary = export_onnx(
        net,
        out,
        form=form,
        opset=opset,
        source_checkpoint=model,
        score_thresh=score_thresh,
        iou_thresh=iou_thresh,
        max_detections=max_detections,
        check=not no_check,
    )
    from prunekit.deploy.trt_lint import lint_file

    summary.tensorrt_lint = lint_file(summary.path)
    click.echo(json.dumps(summary.to_dict(), indent=2, default=str) if as_json else summary.text())


COMMANDS = [export]
