"""Torch-free edge runtime: image in, detections out, from an exported ONNX model or a TensorRT plan.

This one file is what edge engineers copy to a Jetson. It needs numpy and pillow, plus
onnxruntime for ``.onnx`` models or tensorrt + cuda-python for ``.plan`` engines, and nothing
else from prunekit: it reads everything it needs (input size, mean/std, anchors, class names,
post-processing thresholds) from the ONNX metadata props or the plan's metadata JSON.

Pre- and post-processing reproduce torchvision's SSD exactly: bilinear resize without
antialiasing (``F.interpolate(..., align_corners=False)``), normalisation, BoxCoder decoding with
weights (10, 10, 5, 5) and its exp clamp, softmax, per-class score threshold and top-k, per-class
NMS (IoU > threshold suppresses), ``detections_per_img``, and boxes rescaled to the original
image size. So the runtime's detections equal ``model.eval()(images)`` up to float rounding.

Usage::

    python -m prunekit.deploy.runtime model.onnx image.jpg --out det.jpg [--json dets.json] [--score 0.3]
    python runtime.py model.plan image.jpg --out det.jpg          # the file copied on its own
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
# Execution providers by prunekit backend name / runtime device name.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


class PlanMismatchError(ValueError):
    """A TensorRT plan built with another TensorRT version or for another GPU (plans are not portable)."""


# --------------------------------------------------------------------------- metadata


def _parse_props(props: dict[str, str]) -> dict[str, Any]:
    """Metadata prop values are JSON strings; a value that is not JSON stays a string."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def plan_metadata_path(plan_path: str | os.PathLike) -> Path:
    """The metadata JSON written next to a TensorRT plan: ``model.plan`` -> ``model.plan.json``."""
    p = Path(plan_path)
    return p.with_name(p.name + ".json")


def read_plan_metadata(plan_path: str | os.PathLike) -> dict[str, Any]:
    path = plan_metadata_path(plan_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: plan metadata JSON not found (build the plan with prunekit build-engine)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_metadata(model_path: str | os.PathLike) -> dict[str, Any]:
    """The model's prunekit metadata (``prunekit_config``, ``input_size``, ``image_mean``...), parsed.

    For a TensorRT plan it is the ONNX metadata that ``build-engine`` copied into the plan's
    JSON. Uses the ``onnx`` package when present, else onnxruntime's model metadata.
    """
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.suffix in PLAN_SUFFIXES:
        meta = read_plan_metadata(path).get("model_metadata")
        if not meta:
            raise ValueError(f"{plan_metadata_path(path)}: has no model_metadata (not built by prunekit?)")
        return dict(meta)
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
        props = {p.key: p.value for p in model.metadata_props}
    else:
        ort = importlib.import_module("onnxruntime")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        props = dict(sess.get_modelmeta().custom_metadata_map)
    meta = _parse_props(props)
    if "prunekit_config" not in meta and "input_size" not in meta:
        raise ValueError(f"{path}: ONNX model has no prunekit metadata (export it with prunekit export)")
    return meta


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    cfg = meta.get("prunekit_config") or {}
    return cfg if isinstance(cfg, dict) else {}


def meta_setting(meta: dict[str, Any], key: str, default: Any) -> Any:
    # Top-level metadata key first (the export's), then the architecture config's.
    value = meta.get(key)
    if value is None:
        value = _config(meta).get(key)
    return default if value is None else value


def input_size(meta: dict[str, Any]) -> tuple[int, int]:
    size = meta.get("input_size") or _config(meta).get("input_size")
    if not size:
        raise ValueError("model metadata has no input_size")
    h, w = (int(size[0]), int(size[1])) if len(size) == 2 else (int(size[-2]), int(size[-1]))
    return h, w


def class_names(meta: dict[str, Any]) -> list[str]:
    names = meta.get("class_names") or _config(meta).get("class_names") or []
    return [str(n) for n in names]


def is_detector(meta: dict[str, Any]) -> bool:
    arch = _config(meta).get("arch")
    if arch:  # a classifier is exported in the "raw" form too: the architecture decides
        return str(arch).startswith("ssd")
    return meta.get("form") in ("raw", "decoded", "trt")


def label_name(label: int, names: list[str], num_classes: int | None = None) -> str:
    """Detector labels are 1..C-1 (0 = background); ``names`` usually omit the background."""
    if num_classes is not None and len(names) == num_classes:
        idx = label
    else:
        idx = label - 1
    return names[idx] if 0 <= idx < len(names) else str(label)


# --------------------------------------------------------------------------- pre-processing


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # torch's area_pixel_compute_source_index for bilinear, align_corners=False.
    # In float32 like torch's CPU kernel, so the interpolation weights round the same way.
    scale = np.float32(in_size / out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, frac


def resize_bilinear(chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, H, W] float -> [C, h, w], as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    h, w = size
    if chw.shape[1:] == (h, w):
        return chw
    y0, y1, fy = _linear_taps(chw.shape[1], h)
    x0, x1, fx = _linear_taps(chw.shape[2], w)
    rows = chw[:, y0, :] * (1 - fy)[None, :, None] + chw[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


# PIL transposes that undo each EXIF orientation (2..8), as PIL.ImageOps.exif_transpose uses.
_EXIF_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def exif_orientation(im: Any) -> int:
    """EXIF orientation (1..8, 1 = as stored) of an opened PIL image, from its header only.

    A PNG eXIf chunk after the pixel data is ignored, as libpng (hence torchvision) does, so that
    training and deployment turn the same files; reading it would also mean decoding the pixels.
    Malformed EXIF counts as 1, as the decoders treat it.
    """
    from PIL import Image

    try:
        if im.format == "PNG":  # PIL's getexif() on a PNG decodes the pixels to look past them
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        orientation = int(exif.get(0x0112, 1))
    except Exception:  # any EXIF parsing failure: decoders ignore the tag, so do we
        return 1
    return orientation if orientation in _EXIF_TRANSPOSE else 1


class _NotRGB(ValueError):
    """Pixels that cannot become 8-bit RGB (float, out-of-range 16-bit); a readable file."""


_RGB_ERRORS = (_NotRGB,)
# What PIL raises for a file it cannot read: UnidentifiedImageError (an OSError) for a non-image,
# OSError for truncated or broken data, SyntaxError / ValueError / EOFError / struct.error for
# broken headers, zlib.error (and DecompressionBombError for a header claiming billions of pixels).
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
)  # fmt: skip


def _pil_to_rgb(im: Any) -> np.ndarray:
    from PIL import Image

    orientation = exif_orientation(im)
    if orientation != 1:
        im = im.transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[orientation]))
    if im.mode == "I" or im.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF, PGM): PIL's own convert("RGB") would clip it at 255.
        gray = np.asarray(im).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise _NotRGB(f"{im.mode} image with values outside 0..65535: not a 16-bit image")
        return np.repeat((gray >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise _NotRGB("floating-point image (PIL mode F): unknown value range, convert it to 8/16-bit")
    if im.mode in ("P", "PA"):
        # Via RGBA: PIL warns when a palette with transparency goes straight to RGB. Same colours.
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


def load_image(image: Any) -> np.ndarray:
    """A path, PIL image or HWC array -> HWC uint8 RGB array: the pixels the model is fed.

    Whatever the encoding, a file gives the same pixels as prunekit's training loader
    (``prunekit.data.read_image``):

    * the EXIF orientation is applied (as ``PIL.ImageOps.exif_transpose`` and torchvision's
      ``decode_image(apply_exif_orientation=True)``), see :func:`exif_orientation`;
    * 16-bit samples keep their high byte (``v >> 8``, within 1/255 of ``v / 65535``): what PIL
      and libpng give for 16-bit colour PNGs, and so the one rule this torch-free file can apply
      to every 16-bit image;
    * alpha is dropped, not composited: a transparent pixel keeps its stored colour;
    * grayscale is repeated to three channels; palette, CMYK, 1-bit... are converted by PIL.

    Arrays may be uint8 or uint16 (high byte kept), HxW, HxWx3 or HxWx4 (alpha dropped).
    Raises FileNotFoundError for a missing file and ValueError for what cannot be made RGB.
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (or uint16) image array, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
    else:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            p = Path(image)
            if not p.is_file():
                raise FileNotFoundError(f"{p}: image not found")
            try:
                with Image.open(p) as im:
                    arr = _pil_to_rgb(im)
            except _RGB_ERRORS as e:  # the pixels' own problem (float, out of range): name the file
                raise ValueError(f"{p}: {e}") from e
            except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
                raise ValueError(f"{p}: not a readable image ({e or type(e).__name__})") from e
        else:
            arr = _pil_to_rgb(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    return arr


def preprocess(image_hwc_uint8: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """HWC uint8 RGB image -> [1, 3, H, W] float32 resized to the model input, normalised.

    Same arithmetic as the PyTorch side: ``/255``, normalise ``(x - mean) / std``, bilinear
    resize (torchvision's SSD transform normalises first, then resizes).
    """
    img = load_image(image_hwc_uint8)
    return preprocess_float(img.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0), meta)


def preprocess_float(chw: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """[3, h, w] float image in [0, 1] (a dataset item) -> [1, 3, H, W] normalised model input."""
    mean = np.asarray(meta_setting(meta, "image_mean", [0.0, 0.0, 0.0]), np.float32)
    std = np.asarray(meta_setting(meta, "image_std", [1.0, 1.0, 1.0]), np.float32)
    chw = (np.asarray(chw, np.float32) - mean[:, None, None]) / std[:, None, None]
    chw = resize_bilinear(chw, input_size(meta))
    return np.ascontiguousarray(chw[None], dtype=np.float32)


# --------------------------------------------------------------------------- SSD post-processing


def default_boxes(meta: dict[str, Any], num_anchors: int | None = None) -> np.ndarray:
    """SSD default boxes [A, 4] xyxy in input pixels, as torchvision's ``DefaultBoxGenerator``.

    Used when the ONNX has no ``anchors`` output. Feature-map sizes are ``ceil(size / step)``
    (true for SSD300 and SSD512); ``num_anchors`` checks the result against the network.
    """
    cfg = _config(meta)
    anchors = cfg.get("anchors")
    if not anchors:
        raise ValueError("model metadata has no anchors config (prunekit_config.anchors)")
    h, w = input_size(meta)
    scales, steps, ratios = anchors["scales"], anchors["steps"], anchors["aspect_ratios"]
    clip = anchors.get("clip", True)
    out = []
    for k, ars in enumerate(ratios):
        s_k = scales[k]
        s_prime = math.sqrt(scales[k] * scales[k + 1])
        wh = [[s_k, s_k], [s_prime, s_prime]]
        for ar in ars:
            sq = math.sqrt(ar)
            wh += [[s_k * sq, s_k / sq], [s_k / sq, s_k * sq]]
        wh_arr = np.asarray(wh, np.float32)
        if clip:
            wh_arr = np.clip(wh_arr, 0.0, 1.0)
        fh, fw = math.ceil(h / steps[k]), math.ceil(w / steps[k])
        cx = ((np.arange(fw, dtype=np.float32) + 0.5) / np.float32(w / steps[k])).astype(np.float32)
        cy = ((np.arange(fh, dtype=np.float32) + 0.5) / np.float32(h / steps[k])).astype(np.float32)
        sy, sx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.repeat(np.stack([sx.reshape(-1), sy.reshape(-1)], axis=1), len(wh_arr), axis=0)
        sizes = np.tile(wh_arr, (fh * fw, 1))
        out.append(np.concatenate([centres, sizes], axis=1))
    boxes = np.concatenate(out, axis=0)
    scale = np.asarray([w, h], np.float32)
    xyxy = np.concatenate(
        [(boxes[:, :2] - 0.5 * boxes[:, 2:]) * scale, (boxes[:, :2] + 0.5 * boxes[:, 2:]) * scale], axis=1
    ).astype(np.float32)
    if num_anchors is not None and len(xyxy) != num_anchors:
        raise ValueError(
            f"anchors config gives {len(xyxy)} default boxes but the network outputs {num_anchors}"
        )
    return xyxy


def decode_boxes(rel_codes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """torchvision ``BoxCoder((10, 10, 5, 5)).decode_single``: [A, 4] deltas -> [A, 4] xyxy."""
    rel = rel_codes.astype(np.float32, copy=False)
    a = anchors.astype(np.float32, copy=False)
    widths = a[:, 2] - a[:, 0]
    heights = a[:, 3] - a[:, 1]
    ctr_x = a[:, 0] + np.float32(0.5) * widths
    ctr_y = a[:, 1] + np.float32(0.5) * heights
    wx, wy, ww, wh = (np.float32(v) for v in BOX_CODER_WEIGHTS)
    dx, dy = rel[:, 0] / wx, rel[:, 1] / wy
    dw = np.minimum(rel[:, 2] / ww, np.float32(BBOX_XFORM_CLIP))
    dh = np.minimum(rel[:, 3] / wh, np.float32(BBOX_XFORM_CLIP))
    pcx, pcy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = np.float32(0.5) * np.exp(dw) * widths, np.float32(0.5) * np.exp(dh) * heights
    return np.stack([pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h], axis=1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS, torchvision semantics: a box is dropped when IoU > ``iou_thresh``."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while order.size:
            i = int(order[0])
            keep.append(i)
            rest = order[1:]
            iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
            ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
            inter = iw * ih
            iou = inter / (areas[i] + areas[rest] - inter)
            order = rest[~(iou > iou_thresh)]  # NaN (two empty boxes) is kept, as in torchvision
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Per-class NMS; kept indices sorted by decreasing score."""
    keep = [
        np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_thresh)]
        for c in np.unique(labels)
    ]
    if not keep:
        return np.zeros(0, np.int64)
    idx = np.concatenate(keep)
    return idx[np.argsort(-scores[idx], kind="stable")]


def _rescale(boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int] | None) -> np.ndarray:
    if to_hw is None or tuple(to_hw) == tuple(from_hw):
        return boxes
    rh = np.float32(to_hw[0]) / np.float32(from_hw[0])
    rw = np.float32(to_hw[1]) / np.float32(from_hw[1])
    return boxes * np.asarray([rw, rh, rw, rh], np.float32)


def postprocess_raw(
    outputs: dict[str, np.ndarray],
    meta: dict[str, Any],
    image_sizes: list[tuple[int, int]] | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    topk_candidates: int | None = None,
    detections_per_img: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Raw SSD outputs -> per-image ``{"boxes" [n,4] xyxy, "scores" [n], "labels" [n] int64}``.

    ``outputs`` holds ``bbox_regression`` [N, A, 4], ``cls_logits`` [N, A, C] and optionally
    ``anchors`` [A, 4] (xyxy input pixels; computed from the metadata when absent).
    ``image_sizes`` are the ORIGINAL (H, W) of each image; boxes come back in those pixels
    (input pixels when omitted). Thresholds default to the model's (``prunekit_config``).
    """
    score_thresh = float(meta_setting(meta, "score_thresh", 0.01) if score_thresh is None else score_thresh)
    nms_thresh = float(meta_setting(meta, "nms_thresh", 0.45) if nms_thresh is None else nms_thresh)
    topk = int(meta_setting(meta, "topk_candidates", 400) if topk_candidates is None else topk_candidates)
    per_img = int(
        meta_setting(meta, "detections_per_img", 200) if detections_per_img is None else detections_per_img
    )
    reg, logits = np.asarray(outputs["bbox_regression"]), np.asarray(outputs["cls_logits"])
    if reg.ndim != 3 or logits.ndim != 3 or reg.shape[:2] != logits.shape[:2]:
        raise ValueError(f"bad raw SSD outputs: bbox_regression {reg.shape}, cls_logits {logits.shape}")
    anchors = outputs.get("anchors")
    anchors = default_boxes(meta, reg.shape[1]) if anchors is None else np.asarray(anchors).reshape(-1, 4)
    in_hw = input_size(meta)
    if image_sizes is not None and len(image_sizes) != len(reg):
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {len(reg)}")
    results = []
    for n in range(len(reg)):
        boxes = decode_boxes(reg[n], anchors)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, in_hw[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, in_hw[0])
        scores = softmax(logits[n])
        all_boxes, all_scores, all_labels = [], [], []
        for label in range(1, scores.shape[1]):
            s = scores[:, label]
            idx = np.flatnonzero(s > score_thresh)
            if idx.size > topk:
                idx = idx[np.argpartition(-s[idx], topk - 1)[:topk]]
            idx = idx[np.argsort(-s[idx], kind="stable")]
            all_boxes.append(boxes[idx])
            all_scores.append(s[idx])
            all_labels.append(np.full(idx.size, label, np.int64))
        b = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
        s = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
        lab = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
        keep = batched_nms(b, s, lab, nms_thresh)[:per_img]
        size = None if image_sizes is None else image_sizes[n]
        results.append(
            {
                "boxes": _rescale(b[keep], in_hw, size).astype(np.float32),
                "scores": s[keep].astype(np.float32),
                "labels": lab[keep],
            }
        )
    return results


def postprocess_decoded(
    outputs: dict[str, np.ndarray], meta: dict[str, Any], image_sizes: list[tuple[int, int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """The ``decoded``/``trt`` forms already ran NMS in the graph: strip the padding, rescale boxes."""
    num = np.asarray(outputs["num_detections"]).reshape(-1)
    in_hw = input_size(meta)
    results = []
    for n in range(len(num)):
        k = int(num[n])
        size = None if image_sizes is None else image_sizes[n]
        results.append(
            {
                "boxes": _rescale(np.asarray(outputs["detection_boxes"][n][:k], np.float32), in_hw, size),
                "scores": np.asarray(outputs["detection_scores"][n][:k], np.float32),
                "labels": np.asarray(outputs["detection_classes"][n][:k]).astype(np.int64),
            }
        )
    return results


def postprocess(
    outputs: dict[str, np.ndarray],
    meta: dict[str, Any],
    image_sizes: list[tuple[int, int]] | None = None,
    **kw: Any,
) -> list[dict[str, np.ndarray]]:
    """Dispatch on the outputs present: raw SSD, decoded SSD, or classifier ``logits``."""
    if "bbox_regression" in outputs:
        return postprocess_raw(outputs, meta, image_sizes, **kw)
    if "num_detections" in outputs:
        return postprocess_decoded(outputs, meta, image_sizes)
    if "logits" in outputs:
        k = int(kw.get("topk", 5))
        probs = softmax(np.asarray(outputs["logits"]))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [{"labels": t.astype(np.int64), "scores": p[t]} for t, p in zip(top, probs)]
    raise ValueError(f"unrecognised model outputs {sorted(outputs)}")


# --------------------------------------------------------------------------- drawing

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]  # fmt: skip


def draw_detections(
    image: Any, det: dict[str, np.ndarray], names: list[str] | None = None, num_classes: int | None = None
):
    """Boxes and ``name score`` labels drawn on a copy of the image; returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(load_image(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        color = _PALETTE[int(label) % len(_PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = f"{label_name(int(label), names or [], num_classes)} {float(score):.2f}"
        tb = draw.textbbox((x1, y1), text, font=font)
        ty = max(0.0, y1 - (tb[3] - tb[1]) - 2)
        draw.rectangle([x1, ty, x1 + (tb[2] - tb[0]) + 4, ty + (tb[3] - tb[1]) + 2], fill=color)
        draw.text((x1 + 2, ty), text, fill=(0, 0, 0), font=font)
    return im


def detections_to_json(
    det: dict[str, np.ndarray], names: list[str] | None = None, num_classes: int | None = None
) -> list[dict]:
    return [
        {
            "box": [round(float(v), 3) for v in box],
            "score": round(float(score), 6),
            "label": int(label),
            "name": label_name(int(label), names or [], num_classes),
        }
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"])
    ]


# --------------------------------------------------------------------------- engines


def ort_session(
    model_path: str | os.PathLike,
    device: str = "cpu",
    sess_options: Any = None,
    provider_options: dict | None = None,
):
    """An onnxruntime session on exactly the requested provider; refuses rather than falling back."""
    ort = importlib.import_module("onnxruntime")
    provider = ORT_PROVIDERS.get(device, device)
    available = ort.get_available_providers()
    if provider not in available:
        raise RuntimeError(f"onnxruntime has no {provider} here (available: {', '.join(available)})")
    providers: list[Any] = [(provider, provider_options or {})]
    if provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")  # nodes TensorRT rejects run on CUDA, never on CPU silently
    if sess_options is None:
        sess_options = ort.SessionOptions()
        sess_options.log_severity_level = 3  # errors only
    sess = ort.InferenceSession(str(model_path), sess_options=sess_options, providers=providers)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime did not enable {provider} for {model_path}: {sess.get_providers()}")
    return sess


def _cudart():
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def _cuda_check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def cuda_device_info(device: int = 0) -> dict[str, Any]:
    """GPU name and compute capability through cuda-python (no torch)."""
    cudart = _cudart()
    prop = _cuda_check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def check_plan_compatible(plan_meta: dict[str, Any], here: dict[str, Any], plan_path: str = "plan") -> None:
    """Refuse a plan built by another TensorRT version or for another GPU.

    A serialized TensorRT engine is only valid for the TensorRT version and the GPU model it was
    built with; loading it elsewhere fails obscurely or, worse, runs badly tuned. Pure function
    on the plan's metadata and the current environment (``tensorrt_version``, ``gpu_name``,
    ``compute_capability``) so it is testable without TensorRT.
    """
    for key, what in (
        ("tensorrt_version", "TensorRT"),
        ("gpu_name", "GPU"),
        ("compute_capability", "compute capability"),
    ):
        built, now = plan_meta.get(key), here.get(key)
        if built is None:
            raise PlanMismatchError(
                f"{plan_path}: plan metadata has no {key}; rebuild it with prunekit build-engine"
            )
        if built == "unknown" and key != "tensorrt_version":
            continue  # deploy/build_engine.py without cuda-python or nvidia-smi: built here, by the user
        if now is not None and str(built) != str(now):
            raise PlanMismatchError(
                f"{plan_path}: built for {what} {built} but this machine has {what} {now}; "
                "rebuild the plan here (prunekit build-engine)"
            )


class TrtPlan:
    """A deserialized TensorRT plan run with cuda-python device buffers (no torch).

    TensorRT 10 name-based I/O: ``set_input_shape`` / ``set_tensor_address`` /
    ``execute_async_v3`` on one CUDA stream; buffers grow on demand and are reused.
    """

    def __init__(self, plan_path: str | os.PathLike, device: int = 0, check: bool = True):
        trt = importlib.import_module("tensorrt")
        self._cudart = _cudart()
        self.path = Path(plan_path)
        self.plan_meta = read_plan_metadata(self.path)
        _cuda_check(self._cudart.cudaSetDevice(device))
        if check:
            here = {"tensorrt_version": trt.__version__, **cuda_device_info(device)}
            check_plan_compatible(self.plan_meta, here, str(self.path))
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path}: TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda_check(self._cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, capacity bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                _cuda_check(self._cudart.cudaFree(ptr))
            ptr = int(_cuda_check(self._cudart.cudaMalloc(max(nbytes, 1))))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.engine.get_tensor_shape(n)) for n in self.inputs + self.outputs}

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in = {}
        for name in self.inputs:
            if name not in feed:
                raise ValueError(f"{self.path}: missing input {name!r}")
            arr = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
            host_in[name] = arr  # keep alive until the copy completes
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise ValueError(f"{self.path}: input {name} shape {arr.shape} outside the plan's profile")
            ptr = self._buffer(name, arr.nbytes)
            _cuda_check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        host_out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
            host_out[name] = out
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed")
        for name, out in host_out.items():
            ptr = self._buffers[name][0]
            _cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
        self.synchronize()
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in host_out.items()}

    def synchronize(self) -> None:
        _cuda_check(self._cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = self.runtime = None


# --------------------------------------------------------------------------- the detector


class Detector:
    """Image in, detections (or class scores) out; all it needs comes from the model file.

    ``device``: ``cpu`` / ``cuda`` / ``trt`` (onnxruntime execution providers) for ``.onnx``;
    a ``.plan`` runs on TensorRT directly. Results are in the original image's pixels.
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", score_thresh: float | None = None):
        self.path = Path(model_path)
        self.meta = read_metadata(self.path)
        self.names = class_names(self.meta)
        self.num_classes = _config(self.meta).get("num_classes")
        self.score_thresh = score_thresh
        if self.path.suffix in PLAN_SUFFIXES:
            self._plan: TrtPlan | None = TrtPlan(self.path)
            self._sess = None
            self.input_name = self._plan.inputs[0]
        else:
            self._plan = None
            self._sess = ort_session(self.path, device)
            self.input_name = self._sess.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._plan is not None:
            return self._plan.infer({self.input_name: batch})
        names = [o.name for o in self._sess.get_outputs()]
        return dict(zip(names, self._sess.run(names, {self.input_name: batch})))

    def __call__(self, image: Any) -> dict[str, np.ndarray]:
        img = load_image(image)
        outputs = self.run(preprocess(img, self.meta))
        kw = {} if self.score_thresh is None or "logits" in outputs else {"score_thresh": self.score_thresh}
        return postprocess(outputs, self.meta, [img.shape[:2]], **kw)[0]

    def close(self) -> None:
        if self._plan is not None:
            self._plan.close()
        self._sess = None


def _write_atomic(path: str, write: Any) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename: a failed write leaves nothing behind.

    prunekit.fileio is not available where this file is copied on its own."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the file asked for is the one to name, not the temp file
        tmp.unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: str, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _image_format(path: str) -> str:
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    Image.init()
    if ext not in Image.EXTENSION:
        raise ValueError(f"{path}: unknown image file extension {ext or '(none)'!r} (use .jpg or .png)")
    return Image.EXTENSION[ext]


def save_image_atomic(image: Any, path: str) -> None:
    """``image.save(path)`` through a temp file beside it: a failed write leaves nothing behind."""
    fmt = _image_format(path)
    _write_atomic(path, lambda tmp: image.save(tmp, format=fmt))


def check_output_path(path: str | None, what: str, image: bool = False) -> None:
    """Refuse an output path that cannot be written (missing folder, a folder, read-only; for an
    ``image``, an extension PIL cannot write) up front: ValueError naming ``path``, before any
    model is loaded or run.
    """
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{what} {path}: is a folder; give a file name")
    if image:
        try:
            _image_format(path)
        except ValueError as e:
            raise ValueError(f"{what} {e}") from None
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {path}: file is not writable")


def _os_error_message(e: OSError) -> str:
    """One line naming the file: ``no space left on device: PATH`` (as prunekit says it), else
    ``PATH: what went wrong``."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device: {e.filename}" if e.filename else "no space left on device"
    if e.filename is not None:
        return f"{e.filename}: {(e.strerror or str(e)).lower()}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="prunekit.deploy.runtime", description="Run an exported prunekit model on one image."
    )
    ap.add_argument("model", help="model.onnx (prunekit export) or model.plan (prunekit build-engine)")
    ap.add_argument("image")
    ap.add_argument("--out", help="write the image with boxes drawn here")
    ap.add_argument("--json", dest="json_out", help="write detections as JSON here")
    ap.add_argument("--score", type=float, default=0.3, help="minimum score to draw/report (default 0.3)")
    ap.add_argument(
        "--device", default="cpu", choices=sorted(ORT_PROVIDERS), help="onnxruntime provider for .onnx"
    )
    args = ap.parse_args(argv)
    try:
        check_output_path(args.out, "--out", image=True)
        check_output_path(args.json_out, "--json")
        img = load_image(args.image)
        det_model = Detector(args.model, device=args.device)
        det = det_model(img)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _report(det, det_model, img, args)
    except (OSError, ValueError) as e:  # a full disk, a file that vanished: one line, nothing left
        print(f"error: {_os_error_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2


def _report(det: dict[str, np.ndarray], det_model: Detector, img: np.ndarray, args: Any) -> int:
    if "boxes" not in det:  # classifier
        for label, score in zip(det["labels"], det["scores"]):
            name = det_model.names[int(label)] if int(label) < len(det_model.names) else str(int(label))
            print(f"{name}\t{float(score):.4f}")
        return 0
    keep = det["scores"] >= args.score
    det = {k: v[keep] for k, v in det.items()}
    for d in detections_to_json(det, det_model.names, det_model.num_classes):
        print(f"{d['name']}\t{d['score']:.3f}\t{d['box']}")
    if args.out:
        save_image_atomic(draw_detections(img, det, det_model.names, det_model.num_classes), args.out)
    if args.json_out:
        _write_text_atomic(
            args.json_out,
            json.dumps(detections_to_json(det, det_model.names, det_model.num_classes), indent=2) + "\n",
        )
    print(f"{len(det['scores'])} detections (score >= {args.score})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
