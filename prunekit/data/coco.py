"""COCO instances reader (pycocotools).

Category ids (sparse: 1..90 for COCO) are mapped to contiguous labels 1..C in increasing id order;
``contiguous=False`` keeps the raw ids as labels (what torchvision's 91-class COCO SSD checkpoint
predicts), with placeholder names for unused ids. Crowd annotations become ``difficult=True``, so
evaluation ignores them as COCO does. ``image_id`` is COCO's own id, so results can be written in
COCO format against the original annotation file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prunekit.data.base import DetectionDataset, DetectionTransform, check_box, make_record
from prunekit.data.errors import BadInputs, DatasetError, MissingSplitError

log = logging.getLogger(__name__)


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: annotation file not found") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: line {e.lineno}, column {e.colno}: unparsable JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits, absurd nesting
        raise DatasetError(f"{path}: unreadable JSON ({e})") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (not a bool, not NaN/Infinity, not an integer too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # 10**400 is valid JSON
        return False


def _image_problem(img: dict[str, Any]) -> str | None:
    """What makes an ``images`` entry unusable (None if nothing): the fields the reader relies on."""
    if not _is_int(img.get("id")):
        return f"'id' must be an integer, got {img.get('id')!r}"
    name = img.get("file_name")
    if not isinstance(name, str) or not name.strip():
        return f"'file_name' must be a file name, got {name!r}"
    for key in ("width", "height"):
        v = img.get(key)
        if v is not None and not (_is_number(v) and v == int(v)):
            return f"'{key}' must be a whole number of pixels, got {v!r}"
    return None


def _annotation_problem(ann: dict[str, Any]) -> str | None:
    for key in ("id", "image_id", "category_id"):
        if not _is_int(ann.get(key)):
            return f"'{key}' must be an integer, got {ann.get(key)!r}"
    return None


def resolve_coco(path: str | os.PathLike, images: str | os.PathLike | None, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) for ``coco:ANN.json,IMAGES`` or a COCO root folder.

    A root folder follows the official layout: ``annotations/instances_<split>2017.json`` (or
    ``instances_<split>.json``) and images in ``<split>2017/`` (or ``<split>/``).
    """
    p = Path(path)
    if p.is_dir() and images is None:
        names = [f"instances_{split}2017.json", f"instances_{split}.json"]
        ann = next((p / "annotations" / n for n in names if (p / "annotations" / n).is_file()), None)
        if ann is None:
            raise MissingSplitError(
                f"{p}: no annotations/instances_{split}2017.json (or instances_{split}.json)"
            )
        img_dir = next((p / d for d in (f"{split}2017", split, "images") if (p / d).is_dir()), None)
        if img_dir is None:
            raise MissingSplitError(f"{p}: no image folder {split}2017/ or {split}/")
        return ann, img_dir
    if images is None:
        raise DatasetError(f"{p}: COCO needs 'ANN.json,IMAGES' (annotation file and image folder)")
    return p, Path(images)


def _usable(
    items: list[dict[str, Any]], problem_of: Callable[[dict[str, Any]], str | None], what: str, bad: BadInputs
) -> list[dict[str, Any]]:
    """``items`` without those ``problem_of`` finds fault with, each reported through ``bad`` as
    ``<what> <index> (id <id>): <problem>``."""
    usable = []
    for k, item in enumerate(items):
        problem = problem_of(item)
        if problem:
            bad.report(f"{what} {k} (id {item.get('id')!r}): {problem}")
        else:
            usable.append(item)
    return usable


def _checked_ids(data: dict[str, Any], ann_file: Path, bad: BadInputs) -> dict[str, Any]:
    """``data`` without what pycocotools' index would silently lose or mis-attribute.

    Its index is a dict by id, so a duplicated image or annotation id keeps only the last entry,
    and annotations of an image id absent from ``images`` are never looked at. Each such input is
    reported through ``bad`` (an error, or skipped and counted with ``skip_bad``): a duplicated
    image id drops every image with that id and their annotations (which one they belong to is
    unknowable), a duplicated annotation id every annotation with it. Duplicated category ids are
    always an error: the class list itself would be ambiguous.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list) or not all(isinstance(x, dict) for x in data[key]):
            raise DatasetError(f"{ann_file}: '{key}' must be a list of objects")
    cat_names: dict[Any, list[str]] = defaultdict(list)
    for k, c in enumerate(data["categories"]):
        # always an error: a category that cannot be named or indexed makes the class list unknowable
        if not _is_int(c.get("id")):
            raise DatasetError(f"{ann_file}: category {k}: 'id' must be an integer, got {c.get('id')!r}")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise DatasetError(
                f"{ann_file}: category id {c['id']}: 'name' must be a string, got {c.get('name')!r}"
            )
        cat_names[c["id"]].append(c["name"])
    for cid, names in cat_names.items():
        if len(names) > 1:
            raise DatasetError(
                f"{ann_file}: category id {cid} appears {len(names)} times (names {', '.join(names)})"
            )
    usable_images = _usable(data["images"], _image_problem, f"{ann_file}: image", bad)
    usable_anns = _usable(data["annotations"], _annotation_problem, f"{ann_file}: annotation", bad)
    files: dict[Any, list[str]] = defaultdict(list)
    for img in usable_images:
        files[img["id"]].append(img["file_name"])
    dup_images = {i for i, f in files.items() if len(f) > 1}
    for i in sorted(dup_images):
        bad.report(f"{ann_file}: image id {i} appears {len(files[i])} times (files {', '.join(files[i])})")
    ann_count = Counter(a["id"] for a in usable_anns)
    reported: set[Any] = set()
    anns = []
    for a in usable_anns:
        aid, iid = a["id"], a["image_id"]
        if iid not in files:
            bad.report(f"{ann_file}: annotation id {aid} refers to image id {iid}, which is not in 'images'")
        elif ann_count[aid] > 1:
            if aid not in reported:
                reported.add(aid)
                bad.report(f"{ann_file}: annotation id {aid} appears {ann_count[aid]} times")
        elif iid not in dup_images:  # the duplicated image's report covers its annotations
            anns.append(a)
    images = [img for img in usable_images if img["id"] not in dup_images]
    return {**data, "images": images, "annotations": anns}


class COCODetection(DetectionDataset):
    """COCO-format detection set: ``ann_file`` (instances JSON) + ``image_dir``."""

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transforms: DetectionTransform | None = None,
        skip_bad: bool = False,
        contiguous: bool = True,
        keep_empty: bool = True,
        keep_crowd: bool = True,
        check_images: bool = True,
        classes: Sequence[str] | None = None,
    ):
        from pycocotools.coco import COCO

        ann_file, image_dir = Path(ann_file), Path(image_dir)
        data = load_json(ann_file)
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise DatasetError(f"{ann_file}: not a COCO instances file (needs 'images' and 'categories')")
        data.setdefault("annotations", [])
        bad = BadInputs(skip_bad, ann_file)
        data = _checked_ids(data, ann_file, bad)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            try:
                coco.createIndex()
            except (KeyError, TypeError) as e:
                raise DatasetError(f"{ann_file}: malformed COCO structure (missing/invalid field {e})") from e
        self.coco = coco
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        if classes is not None:
            by_name = {c["name"]: c["id"] for c in cats}
            missing = [n for n in classes if n not in by_name]
            if missing:
                raise DatasetError(f"{ann_file}: no category named {missing[0]!r}")
            cats = [c for n in classes for c in cats if c["name"] == n]
        if contiguous:
            self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
            class_list = [c["name"] for c in cats]
        else:
            max_id = max((c["id"] for c in cats), default=0)
            names = {c["id"]: c["name"] for c in cats}
            self.cat_to_label = {c["id"]: c["id"] for c in cats}
            class_list = [names.get(i, f"__unused_{i}__") for i in range(1, max_id + 1)]
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}

        records = []
        for img_id in sorted(coco.imgs):
            info = coco.imgs[img_id]
            fname = info.get("file_name")
            path = image_dir / fname if fname else None
            if path is None or (check_images and not path.is_file()):
                bad.report(f"{ann_file}: image id {img_id}: image file {path} not found")
                continue
            w, h = int(info.get("width") or 0), int(info.get("height") or 0)
            if w <= 0 or h <= 0:
                bad.report(f"{ann_file}: image id {img_id} ({fname}): missing width/height")
                continue
            boxes, labels, difficult = [], [], []
            for ann in coco.imgToAnns.get(img_id, []):
                where = f"{ann_file}: annotation id {ann.get('id')} (image {fname})"
                cat = ann.get("category_id")
                if cat not in coco.cats:
                    bad.report(f"{where}: unknown category_id {cat} (not in 'categories')")
                    continue
                if cat not in self.cat_to_label:
                    continue  # an explicit class subset drops the other categories on purpose
                crowd = bool(ann.get("iscrowd", 0))
                if crowd and not keep_crowd:
                    continue
                bb = ann.get("bbox")
                if not isinstance(bb, list) or len(bb) != 4 or not all(_is_number(v) for v in bb):
                    bad.report(f"{where}: bbox must be [x, y, w, h] (finite numbers), got {bb!r}")
                    continue
                x, y, bw, bh = (float(v) for v in bb)
                box = check_box((x, y, x + bw, y + bh), w, h, where, bad)
                if box is None:
                    continue
                boxes.append(box)
                labels.append(self.cat_to_label[cat])
                difficult.append(crowd)
            if not boxes and not keep_empty:
                continue
            records.append(make_record(int(img_id), path, w, h, boxes, labels, difficult, name=fname))
        bad.finish()
        if not records:
            raise DatasetError(f"{ann_file}: no usable images")
        super().__init__(records, class_list, transforms, source=f"coco:{ann_file},{image_dir}", bad=bad)
