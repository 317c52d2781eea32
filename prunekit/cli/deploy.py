"""``prunekit build-engine``, ``prunekit verify``, ``prunekit backends``, ``prunekit detect``."""

from __future__ import annotations

import json

import click

from prunekit.cli.common import UserError, friendly_errors


def _unavailable(e: Exception) -> UserError:
    return UserError(str(e))


@click.command("backends")
def backends_cmd() -> None:
    """List the inference backends and why each one that cannot run here is unavailable."""
    from prunekit.deploy import available_backends

    for name, reason in available_backends().items():
        click.echo(f"{name:14s} {'available' if reason is None else 'skipped: ' + reason}")


@click.command("build-engine")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--backend",
    type=click.Choice(["trt", "ort-cuda", "ort-trt", "ort-cpu", "torch-compile"]),
    required=True,
    help="torch-compile builds an AOTInductor .pt2 from the checkpoint (MODEL.pt).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--calib-data", help="INT8 calibration images: an image folder or a dataset spec (voc:DIR...).")
@click.option("--num-calib", type=int, default=64, show_default=True, help="Calibration images.")
@click.option("--calib-batch", type=int, default=8, show_default=True)
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=1, show_default=True)
@click.option("--max-batch", type=int, default=8, show_default=True)
@click.option("--workspace", "workspace_mb", type=int, default=2048, show_default=True, help="MiB.")
@click.option(
    "--opt-level",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimisation level.",
)
@click.option(
    "--device", default="cpu", show_default=True, help="torch-compile: compile for cpu or cuda[:N]."
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Engine folder [MODEL's folder/engines]."
)
@friendly_errors
def build_engine_cmd(
    model: str,
    backend: str,
    precision: str,
    calib_data: str | None,
    num_calib: int,
    calib_batch: int,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_mb: int,
    opt_level: str,
    device: str,
    out_dir: str | None,
) -> None:
    """Build an engine from MODEL.onnx (or MODEL.pt for torch-compile) with its metadata JSON."""
    from prunekit.deploy.base import BackendUnavailable
    from prunekit.deploy.build import build

    try:
        info = build(
            model,
            backend,
            precision,
            out_dir,
            calib_data=calib_data,
            num_calib=num_calib,
            calib_batch=calib_batch,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            workspace_mb=workspace_mb,
            opt_level=opt_level,
            device=device,
        )
    except BackendUnavailable as e:
        raise _unavailable(e) from e
    click.echo(f"{info['engine']}  ({backend}, {precision}; metadata {info['metadata']})")


@click.command("verify")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("onnx_model", type=click.Path(dir_okay=False))
@click.option("--images", type=click.Path(file_okay=False), help="Folder of real images.")
@click.option("--data", help="Dataset spec (voc:DIR, coco:ANN.json,IMAGES, cifar10:DIR, ...).")
@click.option("--split", default="val", show_default=True, help="Dataset split for --data.")
@click.option(
    "--backends",
    default="",
    help="Comma-separated (ort-cpu,ort-cuda,ort-trt,trt,torch-compile); default: every ONNX backend here.",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--num-images", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--engine-dir", type=click.Path(file_okay=False), help="Where TensorRT plans are built/reused.")
@click.option("--out", default="verify.json", show_default=True, type=click.Path(dir_okay=False))
@friendly_errors
def verify_cmd(
    checkpoint: str,
    onnx_model: str,
    images: str | None,
    data: str | None,
    split: str,
    backends: str,
    precision: str,
    num_images: int,
    batch_size: int,
    engine_dir: str | None,
    out: str,
) -> None:
    """Check that ONNX_MODEL on every backend computes what CHECKPOINT computes in PyTorch.

    Exit 0 when all backends are within the precision's tolerance, 1 when one is not (the
    message names the backend, the worst output and the worst image), 2 for bad input.
    """
    from prunekit.deploy.verify import ModelMismatchError, VerificationError, verify

    names = [b.strip() for b in backends.split(",") if b.strip()] or None
    try:
        report = verify(
            checkpoint,
            onnx_model,
            images=images,
            data=data,
            backends=names,
            precision=precision,
            num_images=num_images,
            out=out,
            split=split,
            batch_size=batch_size,
            engine_dir=engine_dir,
        )
    except ModelMismatchError as e:  # two files that do not belong together: bad input, exit 2
        raise UserError(str(e)) from e
    except VerificationError as e:
        raise click.ClickException(str(e)) from e
    for b, entry in report["backends"].items():
        worst = entry["outputs"].get(entry["worst_output"] or "", {})
        line = f"{b:14s} PASS"
        if worst.get("max_abs_error") is not None:
            line += f"  worst {entry['worst_output']}: max abs {worst['max_abs_error']:.3g} cos {worst['cosine']:.6f}"
        if "detections" in entry:
            line += f"  detections matched {entry['detections']['fraction']:.3f}"
        click.echo(line)
    for b, reason in report["skipped"].items():
        click.echo(f"{b:14s} skipped: {reason}")
    click.echo(f"wrote {out}")


@click.command("detect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--out", help="Write the image with boxes drawn.")
@click.option("--json", "json_out", help="Write detections as JSON.")
@click.option("--score", type=float, default=0.3, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "trt"]), default="cpu", show_default=True)
@friendly_errors
def detect_cmd(
    model: str, image: str, out: str | None, json_out: str | None, score: float, device: str
) -> None:
    """Run the torch-free runtime on one image (what `python -m prunekit.deploy.runtime` does)."""
    from prunekit.deploy.runtime import (
        Detector,
        check_output_path,
        detections_to_json,
        draw_detections,
        load_image,
        save_image_atomic,
    )
    from prunekit.fileio import atomic_write_text

    check_output_path(out, "--out", image=True)  # before any work: a typo is not a lost run
    check_output_path(json_out, "--json")
    img = load_image(image)
    try:
        det_model = Detector(model, device=device)
    except RuntimeError as e:
        raise UserError(str(e)) from e
    det = det_model(img)
    if "boxes" not in det:
        raise UserError(f"{model}: a classifier; detect draws boxes for detectors only")
    keep = det["scores"] >= score
    det = {k: v[keep] for k, v in det.items()}
    records = detections_to_json(det, det_model.names, det_model.num_classes)
    for d in records:
        click.echo(f"{d['name']}\t{d['score']:.3f}\t{d['box']}")
    if out:
        save_image_atomic(draw_detections(img, det, det_model.names, det_model.num_classes), out)
    if json_out:
        atomic_write_text(json_out, json.dumps(records, indent=2) + "\n")


COMMANDS = [backends_cmd, build_engine_cmd, verify_cmd, detect_cmd]
