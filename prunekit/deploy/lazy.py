"""Optional heavy dependencies (TensorRT, cuda-python, onnxruntime, torch) imported in one place.

``import prunekit.deploy`` must work on a machine with none of them, and a missing one must
surface as :class:`BackendUnavailable` naming the backend and why, never as a bare ImportError
deep inside a runner. Torch-free on purpose.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from prunekit.deploy.base import BackendUnavailable


def import_optional(name: str, backend: str, hint: str = "") -> ModuleType:
    """Import ``name`` or raise :class:`BackendUnavailable` for ``backend`` with the reason."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a broken install (missing .so) is just as unavailable
        reason = f"cannot import {name} ({type(e).__name__}: {e})"
        if hint:
            reason += f"; {hint}"
        raise BackendUnavailable(backend, reason) from e


def import_cudart(backend: str) -> ModuleType:
    """cuda-python's runtime bindings under either module layout (``cuda.bindings`` is 12.6+)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except Exception:  # noqa: BLE001
        return import_optional("cuda.cudart", backend, "pip install cuda-python")


def cuda_device_count() -> int:
    """CUDA devices visible through cuda-python (0 when there is no driver); torch-free."""
    try:
        cudart = import_cudart("cuda")
        err, n = cudart.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no driver / no library both mean "no GPU here"
        return 0
    return int(n) if int(err) == 0 else 0
