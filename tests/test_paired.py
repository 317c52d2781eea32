"""prunekit.paired: per-image AP50 matches pycocotools, a resample is a re-weighting, and the paired
standard error is that of the per-image difference (``python -m benchmarks.paired`` uses the same module)."""

import numpy as np
import pytest

from prunekit.metrics import detection_metrics
from prunekit.paired import Scorecard, bootstrap_weights, match_images, paired_difference, weighted_ap50


def _ap50_both_ways(preds: list[dict], gts: list[dict], num_classes: int) -> tuple[float, float]:
    """(prunekit.paired's AP50 from per-image matches, prunekit.metrics' pycocotools AP50), in percent."""
    ours = 100 * weighted_ap50(match_images(preds, gts), np.ones(len(gts)))
    return ours, 100 * detection_metrics(preds, gts, num_classes)["map50"]


def _scene(rng: np.random.Generator, n_gt: int, n_classes: int) -> tuple[dict, dict]:
    xy = rng.uniform(0, 200, (n_gt, 2))
    wh = rng.uniform(10, 60, (n_gt, 2))
    gt = {"boxes": np.hstack([xy, xy + wh]), "labels": rng.integers(1, n_classes, n_gt),
          "difficult": rng.random(n_gt) < 0.1}  # fmt: skip
    keep = rng.random(n_gt) < 0.8  # some boxes found, jittered; some false alarms
    found = gt["boxes"][keep] + rng.normal(0, 4, (int(keep.sum()), 4))
    fa_xy = rng.uniform(0, 200, (3, 2))
    boxes = np.vstack([found, np.hstack([fa_xy, fa_xy + 30])])
    labels = np.concatenate([gt["labels"][keep], rng.integers(1, n_classes, 3)])
    scores = np.concatenate([rng.uniform(0.4, 1.0, int(keep.sum())), rng.uniform(0.0, 0.7, 3)])
    return {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "labels": labels}, gt


def test_per_image_ap50_equals_pycocotools_and_resamples_are_weights():
    rng = np.random.default_rng(0)
    scenes = [_scene(rng, int(rng.integers(1, 9)), 4) for _ in range(30)]
    preds, gts = [s[0] for s in scenes], [s[1] for s in scenes]
    ours, coco = _ap50_both_ways(preds, gts, num_classes=4)
    assert 20 < coco < 100 and abs(ours - coco) < 0.05, (ours, coco)

    # an image drawn twice counts twice: the weighted AP is pycocotools on the duplicated set
    weights = rng.multinomial(30, np.full(30, 1 / 30)).astype(float)
    idx = [i for i, w in enumerate(weights) for _ in range(int(w))]
    dup_ours = 100 * weighted_ap50(match_images(preds, gts), weights)
    _, dup_coco = _ap50_both_ways([preds[i] for i in idx], [gts[i] for i in idx], 4)
    assert abs(dup_ours - dup_coco) < 0.05 and abs(dup_ours - ours) > 0.01, (dup_ours, dup_coco, ours)


def test_resamples_at_once_equal_one_by_one_and_paired_errors():
    rng = np.random.default_rng(1)
    scenes = [_scene(rng, int(rng.integers(1, 9)), 4) for _ in range(40)]
    preds, gts = [s[0] for s in scenes], [s[1] for s in scenes]
    card = Scorecard.detection(preds, gts)
    w = bootstrap_weights(40, 50, seed=3)
    assert np.allclose(card.value(w), [card.value(row) for row in w])
    assert card.value() == weighted_ap50(match_images(preds, gts), np.ones(40))
    assert paired_difference(card, card) == (0.0, 0.0)
    # a second model: the same detections but a found box lost on every third image; its gap has a bootstrap error below the
    # unpaired one (both scored on the same images)
    worse = [{k: v[int(i % 3 == 0) :] for k, v in p.items()} for i, p in enumerate(preds)]  # a hit lost
    other = Scorecard.detection(worse, gts)
    diff, se = paired_difference(card, other, n_boot=400)
    unpaired = np.hypot(np.std(card.value(w)), np.std(other.value(w)))
    assert diff > 0 and 0 < se < unpaired, (diff, se, unpaired)

    # top-1: sd of the per-image difference over sqrt(n)
    a, b = rng.random(200) < 0.8, rng.random(200) < 0.7
    diff, se = paired_difference(Scorecard.classification(a), Scorecard.classification(b))
    d = a.astype(float) - b
    assert diff == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(200))
    with pytest.raises(ValueError, match="different splits"):
        paired_difference(Scorecard.classification(a), Scorecard.classification(b[:100]))
