"""COCO input is checked, not trusted (issue #39): ids pycocotools' index would silently lose or
mis-attribute are one-line errors naming the file, or with ``skip_bad`` skipped and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from prunekit.data import COCODetection, DatasetError


def _coco(tmp_path: Path, images: list[dict] | None = None, anns: list[dict] | None = None) -> Path:
    """ann.json + images/ with a.jpg (id 7, 40x30), b.jpg (id 8, 20x20); categories 1 cat, 3 dog."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (20, 20))):
        Image.new("RGB", size, (90, 90, 90)).save(tmp_path / "images" / name)
    data = {
        "images": images
        if images is not None
        else [
            {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 8, "file_name": "b.jpg", "width": 20, "height": 20},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": anns
        if anns is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 8, "category_id": 3, "bbox": [2, 2, 5, 5], "iscrowd": 0},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def _ann(aid: int, image_id: int, cat: int = 1) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": [1, 1, 4, 4], "iscrowd": 0}


def _skipped(ann: Path, caplog: pytest.LogCaptureFixture, **kw) -> COCODetection:
    """Read with skip_bad=True and check it says so in exactly one warning giving the count."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ds = COCODetection(ann, ann.parent / "images", skip_bad=True, **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"skipped {len(ds.skipped)} bad input(s)" in warnings[0], warnings
    return ds


def test_duplicate_image_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = [
        {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 7, "file_name": "b.jpg", "width": 20, "height": 20},
        {"id": 8, "file_name": "b.jpg", "width": 20, "height": 20},
    ]
    ann = _coco(tmp_path, images=images)
    with pytest.raises(DatasetError, match=r"ann\.json: image id 7 appears 2 times \(files a\.jpg, b\.jpg\)"):
        COCODetection(ann, tmp_path / "images")
    ds = _skipped(ann, caplog)
    # Every image with the ambiguous id goes, with its annotations (which one they belong to is unknowable).
    assert [r.image_id for r in ds.records] == [8] and len(ds.skipped) == 1
    assert ds.skipped[0] == f"{ann}: image id 7 appears 2 times (files a.jpg, b.jpg)"


def test_annotation_of_an_unknown_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _coco(tmp_path, anns=[_ann(1, 7), _ann(2, 99), _ann(3, 98)])
    with pytest.raises(
        DatasetError, match=r"ann\.json: annotation id 2 refers to image id 99, which is not in 'images'"
    ):
        COCODetection(ann, tmp_path / "images")
    ds = _skipped(ann, caplog)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert ds.skipped[1] == f"{ann}: annotation id 3 refers to image id 98, which is not in 'images'"
    assert sum(len(r.labels) for r in ds.records) == 1


def test_unknown_category_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _coco(tmp_path, anns=[_ann(1, 7), _ann(2, 8, cat=5)])
    with pytest.raises(
        DatasetError, match=r"ann\.json: annotation id 2 \(image b\.jpg\): unknown category_id 5 \(not in"
    ):
        COCODetection(ann, tmp_path / "images")
    # An explicit class subset drops other known categories on purpose, but not unknown ones.
    with pytest.raises(DatasetError, match=r"unknown category_id 5"):
        COCODetection(ann, tmp_path / "images", classes=["cat"])
    ds = _skipped(ann, caplog)
    assert len(ds.skipped) == 1 and [len(r.labels) for r in ds.records] == [1, 0]


def test_duplicate_annotation_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # pycocotools keeps the last of the two in its id index, so COCO evaluation would see it twice.
    ann = _coco(tmp_path, anns=[_ann(1, 7), _ann(1, 8), _ann(2, 8)])
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 1 appears 2 times"):
        COCODetection(ann, tmp_path / "images")
    ds = _skipped(ann, caplog)
    assert len(ds.skipped) == 1 and [len(r.labels) for r in ds.records] == [0, 1]


def test_duplicate_category_id_is_always_an_error(tmp_path: Path) -> None:
    ann = _coco(tmp_path)
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 3, "name": "wolf"})
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"ann\.json: category id 3 appears 2 times \(names dog, wolf\)"):
        COCODetection(ann, tmp_path / "images", skip_bad=True)


def test_clean_file_reads_as_before(tmp_path: Path) -> None:
    ds = COCODetection(_coco(tmp_path), tmp_path / "images")
    assert [r.image_id for r in ds.records] == [7, 8] and ds.skipped == []
    assert ds.classes == ["cat", "dog"] and [r.labels.tolist() for r in ds.records] == [[1], [2]]
