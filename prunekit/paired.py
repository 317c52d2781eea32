"""Paired comparisons: how well is the *difference* between two models known, on the same images?

Each model's standard error answers "how well is this one accuracy known"; on 100 validation
images an AP50 near 96 carries ~1.9 points. Two models scored on the same images are strongly
correlated (they find the same easy boxes and miss the same hard ones), so their difference is
known far better than either score. A budget of 1 point can only be checked on the difference.

A :class:`Scorecard` is what one model did image by image: for a classifier whether each image was
right, for a detector every kept detection's image, score and true-positive flag per class (COCO's
greedy matching at IoU 0.5, 100 detections per image and class, difficult boxes ignored) and each
image's number of ground-truth boxes. AP50 under a bootstrap resample of the images is then a
re-weighting of those matches, with no re-matching: :func:`paired_difference` draws the same
resamples for both models and reports the standard deviation of the difference. AP50 here is
COCO's 101-point interpolated AP, the number :func:`prunekit.metrics.detection_metrics` reports as
``map50`` (tests check the two agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RECALL_POINTS = np.linspace(0.0, 1.0, 101)
BOOTSTRAP = 1000  # resamples: the standard error's own relative error is ~1/sqrt(2 * 1000), 2%
_CHUNK = 100  # resamples evaluated at once (memory: chunk x detections of a class)


def match_images(
    preds: Sequence[dict[str, np.ndarray]], gts: Sequence[dict[str, np.ndarray]], iou: float = 0.5,
    max_det: int = 100,
) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Per class: every kept detection's image, score and true-positive flag (sorted by score,
    highest first) and each image's number of non-difficult ground-truth boxes."""
    from prunekit.export.compare import box_iou

    classes = sorted({int(c) for d in (*preds, *gts) for c in np.asarray(d["labels"]).reshape(-1)})
    out: dict[int, dict[str, np.ndarray]] = {}
    for c in classes:
        img: list[int] = []
        score: list[float] = []
        tp: list[bool] = []
        npos = np.zeros(len(gts))
        for i, (p, g) in enumerate(zip(preds, gts)):
            glab = np.asarray(g["labels"]).reshape(-1)
            gsel = glab == c
            gb = np.asarray(g["boxes"], dtype=np.float64).reshape(-1, 4)[gsel]
            diff = g.get("difficult")
            ign = (np.zeros(len(glab), bool) if diff is None else np.asarray(diff, bool).reshape(-1))[gsel]
            npos[i] = (~ign).sum()
            plab = np.asarray(p["labels"]).reshape(-1)
            pscore = np.asarray(p["scores"], dtype=np.float64).reshape(-1)
            psel = np.flatnonzero(plab == c)
            psel = psel[np.argsort(-pscore[psel], kind="mergesort")][:max_det]
            if not len(psel):
                continue
            pb = np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4)[psel]
            area = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
            ious = box_iou(pb, gb) if len(gb) else np.zeros((len(psel), 0))
            order = np.argsort(ign, kind="mergesort")  # COCO: real boxes before ignored ones
            taken = np.zeros(len(gb), bool)
            for d in range(len(psel)):
                best, best_iou = -1, min(iou, 1 - 1e-10)
                for j in order:
                    if taken[j]:
                        continue
                    if best >= 0 and not ign[best] and ign[j]:
                        break  # matched a real box already; ignored ones come after
                    if ious[d, j] < best_iou:
                        continue
                    best, best_iou = j, ious[d, j]
                if best >= 0:
                    taken[best] = True  # an ignored box, too, is matched once
                    if ign[best]:
                        continue  # on an ignored box: neither true nor false
                elif not 0 <= area[d] <= 1e10:
                    continue  # COCO's area range "all": a degenerate box is ignored, not false
                img.append(i)
                score.append(float(pscore[psel[d]]))
                tp.append(best >= 0)
        order = np.argsort(-np.asarray(score), kind="mergesort")
        out[c] = {
            "image": np.asarray(img, int)[order],
            "tp": np.asarray(tp, bool)[order],
            "npos": npos,
        }
    return out


def weighted_ap50(matches: dict[int, dict[str, np.ndarray]], weights: np.ndarray) -> np.ndarray | float:
    """Mean over classes with ground truth of the 101-point AP when image i counts ``weights[..., i]``
    times. ``weights`` of shape (n,) gives a float, (B, n) one AP per row (a bootstrap resample)."""
    w2 = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    aps = np.full((len(matches), w2.shape[0]), np.nan)
    for k, m in enumerate(matches.values()):
        npos = w2 @ m["npos"]
        if not len(m["image"]):
            aps[k] = np.where(npos > 0, 0.0, np.nan)
            continue
        w = w2[:, m["image"]]
        ctp = np.cumsum(w * m["tp"], axis=1)
        cfp = np.cumsum(w * ~m["tp"], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = ctp / npos[:, None]
        precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        last = precision.shape[1] - 1
        for r in range(w2.shape[0]):
            if npos[r] <= 0:
                continue
            idx = np.searchsorted(recall[r], RECALL_POINTS, side="left")
            aps[k, r] = np.where(idx <= last, precision[r, np.minimum(idx, last)], 0.0).mean()
    with np.errstate(all="ignore"):
        valid = ~np.isnan(aps)
        out = np.where(valid.any(0), np.nansum(aps, 0) / np.maximum(valid.sum(0), 1), np.nan)
    return float(out[0]) if np.ndim(weights) == 1 else out


@dataclass
class Scorecard:
    """What one model did on each image of a split, enough to re-score any resample of it.

    ``metric`` is ``"ap50"`` (``matches`` from :func:`match_images`) or ``"top1"`` (``correct``,
    one 0/1 per image). Values are fractions in [0, 1], like :func:`prunekit.evaluate.evaluate`'s.
    """

    metric: str
    n: int
    correct: np.ndarray | None = None
    matches: dict[int, dict[str, np.ndarray]] | None = field(default=None, repr=False)

    @classmethod
    def detection(
        cls, preds: Sequence[dict[str, np.ndarray]], gts: Sequence[dict[str, np.ndarray]]
    ) -> Scorecard:
        return cls("ap50", len(gts), matches=match_images(preds, gts))

    @classmethod
    def classification(cls, correct: np.ndarray) -> Scorecard:
        c = np.asarray(correct, dtype=np.float64).reshape(-1)
        return cls("top1", len(c), correct=c)

    def value(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """The metric with image i counted ``weights[..., i]`` times (all once by default)."""
        w = np.ones(self.n) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.metric == "top1":
            assert self.correct is not None
            return (w @ self.correct) / w.sum(-1)
        assert self.matches is not None
        return weighted_ap50(self.matches, w)


def resolves(se: float, budget: float) -> bool:
    """Whether a difference known to ``se`` can tell a drop inside ``budget`` from one outside it:
    its 95% interval (± 2 SE) is narrower than the budget."""
    return 2 * se < budget


def bootstrap_weights(n: int, n_boot: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicities of n images drawn with replacement: the same draw for every model."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def paired_difference(
    a: Scorecard, b: Scorecard, n_boot: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """``(value(a) - value(b), its standard error)``, both scored on the same images.

    Top-1: the mean per-image difference and sd / sqrt(n). AP50: the bootstrap standard deviation
    of the difference over ``n_boot`` resamples of the images, the same resample for both models.
    """
    if a.metric != b.metric or a.n != b.n:
        raise ValueError(f"scorecards of different splits or metrics: {a.metric}/{a.n} vs {b.metric}/{b.n}")
    diff = float(a.value()) - float(b.value())
    if a.n < 2:
        return diff, math.nan
    if a.metric == "top1":
        assert a.correct is not None and b.correct is not None
        return diff, float(np.std(a.correct - b.correct, ddof=1) / math.sqrt(a.n))
    weights = bootstrap_weights(a.n, n_boot, seed)
    d = np.concatenate([np.asarray(a.value(w)) - np.asarray(b.value(w))
                        for w in np.array_split(weights, max(1, n_boot // _CHUNK))])  # fmt: skip
    d = d[~np.isnan(d)]
    return diff, float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
