"""CIFAR-10 in its original python-pickle format (``cifar-10-batches-py``).

``data_batch_1..5`` are the train split, ``test_batch`` the test split. CIFAR has no validation
split: :func:`prunekit.data.build.build_dataset` holds one out of train (``HELD_OUT_FRACTION``), so
nothing is selected on the test images the paper reports. The reader accepts the
batch folder, its parent, or the ``cifar-10-python.tar.gz`` archive itself (read in memory).

Pickle runs code from the file it loads: only point this at CIFAR files you trust, as with any
CIFAR loader.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunekit.data.base import ClassificationDataset, ImageTransform
from prunekit.data.errors import DatasetError, MissingSplitError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
_BATCH_DIR = "cifar-10-batches-py"


def _unpickle(data: bytes, name: str) -> dict:
    try:
        obj = pickle.loads(data, encoding="bytes")
    except Exception as e:  # pickle raises many types for corrupt input
        raise DatasetError(f"{name}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _Source:
    """Reads named files from a batch folder or from inside a .tar.gz."""

    def __init__(self, root: Path):
        self.root = root
        self.members: dict[str, bytes] | None = None
        if root.is_file():
            try:
                with tarfile.open(root, "r:*") as tf:
                    wanted = {*TRAIN_BATCHES, *TEST_BATCHES, "batches.meta"}
                    self.members = {
                        Path(m.name).name: tf.extractfile(m).read()  # type: ignore[union-attr]
                        for m in tf.getmembers()
                        if m.isfile() and Path(m.name).name in wanted
                    }
            except tarfile.TarError as e:
                raise DatasetError(f"{root}: not a readable CIFAR archive ({e})") from e
        elif not root.is_dir():
            raise FileNotFoundError(f"{root}: CIFAR-10 folder not found")
        elif (root / _BATCH_DIR).is_dir() and not (root / "test_batch").exists():
            self.root = root / _BATCH_DIR

    def read(self, name: str) -> bytes:
        if self.members is not None:
            if name not in self.members:
                raise DatasetError(f"{self.root}: archive has no {name}")
            return self.members[name]
        path = self.root / name
        if not path.is_file():
            raise DatasetError(f"{path}: CIFAR batch file not found")
        return path.read_bytes()

    def has(self, name: str) -> bool:
        return name in self.members if self.members is not None else (self.root / name).is_file()

    def label(self, name: str) -> str:
        return f"{self.root}:{name}" if self.members is not None else str(self.root / name)


def read_cifar_batches(root: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N], class names) from the named batches."""
    src = _Source(root)
    images, labels = [], []
    for name in names:
        batch = _unpickle(src.read(name), src.label(name))
        data, lbl = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
        if data is None or lbl is None:
            raise DatasetError(f"{src.label(name)}: CIFAR batch needs 'data' and 'labels' entries")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lbl) != len(data):
            raise DatasetError(
                f"{src.label(name)}: 'data' must be uint8 [N, 3072] with N labels, "
                f"got {data.dtype} {list(data.shape)} and {len(lbl)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(lbl, dtype=np.int64))
    classes = list(CIFAR10_CLASSES)
    if src.has("batches.meta"):
        meta = _unpickle(src.read("batches.meta"), src.label("batches.meta"))
        names_ = meta.get("label_names")
        if names_:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    lab = np.concatenate(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
        raise DatasetError(f"{src.root}: label {int(lab.max())} out of range for {len(classes)} classes")
    return np.concatenate(images), lab, classes


class CIFAR10(ClassificationDataset):
    """CIFAR-10 (or any set written in its pickle format, e.g. :func:`make_synth_cifar`)."""

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: ImageTransform | None = None
    ):
        if split not in ("train", "test"):
            raise MissingSplitError(
                f"CIFAR-10 has no split {split!r} (train or test; build_dataset holds a validation split out of train)"
            )
        root = Path(root)
        images, labels, classes = read_cifar_batches(
            root, TRAIN_BATCHES if split == "train" else TEST_BATCHES
        )
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.targets = labels.tolist()
        self.classes = classes
        self.transform = transform
        self.source = f"cifar10:{root}"
        self.split = split

    def load_uint8(self, index: int) -> Tensor:
        return self.images[index]

    def uint8_arrays(self) -> tuple[Tensor, Tensor]:
        """All images uint8 [N, 3, 32, 32] and labels int64 [N] (the in-memory loader's fast path)."""
        return self.images, self.labels


def write_cifar_batches(
    out_dir: str | os.PathLike,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
) -> Path:
    """Write ``(images uint8 [N, 3, 32, 32], labels)`` pairs as CIFAR-10 python batches.

    The train split is cut into the five ``data_batch_*`` files, as in the original.
    """
    from prunekit.fileio import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: Any) -> None:
        buf = io.BytesIO()
        pickle.dump(obj, buf, protocol=2)
        atomic_write_bytes(out / name, buf.getvalue())

    x, y = train
    for i, idx in enumerate(np.array_split(np.arange(len(x)), len(TRAIN_BATCHES))):
        dump(
            TRAIN_BATCHES[i],
            {
                b"batch_label": f"training batch {i + 1} of 5".encode(),
                b"labels": [int(v) for v in y[idx]],
                b"data": np.ascontiguousarray(x[idx].reshape(len(idx), -1), dtype=np.uint8),
                b"filenames": [f"img_{j:06d}.png".encode() for j in idx],
            },
        )
    tx, ty = test
    dump(
        TEST_BATCHES[0],
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in ty],
            b"data": np.ascontiguousarray(tx.reshape(len(tx), -1), dtype=np.uint8),
            b"filenames": [f"test_{j:06d}.png".encode() for j in range(len(tx))],
        },
    )
    dump("batches.meta", {b"label_names": [c.encode() for c in classes], b"num_vis": 3072})
    return out
