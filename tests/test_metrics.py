"""Detection metrics on hand-computed cases, and the vectorised VOC07 AP against the devkit loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.metrics import detection_metrics, top1


def _gt(boxes, labels, difficult=None):
    b = np.asarray(boxes, float).reshape(-1, 4)
    d = np.zeros(len(b), bool) if difficult is None else np.asarray(difficult, bool)
    return {"boxes": b, "labels": np.asarray(labels, np.int64), "difficult": d}


def _pred(boxes, labels, scores):
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "scores": np.asarray(scores, float),
    }


A = [10, 10, 50, 60]
B = [100, 100, 160, 140]
FAR = [200, 200, 240, 240]


def test_perfect_predictions_score_one():
    gts = [_gt([A, B], [1, 2]), _gt([B], [1])]
    preds = [_pred([A, B], [1, 2], [0.9, 0.8]), _pred([B], [1], [0.7])]
    m = detection_metrics(preds, gts, num_classes=3, class_names=["cat", "dog"])
    for key in ("map", "map50", "map75", "voc07_ap"):
        assert m[key] == pytest.approx(1.0)
    assert m["per_class"]["cat"] == {
        "ap": pytest.approx(1.0),
        "ap50": pytest.approx(1.0),
        "voc07_ap": pytest.approx(1.0),
        "num_gt": 2,
        "num_difficult": 0,
        "num_pred": 2,
    }
    assert (m["num_images"], m["num_gt"], m["num_pred"]) == (2, 3, 3)


def test_one_tp_then_one_fp_known_curve():
    # 2 GT; ranked detections: TP (recall .5, precision 1), then FP (recall .5, precision .5).
    gts = [_gt([A, B], [1, 1])]
    preds = [_pred([A, FAR], [1, 1], [0.9, 0.8])]
    m = detection_metrics(preds, gts, num_classes=2)
    # VOC07: recall points 0, .1, ..., .5 see precision 1; .6 .. 1.0 see nothing -> 6/11.
    assert m["voc07_ap"] == pytest.approx(6 / 11)
    # COCO: 101 recall points, precision 1 up to recall .50 (51 points), 0 after; same at every IoU.
    assert m["map50"] == pytest.approx(51 / 101)
    assert m["map"] == pytest.approx(51 / 101)


def test_fp_ranked_first_lowers_precision():
    # FP (score .9) before the TP (score .8): precision .5 at recall .5 -> VOC07 = 6 * .5 / 11.
    gts = [_gt([A, B], [1, 1])]
    preds = [_pred([FAR, A], [1, 1], [0.9, 0.8])]
    m = detection_metrics(preds, gts, num_classes=2)
    assert m["voc07_ap"] == pytest.approx(3 / 11)
    assert m["map50"] == pytest.approx(51 * 0.5 / 101)


def test_duplicate_detection_is_false_positive_and_iou_threshold():
    gts = [_gt([A], [1])]
    shifted = [10, 10, 50, 44]  # IoU with A = 34/50 = 0.68: a hit at .5 .. .65, a miss from .7 on
    preds = [_pred([A, A], [1, 1], [0.9, 0.8])]
    m = detection_metrics(preds, gts, num_classes=2)
    assert m["voc07_ap"] == pytest.approx(1.0)  # the duplicate comes after full recall
    m = detection_metrics([_pred([shifted], [1], [0.9])], gts, num_classes=2)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(0.4)  # 4 of the 10 IoU thresholds


def test_difficult_ground_truth_is_ignored():
    # A difficult box: detecting it is neither TP nor FP, missing it costs no recall.
    gts = [_gt([A, B], [1, 1], difficult=[False, True])]
    m = detection_metrics([_pred([B, A], [1, 1], [0.95, 0.9])], gts, num_classes=2)
    assert m["voc07_ap"] == pytest.approx(1.0)
    assert m["map50"] == pytest.approx(1.0)
    assert m["per_class"]["1"]["num_gt"] == 1 and m["per_class"]["1"]["num_difficult"] == 1
    m = detection_metrics([_pred([A], [1], [0.9])], gts, num_classes=2)
    assert m["voc07_ap"] == pytest.approx(1.0)
    # The same box not flagged difficult: half the recall.
    gts_plain = [_gt([A, B], [1, 1])]
    m = detection_metrics([_pred([A], [1], [0.9])], gts_plain, num_classes=2)
    assert m["voc07_ap"] == pytest.approx(6 / 11)
    assert m["map50"] == pytest.approx(51 / 101)


def test_class_without_gt_is_excluded_and_images_without_predictions_count():
    gts = [_gt([A], [1]), _gt([B], [1])]
    preds = [_pred([A, FAR], [1, 2], [0.9, 0.9]), _pred(np.zeros((0, 4)), [], [])]
    m = detection_metrics(preds, gts, num_classes=3)
    assert m["per_class"]["2"]["ap"] is None and m["per_class"]["2"]["voc07_ap"] is None
    assert m["per_class"]["2"]["num_pred"] == 1
    # class 1: one of two found, precision 1 -> only class 1 enters the means
    assert m["voc07_ap"] == pytest.approx(6 / 11)
    assert m["map50"] == pytest.approx(51 / 101)


def test_no_predictions_at_all_and_background_labels_dropped():
    gts = [_gt([A], [1])]
    m = detection_metrics([_pred(np.zeros((0, 4)), [], [])], gts, num_classes=2)
    assert m["map"] == 0.0 and m["voc07_ap"] == 0.0
    m = detection_metrics([_pred([A], [0], [0.9])], gts, num_classes=2)  # label 0 = background
    assert m["num_pred"] == 0 and m["map50"] == 0.0


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="outside 1..1"):
        detection_metrics([_pred([A], [1], [0.5])], [_gt([A], [2])], num_classes=2)
    with pytest.raises(ValueError, match="2 predictions for 1 images"):
        detection_metrics([_pred([A], [1], [0.5])] * 2, [_gt([A], [1])], num_classes=2)
    with pytest.raises(ValueError, match="class names"):
        detection_metrics(
            [_pred([A], [1], [0.5])], [_gt([A], [1])], num_classes=2, class_names=["a", "b", "c"]
        )


def _devkit_voc07(preds, gts, c):
    """The VOC devkit's loop (py-faster-rcnn voc_eval, without the +1 pixel), as the reference."""
    recs, npos = {}, 0
    for i, g in enumerate(gts):
        sel = g["labels"] == c
        recs[i] = {"bb": g["boxes"][sel], "diff": g["difficult"][sel], "det": np.zeros(sel.sum(), bool)}
        npos += int((~g["difficult"][sel]).sum())
    if npos == 0:
        return None
    ids = [i for i, p in enumerate(preds) for _ in range(int((p["labels"] == c).sum()))]
    conf = np.concatenate([p["scores"][p["labels"] == c] for p in preds])
    bbs = np.concatenate([p["boxes"][p["labels"] == c] for p in preds])
    order = np.argsort(-conf, kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for d, k in enumerate(order):
        r, bb = recs[ids[k]], bbs[k]
        ovmax, jmax = -np.inf, -1
        if r["bb"].size:
            g = r["bb"]
            iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]), 0)
            ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]), 0)
            inter = iw * ih
            union = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
            ov = inter / union
            ovmax, jmax = ov.max(), ov.argmax()
        if ovmax > 0.5:
            if not r["diff"][jmax]:
                if not r["det"][jmax]:
                    tp[d], r["det"][jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) / 11 for t in np.arange(0, 1.1, 0.1))


def test_vectorised_voc07_matches_devkit_loop_on_random_cases():
    rng = np.random.default_rng(0)
    num_classes = 4
    for _ in range(25):
        gts, preds = [], []
        for _ in range(int(rng.integers(1, 7))):
            n = int(rng.integers(0, 6))
            xy = rng.uniform(0, 50, (n, 2))
            g = _gt(
                np.c_[xy, xy + rng.uniform(5, 30, (n, 2))],
                rng.integers(1, num_classes, n),
                rng.random(n) < 0.2,
            )
            m = int(rng.integers(0, 10))
            if n:
                src = rng.integers(0, n, m)
                boxes = g["boxes"][src] + rng.normal(0, 3, (m, 4))
                labels = np.where(rng.random(m) < 0.8, g["labels"][src], rng.integers(1, num_classes, m))
            else:
                xy = rng.uniform(0, 50, (m, 2))
                boxes, labels = np.c_[xy, xy + 10], rng.integers(1, num_classes, m)
            gts.append(g)
            preds.append(_pred(boxes, labels, np.round(rng.random(m), 1)))  # rounded: ties happen
        m = detection_metrics(preds, gts, num_classes)
        for c in range(1, num_classes):
            ref = _devkit_voc07(preds, gts, c)
            got = m["per_class"][str(c)]["voc07_ap"]
            assert (got is None and ref is None) or got == pytest.approx(ref, abs=1e-12)


def test_top1_accepts_logits_labels_and_tensors():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1(logits, [1, 0, 0, 0]) == pytest.approx(0.75)
    assert top1(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        top1(logits, [1, 0])
