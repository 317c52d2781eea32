"""Dataset specs: one string names a dataset on the command line and in configs.

=============================  ===============================================================
``synth``                      synthetic VOC-format shapes, generated once into the cache
``synth:DIR``                  the same, generated into (or read from) ``DIR``
``voc:DIR``                    VOCdevkit (07+12 for train splits) or any VOC-format folder; one
                               without ``ImageSets/`` (labelImg/Roboflow export) gets a seeded
                               train/val split (``train_fraction=0.8``, ``split_seed=0``)
``yolo:DATA.yaml``             Ultralytics dataset YAML (``train``/``val``/``test``, ``names``) +
                               ``class cx cy w h`` label files; ``yolo:DIR`` reads DIR/data.yaml
``coco:ANN.json,IMAGES``       COCO instances file + image folder (or ``coco:ROOT``)
``gtsdb:DIR``                  GTSDB (``gt.txt`` + .ppm), 3 paper categories by default
``cifar10:DIR``                CIFAR-10 python batches (folder or .tar.gz)
``gtsrb:DIR``                  GTSRB per-class CSV + .ppm
``folder:DIR``                 class-per-folder images, a folder or a .tar.gz of one
=============================  ===============================================================

``{split}`` in a path is replaced by the split, for sets kept as one file per split
(``folder:data/cifar10-jpg-{split}.tar.gz``). A spec carries no options; reader options
(``train_fraction``, ``split_seed``, ``skip_bad``...) are keyword arguments of
:func:`build_dataset`.

``train=True`` picks the training transforms (SSD augmentation for detection; padded random
crop + flip for classification); ``train=False`` the evaluation ones (none: the SSD resizes
internally).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from prunekit.data.base import ClassificationDataset, DetectionDataset, HeldOut
from prunekit.data.cifar import CIFAR10
from prunekit.data.coco import COCODetection, resolve_coco
from prunekit.data.errors import DatasetError
from prunekit.data.folder import ImageFolder, split_folders
from prunekit.data.gtsdb import GTSDBDetection
from prunekit.data.gtsrb import GTSRB
from prunekit.data.split import seeded_split
from prunekit.data.synth import ensure_synth_voc
from prunekit.data.transforms import (
    DEFAULT_FILL,
    classification_train_transforms,
    ssd_eval_transforms,
    ssd_train_transforms,
)
from prunekit.data.voc import VOCDetection, is_voc_folder
from prunekit.data.yolo import YOLODetection

log = logging.getLogger(__name__)

DATASET_KINDS = ("synth", "voc", "yolo", "coco", "gtsdb", "cifar10", "gtsrb", "folder")
DETECTION_KINDS = ("synth", "voc", "yolo", "coco", "gtsdb")
_SYNTH_PARAMS = ("n_train", "n_val", "n_test", "seed", "image_size", "classes", "max_objects")
# A classification set with no validation split of its own (CIFAR-10's pickles and GTSRB have
# train and test; a folder or archive per split often has no val) gets one carved from its
# training split: this seeded share of the training images (CIFAR-10: 5,000 of 50,000), and the
# training split is the rest. Selecting on the test split instead (what "val" meant for CIFAR-10
# before) reports a number that the selection has already seen.
HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 0


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"voc:/data/VOCdevkit"`` -> ``("voc", "/data/VOCdevkit")``; ``"synth"`` -> ``("synth", None)``."""
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise ValueError(
            f"unknown dataset spec {spec!r}; expected one of: {', '.join(k + ':...' for k in DATASET_KINDS)}"
        )
    if sep and not arg:
        raise ValueError(f"dataset spec {spec!r} names no path after ':'")
    if not sep and kind != "synth":
        raise ValueError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    return kind, (arg or None)


def is_detection_spec(spec: str) -> bool:
    return parse_spec(spec)[0] in DETECTION_KINDS


def _call(cls: Any, kw: dict[str, Any], *args: Any, **fixed: Any) -> Any:
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kw if k not in params)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option {unknown[0]!r} (options: {', '.join(p for p in params if p != 'self')})"
        )
    return cls(*args, **{**fixed, **kw})


def build_dataset(spec: str, split: str, train: bool = False, **kw: Any) -> Dataset:
    """The dataset a spec names, with the transforms for training or evaluation.

    ``kw`` go to the reader (``skip_bad``, ``classes``, ``keep_difficult``, ``grouping``,
    ``image_size``, ``train_fraction``/``split_seed`` for a ``voc`` folder without a split...);
    ``size`` adds a fixed resize for detection; ``transforms``/``transform`` replace the default
    ones. For ``synth``, the generator's parameters (``n_train``, ``n_val``,
    ``n_test``, ``seed``, ``image_size``, ``classes``, ``max_objects``) pick which set.
    """
    kind, raw = parse_spec(spec)
    arg = raw
    if arg is not None:
        arg = arg.replace("{split}", split)  # e.g. folder:cifar10-jpg-{split}.tar.gz: one file per split
    kw = dict(kw)
    if kind in DETECTION_KINDS:
        size = kw.pop("size", None)
        fill = kw.pop("fill", DEFAULT_FILL)
        if "transforms" not in kw:
            kw["transforms"] = ssd_train_transforms(size, fill=fill) if train else ssd_eval_transforms(size)
        if kind in ("synth", "voc"):
            kw.setdefault("keep_difficult", not train)  # SSD trains without VOC's "difficult" objects
        if kind == "synth":
            gen = {k: kw.pop(k) for k in _SYNTH_PARAMS if k in kw}
            if arg is not None and is_voc_folder(Path(arg)) and not (Path(arg) / "synth.json").is_file():
                raise DatasetError(f"{arg}: a VOC folder that prunekit did not generate; use voc:{arg}")
            root = ensure_synth_voc(arg, **gen)
            return _call(VOCDetection, kw, root, split)
        if kind == "voc":
            return _call(VOCDetection, kw, arg, split)
        if kind == "yolo":
            return _call(YOLODetection, kw, arg, split)
        if kind == "coco":
            ann, _, images = (arg or "").partition(",")
            ann_file, image_dir = resolve_coco(ann, images or None, split)
            if images:
                log.info("coco: %s given explicitly; split %r is not used to pick files", ann_file, split)
            return _call(COCODetection, kw, ann_file, image_dir)
        return _call(GTSDBDetection, kw, arg, split)

    if "size" in kw:
        kw["image_size"] = kw.pop("size")
    if split in ("train", "val") and not has_own_val(kind, raw):
        train_arg = raw.replace("{split}", "train") if raw is not None else None
        base = _classification(kind, train_arg, "train", train, dict(kw))
        by_class: dict[int, list[str]] = {}
        for i, t in enumerate(base.targets):  # stratified: each class keeps its share in both parts
            by_class.setdefault(int(t), []).append(f"{i:08d}")
        cuts = [seeded_split(stems, 1 - HELD_OUT_FRACTION, HELD_OUT_SEED) for stems in by_class.values()]
        part = sorted(int(k) for c in cuts for k in c.stems(split))
        if split == "val":
            log.info("%s: no validation split; %d of its %d training images held out as one (seeded, "
                     "stratified)", spec, len(part), len(base))  # fmt: skip
        return HeldOut(base, part, base.transform, split)
    return _classification(kind, arg, split, train, kw)


def has_own_val(kind: str, arg: str | None) -> bool:
    """Whether a classification spec has a validation split of its own (see HELD_OUT_FRACTION).
    Unknown (an archive holding split folders, listed only by reading it): True, and its reader
    says so if the split is missing."""
    if kind in ("cifar10", "gtsrb"):
        return False
    if kind != "folder" or arg is None:
        return True
    if "{split}" in arg:
        return (
            Path(arg.replace("{split}", "val")).exists() or not Path(arg.replace("{split}", "train")).exists()
        )
    splits = split_folders(Path(arg))
    return not splits or "val" in splits or "train" not in splits


def _classification(kind: str, arg: str | None, split: str, train: bool, kw: dict[str, Any]) -> Dataset:
    """The reader of a classification spec for one split the set has."""
    if kind == "cifar10":
        kw.pop("skip_bad", None)  # pickles have no per-sample inputs to skip
        if "transform" not in kw:
            kw["transform"] = classification_train_transforms(32) if train else None
        return _call(CIFAR10, kw, arg, split)
    if kind == "gtsrb":
        if "transform" not in kw:
            size = kw.get("image_size", 32)
            kw["transform"] = classification_train_transforms(size, flip=False) if train and size else None
        return _call(GTSRB, kw, arg, split)
    kw.pop("skip_bad", None)
    if "transform" not in kw:
        kw["transform"] = classification_train_transforms(None) if train else None
    return _call(ImageFolder, kw, arg, split)


def dataset_task(dataset: Dataset) -> str:
    """``"detection"`` or ``"classification"``."""
    if isinstance(dataset, DetectionDataset):
        return "detection"
    if isinstance(dataset, ClassificationDataset):
        return "classification"
    raise TypeError(f"not a prunekit dataset: {type(dataset).__name__}")
