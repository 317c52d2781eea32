"""German Traffic Sign Detection Benchmark reader (``gt.txt`` + ``.ppm`` images).

``gt.txt`` lines are ``file;left;top;right;bottom;class_id`` with inclusive 0-based pixel
indices, converted to continuous xyxy (``x2 = right + 1``). Images without signs are kept (they
are part of the benchmark). The split follows the IJCNN 2013 benchmark: in the full set
(``FullIJCNN2013``, 900 images) images 00000-00599 are ``train`` and 00600-00899 ``test`` (also
``val``); ``all`` is everything. ``grouping="paper"`` maps the 43 classes to prohibitory /
mandatory / danger and drops the "other" signs; ``grouping="none"`` keeps all 43.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prunekit.data.base import DetectionDataset, DetectionTransform, check_box, image_size, make_record
from prunekit.data.errors import BadInputs, DatasetError, MissingSplitError
from prunekit.data.signs import GTSDB_GROUP_OF, GTSDB_GROUPS, GTSRB_CLASSES

log = logging.getLogger(__name__)

GTSDB_TRAIN_IMAGES = 600  # IJCNN 2013: the first 600 images are training, the last 300 test


def _resolve_gtsdb(root: Path, split: str) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"{root}: GTSDB folder not found")
    if (root / "gt.txt").is_file():
        return root
    for sub in ("FullIJCNN2013", "TrainIJCNN2013" if split == "train" else "TestIJCNN2013"):
        if (root / sub / "gt.txt").is_file():
            return root / sub
    raise DatasetError(f"{root}: no gt.txt (expected a GTSDB folder such as FullIJCNN2013/)")


def _split_keeps(split: str, stem: str, n_train: int) -> bool:
    if split in ("all", "trainval"):
        return True
    try:
        num = int(stem)
    except ValueError:
        return split == "train"  # non-numeric names cannot be placed; treat as training data
    if split == "train":
        return num < n_train
    return num >= n_train  # "test" / "val"


class GTSDBDetection(DetectionDataset):
    """GTSDB detection set; see the module docstring for split and class grouping."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        grouping: str = "paper",
        transforms: DetectionTransform | None = None,
        skip_bad: bool = False,
        n_train: int = GTSDB_TRAIN_IMAGES,
    ):
        if split not in ("train", "val", "test", "all", "trainval"):
            raise MissingSplitError(f"GTSDB has no split {split!r} (use train, test/val or all)")
        if grouping not in ("paper", "none"):
            raise DatasetError(f"unknown GTSDB grouping {grouping!r} (use 'paper' or 'none')")
        folder = _resolve_gtsdb(Path(root), split)
        gt = folder / "gt.txt"
        classes = list(GTSDB_GROUPS) if grouping == "paper" else list(GTSRB_CLASSES)
        group_label = {g: i + 1 for i, g in enumerate(GTSDB_GROUPS)}
        bad = BadInputs(skip_bad, gt)
        objects: dict[str, list[tuple[tuple[float, float, float, float], int, str]]] = {}
        dropped_other = 0
        for lineno, line in enumerate(gt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{gt}: line {lineno}"
            fields = line.strip().split(";")
            if len(fields) != 6:
                bad.report(f"{where}: expected 'file;left;top;right;bottom;class_id', got {line.strip()!r}")
                continue
            try:
                left, top, right, bottom, cid = (int(float(v)) for v in fields[1:])
            except ValueError:
                bad.report(f"{where}: non-numeric field in {line.strip()!r}")
                continue
            if not 0 <= cid < len(GTSRB_CLASSES):
                bad.report(f"{where}: unknown class id {cid} (GTSDB has 0..42)")
                continue
            if grouping == "paper":
                group = GTSDB_GROUP_OF.get(cid)
                if group is None:
                    dropped_other += 1
                    continue
                label = group_label[group]
            else:
                label = cid + 1
            box = (float(left), float(top), float(right + 1), float(bottom + 1))
            objects.setdefault(fields[0], []).append((box, label, where))

        names = sorted({p.name for p in folder.glob("*.ppm")} | set(objects))
        records = []
        for name in names:
            if not _split_keeps(split, Path(name).stem, n_train):
                continue
            path = folder / name
            if not path.is_file():
                bad.report(f"{gt}: image {name} not found in {folder}")
                continue
            w, h = image_size(path)
            boxes, labels = [], []
            for box, label, where in objects.get(name, []):
                b = check_box(box, w, h, where, bad)
                if b is None:
                    continue
                boxes.append(b)
                labels.append(label)
            records.append(
                make_record(len(records), path, w, h, boxes, labels, [False] * len(boxes), name=name)
            )
        bad.finish()
        if dropped_other:
            log.info("%s: %d 'other' signs outside the 3 GTSDB categories dropped", gt, dropped_other)
        if not records:
            raise DatasetError(f"{folder}: split {split!r} has no images")
        super().__init__(records, classes, transforms, source=f"gtsdb:{folder}", split=split, bad=bad)
