"""A plain image folder (one sub-folder per class, like torchvision's ImageFolder), on disk or
inside a ``.tar``/``.tar.gz``.

An archive is read once, member by member, into memory (compressed image bytes only: 50,000
CIFAR JPEGs are ~50 MB), so no extraction to disk and no slow random seeks into gzip.

Splits: if the root has a sub-folder named like the split (``train/<class>/...``), that is used.
If it has split-like sub-folders (train/val/test...) but not the one asked for, that is an error.
Otherwise the root's sub-folders are the classes and every split reads all of them.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from prunekit.data.base import ClassificationDataset, ImageTransform, decode_image_bytes, read_image
from prunekit.data.errors import DatasetError, MissingSplitError
from prunekit.data.transforms import ResizeImage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test", "trainval")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _split_level(
    subdirs: Callable[[PurePosixPath], list[str]], split: str | None = None
) -> tuple[PurePosixPath, set[str]]:
    """(folder, its sub-folder names) where a set's splits or classes sit, relative to its source:
    the first folder holding ``split`` or any split-like name. An archive often wraps everything in
    one top folder (cifar10/, data/): a single folder with folders inside is descended through
    (else it is the only class). ``subdirs(p)`` lists the names of the folders directly inside ``p``."""
    base = PurePosixPath(".")
    while True:
        names = set(subdirs(base))
        if (split and split in names) or names & set(SPLIT_NAMES):
            return base, names
        if len(names) == 1:
            (only,) = names
            if subdirs(base / only):
                base = base / only
                continue
        return base, names


def _pick_root(
    subdirs: Callable[[PurePosixPath], list[str]], split: str | None, source: Path
) -> PurePosixPath:
    """The folder (relative to the source) whose sub-folders are the classes."""
    base, names = _split_level(subdirs, split)
    if split and split in names:
        return base / split
    splits = sorted(names & set(SPLIT_NAMES))
    if splits:
        if split is None:
            raise DatasetError(f"{source}: has split folders ({', '.join(splits)}); name the split")
        raise MissingSplitError(f"{source}: no split {split!r} (has {', '.join(splits)})")
    return base


def split_folders(root: Path) -> set[str]:
    """The split folders (train/val/test...) of a directory set, found as the reader finds them;
    empty when its sub-folders are the classes, or for an archive (listing one means reading it)."""
    if not root.is_dir():
        return set()
    _, names = _split_level(lambda p: [c.name for c in (root / p).iterdir() if c.is_dir()])
    return names & set(SPLIT_NAMES)


class ImageFolder(ClassificationDataset):
    """Images in ``<root>/[<split>/]<class>/<file>``; ``root`` may be a directory or a tarball.

    ``image_size`` resizes every image (needed for batching when sizes differ); ``classes`` fixes
    the class list and order (default: sorted folder names). Class folders with no images keep
    their index, so train and test agree.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        transform: ImageTransform | None = None,
        image_size: int | Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        limit_per_class: int | None = None,
    ):
        root = Path(root)
        self.source = f"folder:{root}"
        self.transform = transform
        self.split = split
        self._resize = ResizeImage(image_size) if image_size is not None else None
        self._blobs: list[bytes] | None = None
        if not root.exists():
            raise FileNotFoundError(f"{root}: image folder not found")
        if is_archive(root):
            files, blobs, top = self._scan_archive(root, split, limit_per_class)
            self._blobs = blobs
        elif root.is_dir():
            files, top = self._scan_dir(root, split)
        else:
            raise DatasetError(f"{root}: neither a folder nor a .tar/.tar.gz archive of class folders")
        found = sorted({f.parent.name for f in files})
        all_dirs = sorted(top)
        class_list = list(classes) if classes is not None else (all_dirs or found)
        index = {c: i for i, c in enumerate(class_list)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise DatasetError(f"{root}: class folder {unknown[0]!r} is not in the class list {class_list}")
        keep: list[int] = []
        counts: dict[str, int] = {}
        for i, f in enumerate(files):
            c = f.parent.name
            if limit_per_class is not None and counts.get(c, 0) >= limit_per_class:
                continue
            counts[c] = counts.get(c, 0) + 1
            keep.append(i)
        self.files = [files[i] for i in keep]
        if self._blobs is not None:
            self._blobs = [self._blobs[i] for i in keep]
        if not self.files:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
        empty = [c for c in class_list if c not in counts]
        if empty:
            log.warning("%s: class folder(s) without images: %s", root, ", ".join(empty))
        self.classes = class_list
        self.targets = [index[f.parent.name] for f in self.files]
        self.root = root

    @staticmethod
    def _scan_dir(root: Path, split: str | None) -> tuple[list[PurePosixPath], set[str]]:
        def subdirs(p: PurePosixPath) -> list[str]:
            return [c.name for c in (root / p).iterdir() if c.is_dir()]

        base = root / _pick_root(subdirs, split, root)
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
        files = [
            PurePosixPath(f.as_posix())
            for d in class_dirs
            for f in sorted(d.iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        return files, {d.name for d in class_dirs}

    @staticmethod
    def _scan_archive(
        root: Path, split: str | None, limit_per_class: int | None
    ) -> tuple[list[PurePosixPath], list[bytes], set[str]]:
        # One sequential pass in stream mode: random access into a gzip stream re-decompresses
        # from the start for every member (minutes for 50k files instead of a second or two).
        blobs_by_path: dict[PurePosixPath, bytes] = {}
        dirs: set[PurePosixPath] = set()
        per_dir: dict[PurePosixPath, int] = {}
        try:
            with tarfile.open(root, "r|*") as tf:
                for m in tf:
                    p = PurePosixPath(m.name)
                    if m.isdir():
                        dirs.add(p)
                        continue
                    if not m.isfile():
                        continue
                    dirs.add(p.parent)
                    if p.suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    if limit_per_class is not None and per_dir.get(p.parent, 0) >= limit_per_class:
                        continue
                    per_dir[p.parent] = per_dir.get(p.parent, 0) + 1
                    blobs_by_path[p] = tf.extractfile(m).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DatasetError(f"{root}: unreadable archive ({e})") from e
        expanded: set[PurePosixPath] = set()
        for d in dirs:  # every ancestor too, so _pick_root sees the whole tree
            expanded.add(d)
            expanded.update(d.parents)
        expanded.discard(PurePosixPath("."))
        children: dict[PurePosixPath, list[str]] = {}
        for d in expanded:
            children.setdefault(d.parent, []).append(d.name)
        base = _pick_root(lambda p: children.get(p, []), split, root)
        chosen = sorted(
            (p for p in blobs_by_path if p.parent.parent == base), key=lambda p: (p.parent.name, p.name)
        )
        classes = {d.name for d in expanded if d.parent == base}
        return chosen, [blobs_by_path[p] for p in chosen], classes

    def load_uint8(self, index: int) -> Tensor:
        if self._blobs is not None:
            img = decode_image_bytes(self._blobs[index], f"{self.root}:{self.files[index]}")
        else:
            img = read_image(self.files[index])
        return self._resize(img) if self._resize is not None else img

    def image_source(self, index: int) -> tuple[str, Path | bytes]:
        if self._blobs is not None:
            return f"{self.root}:{self.files[index]}", self._blobs[index]
        return str(self.files[index]), Path(self.files[index])

    def uint8_arrays(self, progress: bool = False) -> tuple[Tensor, Tensor]:
        """Decode everything into uint8 [N, 3, H, W] + labels (batched JPEG decoding where possible)."""
        from tqdm import tqdm

        imgs: list[Tensor] = []
        chunk = 2048
        jpeg = self._blobs is not None and all(f.suffix.lower() in (".jpg", ".jpeg") for f in self.files)
        bar = tqdm(total=len(self), desc="decoding", unit="img", disable=not progress)
        for start in range(0, len(self), chunk):
            idx = range(start, min(start + chunk, len(self)))
            if jpeg:
                from torchvision.io import ImageReadMode, decode_jpeg

                assert self._blobs is not None
                data = [torch.frombuffer(bytearray(self._blobs[i]), dtype=torch.uint8) for i in idx]
                try:
                    # EXIF orientation applied, as the per-image path (decode_image_bytes) does.
                    out = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
                    part = [self._resize(o) if self._resize is not None else o for o in out]
                except RuntimeError:  # one odd file: fall back to per-image decoding with its name
                    part = [self.load_uint8(i) for i in idx]
            else:
                part = [self.load_uint8(i) for i in idx]
            imgs.extend(part)
            bar.update(len(part))
        bar.close()
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) > 1:
            raise DatasetError(
                f"{self.root}: images differ in size ({sorted(shapes)[:3]}...); pass image_size= to resize"
            )
        return torch.stack(imgs), torch.tensor(self.targets, dtype=torch.int64)
