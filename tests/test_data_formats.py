"""Dataset readers on small fixtures written in the real on-disk formats, and their error messages."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.data import (
    CIFAR10,
    GTSRB,
    COCODetection,
    DatasetError,
    GTSDBDetection,
    ImageFolder,
    VOCDetection,
    write_cifar_batches,
)
from prunekit.data.voc import VOC_CLASSES, voc_annotation_xml


def _jpeg(path: Path, w: int, h: int, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, quality=95)


def _voc_folder(root: Path, items: dict[str, list], split_ids: dict[str, list[str]], w=64, h=48) -> Path:
    """items: id -> [(name, (xmin, ymin, xmax, ymax), truncated, difficult)]."""
    for image_id, objects in items.items():
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", w, h)
        xml = voc_annotation_xml(f"{image_id}.jpg", w, h, objects)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in split_ids.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return _voc_folder(
        tmp_path / "voc",
        {
            "a": [("RBC", (1, 1, 10, 20), False, False), ("WBC", (30, 10, 64, 48), True, True)],
            "b": [("Platelets", (5, 5, 15, 15), False, False)],
            "c": [("RBC", (2, 3, 40, 30), False, False)],
        },
        {"train": ["a", "b"], "val": ["c"]},
    )


# ---- VOC -------------------------------------------------------------------------------------


def test_voc_reads_boxes_labels_difficult(voc: Path) -> None:
    ds = VOCDetection(voc, "train")
    assert ds.classes == ["Platelets", "RBC", "WBC"]  # sorted names from all annotations
    assert ds.num_classes == 4 and len(ds) == 2
    img, t = ds[0]
    assert img.shape == (3, 48, 64) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    # VOC 1-based inclusive -> 0-based continuous
    assert t["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0], [29.0, 9.0, 64.0, 48.0]]
    assert t["labels"].tolist() == [2, 3]
    assert t["difficult"].tolist() == [False, True]
    assert t["image_id"] == 0 and t["labels"].dtype == torch.int64
    assert ds.class_counts() == {"Platelets": 1, "RBC": 1, "WBC": 1}
    # val sees the same label mapping although it only contains RBC
    assert VOCDetection(voc, "val").classes == ds.classes
    assert len(VOCDetection(voc, "train", keep_difficult=False)[0][1]["boxes"]) == 1


def test_voc_class_file_and_explicit_classes(voc: Path) -> None:
    (voc / "classes.txt").write_text("WBC\nRBC\nPlatelets\n")
    assert VOCDetection(voc, "train")[0][1]["labels"].tolist() == [2, 1]
    ds = VOCDetection(voc, "train", classes=["RBC", "WBC", "Platelets"])
    assert ds[0][1]["labels"].tolist() == [1, 2]


def test_vocdevkit_07_plus_12_union(tmp_path: Path) -> None:
    dev = tmp_path / "VOCdevkit"
    _voc_folder(dev / "VOC2007", {"000001": [("dog", (1, 1, 9, 9), 0, 0)], "000002": [("cat", (2, 2, 8, 8), 0, 1)]},
                {"trainval": ["000001"], "test": ["000002"]})  # fmt: skip
    _voc_folder(
        dev / "VOC2012",
        {"2008_000001": [("person", (3, 3, 20, 20), 0, 0)]},
        {"trainval": ["2008_000001"], "test": []},
    )
    union = VOCDetection(tmp_path, "trainval")  # the folder holding VOCdevkit works too
    assert union.classes == VOC_CLASSES
    assert len(union) == 2 and [r.image_id for r in union.records] == [0, 1]
    assert [VOC_CLASSES[int(r.labels[0]) - 1] for r in union.records] == ["dog", "person"]
    test = VOCDetection(dev, "test")  # VOC2012 test has no labels: 2007 only
    assert len(test) == 1 and test[0][1]["difficult"].tolist() == [True]
    assert len(VOCDetection(dev, "trainval", years=["2012"])) == 1
    assert len(VOCDetection(dev, "2007_trainval")) == 1


def test_voc_missing_image(voc: Path) -> None:
    (voc / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"b\.xml: image file not found"):
        VOCDetection(voc, "train")


def test_voc_unparsable_xml_names_file_and_line(voc: Path) -> None:
    (voc / "Annotations" / "b.xml").write_text("<annotation>\n<object>\n<name>RBC</nam>\n</annotation>\n")
    with pytest.raises(DatasetError, match=r"b\.xml: unparsable XML \(mismatched tag: line 3, column"):
        VOCDetection(voc, "train", classes=["RBC", "WBC", "Platelets"])


def test_voc_box_outside_image(voc: Path) -> None:
    xml = voc_annotation_xml("b.jpg", 64, 48, [("RBC", (1, 1, 10, 10), 0, 0), ("RBC", (50, 5, 90, 20), 0, 0)])
    (voc / "Annotations" / "b.xml").write_text(xml)
    with pytest.raises(DatasetError, match=r"b\.xml: object 2 \('RBC'\): box .* outside the 64x48 image"):
        VOCDetection(voc, "train")


def test_voc_inverted_box(voc: Path) -> None:
    xml = voc_annotation_xml("b.jpg", 64, 48, [("RBC", (20, 20, 10, 30), 0, 0)])
    (voc / "Annotations" / "b.xml").write_text(xml)
    with pytest.raises(DatasetError, match=r"b\.xml: object 1 \('RBC'\): inverted box"):
        VOCDetection(voc, "train")


def test_voc_zero_area_box_dropped_with_warning(voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a click without a drag (BCCD's BloodImage_00343 has one): no extent, so no object; not an error
    xml = voc_annotation_xml(
        "b.jpg",
        64,
        48,
        [("RBC", (20, 20, 20, 20), 0, 0), ("RBC", (5, 5, 9, 5), 0, 0), ("RBC", (2, 3, 12, 13), 0, 0)],
    )
    (voc / "Annotations" / "b.xml").write_text(xml)
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection(voc, "train")
    b = next(r for r in ds.records if r.name == "b")
    assert b.boxes.tolist() == [[1.0, 2.0, 12.0, 13.0]] and ds.skipped == []
    assert "dropped 2 zero-area box(es)" in caplog.text and "b.xml: object 1 ('RBC')" in caplog.text


def test_voc_unknown_class(voc: Path) -> None:
    with pytest.raises(DatasetError, match=r"a\.xml: object 2 \('WBC'\): unknown class 'WBC'"):
        VOCDetection(voc, "train", classes=["RBC", "Platelets"])


def test_voc_skip_bad_counts_and_warns(voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    (voc / "JPEGImages" / "b.jpg").unlink()
    xml = voc_annotation_xml(
        "a.jpg",
        64,
        48,
        [("RBC", (1, 1, 10, 10), 0, 0), ("RBC", (5, 5, 4, 9), 0, 0), ("cow", (1, 1, 5, 5), 0, 0)],
    )
    (voc / "Annotations" / "a.xml").write_text(xml)
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection(voc, "train", classes=["RBC"], skip_bad=True)
    assert len(ds) == 1 and len(ds.records[0].boxes) == 1
    assert len(ds.skipped) == 3  # missing image, inverted box, unknown class
    assert "skipped 3 bad input(s)" in caplog.text


def test_voc_missing_split_lists_available(voc: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"test\.txt: split file not found \(available splits: train, val\)"
    ):
        VOCDetection(voc, "test")


# ---- COCO ------------------------------------------------------------------------------------


def _coco(tmp_path: Path, anns: list[dict] | None = None) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    _jpeg(img_dir / "x.jpg", 50, 40)
    _jpeg(img_dir / "y.jpg", 30, 30)
    data = {
        "images": [{"id": 7, "file_name": "x.jpg", "width": 50, "height": 40}, {"id": 9, "file_name": "y.jpg", "width": 30, "height": 30}],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "bus"}, {"id": 9, "name": "boat"}],
        "annotations": anns
        if anns is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 0, 50, 40], "area": 2000, "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [1.5, 2, 3, 4], "area": 12, "iscrowd": 0},
        ],
    }  # fmt: skip
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_coco_contiguous_labels_xyxy_and_crowd(tmp_path: Path) -> None:
    ann, img_dir = _coco(tmp_path)
    ds = COCODetection(ann, img_dir)
    assert ds.classes == ["person", "bus", "boat"] and ds.num_classes == 4
    img, t = ds[0]
    assert img.shape == (3, 40, 50) and t["image_id"] == 7
    assert t["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 50.0, 40.0]]
    assert t["labels"].tolist() == [2, 3]
    assert t["difficult"].tolist() == [False, True]  # crowd: ignored by evaluation
    assert ds[1][1]["boxes"].tolist() == [[1.5, 2.0, 4.5, 6.0]]
    assert ds.label_to_cat == {1: 1, 2: 5, 3: 9}
    raw = COCODetection(ann, img_dir, contiguous=False)
    assert len(raw.classes) == 9 and raw.classes[4] == "bus" and raw[0][1]["labels"].tolist() == [5, 9]


def test_coco_unparsable_json(tmp_path: Path) -> None:
    ann, img_dir = _coco(tmp_path)
    ann.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"instances\.json: line 2, column \d+: unparsable JSON"):
        COCODetection(ann, img_dir)


def test_coco_malformed_annotations(tmp_path: Path) -> None:
    bad_cat = [{"id": 4, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 0}]
    ann, img_dir = _coco(tmp_path, bad_cat)
    with pytest.raises(
        DatasetError, match=r"instances\.json: annotation id 4 \(image x\.jpg\): unknown category_id 3"
    ):
        COCODetection(ann, img_dir)
    outside = [{"id": 5, "image_id": 9, "category_id": 1, "bbox": [20, 20, 15, 5], "iscrowd": 0}]
    ann, img_dir = _coco(tmp_path, outside)
    with pytest.raises(
        DatasetError, match=r"annotation id 5 \(image y\.jpg\): box .* outside the 30x30 image"
    ):
        COCODetection(ann, img_dir)
    (img_dir / "y.jpg").unlink()
    with pytest.raises(DatasetError, match=r"instances\.json: image id 9: image file .*y\.jpg not found"):
        COCODetection(ann, img_dir)
    ds = COCODetection(ann, img_dir, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1


# ---- GTSDB -----------------------------------------------------------------------------------


def _ppm(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 120, 200)).save(path, format="PPM")


@pytest.fixture
def gtsdb(tmp_path: Path) -> Path:
    root = tmp_path / "FullIJCNN2013"
    for name in ("00000.ppm", "00001.ppm", "00002.ppm", "00700.ppm"):
        _ppm(root / name, 80, 50)
    (root / "gt.txt").write_text(
        "00000.ppm;10;5;19;14;1\n"  # speed limit 30 -> prohibitory
        "00000.ppm;30;20;41;33;38\n"  # keep right -> mandatory
        "00001.ppm;0;0;9;9;14\n"  # stop: "other", dropped in the paper grouping
        "00700.ppm;60;30;79;49;11\n"  # right-of-way -> danger (test split)
    )
    return tmp_path


def test_gtsdb_grouping_splits_and_coordinates(gtsdb: Path) -> None:
    ds = GTSDBDetection(gtsdb, "train")
    assert ds.classes == ["prohibitory", "mandatory", "danger"]
    assert [r.name for r in ds.records] == ["00000.ppm", "00001.ppm", "00002.ppm"]  # empty images kept
    img, t = ds[0]
    assert img.shape == (3, 50, 80)
    assert t["boxes"].tolist() == [
        [10.0, 5.0, 20.0, 15.0],
        [30.0, 20.0, 42.0, 34.0],
    ]  # inclusive -> exclusive
    assert t["labels"].tolist() == [1, 2]
    assert len(ds[1][1]["boxes"]) == 0
    test = GTSDBDetection(gtsdb / "FullIJCNN2013", "test")
    assert len(test) == 1 and test[0][1]["labels"].tolist() == [3]
    all43 = GTSDBDetection(gtsdb, "all", grouping="none")
    assert len(all43.classes) == 43 and all43.classes[14] == "stop"
    assert all43[1][1]["labels"].tolist() == [15]


def test_gtsdb_malformed_lines(gtsdb: Path) -> None:
    gt = gtsdb / "FullIJCNN2013" / "gt.txt"
    gt.write_text(gt.read_text() + "00002.ppm;1;2;3\n")
    with pytest.raises(
        DatasetError, match=r"gt\.txt: line 5: expected 'file;left;top;right;bottom;class_id'"
    ):
        GTSDBDetection(gtsdb, "train")
    gt.write_text("00000.ppm;70;5;85;14;1\n")
    with pytest.raises(DatasetError, match=r"gt\.txt: line 1: box .* outside the 80x50 image"):
        GTSDBDetection(gtsdb, "train")
    gt.write_text("00000.ppm;70;5;85;14;1\n00002.ppm;1;1;5;5;50\n00003.ppm;1;1;5;5;2\n")
    with pytest.raises(DatasetError, match=r"gt\.txt: line 2: unknown class id 50"):
        GTSDBDetection(gtsdb, "train")
    ds = GTSDBDetection(gtsdb, "train", skip_bad=True)
    assert len(ds.skipped) == 3  # outside box, class 50, missing 00003.ppm
    assert len(ds) == 3


# ---- CIFAR-10 pickles ------------------------------------------------------------------------


def _cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10


def test_cifar_pickles_round_trip(tmp_path: Path) -> None:
    train, test = _cifar_arrays(25, 0), _cifar_arrays(7, 1)
    names = [f"c{i}" for i in range(10)]
    out = write_cifar_batches(tmp_path / "cifar-10-batches-py", train, test, names)
    assert sorted(p.name for p in out.iterdir()) == [
        "batches.meta",
        *[f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
    ]
    ds = CIFAR10(tmp_path, "train")  # the parent of cifar-10-batches-py works too
    assert len(ds) == 25 and ds.classes == names
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 3
    assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(train[0][3]))
    te = CIFAR10(out, "test")
    assert len(te) == 7 and te.targets == list(range(7))
    # the python-version archive is read in memory
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(out, arcname="cifar-10-batches-py")
    assert torch.equal(CIFAR10(archive, "test").images, te.images)


def test_cifar_malformed(tmp_path: Path) -> None:
    out = write_cifar_batches(
        tmp_path, _cifar_arrays(10, 0), _cifar_arrays(2, 1), [str(i) for i in range(10)]
    )
    (out / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"data_batch_3: not a readable CIFAR pickle"):
        CIFAR10(out, "train")
    (out / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"test_batch: 'data' must be uint8 \[N, 3072\]"):
        CIFAR10(out, "test")
    (out / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3: CIFAR batch file not found"):
        CIFAR10(out, "train")


# ---- GTSRB -----------------------------------------------------------------------------------


_GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


@pytest.fixture
def gtsrb(tmp_path: Path) -> Path:
    train = tmp_path / "GTSRB" / "Final_Training" / "Images"
    for cid in (0, 14):
        d = train / f"{cid:05d}"
        rows = []
        for k in range(2):
            name = f"00000_{k:05d}.ppm"
            _ppm(d / name, 40 + k, 36)
            rows.append(f"{name};{40 + k};36;5;5;{34 + k};30;{cid}\n")
        (d / f"GT-{cid:05d}.csv").write_text(_GT_HEADER + "".join(rows))
    test = tmp_path / "GTSRB" / "Final_Test" / "Images"
    _ppm(test / "00000.ppm", 50, 50)
    _ppm(test / "00001.ppm", 20, 25)
    (test / "GT-final_test.csv").write_text(
        _GT_HEADER + "00000.ppm;50;50;1;1;45;45;38\n00001.ppm;20;25;0;0;19;24;2\n"
    )
    return tmp_path / "GTSRB"


def test_gtsrb_train_and_test(gtsrb: Path) -> None:
    ds = GTSRB(gtsrb, "train")
    assert len(ds) == 4 and ds.targets == [0, 0, 14, 14] and len(ds.classes) == 43
    img, label = ds[2]
    assert img.shape == (3, 32, 32) and label == 14  # resized to 32x32
    assert GTSRB(gtsrb, "train", image_size=None, crop_roi=True).load_uint8(1).shape == (3, 26, 31)
    te = GTSRB(gtsrb, "test")
    assert te.targets == [38, 2] and te[1][0].shape == (3, 32, 32)


def test_gtsrb_malformed(gtsrb: Path) -> None:
    csv = gtsrb / "Final_Training" / "Images" / "00014" / "GT-00014.csv"
    csv.write_text("Filename;Width;Height\n00000_00000.ppm;40;36\n")
    with pytest.raises(DatasetError, match=r"GT-00014\.csv: line 1: missing column\(s\) Roi\.X1"):
        GTSRB(gtsrb, "train")
    csv.write_text(_GT_HEADER + "00000_00000.ppm;40;36;5;5;34;30;14\n00000_00009.ppm;40;36;5;5;34;30;14\n")
    with pytest.raises(DatasetError, match=r"00000_00009\.ppm: image file not found"):
        GTSRB(gtsrb, "train")
    assert len(GTSRB(gtsrb, "train", skip_bad=True)) == 3


# ---- image folder (directory and tarball) ------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 1)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for k in range(n):
                _jpeg(root / split / c / f"{k:04d}.jpg", 16, 16, colour)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_dir_and_tarball_agree(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolder(folder, "train")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
    img, label = ds[4]
    assert img.shape == (3, 16, 16) and label == 1 and float(img[2].mean()) > 0.9  # blue
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="data")  # one wrapping folder, as archives often have
    packed = ImageFolder(archive, "train")
    assert packed.classes == ds.classes and packed.targets == ds.targets
    assert all(torch.equal(packed.load_uint8(i), ds.load_uint8(i)) for i in range(len(ds)))
    assert len(ImageFolder(archive, "test")) == 2
    assert ImageFolder(archive, "train", limit_per_class=1).targets == [0, 1]
    assert ImageFolder(folder / "train").classes == ["cat", "dog"]  # a bare class-folder root
    assert ImageFolder(folder, "train", image_size=8)[0][0].shape == (3, 8, 8)


def test_image_folder_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"imgs: no split 'val' \(has test, train\)"):
        ImageFolder(folder, "val")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match=r"broken\.tar\.gz: unreadable archive"):
        ImageFolder(broken, "train")
    (folder / "train" / "dog" / "0001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=r"0001\.jpg: cannot decode image"):
        ImageFolder(folder, "train").load_uint8(4)


def test_image_decoding_of_grey_and_png(tmp_path: Path) -> None:
    from prunekit.data import decode_image_bytes

    buf = io.BytesIO()
    Image.new("L", (5, 4), 128).save(buf, format="PNG")
    img = decode_image_bytes(buf.getvalue(), "g.png")
    assert img.shape == (3, 4, 5) and img.dtype == torch.uint8 and int(img[1, 0, 0]) == 128
