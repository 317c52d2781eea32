"""Training, evaluation and export on the real sets in ../shared/data (skipped where it is absent).

The dataset readers themselves are tested in test_data_real.py; these check that the model
pipeline runs on real images: CIFAR-10 JPEGs through the folder reader, BCCD through the VOC
reader, and a BCCD image through ONNX export and ONNX Runtime.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.data import TensorImageDataset, build_dataset, cached_uint8
from prunekit.data.transforms import classification_train_transforms
from prunekit.evaluate import evaluate
from prunekit.models import SSDRaw, create_model, ssd300_vgg16
from prunekit.train import TrainConfig, train

pytestmark = pytest.mark.shared_data
BCCD_CLASSES = ["Platelets", "RBC", "WBC"]


def _cifar(shared: Path, split: str, per_class: int) -> TensorImageDataset:
    ds = build_dataset(f"folder:{shared}/cifar10-jpg-{{split}}.tar.gz", split, limit_per_class=per_class)
    images, labels = cached_uint8(ds)
    aug = classification_train_transforms(32) if split == "train" else None
    return TensorImageDataset(images, labels, ds.classes, aug)


def test_vgg16_trains_on_real_cifar_subset(shared_data: Path, tmp_path: Path) -> None:
    train_set = _cifar(shared_data, "train", 30)  # 270 images: 30 a class read, 3 held out as validation
    test_set = _cifar(shared_data, "test", 13)  # 130 images, every class
    assert len(train_set) == 270 and sorted(set(train_set.targets)) == list(range(10))
    model = create_model("vgg16", 10, 0.0625, class_names=train_set.classes)  # what --model vgg16 builds
    assert model.prunekit_config.input_size == (32, 32)
    cfg = TrainConfig(epochs=1, max_steps=2, lr=0.01, batch_size=128, log_every=1)
    hist = train(model, train_set, cfg, out_dir=tmp_path, progress=False)
    assert hist["steps"] == 2
    loss = hist["epochs"][0]["loss"]
    assert math.isfinite(loss) and 1.0 < loss < 5.0  # ~ln(10) from scratch
    metrics = evaluate(model, test_set, batch_size=64, progress=False)
    assert metrics["num_images"] == 130 and 0.0 <= metrics["top1"] <= 1.0


def test_ssd_train_step_and_eval_on_bccd(shared_data: Path) -> None:
    from torch.utils.data import Subset

    root = shared_data / "BCCD"
    train_set = build_dataset(f"voc:{root}", "train", train=True, skip_bad=True)
    test_set = build_dataset(f"voc:{root}", "test")
    assert train_set.classes == BCCD_CLASSES
    model = ssd300_vgg16(num_classes=4, width=0.0625, batch_norm=True, class_names=BCCD_CLASSES)
    cfg = TrainConfig(epochs=1, max_steps=1, lr=0.01, batch_size=2, grad_clip=10.0)
    hist = train(model, Subset(train_set, range(2)), cfg, progress=False)
    assert hist["steps"] == 1 and math.isfinite(hist["epochs"][0]["loss"])
    few = Subset(test_set, range(3))
    few.classes = test_set.classes  # type: ignore[attr-defined]
    m = evaluate(model, few, batch_size=3, progress=False)
    assert set(m["per_class"]) == set(BCCD_CLASSES)
    for key in ("map", "map50", "voc07_ap"):
        assert 0.0 <= m[key] <= 1.0
    # every test image of BCCD has at least one white cell: the WBC ground truth is counted
    assert m["per_class"]["WBC"]["num_gt"] >= 3


def test_bccd_image_through_onnx_runtime_matches_torch(shared_data: Path, tmp_path: Path) -> None:
    from prunekit.deploy import get_runner
    from prunekit.export import export_onnx

    test_set = build_dataset(f"voc:{shared_data / 'BCCD'}", "test")
    image, _ = test_set[0]
    assert image.shape == (3, 480, 640)
    model = ssd300_vgg16(num_classes=4, width=0.0625, batch_norm=True, class_names=BCCD_CLASSES).eval()
    path = tmp_path / "bccd.onnx"
    export_onnx(model, path, form="raw", check=False)
    with torch.no_grad():
        x = model.transform([image])[0].tensors  # resized to 300x300 and normalised, as the runtime feeds
        ref_loc, ref_cls = SSDRaw(model)(x)
    with get_runner("ort-cpu", path) as runner:
        out = runner.infer({"images": x.numpy()})
    assert out["bbox_regression"].shape == tuple(ref_loc.shape) == (1, 8732, 4)
    assert out["cls_logits"].shape == (1, 8732, 4)
    np.testing.assert_allclose(out["bbox_regression"], ref_loc.numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(out["cls_logits"], ref_cls.numpy(), atol=1e-3, rtol=1e-3)
