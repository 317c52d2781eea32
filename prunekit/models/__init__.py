"""Model builders (SSD300/SSD512 VGG16, VGG16 classifiers), configs and checkpoints."""

from prunekit.models.config import AnchorConfig, ArchConfig
from prunekit.models.io import (
    CheckpointError,
    build_model,
    count_params,
    create_model,
    default_config,
    get_config,
    layer_names,
    load,
    load_weights,
    save,
)
from prunekit.models.ssd import SSDRaw, ssd300_vgg16, ssd512_vgg16
from prunekit.models.vgg import vgg16

__all__ = [
    "AnchorConfig",
    "ArchConfig",
    "CheckpointError",
    "SSDRaw",
    "build_model",
    "count_params",
    "create_model",
    "default_config",
    "get_config",
    "layer_names",
    "load",
    "load_weights",
    "save",
    "ssd300_vgg16",
    "ssd512_vgg16",
    "vgg16",
]
