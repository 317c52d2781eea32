"""``prunekit verify``: the same real images through PyTorch and every engine, compared per output.

Equivalence is measured, not assumed. Both sides get the identical normalised input batch
(``runtime.preprocess_float`` on real images), so per-output errors isolate the engine. For
detectors the check also runs end to end: torchvision's own ``model.eval()(images)`` (its
transform and post-processing) against the backend's outputs decoded by the torch-free
runtime, matched at IoU >= 0.99 with the same label (looser for FP16/INT8, see
:mod:`prunekit.export.compare`). Results go to ``verify.json``; out of tolerance raises
:class:`VerificationError` naming the backend, the worst output and the worst image.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.base import BackendUnavailable
from prunekit.fileio import atomic_write_json

log = logging.getLogger(__name__)

MIN_IMAGES = 16


class VerificationError(ValueError):
    """An engine's outputs are out of tolerance (or nothing could be verified)."""


class ModelMismatchError(VerificationError):
    """The ONNX model was not exported from the checkpoint: bad input, not a failed verification."""


def _check_same_model(cfg: Any, meta: dict[str, Any], checkpoint: Path, onnx_path: Path) -> None:
    exported = meta.get("prunekit_config") or {}
    mine = cfg.to_dict()
    for key in ("arch", "num_classes", "input_size", "channels", "num_detection_layers"):
        if key in exported and exported[key] != mine.get(key):
            raise ModelMismatchError(
                f"{onnx_path} was not exported from {checkpoint}: {key} {exported[key]!r} != {mine.get(key)!r}"
            )


def _concat(chunks: list[dict[str, np.ndarray]], batched: set[str]) -> dict[str, np.ndarray]:
    # Outputs without a batch axis (the SSD anchors constant) are the same for every batch.
    return {k: np.concatenate([c[k] for c in chunks]) if k in batched else chunks[0][k] for k in chunks[0]}


def _run(runner: Any, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    chunks = [runner.infer({"images": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    batched = {k for k, v in chunks[0].items() if v.ndim and v.shape[0] == min(batch_size, len(x))}
    return _concat(chunks, batched)


def _reference(model: Any, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    import torch

    from prunekit.deploy.torch_runner import raw_network

    net, names = raw_network(model)
    net.eval()
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = net(torch.from_numpy(x[i : i + batch_size]))
            out = out if isinstance(out, (tuple, list)) else (out,)
            chunks.append({n: o.float().numpy() for n, o in zip(names, out)})
    return _concat(chunks, set(names))


def _torchvision_detections(
    model: Any, ref: dict[str, np.ndarray], x: np.ndarray
) -> list[dict[str, np.ndarray]]:
    """torchvision's own ``SSD.postprocess_detections`` on the reference raw outputs (input pixels).

    Both sides decode the same kind of tensors, so a detection mismatch means the engine's
    outputs differ (or the runtime's numpy post-processing does), not the resize.
    """
    import torch
    from torchvision.models.detection.image_list import ImageList

    h, w = x.shape[2:]
    model.eval()
    with torch.inference_mode():
        probe = torch.from_numpy(x[:1])
        feats = list(model.backbone(probe).values())
        anchors = model.anchor_generator(ImageList(probe, [(h, w)]), feats)[0]
        reg, logits = torch.from_numpy(ref["bbox_regression"]), torch.from_numpy(ref["cls_logits"])
        dets = model.postprocess_detections(
            {"bbox_regression": reg, "cls_logits": logits}, [anchors] * len(reg), [(h, w)] * len(reg)
        )
    return [{k: v.numpy() for k, v in d.items()} for d in dets]


# Detection-level matching covers confident detections (score >= this). Below it a trained model has a long
# tail of near-equal scores (~1e-4 apart) whose NMS survivors flip under FP32 rounding alone; those
# are still covered elementwise through the raw outputs, and they barely move mAP.
DET_MIN_SCORE = 0.25


def _tie_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The post-processing decisions a tie can flip: NMS IoU, score thresholds, per-image cap."""
    from prunekit.deploy.runtime import meta_setting

    return {
        "nms_iou": float(meta_setting(meta, "nms_thresh", 0.45)),
        "thresholds": (DET_MIN_SCORE, float(meta_setting(meta, "score_thresh", 0.01))),
        "cap": int(meta_setting(meta, "detections_per_img", 200)),
    }


def _confident(dets: list[dict[str, Any]], min_score: float) -> list[dict[str, Any]]:
    return [{k: np.asarray(v)[np.asarray(d["scores"]) >= min_score] for k, v in d.items()} for d in dets]


def verify(
    checkpoint: str | os.PathLike,
    onnx_path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    data: str | None = None,
    backends: list[str] | None = None,
    precision: str = "fp32",
    num_images: int = MIN_IMAGES,
    out: str | os.PathLike | None = "verify.json",
    split: str = "val",
    batch_size: int = 8,
    min_images: int = MIN_IMAGES,
    engine_dir: str | os.PathLike | None = None,
    tolerance: Any = None,
) -> dict[str, Any]:
    """Compare PyTorch with each backend on real images; returns (and writes) the report.

    ``backends`` defaults to every ONNX backend available here; requested ones that cannot run
    are listed under ``skipped`` with the reason. Raises :class:`VerificationError` when any
    backend is out of tolerance (after writing the report) or when no backend could run.
    """
    from prunekit.deploy import ONNX_BACKENDS, backend_unavailable, get_runner
    from prunekit.deploy.images import load_images
    from prunekit.deploy.runtime import postprocess, preprocess_float, read_metadata
    from prunekit.export.compare import compare_outputs, match_detections_report, tolerance_for
    from prunekit.fileio import file_sha256
    from prunekit.models import get_config, load

    checkpoint, onnx_path = Path(checkpoint), Path(onnx_path)
    if (images is None) == (data is None):
        raise ValueError("give exactly one image source: images=DIR or data=SPEC")
    tol = tolerance or tolerance_for(precision)
    model = load(checkpoint)
    cfg = get_config(model)
    meta = read_metadata(onnx_path)
    _check_same_model(cfg, meta, checkpoint, onnx_path)
    source = str(images if images is not None else data)
    imgs, names = load_images(source, num_images, split=split)
    if len(imgs) < min_images:
        raise ValueError(f"{source}: only {len(imgs)} images; verification needs at least {min_images}")
    x = np.concatenate([preprocess_float(im, meta) for im in imgs])
    t0 = time.perf_counter()
    ref = _reference(model, x, batch_size)
    ref_dets = _torchvision_detections(model, ref, x) if cfg.is_detector else None
    log.info("PyTorch reference on %d images: %.2f s", len(imgs), time.perf_counter() - t0)

    requested = list(backends) if backends else list(ONNX_BACKENDS)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "onnx": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "form": meta.get("form"),
        "precision": precision,
        "tolerance": tol.to_dict(),
        "images": {"source": source, "count": len(imgs), "names": names},
        "backends": {},
        "skipped": {},
    }
    for backend in requested:
        reason = backend_unavailable(backend)
        if reason:
            report["skipped"][backend] = reason
            log.warning("verify: skipping %s: %s", backend, reason)
            continue
        model_file = checkpoint if backend in ("torch", "torch-compile") else onnx_path
        kw: dict[str, Any] = {"engine_dir": engine_dir} if backend == "trt" and engine_dir else {}
        t1 = time.perf_counter()
        try:
            runner = get_runner(backend, model_file, precision, **kw)
        except ValueError as e:  # e.g. a precision this backend does not offer: not this backend's run
            report["skipped"][backend] = str(e)
            log.warning("verify: skipping %s: %s", backend, e)
            continue
        try:
            with runner:
                outs = _run(runner, x, batch_size)
                info = {"device": runner.info.device, **runner.info.extra}
        except BackendUnavailable as e:
            report["skipped"][backend] = e.reason
            log.warning("verify: skipping %s: %s", backend, e.reason)
            continue
        entry = _compare_backend(ref, outs, tol, names, compare_outputs)
        entry["info"] = info
        if ref_dets is not None:
            dets = postprocess(outs, meta)  # input pixels, like the reference
            m = match_detections_report(
                _confident(ref_dets, DET_MIN_SCORE),
                _confident(dets, DET_MIN_SCORE - tol.det_score_atol),
                tol.det_iou,
                tol.det_score_atol,
                **_tie_settings(meta),
            )
            entry["detections"] = m.to_dict() | {"min_score": DET_MIN_SCORE}
            # a detection a tie within the score tolerance decided is reported, not failed
            entry["detections"]["passed"] = m.passed_fraction >= tol.min_det_match
            if m.explained:
                log.info("verify %s: %d unmatched detection(s) explained by ties within %g (e.g. image %s: %s)",
                         backend, len(m.explained), tol.det_score_atol, names[m.explained[0]["image"]],
                         m.explained[0]["reason"])  # fmt: skip
            if m.worst_image is not None:
                entry["detections"]["worst_image_name"] = names[m.worst_image]
            if not entry["detections"]["passed"]:
                entry["passed"] = False
                if entry["outputs_passed"]:  # the outputs are fine, so the detections are the failure
                    entry["worst_output"] = "detections"
                    entry["worst_image"] = entry["detections"].get("worst_image_name")
        elif "logits" in ref and "logits" in outs:
            entry["top1_agreement"] = float(np.mean(ref["logits"].argmax(1) == outs["logits"].argmax(1)))
        entry["seconds"] = round(time.perf_counter() - t1, 3)
        report["backends"][backend] = entry
        log.info("verify %s: %s", backend, "PASS" if entry["passed"] else "FAIL")

    report["passed"] = bool(report["backends"]) and all(b["passed"] for b in report["backends"].values())
    failing = [(b, e) for b, e in report["backends"].items() if not e["passed"]]
    if failing:
        b, e = failing[0]
        report["worst"] = {"backend": b, "output": e["worst_output"], "image": e.get("worst_image")}
    if out is not None:
        atomic_write_json(out, report)
    if not report["backends"]:
        raise VerificationError(
            f"{onnx_path}: no backend could run ({'; '.join(f'{k}: {v}' for k, v in report['skipped'].items())})"
        )
    if failing:
        b, e = failing[0]
        if e["worst_output"] == "detections":
            det = e["detections"]
            first = det["unexplained"][0] if det["unexplained"] else None
            detail = (
                f"{det['passed_fraction']:.3f} of PyTorch detections matched or explained by a tie, need "
                f"{tol.min_det_match}; {len(det['unexplained'])} unmatched with no NMS competitor, threshold or cap "
                f"within {tol.det_score_atol:g} of its score"
                + (f", e.g. score {first['score']:.4f} class {first['label']}" if first else "")
            )
        else:
            o = e["outputs"][e["worst_output"]]
            detail = (
                f"max abs {o['max_abs_error']:.3g}, max rel {o['max_rel_error']:.3g}, cosine {o['cosine']:.6f}"
                if o.get("max_abs_error") is not None
                else o.get("message", "")
            )
        where = f" ({out})" if out is not None else ""
        raise VerificationError(
            f"{onnx_path}: {b} out of {precision} tolerance: worst output {e['worst_output']} "
            f"on image {e.get('worst_image')} ({detail}){where}"
        )
    return report


def _compare_backend(
    ref: dict[str, np.ndarray], outs: dict[str, np.ndarray], tol: Any, names: list[str], compare_outputs: Any
) -> dict[str, Any]:
    """Per-output errors over all images; the worst image is the batch index of the worst element."""
    common = {k: v for k, v in ref.items() if k in outs}
    if not common:  # a decoded/trt graph has no raw outputs: detections are all there is to compare
        return {
            "passed": True,
            "outputs_passed": True,
            "outputs": {},
            "worst_output": None,
            "worst_image": None,
        }
    rep = compare_outputs(common, outs, tol)
    d = rep.to_dict()
    outputs = d["outputs"]
    for name, o in outputs.items():
        per_image_cos = (
            [float(_cos(common[name][i], outs[name][i])) for i in range(len(common[name]))]
            if outs[name].shape == common[name].shape
            else []
        )
        o["min_image_cosine"] = min(per_image_cos) if per_image_cos else None
        o["worst_image_name"] = names[o["worst_sample"]] if o.get("worst_sample") is not None else None
    worst = rep.worst_output
    return {
        "passed": rep.passed,
        "outputs_passed": rep.passed,
        "outputs": outputs,
        "worst_output": worst,
        "worst_image": outputs[worst]["worst_image_name"] if worst else None,
    }


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    from prunekit.export.compare import cosine_similarity

    return cosine_similarity(a, b)
