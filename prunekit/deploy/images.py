"""Real images for INT8 calibration and equivalence checks: an image folder or a dataset spec.

Both paths yield what a dataset item holds: [3, H, W] float32 in [0, 1] at the image's own size,
so the PyTorch side (the model's transform) and the engines (``runtime.preprocess_float``) start
from the same pixels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    """One image file -> [3, H, W] float32 in [0, 1] (RGB).

    Decoded by the runtime's :func:`prunekit.deploy.runtime.load_image` (EXIF orientation applied,
    16-bit reduced to 8, alpha dropped), so these are the pixels both the training loader and the
    deployed runtime see for this file.
    """
    from prunekit.deploy.runtime import load_image

    try:
        arr = load_image(path)  # its ValueErrors name the file
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def load_images(
    source: str | os.PathLike, num: int = 16, split: str = "val"
) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``num`` images from a folder of image files or a ``prunekit.data`` dataset spec.

    Returns the images ([3, H, W] float32 in [0, 1]) and a name for each (file name or
    ``split[index]``) so that reports can say which image was worst.
    """
    if num < 1:
        raise ValueError(f"need at least one image, got num={num}")
    src = str(source)
    if Path(src).is_dir() and image_files(src):
        files = image_files(src)[:num]
        return [load_image_file(f) for f in files], [str(f.relative_to(src)) for f in files]
    if Path(src).is_dir():
        raise ValueError(f"{src}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    from prunekit.data import build_dataset

    ds = build_dataset(src, split, train=False)
    n = min(num, len(ds))
    if n == 0:
        raise ValueError(f"{src}: split {split!r} has no images")
    images, names = [], []
    for i in range(n):
        item = ds[i]
        img = item[0]
        arr = img.numpy() if hasattr(img, "numpy") else np.asarray(img)
        images.append(np.ascontiguousarray(arr, dtype=np.float32))
        names.append(f"{split}[{i}]")
    return images, names
