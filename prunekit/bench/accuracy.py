"""Accuracy through the engine that was timed: mAP (or top-1) from a runner's outputs.

The images go through the same host pipeline as on the edge device: the torch-free runtime's
``preprocess`` (resize to the model input, normalise with the mean/std stored in the model's
metadata), the runner, and the runtime's ``postprocess`` (box decoding + NMS for raw outputs,
padding removal for decoded ones) into the original image's pixels. So an FP16 or INT8 engine
that loses accuracy shows it here, instead of inheriting the PyTorch model's number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy import runtime
from prunekit.deploy.base import Runner

log = logging.getLogger(__name__)


@dataclass
class EvalSample:
    """One evaluation image as the engine sees it, with its ground truth."""

    image: np.ndarray  # HWC uint8 RGB, original size
    target: dict[str, np.ndarray]  # detection: boxes/labels/difficult; classification: {"label": [y]}


def model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The runtime metadata of a model file: ONNX metadata props, a plan's JSON, or a checkpoint's config.

    For a PyTorch checkpoint the dict has the same keys the ONNX export writes, so pre- and
    post-processing are identical whichever backend runs it.
    """
    p = Path(path)
    if p.suffix in (".pt", ".pth"):
        from prunekit.models import get_config, load

        return model_metadata_from_config(get_config(load(p)))
    return runtime.read_metadata(p)


def model_metadata_from_config(cfg: Any) -> dict[str, Any]:
    """Runtime metadata (the keys ONNX export writes) from an :class:`ArchConfig`."""
    d = cfg.to_dict()
    return {
        "prunekit_config": d,
        "input_size": d["input_size"],
        "image_mean": d["image_mean"],
        "image_std": d["image_std"],
        "class_names": d["class_names"],
    }


def to_uint8_hwc(image: Any) -> np.ndarray:
    """A dataset image (float [3,H,W] in [0,1], torch or numpy) -> HWC uint8.

    Images decoded from 8-bit files are multiples of 1/255, so rounding recovers them exactly.
    """
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.dtype == np.uint8:
        return a if a.shape[-1] == 3 else a.transpose(1, 2, 0)
    return np.clip(np.rint(a.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def load_samples(dataset: Any, max_images: int | None = None) -> list[EvalSample]:
    """The first ``max_images`` items of a prunekit dataset as :class:`EvalSample` (order kept)."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    out = []
    for i in range(n):
        img, tgt = dataset[i]
        if isinstance(tgt, dict):
            diff = tgt.get("difficult")
            labels = _np(tgt["labels"]).astype(np.int64)
            target = {
                "boxes": _np(tgt["boxes"]).astype(np.float32).reshape(-1, 4),
                "labels": labels,
                "difficult": np.zeros(len(labels), bool) if diff is None else _np(diff).astype(bool),
            }
        else:
            target = {"label": np.asarray([int(tgt)], np.int64)}
        out.append(EvalSample(to_uint8_hwc(img), target))
    return out


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def preprocess_batch(samples: Sequence[EvalSample], meta: dict[str, Any]) -> np.ndarray:
    """[N, 3, H, W] float32 network input, through the runtime's ``preprocess``."""
    return np.concatenate([runtime.preprocess(s.image, meta) for s in samples], axis=0)


def runner_predict(
    runner: Runner,
    samples: Sequence[EvalSample],
    meta: dict[str, Any],
    batch_size: int = 8,
    pad_to_batch: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Per-image postprocessed outputs of ``runner`` (boxes in original pixels, or top-k labels).

    With ``pad_to_batch`` the last partial batch is padded with copies of its last image, so
    engines built for one fixed batch size run too; the padding's outputs are dropped.
    """
    if not samples:
        raise ValueError("no evaluation images")
    name = runner.input_spec[0].name
    preds: list[dict[str, np.ndarray]] = []
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i : i + batch_size])
        n = len(chunk)
        if pad_to_batch and n < batch_size:
            chunk += [chunk[-1]] * (batch_size - n)
        out = runner.infer({name: preprocess_batch(chunk, meta)})
        runner.synchronize()
        sizes = [tuple(s.image.shape[:2]) for s in chunk]
        if "logits" in out:
            logits = np.asarray(out["logits"])[:n]
            preds += [{"logits": row} for row in logits]
        else:
            preds += runtime.postprocess(out, meta, sizes)[:n]
        if on_batch is not None:
            on_batch(n)
    return preds


def score(
    preds: Sequence[dict[str, np.ndarray]], samples: Sequence[EvalSample], meta: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of postprocessed predictions: detection dict (``map``, ``map50``, ``voc07_ap``...)
    or ``{"top1"}`` for classifiers; per-class details are dropped (they stay reproducible)."""
    if preds and "logits" in preds[0]:
        from prunekit.metrics import top1

        logits = np.stack([p["logits"] for p in preds])
        labels = np.concatenate([s.target["label"] for s in samples])
        return {"top1": float(top1(logits, labels)), "num_images": len(samples)}
    from prunekit.metrics import detection_metrics

    cfg = meta.get("prunekit_config") or {}
    num_classes = int(cfg["num_classes"])
    names = runtime.class_names(meta)
    if len(names) not in (num_classes - 1, num_classes):
        names = None
    m = detection_metrics(list(preds), [s.target for s in samples], num_classes, names)
    return {k: v for k, v in m.items() if k != "per_class"}


def runner_accuracy(
    runner: Runner, samples: Sequence[EvalSample], meta: dict[str, Any], batch_size: int = 8
) -> dict[str, Any]:
    """Accuracy of the engine behind ``runner`` on ``samples`` (see the module docstring)."""
    return score(runner_predict(runner, samples, meta, batch_size), samples, meta)
