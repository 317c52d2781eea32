"""Synthetic sets (determinism, content), SSD augmentation, build_dataset specs and the data CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prunekit.cli.data import data as data_cli
from prunekit.data import (
    CIFAR10,
    DatasetError,
    VOCDetection,
    build_dataset,
    collate_detection,
    ensure_synth_voc,
    make_synth_cifar,
    make_synth_voc,
    parse_spec,
)
from prunekit.data.synth import SHAPES
from prunekit.data.transforms import (
    PhotometricDistort,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomZoomOut,
    Resize,
    SSDAugmentation,
)

SMALL = {"n_train": 8, "n_val": 3, "n_test": 2, "image_size": 160}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth_voc(tmp_path_factory.mktemp("s") / "synth", seed=3, **SMALL)


# ---- synthetic detection set ------------------------------------------------------------------


def test_synth_voc_is_byte_identical_for_a_seed(synth_dir: Path, tmp_path: Path) -> None:
    again = make_synth_voc(tmp_path / "again", seed=3, **SMALL)
    assert _digest(again) == _digest(synth_dir)
    other = make_synth_voc(tmp_path / "other", seed=4, **SMALL)
    assert _digest(other)["JPEGImages/train00000.jpg"] != _digest(synth_dir)["JPEGImages/train00000.jpg"]
    # a split's images do not depend on the other splits' sizes
    more = make_synth_voc(tmp_path / "more", seed=3, n_train=2, n_val=5, n_test=0, image_size=160)
    assert _digest(more)["JPEGImages/val00002.jpg"] == _digest(synth_dir)["JPEGImages/val00002.jpg"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp folders published or removed


def test_synth_voc_content(synth_dir: Path) -> None:
    files = _digest(synth_dir)
    assert len([f for f in files if f.startswith("JPEGImages/")]) == 13
    assert (synth_dir / "ImageSets/Main/trainval.txt").read_text().split() == [
        f"train{i:05d}" for i in range(8)
    ] + [f"val{i:05d}" for i in range(3)]
    ds = VOCDetection(synth_dir, "trainval")
    assert ds.classes == ["circle", "square", "triangle", "star"]  # classes.txt order
    counts = ds.class_counts()
    assert all(n > 0 for n in counts.values()), counts
    sides = []
    for rec in ds.records:
        assert (rec.width, rec.height) == (160, 160)
        b = rec.boxes
        assert len(b) >= 1
        assert (
            (b[:, 0] >= 0).all()
            and (b[:, 1] >= 0).all()
            and (b[:, 2] <= 160).all()
            and (b[:, 3] <= 160).all()
        )
        assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()
        sides += np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).tolist()
    assert min(sides) < 20 < max(sides)  # tiny to large
    img, _ = ds[0]
    assert img.shape == (3, 160, 160) and float(img.std()) > 0.05  # textured, not flat


def test_synth_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic class 'hexagonal'"):
        make_synth_voc(tmp_path / "x", classes=["circle", "hexagonal"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="full: already exists"):
        make_synth_voc(tmp_path / "full", n_train=1, n_val=0, n_test=0)


def test_ensure_synth_caches_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    a = ensure_synth_voc(**SMALL)
    assert a.parent == tmp_path / "cache" and a.name.startswith("synth-")
    stamp = (a / "synth.json").stat().st_mtime_ns
    assert ensure_synth_voc(**SMALL) == a and (a / "synth.json").stat().st_mtime_ns == stamp
    assert ensure_synth_voc(**{**SMALL, "seed": 1}) != a
    ds = build_dataset("synth", "val", **SMALL)
    assert len(ds) == 3 and ds.transforms is None
    tr = build_dataset("synth", "train", train=True, **SMALL)
    assert isinstance(tr.transforms, SSDAugmentation)
    own = build_dataset(f"synth:{tmp_path / 'mine'}", "test", **SMALL)
    assert len(own) == 2 and (tmp_path / "mine" / "synth.json").is_file()


def test_synth_cifar(tmp_path: Path) -> None:
    out = make_synth_cifar(tmp_path / "c", n_train=40, n_test=20, seed=1)
    again = make_synth_cifar(tmp_path / "d", n_train=40, n_test=20, seed=1)
    assert _digest(out) == _digest(again)
    ds = CIFAR10(out, "train")
    assert ds.classes == SHAPES and len(ds) == 40
    assert sorted(ds.class_counts().values()) == [4] * 10  # balanced
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and 0 <= label < 10 and float(img.std()) > 0.02
    assert len(build_dataset(f"cifar10:{out}", "test")) == 20


# ---- SSD augmentation -------------------------------------------------------------------------


def _sample(h: int = 120, w: int = 160) -> tuple[torch.Tensor, dict]:
    img = torch.rand(3, h, w)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [100.0, 30.0, 160.0, 120.0], [70.0, 5.0, 80.0, 15.0]])
    return img, {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3]),
        "difficult": torch.tensor([False, True, False]),
        "image_id": 5,
    }


def test_ssd_augmentation_keeps_boxes_valid() -> None:
    aug = SSDAugmentation()
    seen_sizes, n_boxes = set(), []
    for i in range(40):
        torch.manual_seed(i)
        img, t = aug(*_sample())
        h, w = img.shape[-2:]
        seen_sizes.add((h, w))
        b = t["boxes"]
        assert img.dtype == torch.float32 and float(img.min()) >= 0 and float(img.max()) <= 1
        assert len(b) == len(t["labels"]) == len(t["difficult"])
        assert t["image_id"] == 5
        if len(b):
            assert (
                (b[:, 0] >= 0).all()
                and (b[:, 1] >= 0).all()
                and (b[:, 2] <= w).all()
                and (b[:, 3] <= h).all()
            )
            assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
        n_boxes.append(len(b))
    assert len(seen_sizes) > 10  # zoom-out and crops change the size
    assert min(n_boxes) < 3  # crops drop objects sometimes
    sized = SSDAugmentation(size=300)
    img, t = sized(*_sample())
    assert img.shape == (3, 300, 300) and (t["boxes"] <= 300).all()


def test_flip_zoom_crop_resize_geometry() -> None:
    img, t = _sample()
    fimg, ft = RandomHorizontalFlip(p=1.0)(img, t)
    assert torch.equal(fimg, img.flip(-1))
    assert ft["boxes"][0].tolist() == [110.0, 20.0, 150.0, 70.0]
    # zoom-out: the pixels inside the moved box are the original pixels
    torch.manual_seed(1)
    zimg, zt = RandomZoomOut(max_ratio=3.0, p=1.0)(img, t)
    x1, y1, x2, y2 = (int(v) for v in zt["boxes"][0].tolist())
    assert zimg.shape[1] > 120 and torch.equal(zimg[:, y1:y2, x1:x2], img[:, 20:70, 10:50])
    # an IoU-constrained crop keeps at least one object overlapping >= the sampled minimum
    torch.manual_seed(2)
    crop = RandomIoUCrop(options=[0.5], trials=200)
    cimg, ct = crop(img, t)
    assert cimg.shape != img.shape and 1 <= len(ct["boxes"]) <= 3
    rimg, rt = Resize((60, 80))(img, t)
    assert rimg.shape == (3, 60, 80) and rt["boxes"][0].tolist() == [5.0, 10.0, 25.0, 35.0]
    pimg, _ = PhotometricDistort(p=1.0)(img, t)
    assert pimg.shape == img.shape and not torch.equal(pimg, img)
    empty = {
        **t,
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "difficult": torch.zeros(0, dtype=torch.bool),
    }
    assert RandomIoUCrop()(img, empty)[0] is img


def test_collate_detection(synth_dir: Path) -> None:
    ds = VOCDetection(synth_dir, "val")
    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, 160, 160)
    assert [t["image_id"] for t in targets] == [0, 1]


# ---- specs ------------------------------------------------------------------------------------


def test_parse_spec_and_errors(tmp_path: Path) -> None:
    assert parse_spec("voc:/data/VOCdevkit") == ("voc", "/data/VOCdevkit")
    assert parse_spec("synth") == ("synth", None)
    assert parse_spec("coco:a.json,imgs") == ("coco", "a.json,imgs")
    with pytest.raises(ValueError, match="unknown dataset spec 'imagenet:x'"):
        parse_spec("imagenet:x")
    with pytest.raises(ValueError, match="needs a path: voc:PATH"):
        parse_spec("voc")
    with pytest.raises(FileNotFoundError, match="missing: VOC folder not found"):
        build_dataset(f"voc:{tmp_path / 'missing'}", "train")
    with pytest.raises(DatasetError, match="not a VOC folder"):
        build_dataset(f"voc:{tmp_path}", "train")


def test_build_dataset_options(synth_dir: Path) -> None:
    ds = build_dataset(f"voc:{synth_dir}", "train", train=True, size=128)
    img, t = ds[0]
    assert img.shape == (3, 128, 128)
    ev = build_dataset(f"voc:{synth_dir}", "train")
    assert sum(len(r.labels) for r in ev.records) >= sum(
        len(r.labels) for r in ds.records
    )  # train drops difficult
    with pytest.raises(ValueError, match="VOCDetection has no option 'grouping'"):
        build_dataset(f"voc:{synth_dir}", "train", grouping="paper")


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_synth_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "s"
    r = runner.invoke(
        data_cli, ["synth", "--out", str(out), "--train", "4", "--val", "2", "--test", "1", "--size", "96"]
    )
    assert r.exit_code == 0, r.output
    assert f"--data voc:{out}" in r.output
    r = runner.invoke(data_cli, ["check", f"voc:{out}", "--split", "train"])
    assert r.exit_code == 0, r.output
    assert "4 images, 4 classes (detection)" in r.output and "no problems found" in r.output
    # a broken annotation: listed, exit code 1; accepted with --skip-bad
    (out / "Annotations" / "train00001.xml").write_text("<annotation>")
    r = runner.invoke(data_cli, ["check", f"voc:{out}"])
    assert r.exit_code == 1 and "train00001.xml: unparsable XML" in r.output
    assert runner.invoke(data_cli, ["check", f"voc:{out}", "--skip-bad"]).exit_code == 0
    r = runner.invoke(data_cli, ["check", f"voc:{tmp_path / 'nope'}"])
    assert r.exit_code == 2 and "nope: VOC folder not found" in r.output
    r = runner.invoke(
        data_cli, ["synth", "--out", str(tmp_path / "c"), "--classification", "--train", "10", "--test", "5"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(data_cli, ["check", f"cifar10:{tmp_path / 'c'}", "--json"])
    assert r.exit_code == 0 and '"task": "classification"' in r.output
