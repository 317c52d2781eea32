"""``evaluate(model, dataset)``: batched inference + metrics, the function pruning searches call.

Detectors (torchvision SSD) are run in eval mode on lists of [0, 1] images; their own transform
resizes and normalises, and boxes come back in the dataset image's pixels. Classifiers get
``(x - mean) / std`` with the model config's statistics here, because prunekit's VGG does not
normalise inside the network (its ONNX export takes normalised input, as the runtime feeds it).

Under torchrun each rank scores a strided shard of the images; predictions are gathered so that
every rank returns exactly the single-process metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from prunekit import distributed as D
from prunekit.metrics import detection_metrics
from prunekit.models import get_config

log = logging.getLogger(__name__)


def is_detector(model: nn.Module) -> bool:
    model = D.unwrap(model)
    cfg = getattr(model, "prunekit_config", None)
    if cfg is not None:
        return bool(cfg.is_detector)
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, SSD)


def _kind(detector: bool) -> str:
    return "detector" if detector else "classifier"


def check_task(
    model: nn.Module, data: Any, model_name: str = "the model", data_name: str | None = None
) -> None:
    """Refuse a classifier with detection data, or a detector with classification data.

    ``data`` is a dataset spec (checked without reading anything) or a prunekit dataset (any other
    dataset is trusted). The ValueError names both, ``model_name`` and ``data_name`` (default: the
    spec or the dataset's source), so the CLI prints it as one line.
    """
    from prunekit.data import dataset_task
    from prunekit.data.build import is_detection_spec

    detector = is_detector(model)
    if isinstance(data, str):
        task = "detection" if is_detection_spec(data) else "classification"
        data_name = data_name or data
    else:
        inner = data.dataset if isinstance(data, Subset) else data
        try:
            task = dataset_task(inner)
        except TypeError:
            return  # a user-supplied dataset class: trust it
        data_name = data_name or getattr(inner, "source", "") or type(inner).__name__
    want = "detection" if detector else "classification"
    if task != want:
        cfg = getattr(D.unwrap(model), "prunekit_config", None)
        arch = f" ({cfg.arch})" if cfg is not None else ""
        raise ValueError(
            f"{model_name} is a {_kind(detector)}{arch} but {data_name} is a {task} dataset; "
            f"a {_kind(detector)} needs {want} data"
        )


def primary_metric(metrics: dict[str, Any]) -> float:
    """The number searches compare: ``map50`` for detection, ``top1`` for classification."""
    for key in ("map50", "top1"):
        if key in metrics:
            return float(metrics[key])
    raise KeyError(f"no primary metric (map50 / top1) in {sorted(metrics)}")


def collate_list(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Detection batches stay lists: images differ in size and targets in box count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def normalizer(model: nn.Module, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Classifier input statistics ``(mean, std)`` as [1,3,1,1] tensors, or None without a config."""
    cfg = getattr(D.unwrap(model), "prunekit_config", None)
    if cfg is None or not cfg.image_mean:
        return None
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    max_images: int | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (the first ``max_images`` items if given).

    Detectors: :func:`prunekit.metrics.detection_metrics` (``map``, ``map50``, ``map75``,
    ``voc07_ap``, ``per_class``...); classifiers: ``{"top1", "num_images"}``. Both also carry
    ``eval_time_s``. ``per_image`` adds ``scorecard``: a :class:`prunekit.paired.Scorecard` of
    what the model did on each image, for paired comparisons (not JSON). The model is moved to ``device`` and its train/eval mode is restored after.
    Distributed-aware: all ranks must call it; all get the same result.
    """
    D.init_distributed()
    net = D.unwrap(model)
    check_task(net, dataset)  # a classifier on detection data would fail deep in a batch
    dev = D.resolve_device(device)
    n = len(dataset)  # type: ignore[arg-type]
    if max_images is not None:
        n = min(n, max_images)
    shard = list(range(D.rank(), n, D.world_size()))
    loader = DataLoader(
        Subset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_list if is_detector(net) else None,
        pin_memory=dev.type == "cuda",
    )
    was_training = net.training
    net.to(dev).eval()
    t0 = time.perf_counter()
    bar = tqdm(
        loader, desc="eval", unit="batch", leave=False, disable=not progress or not D.is_main_process()
    )
    try:
        with torch.inference_mode():
            if is_detector(net):
                metrics = _eval_detector(net, bar, shard, dataset, dev, per_image)
            else:
                metrics = _eval_classifier(net, bar, shard, dev, per_image)
    finally:
        bar.close()
        net.train(was_training)
    metrics["eval_time_s"] = time.perf_counter() - t0
    return metrics


def _eval_detector(
    net: nn.Module,
    loader: Any,
    shard: list[int],
    dataset: Dataset,
    dev: torch.device,
    per_image: bool = False,
) -> dict[str, Any]:
    preds: list[dict[str, np.ndarray]] = []
    gts: list[dict[str, np.ndarray]] = []
    for images, targets in loader:
        out = net([im.to(dev, non_blocking=True) for im in images])
        for o, t in zip(out, targets):
            preds.append({k: o[k].cpu().numpy() for k in ("boxes", "scores", "labels")})
            gts.append(_gt_numpy(t))
    cfg = get_config(net) if hasattr(net, "prunekit_config") else None
    num_classes = cfg.num_classes if cfg is not None else int(net.head.classification_head.num_classes)
    names = _class_names(dataset, cfg, num_classes)
    if D.is_distributed():
        # Re-assemble the strided shards in dataset order: metrics equal the single-process ones.
        parts = D.all_gather_object((shard, preds, gts))
        order, preds, gts = [], [], []
        for idx, p, g in parts:
            order += idx
            preds += p
            gts += g
        perm = np.argsort(order, kind="stable")
        preds = [preds[i] for i in perm]
        gts = [gts[i] for i in perm]
        result = _detection_result(preds, gts, num_classes, names, per_image) if D.is_main_process() else None
        return D.broadcast_object(result)
    return _detection_result(preds, gts, num_classes, names, per_image)


def _detection_result(
    preds: list[dict[str, np.ndarray]], gts: list[dict[str, np.ndarray]], num_classes: int,
    names: list[str] | None, per_image: bool,
) -> dict[str, Any]:  # fmt: skip
    result = detection_metrics(preds, gts, num_classes, names)
    if per_image:
        from prunekit.paired import Scorecard

        result["scorecard"] = Scorecard.detection(preds, gts)
    return result


def _eval_classifier(
    net: nn.Module, loader: Any, shard: list[int], dev: torch.device, per_image: bool = False
) -> dict[str, Any]:
    norm = normalizer(net, dev)
    hits: list[np.ndarray] = []
    for x, y in loader:
        x = x.to(dev, non_blocking=True)
        if norm is not None:
            x = (x - norm[0]) / norm[1]
        logits = net(x)
        hits.append((logits.argmax(1) == y.to(dev, non_blocking=True)).cpu().numpy())
    mine = np.concatenate(hits) if hits else np.zeros(0, bool)
    totals = D.all_reduce_sum(torch.tensor([float(mine.sum()), float(len(mine))], dtype=torch.float64))
    n = int(totals[1])
    out: dict[str, Any] = {"top1": float(totals[0] / n) if n else float("nan"), "num_images": n}
    if per_image:
        from prunekit.paired import Scorecard

        correct = np.zeros(n, bool)
        for idx, h in D.all_gather_object((shard, mine)):
            correct[np.asarray(idx, int)] = h
        out["scorecard"] = Scorecard.classification(correct)
    return out


def _gt_numpy(t: dict[str, Any]) -> dict[str, np.ndarray]:
    boxes = t["boxes"].cpu().numpy() if hasattr(t["boxes"], "cpu") else np.asarray(t["boxes"])
    labels = t["labels"].cpu().numpy() if hasattr(t["labels"], "cpu") else np.asarray(t["labels"])
    diff = t.get("difficult")
    if diff is None:
        diff = np.zeros(labels.shape[0], bool)
    elif hasattr(diff, "cpu"):
        diff = diff.cpu().numpy()
    return {"boxes": boxes, "labels": labels, "difficult": np.asarray(diff, bool)}


def _class_names(dataset: Dataset, cfg: Any, num_classes: int) -> list[str] | None:
    for names in (getattr(dataset, "classes", None), getattr(cfg, "class_names", None)):
        if names and len(names) in (num_classes - 1, num_classes):
            return list(names)
    return None
