"""Post-export self-check: ONNX Runtime (CPU) must reproduce PyTorch before an export is kept.

Two random image batches of two different sizes (the traced ``batch_example`` and 1, or 2 when
the example batch was 1) go through both, so a graph that hard-coded a batch size, a branch or a
shape fails here rather than in a user's deployment.

- ``raw`` / classifiers: every output, elementwise, FP32 tolerances (``compare.FP32``).
- ``decoded`` / ``trt``: the pre-NMS tensors (``boxes``, ``scores``) are exposed as outputs of an
  in-memory copy and compared elementwise (a ``trt`` plugin cannot run on ONNX Runtime; its
  inputs are all that can be checked here).
- ``decoded`` post-processing: the NMS part of the graph alone is fed PyTorch's own pre-NMS
  tensors (bit-identical inputs) and checked against torchvision's ``postprocess_detections`` on
  the same tensors, in a way that exact score ties cannot break: per image the same number of
  detections, the same sorted scores (1e-6), and every detection equal to an input candidate
  (its box and its class score). The share of detections matched one-to-one (IoU >= 0.99, same
  label) is reported; under ties it may be below 1 without anything being wrong.

This guards against wrong graphs; equivalence on real images is ``prunekit verify``'s report.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from prunekit.export.compare import (
    FP32,
    Tolerance,
    compare_outputs,
    match_detections_report,
    unpad_detections,
)
from prunekit.export.metadata import INPUT_NAME
from prunekit.export.modules import SSDDecoded, example_input, network_outputs, postprocess_torchvision
from prunekit.export.nms import OUTPUT_NAMES
from prunekit.models import ArchConfig

log = logging.getLogger(__name__)
SCORE_ATOL = 1e-6  # same inputs: only summation order inside NMS-free ops can differ
BOX_ATOL = 1e-4


def _strip_custom_domains(model: onnx.ModelProto) -> onnx.ModelProto:
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def _pre_nms_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Images -> pre-NMS ``boxes``/``scores`` (everything after them dropped)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [tensors["boxes"], tensors["scores"]]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return _strip_custom_domains(gs.export_onnx(graph))


def _nms_model(model: onnx.ModelProto, num_anchors: int, num_classes: int) -> onnx.ModelProto:
    """Pre-NMS ``boxes``/``scores`` -> the four detection outputs (the network dropped)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    boxes, scores = tensors["boxes"], tensors["scores"]
    boxes.inputs.clear()
    scores.inputs.clear()
    boxes.dtype, boxes.shape = np.float32, ["batch", num_anchors, 4]
    scores.dtype, scores.shape = np.float32, ["batch", num_anchors, num_classes]
    graph.inputs = [boxes, scores]
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    return gs.export_onnx(graph)


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(2, torch.get_num_threads()))
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class RuntimeFailure(Exception):
    """ONNX Runtime could not run the exported graph on an input PyTorch handled."""


def _run(sess: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        outs = sess.run(None, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(first) from e
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def _reference(
    cfg: ArchConfig, form: str, raw: tuple[torch.Tensor, ...], anchors: torch.Tensor | None, decoder: Any
) -> dict[str, np.ndarray]:
    if not cfg.is_detector:
        return {"logits": raw[0].numpy()}
    if form == "raw":
        assert anchors is not None
        return {"bbox_regression": raw[0].numpy(), "cls_logits": raw[1].numpy(), "anchors": anchors.numpy()}
    with torch.no_grad():
        boxes, scores = decoder.decode(*raw)
    return {"boxes": boxes.numpy(), "scores": scores.numpy()}


def _normalised_boxes(outputs: dict[str, np.ndarray], cfg: ArchConfig) -> dict[str, np.ndarray]:
    """Pre-NMS boxes in [0, 1] units for the elementwise check.

    They are pixels of the input size (hundreds), produced through exp() of the regression, so
    FP32 rounding alone reaches ~1e-4 px on coordinates near 0 where the relative error is large;
    in normalised units the FP32 tolerance (1e-4 = 0.03 px at 300) is meaningful.
    """
    if "boxes" not in outputs:
        return outputs
    return {**outputs, "boxes": outputs["boxes"] / float(max(cfg.input_size))}


def _nms_problems(
    ref_dets: list[dict[str, np.ndarray]],
    out_dets: list[dict[str, np.ndarray]],
    boxes: np.ndarray,
    scores: np.ndarray,
) -> str:
    """Tie-proof comparison of the graph's NMS with torchvision's on identical inputs ('' = fine)."""
    for i, (r, o) in enumerate(zip(ref_dets, out_dets)):
        n_ref, n_out = len(r["scores"]), len(o["scores"])
        # Near-equal scores at the per-class top-k and the final detections_per_img cut may keep
        # a different (equally scored) candidate: tolerate that at the margin, at most 1%.
        slack = max(1, int(0.01 * max(n_ref, n_out)))
        if abs(n_ref - n_out) > slack:
            return f"image {i}: {n_out} detections, torchvision {n_ref}"
        n = min(n_ref, n_out)
        rs, os_ = np.sort(r["scores"])[::-1][:n], np.sort(o["scores"])[::-1][:n]
        bad = np.abs(rs - os_) > SCORE_ATOL
        if n and bad.sum() > slack:
            return f"image {i}: detection scores differ from torchvision's by {np.abs(rs - os_).max():.3g}"
        for b, s, lab in zip(o["boxes"], o["scores"], o["labels"]):
            if not 1 <= lab < scores.shape[-1]:
                return f"image {i}: label {lab} out of range"
            cand = np.abs(scores[i, :, lab] - s) <= SCORE_ATOL
            if not (np.abs(boxes[i][cand] - b).max(axis=1) <= BOX_ATOL).any():
                return f"image {i}: detection {b.tolist()} (label {lab}) is not one of the input candidates"
    return ""


def self_check(
    onnx_model: onnx.ModelProto,
    model: nn.Module,
    cfg: ArchConfig,
    form: str,
    meta: dict[str, Any],
    anchors: torch.Tensor | None,
    first: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
    tol: Tolerance = FP32,
) -> dict[str, Any] | None:
    """Run the checks; ``None`` when ONNX Runtime is not installed. Result is JSON-safe.

    ``first`` is the traced example input with the network's outputs on it (reused, not rerun);
    a second random batch of another size is added here.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime not installed: exported graph not self-checked")
        return None

    x0, raw0 = first
    x1 = example_input(cfg, 1 if len(x0) > 1 else 2, seed=1)
    try:
        samples = [(x0, raw0), (x1, network_outputs(model, x1))]
    except Exception as e:  # noqa: BLE001 - whatever the model raises
        return {
            "passed": False,
            "batch_sizes": [len(x0), len(x1)],
            "reports": [],
            "max_abs_error": None,
            "reason": f"the PyTorch model itself fails on a batch of {len(x1)} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it is not batch-size agnostic",
        }
    post = form in ("decoded", "trt")
    decoder = SSDDecoded(model, anchors) if post else None
    sess = _session(_pre_nms_model(onnx_model) if post else onnx_model)
    nms_sess = None
    if form == "decoded":
        nms_sess = _session(_nms_model(onnx_model, int(raw0[0].shape[1]), cfg.num_classes))
    result: dict[str, Any] = {
        "passed": True,
        "batch_sizes": [],
        "reports": [],
        "max_abs_error": 0.0,
        "reason": "",
    }
    matched, total = 0, 0
    for x, raw in samples:
        batch = len(x)
        ref = _reference(cfg, form, raw, anchors, decoder)
        try:
            got = _run(sess, {INPUT_NAME: x.numpy()})
        except RuntimeFailure as e:
            result.update(passed=False, reason=f"ONNX Runtime failed on a batch of {batch}: {e}")
            result["batch_sizes"].append(batch)
            return result
        rep = compare_outputs(_normalised_boxes(ref, cfg), _normalised_boxes(got, cfg), tol)
        result["batch_sizes"].append(batch)
        result["reports"].append(rep.to_dict())
        errs = [r.max_abs_error for r in rep.outputs.values() if r.max_abs_error is not None]
        result["max_abs_error"] = max([result["max_abs_error"], *errs])
        if not rep.passed and result["passed"]:
            result["passed"] = False
            result["reason"] = (
                f"ONNX Runtime output {rep.worst_output!r} differs from PyTorch beyond FP32 tolerance at batch {batch}, "
                f"sample {rep.worst_sample}: {rep.outputs[rep.worst_output].message}"
            )
        if nms_sess is not None:
            out = _run(nms_sess, {"boxes": ref["boxes"], "scores": ref["scores"]})
            dets = unpad_detections({k: out[k] for k in OUTPUT_NAMES})
            ref_dets = postprocess_torchvision(
                model, *raw, anchors, meta["score_thresh"], meta["nms_thresh"], meta["detections_per_img"]
            )
            problem = _nms_problems(ref_dets, dets, ref["boxes"], ref["scores"])
            m = match_detections_report(ref_dets, dets, iou=0.99, score_tol=1e-5)
            structural = "out of range" in problem or "not one of the input candidates" in problem
            if problem and not structural:
                # Random images give a trained model hundreds of near-equal scores (~1e-4 apart);
                # which of them survive NMS then depends on evaluation order, not on the graph.
                # Such differences are reported, not fatal: `prunekit verify` judges detections on
                # real images. A detection that is no input candidate, or a bad label, stays fatal.
                result.setdefault("near_ties", []).append(
                    f"batch {batch}: {problem} (matched {m.matched}/{m.total_ref} at IoU 0.99)"
                )
                log.warning(
                    "decoded export self-check: near-tie NMS differences on random images: %s", problem
                )
                problem = ""
            if problem and result["passed"]:
                result["passed"] = False
                result["reason"] = f"in-graph NMS differs from torchvision at batch {batch}: {problem}"
            matched += m.matched
            total += m.total_ref
    if form == "decoded":
        result["detections_matched"] = matched / total if total else 1.0
        result["detections_reference"] = total
        if total == 0:
            result["note"] = "no detections on random images; NMS checked on empty input only"
    if form == "trt":
        result["note"] = "EfficientNMS_TRT needs TensorRT; pre-NMS part checked"
    return result
