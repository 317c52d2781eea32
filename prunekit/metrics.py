"""Detection and classification metrics: pycocotools mAP, the VOC07 11-point AP, top-1.

Inputs are plain numpy (one dict per image), so the same functions score PyTorch predictions,
ONNX Runtime / TensorRT outputs decoded by the torch-free runtime, and hand-written test cases.

Conventions:

- Boxes are ``xyxy`` in absolute pixels, continuous coordinates (no VOC "+1" pixel convention,
  as torchvision and pycocotools treat them).
- Labels are ``1..num_classes-1``; 0 is the background and never a class to score.
- ``difficult`` ground truth is ignored as the VOC devkit does: a detection matched to it counts
  neither as a true nor as a false positive, and it is not counted in the recall denominator. In
  the COCO metric it becomes an ``ignore`` box (standard IoU, matched at most once).
- A class with no (non-difficult) ground truth has no AP (``None`` in ``per_class``) and is left out
  of the means, as COCO's ``-1`` entries are.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

VOC_IOU = 0.5


def detection_metrics(
    preds: Sequence[dict[str, np.ndarray]],
    gts: Sequence[dict[str, np.ndarray]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score detections against ground truth, image by image (``preds[i]`` belongs to ``gts[i]``).

    ``preds[i]``: ``boxes [n,4]``, ``scores [n]``, ``labels [n]``; ``gts[i]``: ``boxes [m,4]``,
    ``labels [m]`` and optionally ``difficult [m]`` (bool). ``num_classes`` includes the background.
    ``class_names`` lists the non-background classes (``len == num_classes - 1``) or all of them.

    Returns fractions in [0, 1]: ``map`` (COCO AP@[.5:.95], 100 detections per image), ``map50``,
    ``map75``, ``map_small/medium/large``, ``voc07_ap`` (mean of the per-class VOC2007 11-point AP
    at IoU 0.5), counts, and ``per_class`` {name: {ap, ap50, voc07_ap, num_gt, num_pred}}.
    """
    if len(preds) != len(gts):
        raise ValueError(f"detection_metrics: {len(preds)} predictions for {len(gts)} images")
    names = _class_names(num_classes, class_names)
    p = _stack(preds, with_scores=True, num_classes=num_classes)
    g = _stack(gts, with_scores=False, num_classes=num_classes)

    coco = _coco_metrics(p, g, len(gts), num_classes)
    voc = voc07_ap(p, g, num_classes)
    per_class: dict[str, dict[str, Any]] = {}
    for c in range(1, num_classes):
        sel_g = g["labels"] == c
        per_class[names[c - 1]] = {
            "ap": _opt(coco["per_class_ap"][c - 1]),
            "ap50": _opt(coco["per_class_ap50"][c - 1]),
            "voc07_ap": _opt(voc[c - 1]),
            "num_gt": int((sel_g & ~g["difficult"]).sum()),
            "num_difficult": int((sel_g & g["difficult"]).sum()),
            "num_pred": int((p["labels"] == c).sum()),
        }
    return {
        "map": coco["map"],
        "map50": coco["map50"],
        "map75": coco["map75"],
        "map_small": coco["map_small"],
        "map_medium": coco["map_medium"],
        "map_large": coco["map_large"],
        "voc07_ap": _nanmean(voc),
        "num_images": len(gts),
        "num_gt": int((~g["difficult"]).sum()),
        "num_pred": int(len(p["labels"])),
        "per_class": per_class,
    }


def top1(logits_or_preds: Any, labels: Any) -> float:
    """Fraction of correct predictions; accepts logits ``[N, C]`` or predicted labels ``[N]``."""
    x = _to_numpy(logits_or_preds)
    y = _to_numpy(labels).reshape(-1)
    pred = x.argmax(axis=1) if x.ndim == 2 else x.reshape(-1)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"top1: {pred.shape[0]} predictions for {y.shape[0]} labels")
    if y.shape[0] == 0:
        return float("nan")
    return float((pred == y).mean())


# --------------------------------------------------------------------------------------------
# VOC2007 11-point AP


def voc07_ap(p: dict[str, np.ndarray], g: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """Per-class VOC07 11-point AP (``[num_classes-1]``, NaN where a class has no GT).

    ``p`` / ``g`` are the flat arrays :func:`_stack` makes (image index per box). Matching follows
    the devkit: in score order each detection takes its highest-IoU ground truth of the same class
    and image; above the threshold it is a TP if that box is not taken yet, ignored if the box is
    difficult, else an FP. A detection never falls back to its second-best box, which is what
    makes the greedy loop vectorisable: the TP of a box is its first claimant in score order.
    """
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        gsel = g["labels"] == c
        npos = int((gsel & ~g["difficult"]).sum())
        if npos == 0:
            continue
        psel = np.flatnonzero(p["labels"] == c)
        if psel.size == 0:
            out[c - 1] = 0.0
            continue
        order = psel[np.argsort(-p["scores"][psel], kind="stable")]
        tp, fp = _voc_match(
            p["image"][order],
            p["boxes"][order],
            g["image"][gsel],
            g["boxes"][gsel],
            g["difficult"][gsel],
            VOC_IOU,
        )
        out[c - 1] = _ap_11point(np.cumsum(tp), np.cumsum(fp), npos)
    return out


def _voc_match(
    d_img: np.ndarray,
    d_box: np.ndarray,
    g_img: np.ndarray,
    g_box: np.ndarray,
    g_diff: np.ndarray,
    iou_thr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags (0/1 floats) for score-sorted detections; ignored detections are dropped."""
    n_det = d_img.shape[0]
    # Ground truth grouped by image (stable, so file order breaks IoU ties as np.argmax does).
    g_order = np.argsort(g_img, kind="stable")
    g_img, g_box, g_diff = g_img[g_order], g_box[g_order], g_diff[g_order]
    n_img = int(max(d_img.max(initial=-1), g_img.max(initial=-1))) + 1
    counts = np.bincount(g_img, minlength=n_img)
    starts = np.cumsum(counts) - counts
    # Every (detection, gt of the same image) pair, detection-major.
    per_det = counts[d_img]
    pair_det = np.repeat(np.arange(n_det), per_det)
    within = np.arange(per_det.sum()) - np.repeat(np.cumsum(per_det) - per_det, per_det)
    pair_gt = np.repeat(starts[d_img], per_det) + within
    iou = _paired_iou(d_box[pair_det], g_box[pair_gt])

    best = np.full(n_det, -1.0)
    np.maximum.at(best, pair_det, iou)
    is_best = iou == best[pair_det]
    first_det, first_pair = np.unique(pair_det[is_best], return_index=True)
    best_gt = np.full(n_det, -1)
    best_gt[first_det] = pair_gt[is_best][first_pair]

    hit = best > iou_thr  # the devkit's strict ">"
    ignored = hit & g_diff[np.maximum(best_gt, 0)]
    claim = hit & ~ignored
    tp = np.zeros(n_det)
    claimers = np.flatnonzero(claim)
    _, first_claim = np.unique(best_gt[claimers], return_index=True)
    tp[claimers[first_claim]] = 1.0
    keep = ~ignored
    return tp[keep], (1.0 - tp)[keep]


def _ap_11point(ctp: np.ndarray, cfp: np.ndarray, npos: int) -> float:
    if ctp.size == 0:
        return 0.0
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    # max precision at recall >= t: a running max from the right, looked up at the first rec >= t
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    idx = np.searchsorted(rec, np.linspace(0.0, 1.0, 11), side="left")
    vals = np.where(idx < rec.size, envelope[np.minimum(idx, rec.size - 1)], 0.0)
    return float(vals.mean())


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# COCO metrics through pycocotools


class _DifficultAwareCOCOeval(COCOeval):
    """COCOeval that honours an ``ignore`` flag on ground truth (pycocotools overwrites it)."""

    def _prepare(self) -> None:
        super()._prepare()
        for anns in self._gts.values():
            for gt in anns:
                gt["ignore"] = int(bool(gt["iscrowd"]) or bool(gt.get("difficult", 0)))


def _coco_metrics(p: dict[str, np.ndarray], g: dict[str, np.ndarray], n_img: int, num_classes: int) -> dict:
    cats = [{"id": c, "name": str(c)} for c in range(1, num_classes)]
    images = [{"id": i, "width": 0, "height": 0} for i in range(n_img)]
    gt_anns = _coco_anns(g["image"], g["boxes"], g["labels"], difficult=g["difficult"])
    dt_anns = _coco_anns(p["image"], p["boxes"], p["labels"], scores=p["scores"])
    coco_gt = _coco_from(images, cats, gt_anns)
    coco_dt = _coco_from(images, cats, dt_anns)
    ev = _DifficultAwareCOCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = list(range(n_img))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ev.evaluate()
        ev.accumulate()
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M maxDets]
    prec = ev.eval["precision"]
    m = len(ev.params.maxDets) - 1  # 100 detections per image, as COCO's headline numbers
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    iou75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    return {
        "map": _mean_valid(prec[:, :, :, 0, m]),
        "map50": _mean_valid(prec[iou50, :, :, 0, m]),
        "map75": _mean_valid(prec[iou75, :, :, 0, m]),
        "map_small": _mean_valid(prec[:, :, :, 1, m]),
        "map_medium": _mean_valid(prec[:, :, :, 2, m]),
        "map_large": _mean_valid(prec[:, :, :, 3, m]),
        "per_class_ap": [_mean_valid(prec[:, :, k, 0, m]) for k in range(num_classes - 1)],
        "per_class_ap50": [_mean_valid(prec[iou50, :, k, 0, m]) for k in range(num_classes - 1)],
    }


def _coco_anns(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    difficult: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    wh = boxes[:, 2:] - boxes[:, :2]
    xywh = np.concatenate([boxes[:, :2], wh], axis=1).tolist()
    area = (wh[:, 0] * wh[:, 1]).tolist()
    img = image.tolist()
    lab = labels.tolist()
    anns = [
        {
            "id": i + 1,
            "image_id": img[i],
            "category_id": lab[i],
            "bbox": xywh[i],
            "area": area[i],
            "iscrowd": 0,
        }
        for i in range(len(lab))
    ]
    if scores is not None:
        for a, s in zip(anns, scores.tolist()):
            a["score"] = s
    if difficult is not None:
        for a, d in zip(anns, difficult.tolist()):
            a["difficult"] = int(d)
    return anns


def _coco_from(images: list[dict], cats: list[dict], anns: list[dict]) -> COCO:
    # Built in memory: COCO.loadRes cannot take an empty result list, and no JSON round trip.
    coco = COCO()
    coco.dataset = {"images": images, "categories": cats, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------
# helpers


def _stack(items: Sequence[dict[str, Any]], with_scores: bool, num_classes: int) -> dict[str, np.ndarray]:
    """Concatenate per-image dicts into flat arrays with an ``image`` index per box."""
    boxes, labels, scores, difficult, image = [], [], [], [], []
    for i, d in enumerate(items):
        b = _to_numpy(d["boxes"]).astype(np.float64).reshape(-1, 4)
        lab = _to_numpy(d["labels"]).astype(np.int64).reshape(-1)
        if b.shape[0] != lab.shape[0]:
            raise ValueError(f"image {i}: {b.shape[0]} boxes but {lab.shape[0]} labels")
        if with_scores:
            s = _to_numpy(d["scores"]).astype(np.float64).reshape(-1)
            if s.shape[0] != lab.shape[0]:
                raise ValueError(f"image {i}: {b.shape[0]} boxes but {s.shape[0]} scores")
            scores.append(s)
        else:
            bad = (lab < 1) | (lab >= num_classes)
            if bad.any():
                raise ValueError(
                    f"image {i}: ground-truth label {int(lab[bad][0])} outside 1..{num_classes - 1}"
                )
            diff = d.get("difficult")
            difficult.append(
                np.zeros(lab.shape[0], bool) if diff is None else _to_numpy(diff).astype(bool).reshape(-1)
            )
        boxes.append(b)
        labels.append(lab)
        image.append(np.full(lab.shape[0], i, np.int64))
    out = {
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "image": np.concatenate(image) if image else np.zeros(0, np.int64),
    }
    if with_scores:
        out["scores"] = np.concatenate(scores) if scores else np.zeros(0)
        # Background or unknown labels are not detections of any class.
        valid = (out["labels"] >= 1) & (out["labels"] < num_classes)
        out = {k: v[valid] for k, v in out.items()}
    else:
        out["difficult"] = np.concatenate(difficult) if difficult else np.zeros(0, bool)
    return out


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(1, num_classes)]
    names = list(class_names)
    if len(names) == num_classes:
        names = names[1:]
    if len(names) != num_classes - 1:
        raise ValueError(f"{len(names)} class names for {num_classes - 1} non-background classes")
    return names


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _mean_valid(a: np.ndarray) -> float:
    v = a[a > -1]
    return float(v.mean()) if v.size else float("nan")


def _nanmean(a: np.ndarray) -> float:
    v = a[~np.isnan(a)]
    return float(v.mean()) if v.size else float("nan")


def _opt(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
