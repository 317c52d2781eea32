"""Build a TensorRT engine from a prunekit ONNX on the device itself: needs only tensorrt and numpy.

Copied into every run's ``deploy/`` folder as ``build_engine.py``; nothing here imports prunekit,
torch or onnx, so it runs on a Jetson with what JetPack ships (TensorRT 10.3, Python 3.10) and on a
desktop with TensorRT 10.x or 11::

    python3 build_engine.py model_trt.onnx --precision fp16            # -> model_trt.fp16.plan (+ .plan.json)
    python3 build_engine.py model_int8.onnx                            # Q/DQ model: INT8, explicit quantization
    python3 build_engine.py model_trt.onnx --precision fp16 --dla 0    # Jetson AGX/NX Orin: DLA core 0, GPU fallback
    python3 runtime.py model_trt.fp16.plan image.jpg --out det.jpg     # run it (runtime.py needs cuda-python)

The plan's JSON records what ``runtime.py`` checks before it runs a plan (TensorRT version, GPU,
compute capability) and the model's metadata (classes, input size, normalisation, thresholds),
read from ``metadata.json`` beside the ONNX. A plan only runs with the TensorRT and the GPU model
it was built with: build it on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8")


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        sys.exit(
            "error: TensorRT is not importable. On a Jetson it comes with JetPack (apt: python3-libnvinfer); "
            "on a desktop: pip install 'tensorrt>=10.3,<12'"
        )
    return trt


def gpu_identity() -> dict[str, str]:
    """GPU name and compute capability: cuda-python if present, else nvidia-smi, else "unknown"."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = __import__(mod, fromlist=["x"])
            err, prop = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
                return {
                    "gpu_name": name.rstrip("\x00").strip(),
                    "compute_capability": f"{prop.major}.{prop.minor}",
                }
        except Exception:  # noqa: BLE001 - any failure: try the next way
            continue
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.splitlines()[0]  # fmt: skip
        name, cap = (s.strip() for s in out.split(","))
        return {"gpu_name": name, "compute_capability": cap}
    except Exception:  # noqa: BLE001
        return {"gpu_name": "unknown", "compute_capability": "unknown"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build(
    onnx_path: Path,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    dla: int | None,
    workspace_mb: int,
    timing_cache: Path | None,
) -> Path:
    """Parse, configure and build; writes ``<stem>.<precision>[.dla<N>].plan`` and its JSON beside the ONNX."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT of model_trt.onnx
    builder = trt.Builder(logger)
    flags_api = hasattr(trt.BuilderFlag, "FP16")  # 10.x: precision flags; 11: strongly typed only
    creation = 0
    if not flags_api:
        creation |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        sys.exit(f"error: {onnx_path}: TensorRT's ONNX parser failed: {errors}")
    qdq = any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
    if qdq:
        precision = "int8"  # a Q/DQ graph carries its own INT8 scales
    elif precision == "int8":
        sys.exit(
            f"error: {onnx_path} has no Q/DQ nodes: INT8 needs model_int8.onnx (prunekit --precision int8)"
        )
    if not flags_api and precision == "fp16" and "fp16" not in onnx_path.name:
        sys.exit(
            f"error: TensorRT {trt.__version__} builds strongly typed networks only: for FP16 build the "
            "FP16 ONNX of this bundle (model_*_fp16.onnx)"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if flags_api and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers without scales fall back to FP16, not FP32
    if flags_api and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if dla is not None:
        if precision == "fp32":
            sys.exit("error: DLA runs FP16 or INT8 only: give --precision fp16 (or an INT8 model)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
        min_batch = opt_batch = max_batch  # DLA needs static shapes
    profile = builder.create_optimization_profile()
    shapes: dict[str, Any] = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(int(d) for d in tuple(t.shape)[1:])
        dims = [(b, *rest) for b in (min_batch, opt_batch, max_batch)]
        profile.set_shape(t.name, *dims)
        shapes[t.name] = {"min": list(dims[0]), "opt": list(dims[1]), "max": list(dims[2])}
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        sys.exit(f"error: {onnx_path}: TensorRT failed to build a {precision} engine (see its log above)")
    plan = onnx_path.with_name(f"{onnx_path.stem}.{precision}{'' if dla is None else f'.dla{dla}'}.plan")
    _atomic_write(plan, bytes(serialized))
    if timing_cache is not None:
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    side = onnx_path.parent / "metadata.json"
    models = json.loads(side.read_text()) if side.is_file() else {}
    meta = {
        "format": "prunekit-trt-plan",
        "built_by": "deploy/build_engine.py",
        "tensorrt_version": trt.__version__,
        **gpu_identity(),
        "precision": precision,
        "quantization": "explicit (Q/DQ)" if qdq else None,
        "strongly_typed": not flags_api,
        "dla_core": dla,
        "profile": shapes,
        "workspace_mb": int(workspace_mb),
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": _sha256(onnx_path),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "model_metadata": models.get(onnx_path.name, {}),
    }
    _atomic_write(plan.with_name(plan.name + ".json"), (json.dumps(meta, indent=2) + "\n").encode())
    print(f"built {plan} ({precision}{'' if dla is None else f', DLA core {dla} + GPU fallback'}, "
          f"{meta['build_seconds']:.1f} s, TensorRT {trt.__version__}, {meta['gpu_name']})")  # fmt: skip
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("onnx", type=Path, help="an ONNX of this bundle (model_trt.onnx, model_int8.onnx, ...)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16", help="ignored for a Q/DQ model (INT8)")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument(
        "--dla", type=int, default=None, metavar="CORE", help="Jetson DLA core (0 or 1), GPU fallback"
    )
    ap.add_argument("--workspace-mb", type=int, default=1024)
    ap.add_argument("--timing-cache", type=Path, default=Path("timing.cache"))
    a = ap.parse_args(argv)
    if not a.onnx.is_file():
        sys.exit(f"error: {a.onnx}: ONNX model not found")
    if not 1 <= a.min_batch <= a.opt_batch <= a.max_batch:
        sys.exit(
            f"error: batches must satisfy 1 <= min <= opt <= max, got {a.min_batch}/{a.opt_batch}/{a.max_batch}"
        )
    build(a.onnx, a.precision, a.min_batch, a.opt_batch, a.max_batch, a.dla, a.workspace_mb, a.timing_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
