"""Paired comparisons: is one method's accuracy different from another's on the *same* test images?

    python -m benchmarks.paired --task bccd_ssd300 --run FOLDER      # FOLDER/{unpruned,prunekit,tp_*}.pt
    python -m benchmarks.paired --task cifar10_vgg16 --run FOLDER

Each model's standard error (``± SE`` in every table) answers "how well is this one accuracy
known"; on BCCD's 72 test images it is ~3.8 AP50 points, larger than any gap between the pruned
models. Methods scored on the same images are strongly correlated, so the uncertainty of their
*difference* is much smaller. This script scores every checkpoint of a folder image by image
and reports, against ``--reference`` (prunekit):

* CIFAR top-1: the difference and its paired standard error, sd(correct_a - correct_b) / sqrt(n);
* BCCD AP50: the difference, its bootstrap standard error and 95% interval, resampling test
  images (the same resample for both models). AP50 is COCO's (IoU 0.5, 101-point interpolated
  precision, 100 detections per image and class, difficult boxes ignored), computed from
  per-image matches (:mod:`prunekit.paired`), so a resample re-weights images instead of
  re-running pycocotools (``tests/test_paired.py`` checks the full-sample value against
  :func:`prunekit.metrics.detection_metrics`).

:func:`paired_detection` is also what ``python -m benchmarks.peers`` pairs its detection rows
with (classification: :func:`benchmarks.common.paired_classification`); that benchmark pairs its
own models, so this script only prints and writes ``--result`` (default ``<run>/paired.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

import prunekit
from benchmarks.common import DEFAULT_DATA, command_line, load_bccd, load_cifar, paired_classification
from prunekit.fileio import atomic_write_json
from prunekit.paired import bootstrap_weights, match_images, weighted_ap50

log = logging.getLogger("paired")
METHODS = ("unpruned", "prunekit", "tp_magnitude", "tp_bnscale", "tp_groupnorm")


def _detections(model: torch.nn.Module, dataset: Any) -> tuple[list[dict], list[dict]]:
    from prunekit.evaluate import _gt_numpy

    preds, gts = [], []
    model.eval()
    with torch.inference_mode():
        for i in range(len(dataset)):
            image, target = dataset[i]
            o = model([image])[0]
            preds.append({k: o[k].numpy() for k in ("boxes", "scores", "labels")})
            gts.append(_gt_numpy(target))
    return preds, gts


def paired_detection(
    models: dict[str, Path], test: Any, reference: str, n_boot: int, seed: int
) -> dict[str, Any]:
    n = len(test)
    boots = bootstrap_weights(n, n_boot, seed)
    scores: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"metric": "ap50", "images": n, "bootstrap": n_boot, "reference": reference}
    for name, path in models.items():
        preds, gts = _detections(prunekit.load(path), test)
        m = match_images(preds, gts)
        full = 100 * weighted_ap50(m, np.ones(n))
        scores[name] = 100 * np.asarray(weighted_ap50(m, boots))
        out[name] = {"ap50": full, "bootstrap_se": float(scores[name].std(ddof=1))}
        log.info("%s: AP50 %.2f (bootstrap SE %.2f)", name, full, out[name]["bootstrap_se"])
    for name in models:
        if name == reference:
            continue
        d = scores[reference] - scores[name]
        out[name]["diff_reference_minus_this"] = out[reference]["ap50"] - out[name]["ap50"]
        out[name]["diff_se"] = float(d.std(ddof=1))
        out[name]["diff_ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("bccd_ssd300", "cifar10_vgg16"), required=True)
    ap.add_argument("--run", type=Path, required=True, help="a folder of model checkpoints")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--reference", default="prunekit")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--result", type=Path, default=None, help="default <run>/paired.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    models = {m: a.run / f"{m}.pt" for m in METHODS if (a.run / f"{m}.pt").is_file()}
    if a.reference not in models:
        raise SystemExit(f"{a.run}: no {a.reference}.pt to compare against")
    if a.task == "bccd_ssd300":
        _, _, test = load_bccd(a.data_dir / "BCCD", "none", train_split="trainval")
        res = paired_detection(models, test, a.reference, a.bootstrap, a.seed)
    else:
        _, _, test = load_cifar(a.data_dir, 45000, 5000, None, a.seed)
        res = paired_classification(models, test, a.reference)
    res["command"] = command_line()
    atomic_write_json(a.result or a.run / "paired.json", res)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
