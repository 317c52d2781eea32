"""Backend-agnostic numerical comparison of named outputs (the equivalence checker's core).

Knows no backend and imports no torch: it compares dicts of numpy arrays, so the deploy layer can
feed it outputs from ONNX Runtime, TensorRT or PyTorch alike (Polygraphy's comparator split).

Element rule (as Polygraphy's elementwise check): an element passes when
``|out - ref| <= atol * scale`` OR ``|out - ref| / max(|ref|, rel_floor) <= rtol``, where ``scale``
is the output's largest |reference value| (at least 1), so atol is relative to the output's range. The floor keeps the
relative error finite where the reference is (near) zero; such elements are judged by ``atol``
anyway. An output passes when every element passes (``elementwise=True``), its cosine similarity
is at least ``min_cosine`` (when set), and its shape matches. Integer outputs (detection counts,
class ids) must match exactly whatever the tolerance.

Precisions (module constants, chosen for VGG/SSD-sized conv stacks):

- ``FP32``: abs 1e-4 / rel 1e-3; only accumulation order differs between backends.
- ``FP16``: abs 2e-2 / rel 2e-2, cosine >= 0.999; half precision keeps ~3 decimal digits per op
  and SSD stacks ~20 convs.
- ``INT8``: judged at detection / similarity level: elementwise errors of a quantised network are
  not meaningful, so only cosine >= 0.98 per output, and detections must match at IoU >= 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Pass/fail limits for one precision; see the module docstring for the element rule."""

    atol: float
    rtol: float
    rel_floor: float = 1e-4  # |ref| below this counts as this when computing the relative error
    min_cosine: float | None = None  # None: cosine is reported but does not decide
    elementwise: bool = True  # False: elementwise errors are reported but do not decide (INT8)
    det_iou: float = 0.99  # detection-level: same label and IoU >= this ...
    det_score_atol: float = 1e-3  # ... and |score difference| <= this
    min_det_match: float = 0.99  # fraction of reference detections that must be matched

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FP32 = Tolerance(atol=1e-4, rtol=1e-3, rel_floor=1e-4, min_cosine=None)
FP16 = Tolerance(
    atol=2e-2,
    rtol=2e-2,
    rel_floor=1e-2,
    min_cosine=0.999,
    det_iou=0.95,
    det_score_atol=1e-2,
    min_det_match=0.95,
)
INT8 = Tolerance(
    atol=0.5,
    rtol=0.1,
    rel_floor=1e-1,
    min_cosine=0.98,
    elementwise=False,
    det_iou=0.5,
    det_score_atol=0.1,
    min_det_match=0.8,
)
TOLERANCES: dict[str, Tolerance] = {"fp32": FP32, "fp16": FP16, "int8": INT8}


def tolerance_for(precision: str, **overrides: Any) -> Tolerance:
    """The default tolerance of a precision ("fp32", "fp16", "int8"), optionally with overrides."""
    key = precision.lower()
    if key not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(TOLERANCES)}")
    return replace(TOLERANCES[key], **overrides) if overrides else TOLERANCES[key]


@dataclass
class OutputReport:
    """Errors of one named output. ``worst_index`` is the element with the largest violation and
    ``worst_sample`` its index along the first (batch) axis."""

    name: str
    passed: bool
    shape_ref: list[int]
    shape_out: list[int] | None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    cosine: float | None = None
    num_failing: int = 0
    num_elements: int = 0
    violation: float = 0.0  # max over elements of min(abs/atol, rel/rtol); > 1 means out of tolerance
    worst_index: list[int] | None = None
    worst_sample: int | None = None
    message: str = ""


@dataclass
class CompareReport:
    """All outputs of one comparison; ``worst_output`` is the output with the largest violation."""

    passed: bool
    tolerance: dict[str, Any]
    outputs: dict[str, OutputReport] = field(default_factory=dict)
    worst_output: str | None = None
    worst_sample: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    def summary(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} (atol {self.tolerance['atol']:g}, rtol {self.tolerance['rtol']:g})"
        ]
        for r in self.outputs.values():
            if r.max_abs_error is None:
                lines.append(f"  {r.name}: {'ok' if r.passed else 'FAIL'} {r.message}")
                continue
            lines.append(
                f"  {r.name}: {'ok  ' if r.passed else 'FAIL'} max_abs {r.max_abs_error:.3g} "
                f"max_rel {r.max_rel_error:.3g} cos {r.cosine:.6f} failing {r.num_failing}/{r.num_elements}"
                + (f" worst sample {r.worst_sample}" if r.worst_sample is not None else "")
            )
        if not self.passed:
            lines.append(f"  worst output: {self.worst_output} (sample {self.worst_sample})")
        return "\n".join(lines)


def _json_safe(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, np.generic):
        return _json_safe(o.item())
    return o


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the flattened arrays in float64; 1.0 when both are all-zero, 0.0 when one is."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0 or not (np.isfinite(na) and np.isfinite(nb)):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_output(name: str, ref: np.ndarray, out: np.ndarray | None, tol: Tolerance) -> OutputReport:
    """Compare one output; see the module docstring for the rules."""
    ref = np.asarray(ref)
    rep = OutputReport(name=name, passed=False, shape_ref=list(ref.shape), shape_out=None)
    if out is None:
        rep.message = "missing from the compared outputs"
        rep.violation = math.inf
        return rep
    out = np.asarray(out)
    rep.shape_out = list(out.shape)
    if ref.shape != out.shape:
        rep.message = f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        rep.violation = math.inf
        return rep
    rep.num_elements = int(ref.size)
    if ref.size == 0:
        rep.passed = True
        rep.max_abs_error = rep.max_rel_error = rep.mean_abs_error = 0.0
        rep.cosine = 1.0
        return rep
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    diff = np.abs(o - r)
    # NaN anywhere it is not in the reference is an infinite error.
    diff = np.where(np.isnan(r) & np.isnan(o), 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(np.nan_to_num(r)), tol.rel_floor)
    exact = np.issubdtype(ref.dtype, np.integer) or np.issubdtype(ref.dtype, np.bool_)
    if exact:
        viol = np.where(diff > 0, np.inf, 0.0)
    else:
        # atol is read in units of the output's own scale (its largest |value|, at least 1):
        # accumulation-order differences grow with the activations' magnitude (an untrained
        # 1/16-width SSD: 2 of 558,848 box deltas off by 1.6e-4 at FP32, cosine 1 - 4e-12)
        finite = np.abs(r[np.isfinite(r)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            viol = np.minimum(
                diff / (tol.atol * scale) if tol.atol > 0 else np.where(diff > 0, np.inf, 0.0),
                rel / tol.rtol if tol.rtol > 0 else np.where(rel > 0, np.inf, 0.0),
            )
    failing = viol > 1.0
    rep.max_abs_error = float(diff.max())
    rep.max_rel_error = float(rel.max())
    rep.mean_abs_error = float(diff.mean())
    rep.cosine = cosine_similarity(r, o)
    rep.num_failing = int(failing.sum())
    worst = int(np.argmax(viol))
    rep.violation = float(viol.flat[worst])
    rep.worst_index = [int(i) for i in np.unravel_index(worst, ref.shape)]
    rep.worst_sample = rep.worst_index[0] if rep.worst_index else None
    ok = True
    reasons = []
    if (exact or tol.elementwise) and rep.num_failing:
        ok = False
        reasons.append(f"{rep.num_failing} elements out of tolerance")
    if tol.min_cosine is not None and rep.cosine < tol.min_cosine:
        ok = False
        reasons.append(f"cosine {rep.cosine:.6f} < {tol.min_cosine}")
        # Cosine failures outrank elementwise ones when ranking outputs.
        rep.violation = max(rep.violation, 1.0 + (tol.min_cosine - rep.cosine) * 1e6)
    rep.passed = ok
    rep.message = "; ".join(reasons)
    return rep


def compare_outputs(
    ref: dict[str, np.ndarray], out: dict[str, np.ndarray], tol: Tolerance = FP32
) -> CompareReport:
    """Compare every output of ``ref`` with the same-named output of ``out``.

    Outputs only in ``out`` are ignored (a backend may expose more); outputs missing from ``out``
    fail. The worst output is the one with the largest violation (failing outputs first).
    """
    reports = {name: compare_output(name, r, out.get(name), tol) for name, r in ref.items()}
    rep = CompareReport(
        passed=all(r.passed for r in reports.values()), tolerance=tol.to_dict(), outputs=reports
    )
    if reports:
        worst = max(reports.values(), key=lambda r: (not r.passed, r.violation))
        rep.worst_output = worst.name
        rep.worst_sample = worst.worst_sample
    return rep


# --- detection-level matching ---------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    # Two identical zero-area boxes (fully clipped) are the same detection.
    same = np.all(a[:, None, :] == b[None, :, :], axis=-1)
    return np.where(same, 1.0, iou)


@dataclass
class DetectionMatch:
    """How many reference detections a backend reproduced (same label, IoU, score within tol)."""

    fraction: float
    matched: int
    total_ref: int
    total_out: int
    per_image: list[float]
    worst_image: int | None
    iou: float
    score_tol: float
    # unmatched reference detections that a tie within ``score_tol`` decided (an NMS competitor, a
    # score threshold, the per-image cap): reported, and counted with the matched ones by ``passed_fraction``
    explained: list[dict[str, Any]] = field(default_factory=list)
    unexplained: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed_fraction(self) -> float:
        """Matched or explained by a tie, over all reference detections."""
        return (self.matched + len(self.explained)) / self.total_ref if self.total_ref else 1.0

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self) | {"passed_fraction": self.passed_fraction})


def _as_list(dets: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [dets] if isinstance(dets, dict) else list(dets)


def _match_image(
    ref: dict[str, np.ndarray], out: dict[str, np.ndarray], iou: float, score_tol: float
) -> tuple[int, list[int]]:
    """Matched count and the indices of the unmatched reference detections."""
    rb, rs, rl = (np.asarray(ref[k]) for k in ("boxes", "scores", "labels"))
    ob, os_, ol = (np.asarray(out[k]) for k in ("boxes", "scores", "labels"))
    if len(rb) == 0 or len(ob) == 0:
        return 0, list(range(len(rb)))
    ious = box_iou(rb, ob)
    ok = (
        (rl.reshape(-1, 1) == ol.reshape(1, -1))
        & (ious >= iou)
        & (np.abs(rs.reshape(-1, 1).astype(np.float64) - os_.reshape(1, -1)) <= score_tol)
    )
    taken = np.zeros(len(ob), dtype=bool)
    matched, unmatched = 0, []
    # Greedy, highest reference score first, best-IoU free candidate: one-to-one.
    for i in np.argsort(-rs.astype(np.float64), kind="stable"):
        cand = np.flatnonzero(ok[i] & ~taken)
        if cand.size:
            taken[cand[np.argmax(ious[i, cand])]] = True
            matched += 1
        else:
            unmatched.append(int(i))
    return matched, sorted(unmatched)


def _tie_reason(
    i: int,
    ref: dict[str, np.ndarray],
    out: dict[str, np.ndarray],
    score_tol: float,
    nms_iou: float | None,
    thresholds: Sequence[float],
    cap: int | None,
) -> str | None:
    """Why reference detection ``i`` may be missing without any numerical error, or None.

    Only a decision a score difference within ``score_tol`` could flip counts: a same-class box
    that overlaps it past the NMS threshold (in either set) and scores within the tolerance (which
    of the two survives NMS is then a coin toss), a score threshold within the tolerance of its
    score, or the per-image cap whose last kept score is within the tolerance of it.
    """
    box, score, label = (
        np.asarray(ref["boxes"])[i],
        float(np.asarray(ref["scores"])[i]),
        np.asarray(ref["labels"])[i],
    )
    if nms_iou is not None:
        for name, dets, skip in (("reference", ref, i), ("backend", out, None)):
            b, sc, lab = (np.asarray(dets[k]) for k in ("boxes", "scores", "labels"))
            if len(b) == 0:
                continue
            ov = box_iou(box[None], b)[0]
            close = (lab == label) & (ov > nms_iou) & (np.abs(sc.astype(np.float64) - score) <= score_tol)
            if skip is not None:
                close[skip] = False
            if close.any():
                j = int(np.flatnonzero(close)[0])
                return f"NMS tie with a {name} box (IoU {ov[j]:.2f} > {nms_iou:g}, scores {score:.5f} vs {float(sc[j]):.5f})"
    for t in thresholds:
        if abs(score - t) <= score_tol:
            return f"score {score:.5f} within {score_tol:g} of the threshold {t:g}"
    scores = np.sort(np.asarray(ref["scores"], dtype=np.float64))[::-1]
    if cap is not None and len(scores) >= cap and abs(score - scores[cap - 1]) <= score_tol:
        return (
            f"score {score:.5f} within {score_tol:g} of the per-image cap's last score {scores[cap - 1]:.5f}"
        )
    return None


def match_detections_report(
    ref_dets: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    out_dets: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    iou: float = 0.99,
    score_tol: float = 1e-3,
    nms_iou: float | None = None,
    thresholds: Sequence[float] = (),
    cap: int | None = None,
) -> DetectionMatch:
    """Match detections image by image; each image is a dict of ``boxes`` [n,4] xyxy, ``scores``
    [n], ``labels`` [n]. An image without reference detections counts as fully matched.

    Every unmatched reference detection is classified: *explained* when a tie within ``score_tol``
    decided it (an NMS competitor at IoU > ``nms_iou``, one of the score ``thresholds``, the
    per-image ``cap``; see :func:`_tie_reason`), else *unexplained*. Flat images and barely trained
    models produce such ties, and FP32 rounding legitimately flips them; anything else is a
    mismatch. ``per_image`` and ``worst_image`` count explained ones as matched.
    """
    refs, outs = _as_list(ref_dets), _as_list(out_dets)
    if len(refs) != len(outs):
        raise ValueError(f"detections for {len(refs)} reference images but {len(outs)} compared images")
    per_image, matched, total_ref, total_out = [], 0, 0, 0
    explained: list[dict[str, Any]] = []
    unexplained: list[dict[str, Any]] = []
    for k, (r, o) in enumerate(zip(refs, outs)):
        n_ref, n_out = len(np.asarray(r["boxes"]).reshape(-1, 4)), len(np.asarray(o["boxes"]).reshape(-1, 4))
        m, missing = _match_image(r, o, iou, score_tol)
        ok = 0
        for i in missing:
            why = _tie_reason(i, r, o, score_tol, nms_iou, thresholds, cap)
            rec = {
                "image": k,
                "score": float(np.asarray(r["scores"])[i]),
                "label": int(np.asarray(r["labels"])[i]),
            }
            if why is None:
                unexplained.append(rec)
            else:
                explained.append(rec | {"reason": why})
                ok += 1
        matched += m
        total_ref += n_ref
        total_out += n_out
        per_image.append((m + ok) / n_ref if n_ref else 1.0)
    worst = int(np.argmin(per_image)) if per_image and min(per_image) < 1.0 else None
    return DetectionMatch(
        fraction=matched / total_ref if total_ref else 1.0,
        matched=matched,
        total_ref=total_ref,
        total_out=total_out,
        per_image=per_image,
        worst_image=worst,
        iou=iou,
        score_tol=score_tol,
        explained=explained,
        unexplained=unexplained,
    )


def match_detections(
    ref_dets: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    out_dets: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    iou: float = 0.99,
    score_tol: float = 1e-3,
) -> float:
    """Fraction of reference detections matched one-to-one by a detection with the same label,
    IoU >= ``iou`` and score within ``score_tol`` (1.0 when there are no reference detections)."""
    return match_detections_report(ref_dets, out_dets, iou, score_tol).fraction


def unpad_detections(outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per-image detection dicts from the padded ``decoded``/``trt`` graph outputs."""
    n = np.asarray(outputs["num_detections"]).reshape(-1)
    boxes, scores, classes = (
        outputs[k] for k in ("detection_boxes", "detection_scores", "detection_classes")
    )
    return [
        {
            "boxes": boxes[i, : n[i]],
            "scores": scores[i, : n[i]],
            "labels": classes[i, : n[i]].astype(np.int64),
        }
        for i in range(len(n))
    ]
