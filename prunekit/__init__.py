"""prunekit: multi-layer pruning of SSD/VGG16 (Singh et al., WACV 2019), export, engines, benchmarks."""

__version__ = "0.1.0"

from prunekit.models import (  # noqa: E402
    ArchConfig,
    build_model,
    count_params,
    create_model,
    load,
    save,
    ssd300_vgg16,
    ssd512_vgg16,
    vgg16,
)

__all__ = [
    "ArchConfig",
    "__version__",
    "build_model",
    "count_params",
    "create_model",
    "load",
    "save",
    "ssd300_vgg16",
    "ssd512_vgg16",
    "vgg16",
]
