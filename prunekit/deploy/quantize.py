"""INT8 by explicit quantization: an ONNX model with Q/DQ nodes, calibrated on real images.

Why Q/DQ (ONNX Runtime's ``QuantFormat.QDQ``) and not a backend's own calibrator: the one file
serves ONNX Runtime CPU, ONNX Runtime CUDA and TensorRT (which builds explicitly quantized
networks from Q/DQ graphs; its implicit calibrator path was deprecated in 10.1 and is gone in
11). Choices, each for a deployment reason:

- weights per output channel, symmetric (TensorRT accepts only zero-point 0 scales);
- activations symmetric too, for the same reason (``ActivationSymmetric``);
- ``target="tensorrt"`` follows TensorRT's explicit-quantization rules to the letter: biases stay
  float (``QuantizeBias=False``: TensorRT's parser rejects a DequantizeLinear of an INT32 bias) and
  Q/DQ sit on the inputs of the compute layers only, never on their outputs
  (``OpTypesToExcludeOutputQuantization``), where they would split a Conv from its ReLU. Checked
  by :mod:`prunekit.deploy.trt_lint`, which finds nothing in such a model;
- only ``Conv``/``Gemm``/``MatMul`` are quantized: the SSD decode and NMS subgraph, which
  works on box coordinates and scores, stays float without a rule for it;
- the *last* compute layers (the ones whose outputs reach a graph output with no other
  Conv/Gemm on the way: SSD's box and score heads, a classifier's last layer) stay float by
  default: their outputs are the detections, and INT8 there costs the most accuracy for the
  least compute;
- activation ranges come from real training images of the same dataset object the pipeline
  trained on (MinMax, Entropy or Percentile), never random tensors.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.onnx_graph import QUANTIZED_OPS, downstream_of, head_nodes, input_nodes
from prunekit.deploy.trt_lint import as_dicts, lint_onnx

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# What stays INT8 between the compute layers for ``target="ort-cpu"``: activations and pooling.
# The rest of ORT's QDQ registry (Reshape, Transpose, Gather, ...) is what the SSD decode is made
# of; nothing downstream of the heads is quantized in either target.
CPU_CHAIN_OPS = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten")
TARGETS = ("tensorrt", "ort-cpu")


@dataclass
class QuantizeConfig:
    """How a model is quantized; stored in the output's metadata so the artifact says how it was made."""

    method: str = "minmax"
    calib_images: int = 256
    calib_batch: int = 8
    per_channel: bool = True
    keep_heads_float: bool = True
    exclude: list[str] = field(default_factory=list)  # node names or fnmatch patterns
    percentile: float = 99.999
    target: str = "tensorrt"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"quantization target must be one of {TARGETS}, got {self.target!r}")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if self.calib_images < 1:
            raise ValueError(f"calib_images must be >= 1, got {self.calib_images}")


class QuantizationError(ValueError):
    """The model cannot be quantized as asked (no calibration data, nothing to quantize...)."""


def _excluded(model: Any, cfg: QuantizeConfig) -> list[str]:
    names = [n.name for n in model.graph.node]
    heads = head_nodes(model)
    out = set(heads) if cfg.keep_heads_float else set()
    if cfg.target == "ort-cpu":
        # The layer reading the image stays float: 3 input channels give the INT8 kernel too short a
        # reduction to pay for itself (measured, BCCD SSD300 batch 1: the original 2.03x -> 2.17x
        # its FP32 throughput, the pruned one 2.80x -> 3.09x, with that layer float). The decode
        # after the heads stays float too (see CPU_CHAIN_OPS).
        out.update(input_nodes(model))
        chain = {n.name for n in model.graph.node if n.op_type in CPU_CHAIN_OPS}
        out.update(chain & set(downstream_of(model, heads)))
    for pattern in cfg.exclude:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise QuantizationError(f"--exclude {pattern!r} matches no node of the model")
        out.update(hits)
    return sorted(out)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str):
        self._batches, self._name, self._i = list(batches), input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {self._name: self._batches[self._i - 1]}

    def rewind(self) -> None:
        self._i = 0


def dataset_batches(
    dataset: Any, meta: dict[str, Any], num_images: int, batch: int, seed: int = 0
) -> list[np.ndarray]:
    """``num_images`` seeded random items of a prunekit dataset, preprocessed as the ONNX input.

    Pass the split built without training augmentation (``build_dataset(spec, "train")``):
    calibration needs the distribution the deployed model sees, not augmented crops.
    """
    from prunekit.deploy.runtime import preprocess_float

    n = len(dataset)
    if n == 0:
        raise QuantizationError("the calibration dataset is empty")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[: min(num_images, n)]
    xs = []
    for i in idx:
        item = dataset[int(i)]
        img = item[0] if isinstance(item, tuple | list) else item
        chw = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
        if chw.dtype == np.uint8:
            chw = chw.astype(np.float32) / 255.0
        xs.append(preprocess_float(chw, meta))
    x = np.concatenate(xs).astype(np.float32)
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def calibration_batches(
    source: str | os.PathLike,
    meta: dict[str, Any],
    num_images: int,
    batch: int,
    split: str = "train",
    seed: int = 0,
) -> list[np.ndarray]:
    """Calibration batches from a dataset spec (seeded random images, no augmentation) or an image folder."""
    from prunekit.deploy.images import image_files, load_images
    from prunekit.deploy.runtime import preprocess_float

    if Path(source).is_dir() and image_files(source):
        images, _ = load_images(source, num_images)
        x = np.concatenate([preprocess_float(im, meta) for im in images])
        return [x[i : i + batch] for i in range(0, len(x), batch)]
    from prunekit.data import build_dataset

    return dataset_batches(build_dataset(str(source), split, train=False), meta, num_images, batch, seed)


def quantize_model(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    batches: Iterable[np.ndarray],
    cfg: QuantizeConfig | None = None,
) -> dict[str, Any]:
    """Quantize ``model_path`` (a prunekit FP32 ONNX) to a Q/DQ INT8 ONNX at ``out_path``.

    ``batches``: preprocessed float32 NCHW calibration batches (see :func:`dataset_batches`).
    The output keeps the source's prunekit metadata (so every runner, ``verify`` and ``bench``
    treat it as the same model) plus ``prunekit_precision = "int8"`` and the settings used; it is
    written atomically. Returns a report: nodes quantized / kept float, sizes, time.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cfg = cfg or QuantizeConfig()
    src, out = Path(model_path), Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: model not found")
    model = onnx.load(str(src), load_external_data=False)
    if any(p.key == "prunekit_precision" and json.loads(p.value) == "int8" for p in model.metadata_props):
        raise QuantizationError(f"{src}: already an INT8 model")
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    if not batches:
        raise QuantizationError(f"{src}: no calibration images")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quantize-") as tmp:
        # ONNX Runtime's own pre-processing (shape inference, Conv+BN and constant folding): the
        # quantizer's ranges and its Q/DQ placement are defined on the optimised graph
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        report = _quantize(onnx.load(str(pre)), model, pre, out, batches, cfg, Path(tmp))
    report["model"], report["source_size_bytes"] = str(src), src.stat().st_size
    log.info(
        "wrote %s: %.2f MB (FP32 %.2f MB, %.2fx smaller), %d Q/DQ nodes",
        out, report["size_bytes"] / 1e6, report["source_size_bytes"] / 1e6,
        report["source_size_bytes"] / max(report["size_bytes"], 1), report["qdq_nodes"],
    )  # fmt: skip
    return report


def _quantize(
    model: Any, source: Any, pre: Path, out: Path, batches: list[np.ndarray], cfg: QuantizeConfig, tmp: Path
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    compute = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    if not compute:
        raise QuantizationError(f"{out}: the model has no Conv/Gemm/MatMul node to quantize")
    excluded = _excluded(model, cfg)
    kept_float = sorted(set(excluded) & set(compute))
    if not set(compute) - set(excluded):
        raise QuantizationError(f"{out}: every Conv/Gemm/MatMul node is excluded; nothing to quantize")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[cfg.method]
    if cfg.target == "ort-cpu":
        # uint8 activations, asymmetric: a ReLU's range then starts at the zero point, so ORT folds
        # the ReLU into the quantization and the INT8 chain runs Conv to Conv without Q/DQ between
        # (measured on the pruned BCCD SSD300, AVX-512 VNNI: 1.2x faster than the int8 symmetric layout).
        act_type, act_sym, ops = QuantType.QUInt8, False, [*QUANTIZED_OPS, *CPU_CHAIN_OPS]
    else:
        # int8, symmetric, zero point 0, float bias, inputs only: what TensorRT's explicit
        # quantization accepts (prunekit.deploy.trt_lint finds nothing in it)
        act_type, act_sym, ops = QuantType.QInt8, True, list(QUANTIZED_OPS)
    extra: dict[str, Any] = {"ActivationSymmetric": act_sym, "WeightSymmetric": True}
    if cfg.target == "tensorrt":
        extra |= {"QuantizeBias": False, "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    n_images = sum(len(b) for b in batches)
    log.info(
        "quantize: %s calibration on %d images, %d of %d compute nodes INT8 (%d kept float)",
        cfg.method, n_images, len(set(compute) - set(excluded)), len(compute), len(kept_float),
    )  # fmt: skip
    t0 = time.perf_counter()
    staged = tmp / "int8.onnx"
    quantize_static(
        str(pre), str(staged), _Reader(batches, model.graph.input[0].name), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops, per_channel=cfg.per_channel,
        activation_type=act_type, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
        calibrate_method=method, extra_options=extra,
    )  # fmt: skip
    q = onnx.load(str(staged))
    settings = {**asdict(cfg), "calibration_images": n_images, "kept_float": kept_float}
    _set_metadata(q, source, {"prunekit_precision": "int8", "prunekit_quantization": settings})
    onnx.checker.check_model(q)
    final = tmp / "final.onnx"
    onnx.save(q, str(final))
    os.replace(final, out)
    lint = lint_onnx(q)
    if lint and cfg.target == "tensorrt":
        log.warning("%s: TensorRT lint: %d finding(s); first: %s", out, len(lint), lint[0])
    return {
        "output": str(out),
        "target": cfg.target,
        "tensorrt_lint": as_dicts(lint),
        "method": cfg.method,
        "calibration_images": n_images,
        "compute_nodes": len(compute),
        "quantized_nodes": len(set(compute) - set(excluded)),
        "kept_float": kept_float,
        "qdq_nodes": sum(1 for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")),
        "size_bytes": out.stat().st_size,
        "time_s": round(time.perf_counter() - t0, 2),
    }


def _set_metadata(q: Any, source: Any, extra: dict[str, Any]) -> None:
    props = {p.key: p.value for p in source.metadata_props}
    props.update({k: json.dumps(v) for k, v in extra.items()})
    del q.metadata_props[:]
    for k, v in props.items():
        p = q.metadata_props.add()
        p.key, p.value = k, v


def model_precision(meta: dict[str, Any]) -> str:
    """``"int8"`` for a model this module wrote, else ``"fp32"`` (or what the metadata says)."""
    return str(meta.get("prunekit_precision") or "fp32")
