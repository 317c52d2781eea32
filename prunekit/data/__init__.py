"""Datasets (PASCAL VOC, Ultralytics YOLO, COCO, GTSDB, CIFAR-10, GTSRB, image folders, synthetic),
SSD augmentation, the in-memory small-image loader, seeded splits for sets without one, and
``build_dataset(spec, split, train)``.

Item contracts are in :mod:`prunekit.data.base`; specs in :mod:`prunekit.data.build`.
"""

from prunekit.data.base import (
    ClassificationDataset,
    DetectionDataset,
    DetectionRecord,
    HeldOut,
    collate_detection,
    decode_image_bytes,
    read_image,
)
from prunekit.data.build import DATASET_KINDS, build_dataset, dataset_task, is_detection_spec, parse_spec
from prunekit.data.cache import cache_dir
from prunekit.data.check import format_summary, summarize
from prunekit.data.cifar import CIFAR10, CIFAR10_CLASSES, write_cifar_batches
from prunekit.data.coco import COCODetection
from prunekit.data.errors import DatasetError
from prunekit.data.folder import ImageFolder
from prunekit.data.gtsdb import GTSDBDetection
from prunekit.data.gtsrb import GTSRB
from prunekit.data.memory import MemoryLoader, TensorImageDataset, cached_uint8, random_crop_flip
from prunekit.data.signs import GTSDB_GROUPS, GTSRB_CLASSES
from prunekit.data.split import SeededSplit, seeded_split, write_split_json
from prunekit.data.synth import ensure_synth_voc, make_synth_cifar, make_synth_voc
from prunekit.data.transforms import (
    PhotometricDistort,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomZoomOut,
    Resize,
    SSDAugmentation,
    classification_train_transforms,
    ssd_eval_transforms,
    ssd_train_transforms,
)
from prunekit.data.voc import VOC_CLASSES, VOCDetection
from prunekit.data.yolo import YOLODetection

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "COCODetection",
    "ClassificationDataset",
    "DATASET_KINDS",
    "DatasetError",
    "DetectionDataset",
    "DetectionRecord",
    "GTSDBDetection",
    "GTSDB_GROUPS",
    "GTSRB",
    "GTSRB_CLASSES",
    "HeldOut",
    "ImageFolder",
    "MemoryLoader",
    "PhotometricDistort",
    "RandomHorizontalFlip",
    "RandomIoUCrop",
    "RandomZoomOut",
    "Resize",
    "SSDAugmentation",
    "SeededSplit",
    "TensorImageDataset",
    "VOCDetection",
    "VOC_CLASSES",
    "YOLODetection",
    "build_dataset",
    "cache_dir",
    "cached_uint8",
    "classification_train_transforms",
    "collate_detection",
    "dataset_task",
    "decode_image_bytes",
    "ensure_synth_voc",
    "format_summary",
    "is_detection_spec",
    "make_synth_cifar",
    "make_synth_voc",
    "parse_spec",
    "random_crop_flip",
    "read_image",
    "seeded_split",
    "ssd_eval_transforms",
    "ssd_train_transforms",
    "summarize",
    "write_cifar_batches",
    "write_split_json",
]
