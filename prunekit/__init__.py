"""prunekit: multi-layer pruning of SSD/VGG16 (Singh et al., WACV 2019), export, engines, benchmarks.

The top-level names are resolved lazily: the edge runtime (``prunekit.deploy.runtime``) lives in
this package and must import on a device that has numpy and onnxruntime but no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    name: "prunekit.models"
    for name in (
        "ArchConfig", "build_model", "count_params", "create_model", "load", "save",
        "ssd300_vgg16", "ssd512_vgg16", "vgg16",
    )
}  # fmt: skip

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
