"""Dataset summaries: what ``prunekit data check`` prints, as data first."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from prunekit.data.base import ClassificationDataset, DetectionDataset, image_conversions, to_float
from prunekit.data.errors import DatasetError


def _scan_headers(
    dataset: DetectionDataset | ClassificationDataset, problems: list[str]
) -> tuple[dict[str, Any], set[int]]:
    """Every image's header (cheap: no pixel decoding): how many needed which conversion.

    Unreadable headers go to ``problems``; their indices are returned so they are not decoded too.
    """
    conversions: Counter[str] = Counter()
    read = 0
    failed: set[int] = set()
    for i in range(len(dataset)):
        source = dataset.image_source(i)
        if source is None:
            continue
        read += 1
        try:
            conversions.update(image_conversions(source[1], name=source[0]))
        except DatasetError as e:
            problems.append(str(e))
            failed.add(i)
    return {"headers_read": read, "conversions": dict(conversions.most_common())}, failed


def _check_decoded(name: str, image: Tensor) -> str | None:
    """A problem if the decoded image is not what the model must get: float RGB [3, H, W] in [0, 1]."""
    if image.dtype != torch.uint8:
        return f"{name}: decoded as {image.dtype}, not uint8"
    if image.ndim != 3 or image.shape[0] != 3:
        return f"{name}: decoded to shape {tuple(image.shape)}, not 3-channel [3, H, W]"
    x = to_float(image)
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):
        return f"{name}: decoded values {lo:g}..{hi:g}, outside [0, 1]"
    return None


def summarize(dataset: Dataset, decode: int = 8) -> dict[str, Any]:
    """Counts per class, box/image size statistics, problems (broken inputs) and warnings.

    Every image's header is read (cheap) to count the encodings decoding converts to 8-bit RGB
    (``conversions``: 16-bit, palette, grayscale, alpha, CMYK, EXIF rotation) and to catch
    unreadable files. ``decode`` images (evenly spread; -1 = all) are fully decoded, to catch
    mis-sized files and check that what reaches the model is float RGB [3, H, W] in [0, 1].
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
        headers, failed = _scan_headers(dataset, problems)
        out.update(headers)
        for i in picks:
            if int(i) in failed:  # already reported: an unreadable header fails decoding too
                continue
            try:
                problem = _check_decoded(str(dataset.records[int(i)].path), dataset.load_image(int(i)))
            except DatasetError as e:
                problem = str(e)
            if problem:
                problems.append(problem)
        dropped = list(getattr(dataset, "empty_boxes", []))
        if dropped:
            warnings.append(
                f"dropped {len(dropped)} zero-area box(es) (they mark no object); first: {dropped[0]}"
            )
        missing = [c for c in dataset.classes if objects.get(c, 0) == 0]
        if missing:
            warnings.append(f"classes without objects in this split: {', '.join(missing)}")
    elif isinstance(dataset, ClassificationDataset):
        out["task"] = "classification"
        out["per_class"] = dataset.class_counts()
        headers, failed = _scan_headers(dataset, problems)
        out.update(headers)
        shapes = Counter()
        for i in picks:
            if int(i) in failed:
                continue
            source = dataset.image_source(int(i))
            name = source[0] if source is not None else f"image {int(i)}"
            try:
                image = dataset.load_uint8(int(i))
                problem = _check_decoded(name, image)
                shapes[tuple(image.shape)] += 1
            except DatasetError as e:
                problem = str(e)
            if problem:
                problems.append(problem)
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
    conv = summary.get("conversions", {})
    if conv:
        # "12 images 16-bit, 3 palette": an image can carry several tags (16-bit and with alpha).
        (tag, k), *rest = conv.items()
        parts = [f"{k} image{'s' if k != 1 else ''} {tag}"] + [f"{k} {tag}" for tag, k in rest]
        lines.append("image encodings converted to 8-bit RGB: " + ", ".join(parts))
    elif summary.get("headers_read"):
        lines.append("image encodings: all 8-bit RGB")
    if summary.get("headers_read"):
        lines.append(
            f"read {summary['headers_read']} image header(s), decoded {summary['decoded']} image(s) to check them"
        )
    else:
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
