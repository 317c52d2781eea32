"""The one object the phase runner trains, scores and recalibrates through.

Every step of the method needs the same three things from the data: fine-tune a model for some
epochs (with or without the sparsity term), score it on validation, and refresh its BatchNorm
statistics after its weights were cut. A :class:`Trainer` bundles them, built once by the caller
(pipeline, CLI, benchmark, test), so the runner knows no data and no training loop.
:class:`DataTrainer` is the real one (prunekit's training loop and evaluator on datasets);
:class:`FnTrainer` adapts two plain callables.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


@runtime_checkable
class Trainer(Protocol):
    """What the phase runner needs. ``sparsity`` is a :class:`prunekit.prune.sparsity.Sparsity`
    (or None for plain fine-tuning); ``evaluate`` returns a metric in [0, 1] or a metrics dict,
    with ``per_image`` one that may carry a ``scorecard`` (:class:`prunekit.paired.Scorecard`) for
    paired comparisons between models."""

    def train(self, model: nn.Module, epochs: int, sparsity: Any, tag: str) -> None: ...

    def evaluate(self, model: nn.Module, per_image: bool = False) -> float | dict[str, Any]: ...

    def recalibrate(self, model: nn.Module) -> None: ...

    def lr_sum(self, epochs: int) -> float:
        """Σ of the learning rate over a sparsity stage of ``epochs`` (to turn a shrink budget into λ)."""
        ...

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate of every later stage by ``factor``."""
        ...


def recalibrate_bn(model: nn.Module, batches: Any, device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (in place).

    Statistics are a plain average over the batches (momentum None), in train mode for the BNs
    only: dropout and the detector's loss path stay off. ``batches`` yields input tensors (already
    normalised as the network expects) or lists of images for a detector. Returns the number of
    batches seen (0: the model has no BatchNorm, nothing done).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        with torch.no_grad():
            for x in batches:
                if isinstance(x, list | tuple):
                    model([im.to(device) for im in x])
                else:
                    model(x.to(device))
                n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return n


class DataTrainer:
    """:class:`Trainer` on real datasets with :func:`prunekit.train.train` and :func:`prunekit.evaluate`.

    ``config`` is the :class:`prunekit.train.TrainConfig` of every stage; its ``epochs`` is each
    stage's. Sparsity induction runs at ``sparsity_lr`` with ``sparsity_schedule`` (cosine by
    default) and no warm-up; :meth:`lr_sum` sums that very schedule, so a shrink budget means the
    same whatever the schedule. Cosine, because the ε1 check scores the sparse model where the
    stage ends: at a constant lr it is scored mid-flight (measured on CIFAR-10 VGG16, one epoch
    at lr 0.02: the λ = 0 control itself lost 4.7 points, and shrink 1 scored 66.5% against
    control 78.2%; annealed to zero, shrink 1 scored 81.0%). Retraining runs at ``retrain_lr``
    (default ``config.lr``) with ``config.schedule``.
    ``recalibration_images`` training images refresh BN statistics. After :meth:`distill_from`
    every stage (sparsity, its λ = 0 control, retraining) adds the teacher's soft targets, so the
    ε1 comparison stays like for like.
    """

    def __init__(
        self,
        train_set: Dataset,
        val_set: Dataset,
        config: Any,
        sparsity_lr: float | None = None,
        retrain_lr: float | None = None,
        eval_batch_size: int = 64,
        max_val_images: int | None = None,
        recalibration_images: int = 1024,
        progress: bool = False,
        sparsity_schedule: str = "cosine",
    ):
        self.train_set, self.val_set, self.config = train_set, val_set, config
        self.sparsity_lr = sparsity_lr or config.lr
        self.retrain_lr = retrain_lr or config.lr
        self.eval_batch_size, self.max_val_images = eval_batch_size, max_val_images
        self.recalibration_images, self.progress = recalibration_images, progress
        self.sparsity_schedule = sparsity_schedule
        self.epochs_trained = 0
        self.distill: Any = None

    def distill_from(self, teacher: nn.Module, alpha: float = 0.9, temperature: float = 4.0) -> None:
        """Every later :meth:`train` call adds ``teacher``'s soft targets (a frozen copy) to the loss."""
        from prunekit.distill import Distillation

        self.distill = Distillation(teacher, alpha=alpha, temperature=temperature)

    def _cfg(self, epochs: int, sparse: bool) -> Any:
        if sparse:
            return dataclasses.replace(self.config, epochs=epochs, lr=self.sparsity_lr,
                                       schedule=self.sparsity_schedule, warmup_iters=0)  # fmt: skip
        return dataclasses.replace(self.config, epochs=epochs, lr=self.retrain_lr)

    def train(self, model: nn.Module, epochs: int, sparsity: Any, tag: str) -> None:
        from prunekit.train import train

        if epochs <= 0:
            return
        log.info(
            "%s: %d epochs%s", tag, epochs, "" if sparsity is None else f" (sparsity λ={sparsity.lam:g})"
        )
        train(model, self.train_set, self._cfg(epochs, sparsity is not None), regularizer=sparsity,
              progress=self.progress, distill=self.distill)  # fmt: skip
        self.epochs_trained += epochs

    def evaluate(self, model: nn.Module, per_image: bool = False) -> dict[str, Any]:
        from prunekit.evaluate import evaluate

        return evaluate(model, self.val_set, batch_size=self.eval_batch_size, device=self.config.device,
                        progress=False, max_images=self.max_val_images, per_image=per_image)  # fmt: skip

    def lr_sum(self, epochs: int) -> float:
        from prunekit.train import lr_factor

        cfg = self._cfg(epochs, True)
        total = len(self.train_set) // self.config.batch_size * epochs  # type: ignore[arg-type]
        return self.sparsity_lr * sum(lr_factor(i, total, cfg) for i in range(total))

    def scale_lr(self, factor: float) -> None:
        self.sparsity_lr *= factor
        self.retrain_lr *= factor

    def recalibrate(self, model: nn.Module) -> None:
        from prunekit.evaluate import collate_list, is_detector, normalizer

        detector = is_detector(model)
        n = min(self.recalibration_images, len(self.train_set))  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(self.train_set), generator=g)[:n].tolist()  # type: ignore[arg-type]
        bs = max(2, min(self.config.batch_size, 64))
        loader = DataLoader(
            torch.utils.data.Subset(self.train_set, idx), batch_size=bs, shuffle=False,
            collate_fn=collate_list if detector else None,
        )  # fmt: skip
        device = self.config.device
        model.to(device)
        norm = None if detector else normalizer(model, device)

        def batches() -> Any:
            for x, _ in loader:
                if detector:
                    yield list(x)
                else:
                    x = x.to(device)
                    yield (x - norm[0]) / norm[1] if norm is not None else x

        # Augmentation draws random numbers: seeded and restored, so the statistics (and every
        # choice scored on them) are the same in a resumed run and leave training's RNG untouched.
        with _fixed_rng(0):
            recalibrate_bn(model, batches(), device)


@contextmanager
def _fixed_rng(seed: int) -> Iterator[None]:
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class FnTrainer:
    """:class:`Trainer` from ``train_fn(model, sparsity, epochs, tag)`` and ``eval_fn(model)``.

    ``recalibrate_fn(model)`` is optional (no recalibration without it); ``lr_sum`` defaults to
    ``lr * steps_per_epoch * epochs`` with the given numbers (1 and 1: λ then equals the shrink).
    """

    def __init__(
        self,
        train_fn: Callable[[nn.Module, Any, int, str], Any],
        eval_fn: Callable[[nn.Module], Any],
        recalibrate_fn: Callable[[nn.Module], Any] | None = None,
        lr: float = 1.0,
        steps_per_epoch: int = 1,
    ):
        self.train_fn, self.eval_fn, self.recalibrate_fn = train_fn, eval_fn, recalibrate_fn
        self.lr, self.steps_per_epoch = lr, steps_per_epoch

    def train(self, model: nn.Module, epochs: int, sparsity: Any, tag: str) -> None:
        self.train_fn(model, sparsity, epochs, tag)

    def evaluate(self, model: nn.Module, per_image: bool = False) -> Any:
        return self.eval_fn(model)  # a dict with a ``scorecard`` makes the comparisons paired

    def recalibrate(self, model: nn.Module) -> None:
        if self.recalibrate_fn is not None:
            self.recalibrate_fn(model)

    def lr_sum(self, epochs: int) -> float:
        return self.lr * self.steps_per_epoch * epochs

    def scale_lr(self, factor: float) -> None:
        self.lr *= factor  # ``train_fn`` may read it


def standard_error(metric: float, n: int | None) -> float | None:
    """Binomial standard error of an accuracy-like metric in [0, 1] measured on ``n`` items."""
    if not n:
        return None
    return math.sqrt(max(metric * (1 - metric), 0.0) / n)
