"""The readers on the real sets in ../shared/data (skipped where that folder is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunekit.data import ImageFolder, MemoryLoader, VOCDetection, build_dataset

pytestmark = pytest.mark.shared_data


def test_bccd_voc(shared_data: Path) -> None:
    root = shared_data / "BCCD"
    # BCCD's train split has one zero-size box (BloodImage_00343, object 4): dropped, not an error
    ds = VOCDetection(root, "train")
    assert len(ds) == 205 and ds.skipped == []
    assert len(ds.empty_boxes) == 1 and "BloodImage_00343.xml: object 4 ('RBC')" in ds.empty_boxes[0]
    assert ds.classes == ["Platelets", "RBC", "WBC"] and ds.num_classes == 4
    counts = ds.class_counts()
    assert counts["RBC"] > counts["WBC"] > 100 and counts["Platelets"] > 100
    for i in range(3):
        img, t = ds[i]
        assert img.shape == (3, 480, 640)
        n = len(t["boxes"])
        assert 1 <= n <= 60 and (t["labels"] == 3).sum() >= 1  # every BCCD image has a white cell
        b = t["boxes"]
        assert (b[:, 2] <= 640).all() and (b[:, 3] <= 480).all() and (b[:, :2] >= 0).all()
    assert len(build_dataset(f"voc:{root}", "test")) == 72  # the test split is clean


def test_cifar10_jpeg_tarball_subset(shared_data: Path) -> None:
    # one archive per split: {split} in the spec picks it
    ds = build_dataset(f"folder:{shared_data}/cifar10-jpg-{{split}}.tar.gz", "test", limit_per_class=20)
    assert isinstance(ds, ImageFolder) and ds.root.name == "cifar10-jpg-test.tar.gz"
    assert ds.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert len(ds) == 200 and ds.class_counts()["truck"] == 20
    img, label = ds[-1]
    assert img.shape == (3, 32, 32) and label == 9
    loader = MemoryLoader.from_dataset(ds, batch_size=64, shuffle=True, augment=True)
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.max() <= 9
