"""Engines and runners: ONNX Runtime, TensorRT, torch; plus the torch-free edge runtime.

This package init stays torch-free (it imports only :mod:`prunekit.deploy.base`); backend
modules are imported when a runner is asked for. Backends by name:

==================  =========================================================  ==================
name                what                                                       model file
==================  =========================================================  ==================
``ort-cpu``         ONNX Runtime, CPUExecutionProvider                         ``.onnx``
``ort-cuda``        ONNX Runtime, CUDAExecutionProvider (IO binding)           ``.onnx``
``ort-trt``         ONNX Runtime, TensorrtExecutionProvider (engine cache)     ``.onnx``
``trt``             TensorRT Python API, prunekit-built plan                   ``.plan`` / ``.onnx``
``torch``           PyTorch eager (fp32/fp16, channels_last)                   ``.pt`` checkpoint
``torch-compile``   ``torch.compile`` of the same                              ``.pt`` checkpoint
``torch-aoti``      AOTInductor package                                        ``.pt2``
==================  =========================================================  ==================
"""

from __future__ import annotations

import os
from typing import Any

from prunekit.deploy.base import BackendUnavailable, Runner, RunnerInfo, TensorSpec

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "torch", "torch-compile", "torch-aoti")
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ONNX_BACKENDS",
    "Runner",
    "RunnerInfo",
    "TensorSpec",
    "available_backends",
    "backend_unavailable",
    "get_runner",
]


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None when it can (CPU for torch backends)."""
    if backend in ("ort-cpu", "ort-cuda", "ort-trt"):
        from prunekit.deploy.ort import provider_unavailable

        return provider_unavailable(backend)
    if backend == "trt":
        from prunekit.deploy.trt import trt_unavailable

        return trt_unavailable()
    if backend in ("torch", "torch-compile", "torch-aoti"):
        from prunekit.deploy.torch_runner import torch_unavailable

        return torch_unavailable(backend)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def available_backends() -> dict[str, str | None]:
    """Every backend name -> None when it can run here, else the reason it cannot."""
    return {b: backend_unavailable(b) for b in BACKENDS}


def get_runner(
    backend: str, model_path: str | os.PathLike, precision: str = "fp32", device: str | None = None, **kw: Any
) -> Runner:
    """A runner for ``backend`` (not loaded yet: use ``with runner:`` or ``runner.load()``).

    Loading raises :class:`BackendUnavailable` (with the reason) when the backend cannot run
    here; nothing falls back to another backend silently. ``kw`` go to the backend's runner
    (e.g. ``opt_level``, ``intra_op_threads``, ``optimized_model_path`` for ONNX Runtime,
    ``channels_last`` for torch, ``max_batch``/``workspace_mb`` for building a TensorRT plan).
    """
    if backend in ("ort-cpu", "ort-cuda", "ort-trt"):
        from prunekit.deploy.ort import OrtRunner

        return OrtRunner(model_path, backend, precision, device, **kw)
    if backend == "trt":
        from prunekit.deploy.trt import TrtRunner

        return TrtRunner(model_path, precision, device, **kw)
    if backend in ("torch", "torch-compile"):
        from prunekit.deploy.torch_runner import TorchRunner

        if backend == "torch-compile":
            kw.setdefault("compile_mode", "default")
        return TorchRunner(model_path, precision, device, **kw)
    if backend == "torch-aoti":
        from prunekit.deploy.torch_runner import AotiRunner

        if str(model_path).endswith(".pt") and not str(model_path).endswith(".pt2"):
            raise ValueError(
                f"{model_path}: torch-aoti runs a .pt2 package; build one with prunekit build-engine"
            )
        return AotiRunner(model_path, precision, device, **kw)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
