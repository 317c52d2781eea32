"""``prunekit quantize``: an FP32 ONNX model to a Q/DQ INT8 ONNX, calibrated on real images."""

from __future__ import annotations

from pathlib import Path

import click

from prunekit.cli.common import UserError, friendly_errors
from prunekit.deploy.quantize import TARGETS, QuantizeConfig


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    required=True,
    help="Calibration images: a dataset spec (voc:DIR, cifar10:DIR...) or an image folder.",
)
@click.option(
    "--split", default="train", show_default=True, help="Dataset split the calibration images come from."
)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Output [MODEL stem + _int8.onnx].")
@click.option(
    "--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True,
    help="How activation ranges are read from the calibration images.",
)  # fmt: skip
@click.option("--calib-images", type=int, default=256, show_default=True)
@click.option("--calib-batch", type=int, default=8, show_default=True)
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --method percentile.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option(
    "--quantize-heads", is_flag=True,
    help="Quantize the last layers too (SSD box/score heads, the classifier's last layer); float by default.",
)  # fmt: skip
@click.option(
    "--target", type=click.Choice(TARGETS), default=QuantizeConfig.target, show_default=True,
    help="tensorrt: int8 symmetric Q/DQ on the compute layers' inputs, float bias (TensorRT's explicit "
    "quantization; also runs on ORT CPU/CUDA). ort-cpu: uint8 activations with ReLU and pooling in INT8, "
    "faster on x86 (VNNI) CPUs; TensorRT rejects it.",
)  # fmt: skip
@click.option("--exclude", multiple=True, help="Node name or glob pattern to keep in float (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which calibration images are drawn.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@friendly_errors
def quantize_cmd(
    model: str,
    data: str,
    split: str,
    out_path: str | None,
    method: str,
    calib_images: int,
    calib_batch: int,
    percentile: float,
    per_tensor: bool,
    quantize_heads: bool,
    target: str,
    exclude: tuple[str, ...],
    seed: int,
    force: bool,
) -> None:
    """Quantize MODEL (a prunekit FP32 ONNX) to INT8 with Q/DQ nodes (ONNX Runtime's static quantizer).

    The Q/DQ file runs on ONNX Runtime CPU/CUDA and builds TensorRT engines with explicit
    quantization. Weights per channel, symmetric; activations symmetric (``--target ort-cpu``:
    uint8, for x86 CPUs only), calibrated on real images; the last layers and the SSD decode/NMS
    stay float unless asked.
    """
    from prunekit.deploy.quantize import calibration_batches, quantize_model
    from prunekit.deploy.runtime import read_metadata

    src = Path(model)
    out = Path(out_path) if out_path else src.with_name(f"{src.stem}_int8.onnx")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to overwrite it")
    meta = read_metadata(src)
    cfg = QuantizeConfig(
        method=method, calib_images=calib_images, calib_batch=calib_batch, per_channel=not per_tensor,
        keep_heads_float=not quantize_heads, exclude=list(exclude), percentile=percentile, target=target,
    )  # fmt: skip
    batches = calibration_batches(data, meta, calib_images, calib_batch, split, seed)
    report = quantize_model(src, out, batches, cfg)
    click.echo(
        f"wrote {out}: {report['size_bytes'] / 1e6:.2f} MB (FP32 {report['source_size_bytes'] / 1e6:.2f} MB), "
        f"{report['quantized_nodes']} of {report['compute_nodes']} compute nodes INT8, "
        f"{report['calibration_images']} calibration images ({method})"
    )
    click.echo(f"kept float: {', '.join(report['kept_float']) or 'none'}")


COMMANDS = [quantize_cmd]
