"""In-memory loading for small-image classification sets (CIFAR-10, GTSRB at 32x32).

A DataLoader that decodes and augments one image at a time in Python spends minutes per epoch
on CIFAR-10; VGG16 on a GPU needs seconds. So: decode every image once into one uint8 tensor
[N, 3, H, W] (optionally cached on disk, keyed by the source), keep it on the training device,
and augment whole batches there with tensor ops (random crop from the zero-padded image +
horizontal flip, both as one gather). 50,000 CIFAR images are 150 MB of uint8.

The ordinary Dataset classes remain the path for large sets that do not fit in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.data.base import ClassificationDataset, ImageTransform
from prunekit.data.cache import cache_dir
from prunekit.data.errors import DatasetError

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def source_key(dataset: ClassificationDataset) -> str:
    """A key that changes when the dataset's source files change (path, size, mtime, options)."""
    parts = [type(dataset).__name__, str(getattr(dataset, "source", "")), str(getattr(dataset, "split", ""))]
    src = str(getattr(dataset, "source", "")).split(":", 1)[-1]
    if src and os.path.exists(src):
        st = os.stat(src)
        parts += [str(st.st_size), str(st.st_mtime_ns)]
    parts += [str(len(dataset)), str(getattr(getattr(dataset, "_resize", None), "size", ""))]
    parts.append(str(getattr(dataset, "crop_roi", "")))
    base = getattr(dataset, "base", None)  # a HeldOut part: its base set and which of its items
    if isinstance(base, ClassificationDataset):
        parts += [source_key(base), hashlib.sha256(str(dataset.indices).encode()).hexdigest()]  # type: ignore[attr-defined]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def decode_all(dataset: ClassificationDataset, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Every image as uint8 [N, 3, H, W] plus labels int64 [N] (uses a reader's fast path if it has one)."""
    fast = getattr(dataset, "uint8_arrays", None)
    if fast is not None:
        try:
            images, labels = fast(progress=progress)
        except TypeError:
            images, labels = fast()
        return images, labels
    from tqdm import tqdm

    imgs = [dataset.load_uint8(i) for i in tqdm(range(len(dataset)), desc="decoding", disable=not progress)]
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) != 1:
        raise DatasetError(f"{dataset.source}: images differ in size {sorted(shapes)[:3]}; resize them first")
    return torch.stack(imgs), torch.tensor(dataset.targets, dtype=torch.int64)


def cached_uint8(
    dataset: ClassificationDataset, cache: bool | str | os.PathLike | None = None, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`decode_all`, through an on-disk ``.pt`` cache.

    ``cache``: ``None``/``False`` = no cache; ``True`` = ``<cache_dir>/images/<source key>.pt``;
    a path = that file. A cache whose key does not match the dataset is rebuilt.
    """
    if not cache:
        return decode_all(dataset, progress)
    key = source_key(dataset)
    path = cache_dir() / "images" / f"{key}.pt" if cache is True else Path(cache)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key and blob.get("format") == _CACHE_FORMAT:
                log.info("decoded images from cache %s", path)
                return blob["images"], blob["labels"]
            log.info("cache %s is for another source; rebuilding", path)
        except Exception as e:  # a truncated/foreign file is just a cache miss
            log.warning("ignoring unreadable image cache %s (%s)", path, e)
    images, labels = decode_all(dataset, progress)
    from prunekit.fileio import atomic_write

    blob = {"format": _CACHE_FORMAT, "key": key, "images": images.contiguous(), "labels": labels}
    atomic_write(path, lambda p: torch.save(blob, p))
    log.info("cached %d decoded images in %s", len(images), path)
    return images, labels


class TensorImageDataset(ClassificationDataset):
    """A classification Dataset over an in-memory uint8 tensor (no decoding per item)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        transform: ImageTransform | None = None,
        source: str = "",
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.to(torch.int64)
        self.targets = self.labels.tolist()
        self.classes = list(classes)
        self.transform = transform
        self.source = source

    def load_uint8(self, index: int) -> Tensor:
        return self.images[index]

    def uint8_arrays(self) -> tuple[Tensor, Tensor]:
        return self.images, self.labels


def random_crop_flip(
    images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample random crop of the zero-padded batch + random horizontal flip, vectorised.

    ``images`` [B, C, H, W] (any dtype, any device) -> same shape. The crop offsets and the flip
    become one index map, applied with a single ``gather``.
    """
    b, c, h, w = images.shape
    dev = images.device
    p = int(padding)
    padded = F.pad(images, (p, p, p, p)) if p else images
    hp, wp = h + 2 * p, w + 2 * p
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
    rows = oy[:, None] + torch.arange(h, device=dev)[None]  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=dev)[None]  # [B, W]
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


class MemoryLoader:
    """Batches from a device-resident uint8 image tensor: ``for x, y in loader`` gives float
    ``x`` [B, 3, H, W] (in [0, 1], or normalised when ``mean``/``std`` are given) and int64 ``y``
    [B], both on ``device``.

    Each pass over the loader is one epoch; the shuffle order and augmentation depend only on
    ``seed`` and the epoch number (``set_epoch`` or the count of passes), so runs repeat exactly.
    ``rank``/``world_size`` give each distributed process a disjoint share of every epoch.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        classes: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.padding, self.flip, self.drop_last = padding, flip, drop_last
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size
        self.classes = (
            list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
        )
        c = images.shape[1]
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.mean = (
            torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1) if mean else None
        )
        self.std = (
            torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1) if std else None
        )
        self._explicit_epoch = False

    @classmethod
    def from_dataset(
        cls,
        dataset: ClassificationDataset,
        cache: bool | str | os.PathLike | None = None,
        progress: bool = False,
        **kw: Any,
    ) -> MemoryLoader:
        """Decode ``dataset`` once (through ``cache``, see :func:`cached_uint8`) and wrap it."""
        images, labels = cached_uint8(dataset, cache, progress)
        kw.setdefault("classes", dataset.classes)
        return cls(images, labels, **kw)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.images)
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        return per_rank

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def dataset(self, transform: ImageTransform | None = None) -> TensorImageDataset:
        """The same images as an ordinary (decode-free) Dataset, e.g. for ``evaluate``."""
        return TensorImageDataset(self.images.cpu(), self.labels.cpu(), self.classes, transform)

    def _order(self, g: torch.Generator) -> Tensor:
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        if self.world_size > 1:
            per = self.num_samples
            if not self.drop_last and per * self.world_size > n:  # pad by wrapping, as DistributedSampler
                order = torch.cat([order, order[: per * self.world_size - n]])
            order = order[self.rank : per * self.world_size : self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        if not self._explicit_epoch:
            self.epoch += 1  # the next pass is the next epoch
        self._explicit_epoch = False
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        order = self._order(g)
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images.index_select(0, idx)
            if self.augment:
                x = random_crop_flip(x, self.padding, self.flip, g)
            x = x.to(torch.float32).div_(255.0)
            if self.mean is not None:
                x = x.sub_(self.mean).div_(self.std)
            yield x, self.labels.index_select(0, idx)
