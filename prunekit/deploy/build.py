"""``prunekit build-engine``: one ONNX (or checkpoint) in, one engine + its metadata JSON out.

Every engine file gets ``<engine>.json`` beside it (backend, precision, input spec, batch
profile, library versions, source hash), so a directory of engines explains itself and a
benchmark can refuse to compare engines built from different models.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.base import BackendUnavailable
from prunekit.fileio import atomic_write_json

log = logging.getLogger(__name__)

BUILD_BACKENDS = ("trt", "ort-cpu", "ort-cuda", "ort-trt", "torch-compile")


def engine_metadata_path(engine: str | os.PathLike) -> Path:
    p = Path(engine)
    return p.with_name(p.name + ".json")


def calibration_batches(
    source: str | os.PathLike,
    meta: dict[str, Any],
    num_images: int = 64,
    batch: int = 8,
    split: str = "train",
) -> list[np.ndarray]:
    """Real images from ``source`` (folder or dataset spec), preprocessed as the model expects."""
    from prunekit.deploy.images import load_images
    from prunekit.deploy.runtime import preprocess_float

    images, _ = load_images(source, num_images, split=split)
    x = np.concatenate([preprocess_float(im, meta) for im in images])
    if len(x) < batch:
        batch = len(x)
    n = len(x) // batch * batch  # TensorRT's calibrator wants equal batches
    return [x[i : i + batch] for i in range(0, n, batch)]


def build(
    model_path: str | os.PathLike,
    backend: str,
    precision: str = "fp32",
    out_dir: str | os.PathLike | None = None,
    calib_data: str | None = None,
    num_calib: int = 64,
    calib_batch: int = 8,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mb: int = 2048,
    opt_level: str = "all",
    device: str = "cpu",
) -> dict[str, Any]:
    """Build the engine of ``backend`` for ``model_path`` into ``out_dir``; returns its metadata.

    Raises :class:`BackendUnavailable` when the backend cannot run here (never builds for
    another backend instead) and ``ValueError`` for a precision the backend does not offer.
    """
    if backend not in BUILD_BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; expected one of {', '.join(BUILD_BACKENDS)}")
    from prunekit.deploy import backend_unavailable

    reason = backend_unavailable(backend)
    if reason:
        raise BackendUnavailable(backend, reason)
    src = Path(model_path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: model not found")
    out = Path(out_dir) if out_dir else src.parent / "engines"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if backend == "torch-compile":
        return _build_aoti(src, out, precision, max_batch, device)
    if src.suffix != ".onnx":
        raise ValueError(f"{src}: {backend} builds from an ONNX model (prunekit export), not {src.suffix}")
    from prunekit.deploy.runtime import read_metadata

    meta = read_metadata(src)
    if backend == "trt":
        from prunekit.deploy.trt import build_engine

        calib = None
        if precision == "int8" and calib_data:
            calib = calibration_batches(calib_data, meta, num_calib, calib_batch)
        plan = out / f"{src.stem}.{precision}.plan"
        info = build_engine(
            src,
            plan,
            precision,
            min_batch,
            opt_batch,
            max_batch,
            workspace_mb,
            calib_batches=calib,
            calib_cache=out / f"{src.stem}.int8.calib" if precision == "int8" else None,
            timing_cache=out / "timing.cache",
        )
        return {"engine": str(plan), "metadata": str(engine_metadata_path(plan)), **info}
    return _build_ort(
        src, out, backend, precision, meta, (min_batch, opt_batch, max_batch), workspace_mb, opt_level, t0
    )


def _build_ort(
    src: Path,
    out: Path,
    backend: str,
    precision: str,
    meta: dict[str, Any],
    batch: tuple[int, int, int],
    workspace_mb: int,
    opt_level: str,
    t0: float,
) -> dict[str, Any]:
    from prunekit.deploy.ort import OrtRunner
    from prunekit.fileio import file_sha256

    engine = out / f"{src.stem}.{backend}.{precision}.onnx"
    kw: dict[str, Any] = {}
    tmp: Path | None = engine.with_name(f".{engine.name}.tmp")
    if backend == "ort-trt":
        # The EP keeps its engines in its own cache (trt_engine_cache_path), keyed on the model and
        # the GPU; ONNX Runtime refuses to save an optimised model holding TensorRT nodes, so the
        # engine here is that cache folder, described by the JSON beside it.
        h, w = meta["input_size"]
        engine = out / f"{src.stem}.ort-trt-cache"
        kw = dict(cache_dir=engine, workspace_mb=workspace_mb, chw=(3, h, w), batch=batch)
        kw["input_name"] = meta.get("input_name", "images")
        tmp = None
    runner = OrtRunner(src, backend, precision, opt_level=opt_level, optimized_model_path=tmp, **kw)
    with runner:
        # One inference: the TensorRT EP builds (and caches) its engines lazily on the first run.
        spec = runner.input_spec[0]
        shape = [batch[1] if isinstance(d, str) else int(d) for d in spec.shape]
        runner.infer({spec.name: np.zeros(shape, np.float32)})
        info = dict(runner.info.extra)
        precision = runner.precision  # a Q/DQ model runs INT8 whatever was asked
    if tmp is not None:
        os.replace(tmp, engine)
    h, w = meta.get("input_size", [None, None])
    result = {
        "format": "prunekit-ort-engine",
        "engine": str(engine),
        "metadata": str(engine_metadata_path(engine)),
        "backend": backend,
        "precision": precision,
        "opt_level": opt_level,
        "providers": info.get("providers"),
        "onnxruntime_version": info.get("onnxruntime"),
        "inputs": [{"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}],
        "input_size": [h, w],
        "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "source_onnx": str(src),
        "source_onnx_sha256": file_sha256(src),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "model_metadata": meta,
    }
    atomic_write_json(engine_metadata_path(engine), result)
    log.info("wrote %s (%s, graph optimisation %s)", engine, backend, opt_level)
    return result


def _build_aoti(src: Path, out: Path, precision: str, max_batch: int, device: str) -> dict[str, Any]:
    if src.suffix != ".pt":
        raise ValueError(
            f"{src}: torch-compile builds an AOTInductor package from the PyTorch checkpoint (.pt)"
        )
    from prunekit.deploy.torch_runner import aoti_metadata_path, export_aoti

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"torch-compile packages are fp32 or fp16, not {precision}")
    package = out / f"{src.stem}.{device.split(':')[0]}.{precision}.pt2"
    info = export_aoti(src, package, device=device, max_batch=max_batch, precision=precision)
    return {
        "engine": str(package),
        "metadata": str(aoti_metadata_path(package)),
        "backend": "torch-compile",
        **info,
    }
