"""What every prunekit dataset returns, and the image decoding they share.

Detection items are ``(image, target)``: ``image`` a float tensor [3, H, W] in [0, 1] and
``target`` a dict with ``boxes`` (float [n, 4], xyxy, absolute pixels, 0-based continuous
coordinates: a box covering pixel columns 0..9 is x1=0, x2=10), ``labels`` (int64 [n] in
1..C-1; 0 is background), ``difficult`` (bool [n]) and ``image_id`` (int). Classification items
are ``(image, class_index)``.

Readers parse every annotation when they are built, so a broken set fails at once (not an hour
into training) and evaluation can read ground truth without decoding a single image.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from prunekit.data.errors import BadInputs, DatasetError

# The deploy runtime (torch-free, numpy + PIL) owns the pixel rules, so that a file decodes to the
# same pixels in training and on the edge device.
from prunekit.deploy.runtime import exif_orientation, load_image

# JPEG is decoded by torchvision (libjpeg-turbo); everything else (PNG, PPM, BMP...) goes via PIL.
# Not PNG: torchvision's libpng error path crashes the process (SIGSEGV) on a corrupt PNG, e.g. one
# flipped byte in IDAT (torchvision 0.29, 58 of 60 random byte mutations), where PIL raises an error.
_JPEG_MAGIC = b"\xff\xd8\xff"
# What PIL raises for a corrupt file: OSError (UnidentifiedImageError, truncation, broken data),
# SyntaxError (broken PNG chunks), ValueError (a PPM header's size), EOFError / struct.error (short
# headers), zlib.error, and DecompressionBombError for a header that claims billions of pixels.
_PIL_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

DetectionTransform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]
ImageTransform = Callable[[Tensor], Tensor]


def decode_image_bytes(data: bytes, name: str) -> Tensor:
    """Decode an encoded image to uint8 RGB [3, H, W], whatever its encoding.

    The pixels are those the torch-free deploy runtime gives for the same file
    (:func:`prunekit.deploy.runtime.load_image`, which documents the rules): EXIF orientation
    applied, 16-bit samples reduced to their high byte, alpha dropped (not composited), grayscale,
    palette and CMYK converted to RGB. JPEG is decoded by torchvision (libjpeg-turbo: fast, and
    bit-identical to PIL); other formats, JPEG flavours libjpeg rejects and PNG go through PIL (a
    corrupt PNG crashes torchvision's decoder instead of raising). ``name`` is only for the error
    message.
    """
    # By content, not by name: torchvision picks its decoder from the bytes, and a PNG named .jpg
    # must not reach libpng through it.
    if data[:3] == _JPEG_MAGIC:
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
        except RuntimeError:
            pass  # some JPEG flavours (arithmetic coding...) only PIL reads; try it before failing
        else:
            if img.dtype == torch.uint16:  # 12-bit JPEG; uint16 has no shift op, hence via int32
                img = (img.to(torch.int32) >> 8).to(torch.uint8)
            return img
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = load_image(im)
    except _PIL_ERRORS as e:
        raise DatasetError(f"{name}: cannot decode image ({e or type(e).__name__})") from e
    # a copy, always: PIL's array is read-only, and for a 1-pixel-wide image the transposed view is
    # already contiguous (a read-only tensor would follow, which in-place transforms must not get)
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))


def read_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as uint8 RGB [3, H, W] (see :func:`decode_image_bytes` for the rules)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: image file not found") from e
    return decode_image_bytes(data, str(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as decoded, i.e. after the EXIF orientation, from the file header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # Orientations 5..8 rotate by 90 degrees: the decoded image is h x w.
            return (h, w) if exif_orientation(im) >= 5 else (w, h)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: image file not found") from e
    except _PIL_ERRORS as e:
        raise DatasetError(f"{path}: cannot read image header ({e})") from e


def image_conversions(source: str | os.PathLike | bytes, name: str | None = None) -> list[str]:
    """What decoding must do to an image beyond plain 8-bit RGB, from its header only (cheap).

    Tags: ``16-bit``, ``palette``, ``grayscale``, ``with alpha (dropped)``, ``CMYK``, ``EXIF-rotated``,
    or ``mode X`` for other PIL modes; ``[]`` for 8-bit RGB as stored. Raises :class:`DatasetError`
    for an unreadable header and for images that cannot become RGB in [0, 1] (float pixels).
    ``source`` is a path or the encoded bytes; ``name`` (default: the path) is for messages.
    """
    if name is None:
        name = "image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            mode = im.mode
            # PIL opens 16-bit colour PNGs as 8-bit modes; the tile's raw mode tells (RGB;16B...).
            args = im.tile[0][-1] if im.tile else ""
            rawmode = (
                args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ""
            )
            transparent = "transparency" in im.info
            orientation = exif_orientation(im)
    except FileNotFoundError as e:
        raise DatasetError(f"{name}: image file not found") from e
    except _PIL_ERRORS as e:
        raise DatasetError(f"{name}: cannot read image header ({e})") from e
    if mode == "F":
        raise DatasetError(f"{name}: floating-point image (mode F), unknown value range")
    tags = []
    if mode == "I" or mode.startswith("I;16") or ";16" in rawmode:
        tags.append("16-bit")
    if mode in ("P", "PA"):
        tags.append("palette")
    if mode in ("1", "L", "LA", "I") or mode.startswith("I;16") or rawmode.startswith("LA"):
        tags.append("grayscale")
    if "A" in mode or transparent:
        tags.append("with alpha (dropped)")
    if mode == "CMYK":
        tags.append("CMYK")
    if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I") and not mode.startswith("I;16"):
        tags.append(f"mode {mode}")
    if orientation != 1:
        tags.append("EXIF-rotated")
    return tags


def to_float(image: Tensor) -> Tensor:
    """uint8 [3, H, W] -> float32 in [0, 1]; any other dtype is refused (it would leave [0, 1])."""
    if image.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 image, got {image.dtype}")
    return image.to(torch.float32).div_(255.0)


@dataclass
class DetectionRecord:
    """One image's ground truth, in the image's own pixel coordinates."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4] xyxy
    labels: np.ndarray  # int64 [n], 1..C-1
    difficult: np.ndarray  # bool [n]
    name: str = ""  # identifier in the source (VOC id, COCO file name)


class DetectionDataset(Dataset):
    """Base of all detection readers: a list of :class:`DetectionRecord` plus lazy image loading.

    ``transforms(image, target)`` (e.g. :class:`prunekit.data.transforms.SSDAugmentation`) runs
    after decoding; ``None`` returns the image as is (the SSD resizes internally).
    """

    def __init__(
        self,
        records: list[DetectionRecord],
        classes: Sequence[str],
        transforms: DetectionTransform | None = None,
        source: str = "",
        split: str | None = None,
        bad: BadInputs | None = None,
    ):
        """A reader passes its ``split`` and the problems it met (``bad``): kept as ``split``,
        ``skipped`` and ``empty_boxes``."""
        self.records = records
        self.classes = list(classes)
        self.transforms = transforms
        self.source = source
        if split is not None:
            self.split = split
        if bad is not None:
            self.skipped, self.empty_boxes = bad.problems, bad.empty

    @property
    def num_classes(self) -> int:
        """Number of classes including background (torchvision convention)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Tensor:
        """uint8 [3, H, W]; checks the decoded size against the annotation."""
        rec = self.records[index]
        img = read_image(rec.path)
        h, w = img.shape[-2:]
        if (w, h) != (rec.width, rec.height):
            hint = ""
            if (h, w) == (rec.width, rec.height):
                hint = " (rotated: images are decoded with their EXIF orientation applied)"
            raise DatasetError(
                f"{rec.path}: image is {w}x{h} but its annotation says {rec.width}x{rec.height}{hint}"
            )
        return img

    def image_source(self, index: int) -> tuple[str, Path | bytes] | None:
        """(name for messages, file path or encoded bytes) of item ``index``'s image."""
        path = self.records[index].path
        return str(path), path

    def annotation(self, index: int) -> dict[str, Any]:
        """Ground truth as numpy (``boxes``, ``labels``, ``difficult``, ``image_id``), no decoding."""
        rec = self.records[index]
        return {
            "boxes": rec.boxes,
            "labels": rec.labels,
            "difficult": rec.difficult,
            "image_id": rec.image_id,
            "width": rec.width,
            "height": rec.height,
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        rec = self.records[index]
        image = to_float(self.load_image(index))
        target = {
            "boxes": torch.from_numpy(rec.boxes.copy()).reshape(-1, 4),
            "labels": torch.from_numpy(rec.labels.copy()),
            "difficult": torch.from_numpy(rec.difficult.copy()),
            "image_id": rec.image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def class_counts(self) -> dict[str, int]:
        """Objects per class name (difficult ones included)."""
        counts = Counter(int(lbl) for rec in self.records for lbl in rec.labels)
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.classes)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, images={len(self)}, classes={self.classes})"


class ClassificationDataset(Dataset):
    """Base of classification readers. Subclasses implement :meth:`load_uint8` and set ``targets``.

    ``transform(image)`` runs on the float image; :meth:`load_uint8` is what the in-memory loader
    (:mod:`prunekit.data.memory`) caches.
    """

    classes: list[str]
    targets: list[int]
    transform: ImageTransform | None
    source: str = ""

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_uint8(self, index: int) -> Tensor:
        raise NotImplementedError

    def image_source(self, index: int) -> tuple[str, Path | bytes] | None:
        """(name for messages, file path or encoded bytes) of item ``index``'s image, for header
        checks; ``None`` where the set holds no encoded images (CIFAR arrays) or does not say."""
        return None

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = to_float(self.load_uint8(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def class_counts(self) -> dict[str, int]:
        counts = Counter(int(t) for t in self.targets)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, images={len(self)}, classes={len(self.classes)})"


class HeldOut(ClassificationDataset):
    """The items ``indices`` of another classification set, seen through this set's own transform.

    What :func:`prunekit.data.build.build_dataset` hands out for the validation split of a set
    that has none (and for the training split it was carved from): the images are the base set's,
    decoded by it; only the index map and the transform differ, so the two parts share no item."""

    def __init__(
        self,
        base: ClassificationDataset,
        indices: Sequence[int],
        transform: ImageTransform | None,
        split: str,
    ):
        self.base = base
        self.split = split
        self.indices = [int(i) for i in indices]
        self.targets = [int(base.targets[i]) for i in self.indices]
        self.classes = list(base.classes)
        self.transform = transform
        self.source = base.source

    def load_uint8(self, index: int) -> Tensor:
        return self.base.load_uint8(self.indices[index])

    def image_source(self, index: int) -> tuple[str, Path | bytes] | None:
        return self.base.image_source(self.indices[index])

    def uint8_arrays(self, *args: Any, **kw: Any) -> tuple[Tensor, Tensor]:
        """The base set's fast path where it has one (CIFAR arrays: an index), else one by one."""
        fast = getattr(self.base, "uint8_arrays", None)
        if fast is not None and len(self.indices) * 2 > len(self.base):
            images, labels = fast(*args, **kw)
            idx = torch.tensor(self.indices, dtype=torch.long)
            return images[idx], labels[idx]
        images = torch.stack([self.load_uint8(i) for i in range(len(self))])
        return images, torch.tensor(self.targets, dtype=torch.long)


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict]]:
    """Keep images as a list: detection images differ in size and the SSD batches them itself."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def check_box(
    box: Sequence[float], width: int, height: int, where: str, bad: BadInputs, tol: float = 1.0
) -> np.ndarray | None:
    """Validate one xyxy box against its image: the clipped box, or None when it is not kept.

    Boxes may poke ``tol`` pixels past the border (common off-by-one in real annotations) and are
    clipped. A zero-width or zero-height box is dropped and counted (``bad.empty_box``); an
    inverted, non-finite or far-outside box, or one empty after clipping, is reported to ``bad``
    naming ``where`` (an error unless skipping bad inputs).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        bad.report(f"{where}: non-finite box {box}")
        return None
    if x2 < x1 or y2 < y1:
        bad.report(f"{where}: inverted box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
        return None
    if x2 == x1 or y2 == y1:
        bad.empty_box(f"{where}: zero-area box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
        return None
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        bad.report(
            f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) outside the {width}x{height} image"
        )
        return None
    out = np.array([max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)], dtype=np.float32)
    if out[2] <= out[0] or out[3] <= out[1]:
        bad.report(f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) empty inside the image")
        return None
    return out


def make_record(
    image_id: int,
    path: Path,
    width: int,
    height: int,
    boxes: list[np.ndarray],
    labels: list[int],
    difficult: list[bool],
    name: str = "",
) -> DetectionRecord:
    return DetectionRecord(
        image_id=image_id,
        path=path,
        width=width,
        height=height,
        boxes=np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        name=name,
    )
