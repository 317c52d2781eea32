"""Ultralytics YOLO sets (``yolo:DATA.yaml``) on tiny fixtures: box conversion, split sources, bad labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prunekit.cli.data import data as data_cli
from prunekit.data import DatasetError, VOCDetection, YOLODetection, build_dataset
from prunekit.data.yolo import label_path


def _image(path: Path, w: int = 32, h: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (30, 120, 200)).save(path)


def _labels(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    """train: a (2 boxes), b (32x16, 1 box), c (no label file); val: d (1 box)."""
    root = tmp_path / "yolo"
    _image(root / "images/train/a.jpg")
    _image(root / "images/train/b.png", 32, 16)
    _image(root / "images/train/c.jpg")
    _image(root / "images/val/d.jpg")
    _labels(root / "labels/train/a.txt", "0 0.5 0.5 0.5 0.25\n1 0.25 0.25 0.5 0.5\n")
    _labels(root / "labels/train/b.txt", "1 0.75 0.5 0.5 1.0\n\n")
    _labels(root / "labels/val/d.txt", "0 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n"
    )
    return root


def test_label_path_follows_the_ultralytics_rule() -> None:
    assert label_path(Path("/d/images/x/images/train/a.b.jpg")) == Path("/d/images/x/labels/train/a.b.txt")
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")  # no images/: beside the image


def test_yolo_boxes_labels_and_background(yolo: Path) -> None:
    ds = YOLODetection(yolo / "data.yaml", "train")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 3
    assert len(ds) == 3 and ds.without_label_file == 1
    by_name = {rec.name: i for i, rec in enumerate(ds.records)}
    assert sorted(by_name) == ["images/train/a.jpg", "images/train/b.png", "images/train/c.jpg"]
    img, t = ds[by_name["images/train/a.jpg"]]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    # same convention as VOCDetection: absolute xyxy pixels, labels = class id + 1 (0 is background)
    assert t["boxes"].tolist() == [[8.0, 12.0, 24.0, 20.0], [0.0, 0.0, 16.0, 16.0]]
    assert t["labels"].tolist() == [1, 2] and t["labels"].dtype == torch.int64
    assert t["difficult"].tolist() == [False, False]
    _, t = ds[by_name["images/train/b.png"]]  # 32 wide, 16 high: x scales by W, y by H
    assert t["boxes"].tolist() == [[16.0, 0.0, 32.0, 16.0]] and t["labels"].tolist() == [2]
    assert ds.annotation(by_name["images/train/c.jpg"])["boxes"].shape == (0, 4)
    assert ds.class_counts() == {"cat": 1, "dog": 2}
    val = YOLODetection(yolo, "val")  # a folder means its data.yaml
    assert len(val) == 1 and val[0][1]["boxes"].tolist() == [[0.0, 0.0, 32.0, 32.0]]
    assert len(YOLODetection(yolo / "data.yaml", "trainval")) == 4


def test_yolo_through_build_dataset_matches_voc_item_format(yolo: Path, tmp_path: Path) -> None:
    ds = build_dataset(f"yolo:{yolo / 'data.yaml'}", "val", train=False)
    assert isinstance(ds, YOLODetection) and ds.source == f"yolo:{yolo / 'data.yaml'}"
    _, t = ds[0]
    assert set(t) == {"boxes", "labels", "difficult", "image_id"}
    train = build_dataset(f"yolo:{yolo / 'data.yaml'}", "train", train=True, size=64)
    img, t = train[0]
    assert img.shape == (3, 64, 64) and t["boxes"].shape[1] == 4
    with pytest.raises(DatasetError, match=r"data.yaml: no split 'test' \(has train, val\)"):
        YOLODetection(yolo / "data.yaml", "test")


def test_yolo_txt_lists_list_names_and_roboflow_paths(tmp_path: Path) -> None:
    root = tmp_path / "rf"
    for split, stem in (("train", "x"), ("valid", "y")):
        _image(root / split / "images" / f"{stem}.jpg")
        _labels(root / split / "labels" / f"{stem}.txt", "1 0.5 0.5 0.5 0.5\n")
    # Roboflow writes ../train/images for a YAML that sits beside train/
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: [a, b]\n")
    ds = YOLODetection(root / "data.yaml", "train")
    assert ds.classes == ["a", "b"] and len(ds) == 1
    assert ds[0][1]["boxes"].tolist() == [[8.0, 8.0, 24.0, 24.0]] and ds[0][1]["labels"].tolist() == [2]
    (root / "lists").mkdir()
    (root / "lists/val.txt").write_text("../valid/images/y.jpg\n\n../train/images/x.jpg\n")
    (root / "list.yaml").write_text(
        f"path: {root}\ntrain: lists/val.txt\nval: [lists/val.txt]\nnames: [a, b]\n"
    )
    assert len(YOLODetection(root / "list.yaml", "train")) == 2
    (root / "lists/val.txt").write_text("../valid/images/y.jpg\nmissing.jpg\n")
    with pytest.raises(DatasetError, match=r"val\.txt: line 2: image missing\.jpg not found"):
        YOLODetection(root / "list.yaml", "val")
    (root / "bad.yaml").write_text("train: nowhere\nval: x\nnames: [a, b]\n")
    with pytest.raises(DatasetError, match=r"bad.yaml: train: .*nowhere not found"):
        YOLODetection(root / "bad.yaml", "train")
    (root / "bad.yaml").write_text("train: x\nval: x\nnames: [a, b]\nnc: 3\n")
    with pytest.raises(DatasetError, match="bad.yaml: nc is 3 but 'names' has 2 entries"):
        YOLODetection(root / "bad.yaml", "train")
    (root / "bad.yaml").write_text("train: x\nval: x\nnames: {0: a, 2: c}\n")
    with pytest.raises(DatasetError, match=r"bad.yaml: 'names' ids must be 0..1, got \[0, 2\]"):
        YOLODetection(root / "bad.yaml", "train")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.5", r"expected 5 fields 'class cx cy w h', got 4"),
        ("0 0.5 0.5 0.5 0.5 0.1", r"expected 5 fields 'class cx cy w h', got 6"),
        ("2 0.5 0.5 0.5 0.5", r"class id 2 out of range 0..1"),
        ("-1 0.5 0.5 0.5 0.5", r"class id -1 out of range 0..1"),
        ("0 0.9 0.5 0.5 0.5", r"box \(cx=0.9, cy=0.5, w=0.5, h=0.5\) outside \[0, 1\]"),
        ("0 0.5 0.5 0 0.5", r"empty box \(w=0, h=0.5\)"),
        ("0 0.5 abc 0.5 0.5", r"non-numeric field in '0 0.5 abc 0.5 0.5'"),
        ("0 0.5 nan 0.5 0.5", r"non-numeric field"),
        ("0.5 0.5 0.5 0.5 0.5", r"class id 0.5 is not an integer"),
    ],
)
def test_yolo_bad_label_lines_name_file_and_line(yolo: Path, line: str, message: str) -> None:
    lbl = yolo / "labels/train/a.txt"
    lbl.write_text(f"0 0.5 0.5 0.5 0.25\n{line}\n")
    with pytest.raises(DatasetError, match=re.escape(f"{lbl}: line 2: ") + message):
        YOLODetection(yolo / "data.yaml", "train")
    ds = YOLODetection(yolo / "data.yaml", "train", skip_bad=True)  # the bad line goes, the image stays
    assert len(ds) == 3 and len(ds.skipped) == 1
    assert ds.skipped[0].startswith(f"{lbl}: line 2: ")


def test_yolo_tolerates_float_noise_at_the_border(yolo: Path) -> None:
    (yolo / "labels/train/a.txt").write_text("0 0.5 0.5 1.0000004 1.0002\n")
    ds = YOLODetection(yolo / "data.yaml", "train")
    assert ds.records[0].boxes.tolist() == [[0.0, 0.0, 32.0, 32.0]]


def test_data_check_yolo_reports_background_and_bad_lines(yolo: Path) -> None:
    runner = CliRunner()
    spec = f"yolo:{yolo / 'data.yaml'}"
    r = runner.invoke(data_cli, ["check", spec])
    assert r.exit_code == 0, r.output
    assert "3 images, 2 classes (detection)" in r.output
    assert "images without a label file (background): 1" in r.output and "no problems found" in r.output
    r = runner.invoke(data_cli, ["check", spec, "--json"])
    assert json.loads(r.stdout)["images_without_label_file"] == 1
    lbl = yolo / "labels/train/b.txt"
    lbl.write_text("1 0.75 0.5 0.5 1.0\n7 0.5 0.5 0.1 0.1\n0 0.5 0.5\n")
    r = runner.invoke(data_cli, ["check", spec])
    assert r.exit_code == 1
    assert f"{lbl}: line 2: class id 7 out of range 0..1" in r.output
    assert f"{lbl}: line 3: expected 5 fields 'class cx cy w h', got 3" in r.output
    assert runner.invoke(data_cli, ["check", spec, "--skip-bad"]).exit_code == 0
    # the VOC-only split options are refused by name for a set that brings its own split
    r = runner.invoke(data_cli, ["check", spec, "--split-seed", "3"])
    assert r.exit_code != 0 and "YOLODetection has no option 'split_seed'" in r.output


def test_yolo_and_voc_agree_on_the_same_boxes(tmp_path: Path) -> None:
    """One image annotated in both formats gives the same target: the SSD code sees no difference."""
    from prunekit.data.voc import voc_annotation_xml

    voc = tmp_path / "voc"
    _image(voc / "a.jpg")
    # VOC 1-based inclusive (9, 13)-(24, 20) is continuous (8, 12)-(24, 20)
    (voc / "a.xml").write_text(voc_annotation_xml("a.jpg", 32, 32, [("cat", (9, 13, 24, 20), False, False)]))
    _image(voc / "b.jpg")
    (voc / "b.xml").write_text(voc_annotation_xml("b.jpg", 32, 32, [("cat", (1, 1, 32, 32), False, False)]))
    v = VOCDetection(voc, "all")
    yolo = tmp_path / "y"
    _image(yolo / "images/a.jpg")
    _labels(yolo / "labels/a.txt", "0 0.5 0.5 0.5 0.25\n")
    (yolo / "data.yaml").write_text("train: images\nval: images\nnames: [cat]\n")
    y = YOLODetection(yolo / "data.yaml", "train")
    vt, yt = v[0][1], y[0][1]
    assert vt["boxes"].tolist() == yt["boxes"].tolist() == [[8.0, 12.0, 24.0, 20.0]]
    assert vt["labels"].tolist() == yt["labels"].tolist() == [1]
    assert v.classes == y.classes == ["cat"]
