"""Dataset summaries: what ``prunekit data check`` prints, as data first."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from prunekit.data.base import ClassificationDataset, DetectionDataset
from prunekit.data.errors import DatasetError


def summarize(dataset: Dataset, decode: int = 8) -> dict[str, Any]:
    """Counts per class, box/image size statistics, problems (broken inputs) and warnings.

    ``decode`` images (evenly spread; -1 = all) are actually decoded, to catch unreadable or
    mis-sized files that annotation parsing alone cannot see.
    """
    n = len(dataset)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "source": getattr(dataset, "source", type(dataset).__name__),
        "images": n,
        "classes": list(getattr(dataset, "classes", [])),
        "skipped": list(getattr(dataset, "skipped", [])),
    }
    problems: list[str] = []
    warnings: list[str] = []
    picks = (
        range(n)
        if decode < 0
        else np.unique(np.linspace(0, n - 1, num=min(decode, n)).astype(int))
        if n
        else []
    )
    if isinstance(dataset, DetectionDataset):
        out["task"] = "detection"
        objects = Counter()
        difficult = Counter()
        sides, empty, sizes = [], 0, Counter()
        for rec in dataset.records:
            sizes[(rec.width, rec.height)] += 1
            if len(rec.labels) == 0:
                empty += 1
            for box, lbl, dif in zip(rec.boxes, rec.labels, rec.difficult):
                name = dataset.classes[int(lbl) - 1]
                objects[name] += 1
                difficult[name] += int(dif)
                sides.append(float(min(box[2] - box[0], box[3] - box[1])))
        out["per_class"] = {
            c: {"objects": objects.get(c, 0), "difficult": difficult.get(c, 0)} for c in dataset.classes
        }
        out["objects"] = int(sum(objects.values()))
        out["images_without_objects"] = empty
        # Readers that treat a missing label file as background say how many; the others cannot know.
        if getattr(dataset, "without_label_file", None) is not None:
            out["images_without_label_file"] = int(dataset.without_label_file)
        split = getattr(dataset, "generated_split", None)
        if split is not None:
            out["generated_split"] = {
                "seed": split.seed,
                "train_fraction": split.train_fraction,
                "train": len(split.train),
                "val": len(split.val),
            }
        out["image_sizes"] = {f"{w}x{h}": k for (w, h), k in sizes.most_common(5)}
        if sides:
            q = np.percentile(sides, [0, 50, 100])
            out["box_min_side_px"] = {"min": float(q[0]), "median": float(q[1]), "max": float(q[2])}
        for i in picks:
            try:
                dataset.load_image(int(i))
            except DatasetError as e:
                problems.append(str(e))
        missing = [c for c in dataset.classes if objects.get(c, 0) == 0]
        if missing:
            warnings.append(f"classes without objects in this split: {', '.join(missing)}")
    elif isinstance(dataset, ClassificationDataset):
        out["task"] = "classification"
        out["per_class"] = dataset.class_counts()
        shapes = Counter()
        for i in picks:
            try:
                shapes[tuple(dataset.load_uint8(int(i)).shape)] += 1
            except DatasetError as e:
                problems.append(str(e))
        out["image_shapes"] = {"x".join(map(str, s)): k for s, k in shapes.most_common(5)}
        empty = [c for c, k in out["per_class"].items() if k == 0]
        if empty:
            warnings.append(f"classes without images in this split: {', '.join(empty)}")
    else:
        raise TypeError(f"not a prunekit dataset: {type(dataset).__name__}")
    out["decoded"] = len(picks)
    out["problems"] = problems
    out["warnings"] = warnings
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable view of :func:`summarize`'s output."""
    lines = [
        f"{summary['source']}: {summary['images']} images, {len(summary['classes'])} classes ({summary['task']})"
    ]
    if summary["task"] == "detection":
        lines.append(
            f"objects: {summary['objects']}, images without objects: {summary['images_without_objects']}"
        )
        if "images_without_label_file" in summary:
            lines.append(f"images without a label file (background): {summary['images_without_label_file']}")
        if "generated_split" in summary:
            g = summary["generated_split"]
            lines.append(
                f"split: none in the folder; seeded split (seed {g['seed']}, train fraction "
                f"{g['train_fraction']:g}): {g['train']} train, {g['val']} val"
            )
        width = max((len(c) for c in summary["per_class"]), default=5)
        for c, v in summary["per_class"].items():
            lines.append(f"  {c:<{width}}  {v['objects']:>7} objects  ({v['difficult']} difficult)")
        if "box_min_side_px" in summary:
            b = summary["box_min_side_px"]
            lines.append(
                f"box shorter side (px): min {b['min']:.0f}, median {b['median']:.0f}, max {b['max']:.0f}"
            )
        lines.append("image sizes: " + ", ".join(f"{k} ({v})" for k, v in summary["image_sizes"].items()))
    else:
        width = max((len(c) for c in summary["per_class"]), default=5)
        for c, v in summary["per_class"].items():
            lines.append(f"  {c:<{width}}  {v:>7} images")
        lines.append("image shapes: " + ", ".join(f"{k} ({v})" for k, v in summary["image_shapes"].items()))
    lines.append(f"decoded {summary['decoded']} image(s) to check them")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad input(s):")
        lines += [f"  {p}" for p in summary["skipped"][:20]]
        if len(summary["skipped"]) > 20:
            lines.append(f"  ... and {len(summary['skipped']) - 20} more")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    if summary["problems"]:
        lines.append(f"{len(summary['problems'])} problem(s):")
        lines += [f"  {p}" for p in summary["problems"]]
    elif summary["skipped"]:
        lines.append("bad inputs found (above): readers stop on them unless skip_bad=True / --skip-bad")
    else:
        lines.append("no problems found")
    return "\n".join(lines)
