"""German Traffic Sign Recognition Benchmark reader (per-class ``GT-xxxxx.csv`` + ``.ppm``).

Training data is ``Final_Training/Images/<00000..00042>/`` with one ``GT-<class>.csv`` per folder;
test data is a flat ``Final_Test/Images/`` with a ``GT-final_test.csv`` that has a ``ClassId``
column (the separately published ground truth). CSV rows are
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``. Images vary in size (15-250 px),
so they are resized to ``image_size`` (default 32, the paper's VGG16 input); ``crop_roi`` crops
the annotated sign first.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from prunekit.data.base import ClassificationDataset, ImageTransform, read_image
from prunekit.data.errors import BadInputs, DatasetError, MissingSplitError
from prunekit.data.signs import GTSRB_CLASSES
from prunekit.data.transforms import ResizeImage

_TRAIN_DIRS = ("Final_Training/Images", "GTSRB/Final_Training/Images", "Training", "train")
_TEST_DIRS = ("Final_Test/Images", "GTSRB/Final_Test/Images", "Test", "test")
_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def _resolve(root: Path, split: str) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"{root}: GTSRB folder not found")
    for rel in _TRAIN_DIRS if split == "train" else _TEST_DIRS:
        if (root / rel).is_dir():
            return root / rel
    if _class_dirs(root) or list(root.glob("GT-*.csv")):
        return root  # the images folder itself
    raise DatasetError(
        f"{root}: no GTSRB {split} folder (looked for {', '.join(_TRAIN_DIRS if split == 'train' else _TEST_DIRS)})"
    )


def _read_csv(
    path: Path, bad: BadInputs, need_class: bool
) -> list[tuple[str, tuple[int, int, int, int], int | None, str]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: annotation file not found") from e
    reader = csv.DictReader(text.splitlines(), delimiter=";")
    missing = [
        c for c in (*_COLUMNS, *(("ClassId",) if need_class else ())) if c not in (reader.fieldnames or [])
    ]
    if missing:
        raise DatasetError(
            f"{path}: line 1: missing column(s) {', '.join(missing)} (is it a GTSRB GT-*.csv?)"
        )
    for lineno, row in enumerate(reader, start=2):
        where = f"{path}: line {lineno}"
        try:
            roi = tuple(int(row[c]) for c in _COLUMNS[1:])
            cid = int(row["ClassId"]) if row.get("ClassId") not in (None, "") else None
        except (TypeError, ValueError):
            bad.report(f"{where}: non-numeric field in {row}")
            continue
        rows.append((row["Filename"], roi, cid, where))  # type: ignore[arg-type]
    return rows


class GTSRB(ClassificationDataset):
    """GTSRB classification set (43 classes); see the module docstring for the layout."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: ImageTransform | None = None,
        image_size: int | Sequence[int] | None = 32,
        crop_roi: bool = False,
        skip_bad: bool = False,
    ):
        if split not in ("train", "test"):
            raise MissingSplitError(
                f"GTSRB has no split {split!r} (train or test; build_dataset holds a validation split out of train)"
            )
        folder = _resolve(Path(root), "train" if split == "train" else "test")
        bad = BadInputs(skip_bad, folder)
        samples: list[tuple[Path, tuple[int, int, int, int], int]] = []
        class_dirs = _class_dirs(folder)
        if class_dirs:
            for d in class_dirs:
                csvs = sorted(d.glob("GT-*.csv"))
                if not csvs:
                    bad.report(f"{d}: no GT-{d.name}.csv")
                    continue
                for fname, roi, cid, where in _read_csv(csvs[0], bad, need_class=False):
                    samples.append((d / fname, roi, int(d.name) if cid is None else cid))
                    if cid is not None and cid != int(d.name):
                        bad.report(f"{where}: ClassId {cid} in folder {d.name}")
                        samples.pop()
        else:
            csvs = sorted(p for p in folder.glob("GT-*.csv") if "test.test" not in p.name)
            if not csvs:
                raise DatasetError(f"{folder}: no GT-*.csv with a ClassId column")
            for fname, roi, cid, where in _read_csv(csvs[0], bad, need_class=True):
                if cid is None:
                    bad.report(f"{where}: empty ClassId")
                    continue
                samples.append((folder / fname, roi, cid))
        kept = []
        for path, roi, cid in samples:
            if not 0 <= cid < len(GTSRB_CLASSES):
                bad.report(f"{path}: unknown class id {cid} (GTSRB has 0..42)")
            elif not path.is_file():
                bad.report(f"{path}: image file not found")
            else:
                kept.append((path, roi, cid))
        bad.finish()
        if not kept:
            raise DatasetError(f"{folder}: no usable images")
        self.samples = kept
        self.targets = [cid for _, _, cid in kept]
        self.classes = list(GTSRB_CLASSES)
        self.transform = transform
        self.crop_roi = crop_roi
        self._resize = ResizeImage(image_size) if image_size is not None else None
        self.source = f"gtsrb:{folder}"
        self.split = split
        self.skipped = bad.problems

    def load_uint8(self, index: int) -> Tensor:
        path, (x1, y1, x2, y2), _ = self.samples[index]
        img = read_image(path)
        if self.crop_roi:
            # GTSRB ROIs are inclusive pixel indices
            img = img[:, max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1]
        return self._resize(img) if self._resize is not None else img
