"""TensorRT through its Python API (TensorRT 10.x and 11, 8.6 where it still works): build plans, run them.

Loaders and runner in Polygraphy's split: :func:`build_engine` turns an ONNX file into a
serialized plan (FP32, FP16, INT8 from a Q/DQ model of ``prunekit quantize`` built strongly typed,
or INT8 with the legacy entropy calibrator where the installed TensorRT still has it; chosen by
:func:`trt_capabilities`, i.e. by what the API offers, not by version strings), with one
optimisation profile for the dynamic batch, a persistent timing cache and a workspace limit, and
writes ``<plan>.json`` beside it. :class:`TrtRunner` runs a plan with cuda-python device buffers
(see :class:`prunekit.deploy.runtime.TrtPlan`) after refusing a plan built by another TensorRT
or for another GPU. TensorRT is imported lazily: nothing here runs on a machine without it, and
nothing pretends to. Torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.base import BackendUnavailable, Runner, RunnerInfo, TensorSpec
from prunekit.deploy.lazy import cuda_device_count, import_cudart, import_optional
from prunekit.deploy.runtime import (
    PlanMismatchError,
    TrtPlan,
    check_plan_compatible,
    cuda_device_info,
    plan_metadata_path,
    read_metadata,
    read_plan_metadata,
)
from prunekit.fileio import atomic_write_bytes, atomic_write_json, file_sha256

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
PLAN_FORMAT = "prunekit-trt-plan"
__all__ = ["PlanMismatchError", "TrtRunner", "build_engine", "check_plan_compatible", "trt_unavailable"]


def _trt() -> Any:
    return import_optional(
        "tensorrt", "trt", "TensorRT needs an NVIDIA GPU: pip install tensorrt cuda-python"
    )


def trt_unavailable() -> str | None:
    """Why TensorRT cannot run here, or None."""
    try:
        _trt()
        import_cudart("trt")
    except BackendUnavailable as e:
        return e.reason
    if cuda_device_count() == 0:
        return "no CUDA device visible (cuda-python reports 0 GPUs)"
    return None


def _make_calibrator(trt: Any, cudart: Any, batches: Sequence[np.ndarray], cache_path: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` over preprocessed real-image batches [B, 3, H, W] float32.

    With an existing cache file TensorRT reads the scales from it and skips calibration, so
    rebuilding an INT8 plan (another GPU, another batch profile) does not need the images again.
    """
    from prunekit.deploy.runtime import _cuda_check

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # required for Python subclasses
            self.batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
            self.index = 0
            nbytes = max((b.nbytes for b in self.batches), default=4)
            self.device_ptr = int(_cuda_check(cudart.cudaMalloc(nbytes)))

        def get_batch_size(self) -> int:
            return int(self.batches[0].shape[0]) if self.batches else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            b = self.batches[self.index]
            self.index += 1
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _cuda_check(cudart.cudaMemcpy(self.device_ptr, b.ctypes.data, b.nbytes, kind))
            return [self.device_ptr]

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                log.info("INT8: reusing calibration cache %s", cache_path)
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                atomic_write_bytes(cache_path, bytes(cache))

        def free(self) -> None:
            if self.device_ptr:
                cudart.cudaFree(self.device_ptr)
                self.device_ptr = 0

    return EntropyCalibrator()


def trt_capabilities(trt: Any) -> dict[str, bool]:
    """What the installed TensorRT offers, read from its API rather than its version string.

    - ``strongly_typed``: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (10.x and 11): layer
      types come from the network (Q/DQ nodes, FP16 tensors in the ONNX), no precision flags;
    - ``precision_flags``: ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` (8.x-10.x; gone in 11);
    - ``implicit_int8``: the calibrator API (``IInt8EntropyCalibrator2``; deprecated in 10.1,
      removed in 11).
    """
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    flags = getattr(trt, "BuilderFlag", None)
    return {
        "strongly_typed": creation is not None and hasattr(creation, "STRONGLY_TYPED"),
        "precision_flags": flags is not None and hasattr(flags, "FP16") and hasattr(flags, "INT8"),
        "implicit_int8": hasattr(trt, "IInt8EntropyCalibrator2")
        and flags is not None
        and hasattr(flags, "INT8"),
    }


def onnx_has_qdq(onnx_path: str | os.PathLike) -> bool:
    """Whether the ONNX graph carries its own quantization (``prunekit quantize``'s Q/DQ nodes)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def qdq_incompatibility(onnx_path: str | os.PathLike) -> str | None:
    """Why TensorRT would reject this Q/DQ graph, or None: the quantization errors of
    :mod:`prunekit.deploy.trt_lint` (uint8 or non-zero zero points from a ``--target ort-cpu``
    model, an INT32 bias behind a DequantizeLinear, unpaired Q/DQ, weights along the wrong axis)."""
    from prunekit.deploy.trt_lint import lint_onnx

    errors = [
        f for f in lint_onnx(onnx_path)
        if f.severity == "error" and (f.rule.startswith(("qdq-", "dq-")) or f.rule == "weight-axis")
    ]  # fmt: skip
    if not errors:
        return None
    return (
        f"{onnx_path}: {errors[0]} ({len(errors)} such finding(s)); TensorRT takes int8 with zero point 0 "
        "only, float bias, Q/DQ on layer inputs: quantize with `prunekit quantize --target tensorrt`"
    )


def build_plan_mode(caps: dict[str, bool], precision: str, explicit_int8: bool) -> dict[str, Any]:
    """How to build: ``{"strongly_typed": bool, "flags": [BuilderFlag names], "calibrate": bool}``.

    A Q/DQ model builds strongly typed where that exists (the one path TensorRT 11 has), else
    with the INT8 flag and no calibrator. FP16 of an FP32 ONNX needs the FP16 builder flag; on a
    TensorRT without it the model must be converted to FP16 in the ONNX (ModelOpt AutoCast).
    Implicit INT8 (a calibrator over an FP32 ONNX) only where the installed TensorRT still has it.
    """
    if explicit_int8:
        if caps["strongly_typed"]:
            return {"strongly_typed": True, "flags": [], "calibrate": False}
        if caps["precision_flags"]:
            return {"strongly_typed": False, "flags": ["FP16", "INT8"], "calibrate": False}
        raise ValueError("this TensorRT has neither strongly typed networks nor the INT8 builder flag")
    if precision == "fp32":
        return {"strongly_typed": False, "flags": [], "calibrate": False}
    if not caps["precision_flags"]:
        raise ValueError(
            f"this TensorRT has no {precision.upper()} builder flag (TensorRT 11 builds strongly typed "
            f"networks only): give a Q/DQ model from `prunekit quantize` for INT8, or an FP16 ONNX "
            "(python -m modelopt.onnx.autocast) for FP16"
        )
    if precision == "fp16":
        return {"strongly_typed": False, "flags": ["FP16"], "calibrate": False}
    if not caps["implicit_int8"]:
        raise ValueError(
            "this TensorRT has no implicit INT8 calibration; quantize the model with `prunekit quantize` "
            "(Q/DQ, explicit quantization) and build that"
        )
    return {"strongly_typed": False, "flags": ["FP16", "INT8"], "calibrate": True}


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mb: int = 2048,
    calib_batches: Iterable[np.ndarray] | None = None,
    calib_cache: str | os.PathLike | None = None,
    timing_cache: str | os.PathLike | None = None,
    device: int = 0,
) -> dict[str, Any]:
    """Build a serialized TensorRT plan from ``onnx_path``; returns the metadata written beside it.

    INT8 needs ``calib_batches`` (real preprocessed images, [B, 3, H, W]) unless ``calib_cache``
    already exists. ``timing_cache`` is read when present and written back after the build, so
    later builds (other precisions, other profiles) skip most kernel timing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}"
        )
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX model not found")
    calib_path = Path(calib_cache) if calib_cache else None
    batches = list(calib_batches or [])
    explicit = onnx_has_qdq(onnx_path)
    if explicit:
        precision = "int8"  # a Q/DQ graph is INT8 whatever is asked
        problem = qdq_incompatibility(onnx_path)
        if problem:
            raise ValueError(problem)
    if precision == "int8" and not explicit and not batches and not (calib_path and calib_path.is_file()):
        raise ValueError(
            "INT8 needs a Q/DQ model (`prunekit quantize`), calibration images (--calib-data) or an "
            "existing calibration cache"
        )
    reason = trt_unavailable()
    if reason:
        raise BackendUnavailable("trt", reason)
    trt = _trt()
    cudart = import_cudart("trt")
    mode = build_plan_mode(trt_capabilities(trt), precision, explicit)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT for the "trt" export form
    builder = trt.Builder(logger)
    flags = 0
    if mode["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif (
        hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
        and int(trt.__version__.split(".")[0]) < 10
    ):
        # TensorRT 10 networks are always explicit-batch; the flag is needed (and exists) on 8.x only
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in mode["flags"]:  # INT8 layers without scales fall back to FP16, not FP32
        config.set_flag(getattr(trt.BuilderFlag, name))
    calibrator = None
    if mode["calibrate"]:
        calibrator = _make_calibrator(trt, cudart, batches, calib_path)
        config.int8_calibrator = calibrator

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    profile_desc: dict[str, Any] = {}
    for t in inputs:
        rest = tuple(int(d) for d in tuple(t.shape)[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"{onnx_path}: input {t.name} has dynamic non-batch dims {tuple(t.shape)}")
        shapes = [(b, *rest) for b in (min_batch, opt_batch, max_batch)]
        profile.set_shape(t.name, *shapes)
        profile_desc[t.name] = {"min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])}
    config.add_optimization_profile(profile)
    if calibrator is not None and batches:
        # Calibration runs at one fixed shape: the calibration batch.
        cal = builder.create_optimization_profile()
        for t in inputs:
            shape = (int(batches[0].shape[0]), *(int(d) for d in tuple(t.shape)[1:]))
            cal.set_shape(t.name, shape, shape, shape)
        config.set_calibration_profile(cal)

    tc_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(tc_path.read_bytes() if tc_path and tc_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise RuntimeError(
            f"{onnx_path}: TensorRT failed to build a {precision} engine (see the TensorRT log above)"
        )
    atomic_write_bytes(plan_path, bytes(serialized))
    if tc_path is not None:
        atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))

    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    meta = {
        "format": PLAN_FORMAT,
        "tensorrt_version": trt.__version__,
        **cuda_device_info(device),
        "precision": precision,
        "quantization": "explicit (Q/DQ)" if explicit else ("implicit (calibrator)" if calibrator else None),
        "strongly_typed": mode["strongly_typed"],
        "profile": profile_desc,
        "inputs": [
            {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(trt.nptype(t.dtype).__name__)}
            for t in inputs
        ],
        "outputs": [
            {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(trt.nptype(t.dtype).__name__)}
            for t in outputs
        ],
        "workspace_mb": int(workspace_mb),
        "source_onnx": str(onnx_path),
        "source_onnx_sha256": file_sha256(onnx_path),
        "timing_cache": str(tc_path) if tc_path else None,
        "calibration_cache": str(calib_path) if calib_path else None,
        "calibration_batches": len(batches),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "model_metadata": _onnx_metadata_or_empty(onnx_path),
    }
    atomic_write_json(plan_metadata_path(plan_path), meta)
    log.info("built %s (%s, %.1f s)", plan_path, precision, meta["build_seconds"])
    return meta


def _onnx_metadata_or_empty(onnx_path: Path) -> dict[str, Any]:
    try:
        return read_metadata(onnx_path)
    except ValueError:
        return {}


class TrtRunner(Runner):
    """Runs a prunekit-built TensorRT plan; ``model_path`` may also be an ONNX file, built on load.

    An ONNX path builds ``<stem>.<precision>.plan`` beside it (or in ``engine_dir``) unless a
    compatible plan is already there; ``build_kw`` go to :func:`build_engine`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        precision: str = "fp32",
        device: str | int | None = None,
        engine_dir: str | os.PathLike | None = None,
        check: bool = True,
        **build_kw: Any,
    ):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: model not found")
        self.precision = precision
        self.device_id = 0 if device in (None, "cuda") else int(str(device).split(":")[-1])
        self.engine_dir = Path(engine_dir) if engine_dir else None
        self.check = check
        self.build_kw = build_kw
        self.plan: TrtPlan | None = None
        self.info = RunnerInfo("trt", f"cuda:{self.device_id}", precision)

    def _plan_path(self) -> Path:
        if self.model_path.suffix != ".onnx":
            return self.model_path
        out_dir = self.engine_dir or self.model_path.parent
        plan = out_dir / f"{self.model_path.stem}.{self.precision}.plan"
        stale = True
        if plan.is_file() and plan_metadata_path(plan).is_file():
            meta = read_plan_metadata(plan)
            stale = (
                meta.get("source_onnx_sha256") != file_sha256(self.model_path)
                or meta.get("precision") != self.precision
            )
            if not stale:
                try:
                    trt = _trt()
                    check_plan_compatible(
                        meta, {"tensorrt_version": trt.__version__, **cuda_device_info(self.device_id)}
                    )
                except PlanMismatchError:
                    stale = True
        if stale:
            build_engine(self.model_path, plan, self.precision, device=self.device_id, **self.build_kw)
        return plan

    def load(self) -> TrtRunner:
        if self.plan is not None:
            return self
        reason = trt_unavailable()
        if reason:
            raise BackendUnavailable("trt", reason)
        plan_path = self._plan_path()
        self.plan = TrtPlan(plan_path, device=self.device_id, check=self.check)
        meta = self.plan.plan_meta
        self.info.precision = meta.get("precision", self.precision)
        self.info.device = meta.get("gpu_name", self.info.device)
        self.info.extra.update(
            plan=str(plan_path), tensorrt=meta.get("tensorrt_version"), profile=meta.get("profile")
        )
        return self

    @property
    def input_spec(self) -> list[TensorSpec]:
        self.load()
        assert self.plan is not None
        shapes = self.plan.shapes()
        return [
            TensorSpec(n, tuple("batch" if d < 0 else d for d in shapes[n]), self.plan.dtypes[n].name)
            for n in self.plan.inputs
        ]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        assert self.plan is not None
        return self.plan.infer(feed)

    def synchronize(self) -> None:
        if self.plan is not None:
            self.plan.synchronize()

    def close(self) -> None:
        if self.plan is not None:
            self.plan.close()
            self.plan = None
