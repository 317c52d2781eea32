"""The backend-agnostic comparator: known errors, cosine, worst output, detection matching."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from prunekit.export.compare import (
    FP16,
    FP32,
    INT8,
    Tolerance,
    box_iou,
    compare_outputs,
    cosine_similarity,
    match_detections,
    match_detections_report,
    tolerance_for,
    unpad_detections,
)

EXPORT_DIR = Path(__file__).resolve().parents[1] / "prunekit" / "export"


def test_identical_outputs_pass_with_zero_error():
    ref = {"a": np.arange(12, dtype=np.float32).reshape(3, 4)}
    rep = compare_outputs(ref, {"a": ref["a"].copy()}, FP32)
    r = rep.outputs["a"]
    assert rep.passed and r.passed
    assert r.max_abs_error == 0.0 and r.max_rel_error == 0.0 and r.cosine == pytest.approx(1.0)
    assert r.num_failing == 0 and r.num_elements == 12


def test_known_errors_are_reported_exactly():
    ref = np.array([[1.0, 2.0, 4.0, 0.0]], dtype=np.float32)
    out = ref + np.array([[0.0, 0.0, 2e-3, 5e-5]], dtype=np.float32)
    r = compare_outputs({"x": ref}, {"x": out}, FP32).outputs["x"]
    assert r.max_abs_error == pytest.approx(2e-3, rel=1e-4)
    # 2e-3 / 4 = 5e-4 (relative); 5e-5 / floor 1e-4 = 0.5 for the zero reference.
    assert r.max_rel_error == pytest.approx(0.5, rel=1e-3)
    # 2e-3 abs fails atol 1e-4 but 5e-4 rel passes rtol 1e-3; 5e-5 abs passes atol.
    assert r.passed and r.num_failing == 0


def test_element_failing_both_abs_and_rel_fails():
    ref = np.array([0.0, 1.0], dtype=np.float32)
    out = np.array([2e-4, 1.0], dtype=np.float32)  # abs 2e-4 > 1e-4, rel 2e-4/1e-4 = 2 > 1e-3
    rep = compare_outputs({"x": ref}, {"x": out}, FP32)
    assert not rep.passed
    r = rep.outputs["x"]
    assert r.num_failing == 1 and r.worst_index == [0]
    assert r.violation == pytest.approx(2.0, rel=1e-3)


def test_cosine_similarity_values():
    a = np.array([1.0, 0.0])
    assert cosine_similarity(a, np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine_similarity(a, 5 * a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    v = np.array([1.0, 2.0, 3.0])
    w = np.array([1.0, 2.0, 3.5])
    assert cosine_similarity(v, w) == pytest.approx(float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)))


def test_perturbed_output_is_named_worst_with_its_sample():
    rng = np.random.default_rng(0)
    ref = {
        "boxes": rng.normal(size=(4, 10, 4)).astype(np.float32),
        "scores": rng.random((4, 10, 3)).astype(np.float32),
        "other": rng.normal(size=(4, 5)).astype(np.float32),
    }
    out = {k: v + 1e-6 for k, v in ref.items()}
    out["scores"] = out["scores"].copy()
    out["scores"][2, 7, 1] += 0.05
    out["other"] = out["other"].copy()
    out["other"][1, 0] += 3e-4 * max(1.0, abs(float(ref["other"][1, 0])))  # fails too, but less
    rep = compare_outputs(ref, out, FP32)
    assert not rep.passed
    assert rep.worst_output == "scores" and rep.worst_sample == 2
    assert rep.outputs["scores"].worst_index == [2, 7, 1]
    assert rep.outputs["boxes"].passed
    text = json.dumps(rep.to_dict())  # JSON-safe
    assert '"worst_output": "scores"' in text
    assert "scores" in rep.summary() and "FAIL" in rep.summary()


def test_shape_mismatch_missing_and_nan_fail():
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32), "c": np.ones(2, np.float32)}
    out = {"a": np.zeros((3, 2), np.float32), "c": np.array([1.0, np.nan], np.float32), "extra": np.ones(1)}
    rep = compare_outputs(ref, out, FP32)
    assert not rep.outputs["a"].passed and "shape" in rep.outputs["a"].message
    assert not rep.outputs["b"].passed and "missing" in rep.outputs["b"].message
    assert not rep.outputs["c"].passed and rep.outputs["c"].worst_index == [1]
    assert "extra" not in rep.outputs
    json.dumps(rep.to_dict())


def test_integer_outputs_must_match_exactly():
    ref = {"n": np.array([[3], [5]], np.int32)}
    assert compare_outputs(ref, {"n": np.array([[3], [5]], np.int32)}, INT8).passed
    rep = compare_outputs(ref, {"n": np.array([[3], [4]], np.int32)}, INT8)
    assert not rep.passed and rep.worst_sample == 1


def test_precision_tolerances_are_ordered_and_int8_uses_cosine():
    assert FP32.atol < FP16.atol < INT8.atol and FP32.rtol < FP16.rtol
    assert tolerance_for("FP16") is FP16
    assert tolerance_for("fp32", atol=1.0).atol == 1.0
    with pytest.raises(ValueError, match="precision"):
        tolerance_for("bf8")
    rng = np.random.default_rng(1)
    ref = rng.normal(size=1000).astype(np.float32)
    noisy = ref + rng.normal(scale=0.05, size=1000).astype(np.float32)  # cosine ~0.9988
    assert not compare_outputs({"x": ref}, {"x": noisy}, FP16).passed
    assert compare_outputs({"x": ref}, {"x": noisy}, INT8).passed
    bad = rng.normal(size=1000).astype(np.float32)  # unrelated: cosine ~0
    rep = compare_outputs({"x": ref}, {"x": bad}, INT8)
    assert not rep.passed and "cosine" in rep.outputs["x"].message


def test_custom_tolerance_round_trips_to_json():
    tol = Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.99)
    rep = compare_outputs({"x": np.ones(3)}, {"x": np.ones(3)}, tol)
    assert rep.to_dict()["tolerance"]["min_cosine"] == 0.99


def _dets(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int64),
    }


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[0.5, 0.0, 1.0]])
    z = np.array([[5, 5, 5, 5]], np.float32)  # fully clipped box matches itself
    assert box_iou(z, z)[0, 0] == 1.0


def test_match_detections_fraction():
    ref = _dets(
        [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70], [0, 0, 5, 5]], [0.9, 0.8, 0.7, 0.6], [1, 2, 1, 3]
    )
    same = _dets(ref["boxes"][::-1].copy(), ref["scores"][::-1].copy(), ref["labels"][::-1].copy())
    assert match_detections(ref, same) == 1.0
    out = _dets(
        [[0, 0, 10, 10], [20, 20, 40, 40.5], [50, 50, 60, 70], [0, 0, 5, 5]],  # box 2 IoU 0.976
        [0.9, 0.8, 0.7, 0.65],  # det 4 score off by 0.05
        [1, 2, 2, 3],  # det 3 wrong label
    )
    rep = match_detections_report([ref, ref], [out, same], iou=0.99, score_tol=1e-3)
    assert rep.matched == 1 + 4 and rep.total_ref == 8
    assert rep.fraction == pytest.approx(5 / 8)
    assert rep.per_image == [0.25, 1.0] and rep.worst_image == 0
    json.dumps(rep.to_dict())
    # Looser thresholds accept the shifted box and the score difference.
    assert match_detections(ref, out, iou=0.95, score_tol=0.1) == pytest.approx(3 / 4)


def test_match_detections_is_one_to_one_and_handles_empty():
    ref = _dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.9], [1, 1])
    out = _dets([[0, 0, 10, 10]], [0.9], [1])
    assert match_detections(ref, out) == 0.5
    empty = _dets(np.zeros((0, 4)), [], [])
    assert match_detections(empty, empty) == 1.0
    assert match_detections(ref, empty) == 0.0
    with pytest.raises(ValueError, match="images"):
        match_detections([ref], [ref, ref])


def test_unpad_detections():
    outputs = {
        "num_detections": np.array([[2], [0]], np.int32),
        "detection_boxes": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
        "detection_scores": np.array([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0]], np.float32),
        "detection_classes": np.array([[1, 2, 0], [0, 0, 0]], np.int32),
    }
    dets = unpad_detections(outputs)
    assert [len(d["boxes"]) for d in dets] == [2, 0]
    assert dets[0]["labels"].tolist() == [1, 2] and dets[0]["labels"].dtype == np.int64


@pytest.mark.parametrize("name", ["compare.py", "metadata.py"])
def test_torch_free_modules_do_not_import_torch(name):
    tree = ast.parse((EXPORT_DIR / name).read_text())
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert "torch" not in imported and "prunekit" not in imported


def test_export_layer_never_imports_deploy():
    for f in EXPORT_DIR.glob("*.py"):
        assert "prunekit.deploy" not in f.read_text(), f


def test_unmatched_detections_are_explained_only_by_ties_within_the_tolerance():
    """Planted ties: PyTorch kept box A (0.8004) where the backend kept its NMS competitor B
    (0.8000, IoU 0.6 > 0.45); a detection at 0.2504 against the 0.25 threshold; both explained.
    Planted mismatches: a lone 0.9 detection the backend lost, and a competitor 0.05 below: not."""
    a, b = [0, 0, 10, 10], [0, 2.5, 10, 12.5]  # IoU 0.6
    ref = _dets([a, [40, 40, 60, 60]], [0.8004, 0.2504], [1, 2])
    out = _dets([b], [0.8000], [1])
    kw = {"iou": 0.99, "score_tol": 1e-3, "nms_iou": 0.45, "thresholds": (0.25,), "cap": 200}
    rep = match_detections_report(ref, out, **kw)
    assert rep.matched == 0 and rep.fraction == 0.0
    assert [e["reason"].split(" ")[0] for e in rep.explained] == ["NMS", "score"]
    assert (
        "0.80040 vs 0.80000" in rep.explained[0]["reason"] and "threshold 0.25" in rep.explained[1]["reason"]
    )
    assert rep.passed_fraction == 1.0 and rep.unexplained == [] and rep.worst_image is None
    assert json.loads(json.dumps(rep.to_dict()))["passed_fraction"] == 1.0

    lost = _dets([[70, 70, 90, 90]], [0.9], [1])  # nothing near it, nowhere near a threshold
    far = _dets([b], [0.75], [1])  # overlapping competitor, but 0.05 below: a real difference
    rep = match_detections_report([ref, lost, ref], [out, _dets(np.zeros((0, 4)), [], []), far], **kw)
    assert rep.passed_fraction == pytest.approx(3 / 5)
    assert [(u["image"], u["score"]) for u in rep.unexplained] == [
        (1, pytest.approx(0.9)),
        (2, pytest.approx(0.8004)),
    ]
    assert rep.per_image == [1.0, 0.0, 0.5] and rep.worst_image == 1
    # without the post-processing settings nothing counts as a tie: the old, strict behaviour
    assert match_detections_report(ref, out).passed_fraction == 0.0
