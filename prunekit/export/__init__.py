"""ONNX export (raw / decoded / TensorRT-NMS forms), graph cleanup, metadata and the comparator.

Names are resolved lazily so that the torch-free parts (``compare``, ``metadata``) import
without pulling in torch through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "prunekit.export.onnx_export",
    "ExportSummary": "prunekit.export.onnx_export",
    "ExportError": "prunekit.export.onnx_export",
    "FORMS": "prunekit.export.onnx_export",
    "DEFAULT_OPSET": "prunekit.export.onnx_export",
    "read_metadata": "prunekit.export.metadata",
    "compare_outputs": "prunekit.export.compare",
    "match_detections": "prunekit.export.compare",
    "Tolerance": "prunekit.export.compare",
    "tolerance_for": "prunekit.export.compare",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit.export' has no attribute {name!r}")
