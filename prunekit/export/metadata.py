"""ONNX ``metadata_props``: what a runtime needs to use an exported model with no other file.

Every value is a JSON string (so numbers, lists and nested dicts survive the string-only ONNX
field). This module imports only ``onnx`` and the standard library: the torch-free runtime reads
metadata through it. With ONNX Runtime alone, ``parse_metadata(sess.get_modelmeta().custom_metadata_map)``
gives the same dict without loading the model twice.

Keys (always present; ``null`` where they do not apply, e.g. anchors for a classifier):

========================  ==========================================================================
``prunekit_config``       ``ArchConfig.to_dict()``: rebuildable architecture, thresholds, anchors
``task``                  ``"detection"`` | ``"classification"``
``form``                  ``"raw"`` | ``"decoded"`` | ``"trt"``
``class_names``           list of names without background (detector label i -> class_names[i-1])
``num_classes``           including background for detectors (torchvision convention)
``input_name``            ``"images"``
``output_names``          graph outputs, in order
``input_size``            ``[H, W]`` of the network input (images are resized to this)
``image_mean``/``image_std``  per-channel, on images scaled to [0, 1]: ``x = (img/255 - mean) / std``
``layout``                ``"NCHW"`` (RGB channel order)
``box_coding``            ``{"name": "torchvision_ssd", "weights": [10,10,5,5], "bbox_xform_clip": ...,
                          "anchor_format": "xyxy", "box_format": "xyxy", "units": "input_pixels"}``
``anchors``               anchor config (aspect_ratios, scales, steps, clip) + ``num_anchors``
``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``  post-processing
                          (the values baked into a ``decoded``/``trt`` graph, the config's for ``raw``)
``prunekit_version``      version of the exporting prunekit
``source_checkpoint_sha256``  sha256 of the ``.pt`` it came from (``null`` if exported from memory)
``opset``                 default-domain opset of the graph
``exporter``              torch version and exporter used
========================  ==========================================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

import onnx

INPUT_NAME = "images"
METADATA_KEYS = (
    "prunekit_config",
    "task",
    "form",
    "class_names",
    "num_classes",
    "input_name",
    "output_names",
    "input_size",
    "image_mean",
    "image_std",
    "layout",
    "box_coding",
    "anchors",
    "score_thresh",
    "nms_thresh",
    "detections_per_img",
    "topk_candidates",
    "prunekit_version",
    "source_checkpoint_sha256",
    "opset",
    "exporter",
)


def set_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace the model's metadata props with ``meta``, each value JSON-encoded."""
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise ValueError(f"ONNX metadata is missing keys {missing}")
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key = key
        prop.value = json.dumps(value, sort_keys=True)


def parse_metadata(props: dict[str, str]) -> dict[str, Any]:
    """Decode JSON-encoded metadata values; values that are not JSON stay strings."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of an exported ONNX file (weights are not loaded)."""
    path = os.fspath(onnx_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for corrupt files
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    meta = parse_metadata({p.key: p.value for p in model.metadata_props})
    if "prunekit_config" not in meta:
        raise ValueError(f"{path}: not a prunekit export (no prunekit_config in the ONNX metadata)")
    return meta
