"""Ultralytics YOLO detection sets: a dataset YAML plus one ``.txt`` label file per image.

The YAML's ``train``/``val``/``test`` (a path or a list of paths) are image folders (searched
recursively) or ``.txt`` files listing image paths (relative ones are relative to the list file).
Relative split paths are relative to ``path``, itself relative to the YAML's folder (or to the
working directory if it exists only there; Ultralytics resolves it against its own datasets
folder, which prunekit does not have); a missing ``path`` means the YAML's folder. Roboflow's
``../train/images`` is also tried without the ``../``, as Ultralytics does. ``names`` is a list
or a ``{id: name}`` mapping with ids 0..n-1.

Labels follow the Ultralytics rule: the last ``/images/`` in an image path becomes ``/labels/``
and the extension ``.txt``. A line is ``class cx cy w h``, normalised to [0, 1]; it becomes an
absolute xyxy box with label ``class + 1`` (0 is background, as for every prunekit detection
set). An image without a label file is a background image, as in Ultralytics; the count is kept
as ``without_label_file`` so ``prunekit data check`` can show it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from prunekit.data.base import (
    DetectionDataset,
    DetectionRecord,
    DetectionTransform,
    check_box,
    image_size,
    make_record,
)
from prunekit.data.errors import BadInputs, DatasetError, MissingSplitError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
BOX_TOLERANCE = 1e-3  # normalised; exporters round 1.0 to 1.0000001 and 0.0 to -1e-7
_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def label_path(image: Path) -> Path:
    """The label file Ultralytics pairs with ``image`` (``.../images/x.jpg`` -> ``.../labels/x.txt``)."""
    s = os.fspath(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        head, tail = s.rsplit(sa, 1)
        s = head + sb + tail
    return Path(s).with_suffix(".txt")


def read_data_yaml(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The YAML file (a folder means its ``data.yaml``) and its content, checked to be a mapping."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in _YAML_NAMES if (path / n).is_file()), None)
        if found is None:
            raise DatasetError(f"{path}: no {' or '.join(_YAML_NAMES)} in this folder")
        path = found
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: dataset YAML not found") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: a value YAML types but cannot build (a date like 2024-13-01); the parser's
        # message spans several lines (DatasetError joins them)
        raise DatasetError(f"{path}: unparsable YAML ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with train, val and names")
    return path, data


def yolo_class_names(data: dict[str, Any], where: Path) -> list[str]:
    """``names`` as a list in id order (a list, an ``{id: name}`` mapping, or ``nc`` alone)."""
    names = data.get("names")
    nc = data.get("nc")
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise DatasetError(f"{where}: no 'names' (nor a positive 'nc')")
        names = [f"class_{i}" for i in range(nc)]
    elif isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{where}: 'names' keys must be class ids 0..n-1 ({e})") from e
        if sorted(by_id) != list(range(len(by_id))):
            raise DatasetError(f"{where}: 'names' ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        names = [by_id[i] for i in range(len(by_id))]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DatasetError(f"{where}: 'names' must be a list or a mapping id -> name")
    if not names:
        raise DatasetError(f"{where}: empty 'names'")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{where}: nc is {nc} but 'names' has {len(names)} entries")
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: duplicate class names in {names}")
    return names


def _expand(entry: str, where: Path) -> Path:
    try:
        return Path(entry).expanduser()
    except RuntimeError as e:  # ~user of a user this machine does not have
        raise DatasetError(f"{where}: cannot resolve {entry!r} ({e})") from e


def _dataset_root(data: dict[str, Any], yaml_file: Path) -> Path:
    base = yaml_file.parent
    if not data.get("path"):
        return base
    p = _expand(str(data["path"]), yaml_file)
    if p.is_absolute() or (p.exists() and not (base / p).exists()):
        return p
    return base / p


def _resolve_entry(root: Path, entry: str) -> Path:
    p = _expand(entry, root)
    if p.is_absolute():
        return p
    if not (root / p).exists() and entry.startswith("../") and (root / entry[3:]).exists():
        return root / entry[3:]  # Roboflow exports say ../train/images next to train/
    return root / p


def _list_images(src: Path, where: str, bad: BadInputs) -> list[Path]:
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if src.is_file() and src.suffix == ".txt":
        images = []
        for lineno, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            entry = line.strip()
            if not entry:
                continue
            p = Path(entry)
            p = p if p.is_absolute() else src.parent / p
            if not p.is_file():
                bad.report(f"{src}: line {lineno}: image {entry} not found")
                continue
            images.append(p)
        return images
    if not src.exists():
        raise DatasetError(f"{where}: {src} not found")
    raise DatasetError(f"{where}: {src} is neither an image folder nor a .txt list of images")


def parse_label_line(line: str, num_classes: int, where: str) -> tuple[int, tuple[float, ...]] | str:
    """``(class id, (x1, y1, x2, y2) normalised and clipped)`` or the problem with the line."""
    fields = line.split()
    if len(fields) != 5:
        return f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)} in {line.strip()!r}"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return f"{where}: non-numeric field in {line.strip()!r}"
    if not all(math.isfinite(v) for v in values):
        return f"{where}: non-numeric field in {line.strip()!r}"
    cid_f, cx, cy, w, h = values
    if cid_f != int(cid_f):
        return f"{where}: class id {fields[0]} is not an integer"
    cid = int(cid_f)
    if not 0 <= cid < num_classes:
        return f"{where}: class id {cid} out of range 0..{num_classes - 1}"
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if w <= 0 or h <= 0:
        return f"{where}: empty box (w={w:g}, h={h:g})"
    t = BOX_TOLERANCE
    if min(x1, y1) < -t or max(x2, y2) > 1 + t:
        return f"{where}: box (cx={cx:g}, cy={cy:g}, w={w:g}, h={h:g}) outside [0, 1]"
    return cid, (max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0))


class YOLODetection(DetectionDataset):
    """An Ultralytics-format detection set (see the module docstring for the YAML and the labels).

    ``split``: ``train``, ``val``, ``test`` (if the YAML has it) or ``trainval`` (train + val).
    ``classes`` may rename the YAML's classes; it must list as many.
    """

    def __init__(
        self,
        data_yaml: str | os.PathLike,
        split: str = "train",
        classes: Sequence[str] | None = None,
        transforms: DetectionTransform | None = None,
        skip_bad: bool = False,
    ):
        yaml_file, data = read_data_yaml(data_yaml)
        names = yolo_class_names(data, yaml_file)
        if classes is not None:
            if len(classes) != len(names):
                raise DatasetError(f"{yaml_file}: {len(names)} classes, but {len(classes)} names were given")
            names = list(classes)
        keys = ["train", "val"] if split == "trainval" else [split]
        for key in keys:
            if not data.get(key):
                have = [k for k in ("train", "val", "test") if data.get(k)]
                raise MissingSplitError(f"{yaml_file}: no split {key!r} (has {', '.join(have) or 'none'})")
        root = _dataset_root(data, yaml_file)
        bad = BadInputs(skip_bad, yaml_file)
        images: list[Path] = []
        for key in keys:
            entries = data[key] if isinstance(data[key], list) else [data[key]]
            for entry in entries:
                images += _list_images(_resolve_entry(root, str(entry)), f"{yaml_file}: {key}", bad)
        records: list[DetectionRecord] = []
        self.without_label_file = 0
        for img in dict.fromkeys(images):  # a file listed twice is one sample
            rec = self._read_one(img, root, len(records), len(names), bad)
            if rec is not None:
                records.append(rec)
        bad.finish()
        if self.without_label_file:
            log.info(
                "%s %s: %d image(s) without a label file (background)",
                yaml_file,
                split,
                self.without_label_file,
            )
        if not images:  # listed but empty: no such split, for a caller to whom a split is optional
            raise MissingSplitError(f"{yaml_file}: split {split!r} lists no images")
        if not records:
            raise DatasetError(f"{yaml_file}: split {split!r} has no usable images")
        super().__init__(records, names, transforms, source=f"yolo:{yaml_file}", split=split, bad=bad)

    def _read_one(
        self, img: Path, root: Path, new_id: int, num_classes: int, bad: BadInputs
    ) -> DetectionRecord | None:
        try:
            w, h = image_size(img)
        except DatasetError as e:
            bad.report(str(e))
            return None
        lbl = label_path(img)
        boxes, labels = [], []
        if lbl.is_file():
            for lineno, line in enumerate(lbl.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{lbl}: line {lineno}"
                parsed = parse_label_line(line, num_classes, where)
                if isinstance(parsed, str):
                    bad.report(parsed)
                    continue
                cid, (x1, y1, x2, y2) = parsed
                box = check_box((x1 * w, y1 * h, x2 * w, y2 * h), w, h, where, bad)
                if box is None:
                    continue
                boxes.append(box)
                labels.append(cid + 1)
        else:
            self.without_label_file += 1
        name = os.fspath(img.relative_to(root)) if img.is_relative_to(root) else os.fspath(img)
        return make_record(new_id, img, w, h, boxes, labels, [False] * len(boxes), name=name)
