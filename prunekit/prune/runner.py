"""The state of one post-training run: its trainer, its cached metrics, its files (rank 0 writes).

The phase runner (:mod:`prunekit.prune.method`) and the budget search inside a phase
(:mod:`prunekit.prune.phase_budget`) both train, score, save and refuse through this one object,
so what "the metric", "a checkpoint" and "the same run" mean is decided once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.fileio import atomic_write_json
from prunekit.prune.config import PruneConfig
from prunekit.prune.phases import Phase
from prunekit.prune.sparsity import POINT
from prunekit.prune.trainer import Trainer, standard_error

if TYPE_CHECKING:
    from prunekit.prune.phase_budget import BudgetPlan
    from prunekit.prune.profile import LatencyTable

log = logging.getLogger(__name__)


class ToleranceFloorError(ValueError):
    """The model scores so low that a tolerance reaches below zero (every check would pass)."""


class Runner:
    """State of one run (the trainer, metrics cached, files written on rank 0 only)."""

    def __init__(self, trainer: Trainer, hp: PruneConfig, out: Path):
        self.trainer, self.hp, self.out = trainer, hp, out
        self.main = is_main_process()
        self.original_channels: dict[str, int] = {}
        self.table: LatencyTable | None = None
        self.budget: BudgetPlan | None = None
        self.val_items: int | None = None

    def train(self, model: nn.Module, sparsity: Any, stage: str, tag: str) -> None:
        epochs = self.hp.epochs_sparsity if stage == "sparsity" else self.hp.epochs_retrain
        torch.manual_seed(self.hp.seed)
        t0 = time.perf_counter()
        self.trainer.train(model, epochs, sparsity, tag)
        log.info("%s: trained %s in %.1f s", tag, stage, time.perf_counter() - t0)

    def evaluate(self, model: nn.Module) -> tuple[float, dict[str, Any] | None]:
        res = self.trainer.evaluate(model)
        if isinstance(res, Mapping):
            from prunekit.evaluate import primary_metric

            n = res.get("num_images")
            if isinstance(n, int):
                self.val_items = n
            return float(primary_metric(dict(res))), json_safe(res)
        return float(res), None

    def metric(self, model: nn.Module) -> float:
        return self.evaluate(model)[0]

    def recalibrated_metric(self, model: nn.Module) -> float:
        if self.hp.recalibrate_bn:
            self.trainer.recalibrate(model)
        return self.metric(model)

    def se(self, metric: float) -> float | None:
        return standard_error(metric, self.val_items)

    def save(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        if self.main:
            from prunekit.models import save

            save(model, path, extra=json_safe({**extra, "original_channels": self.original_channels}))

    def write_json(self, path: Path, obj: Any) -> None:
        if self.main:
            atomic_write_json(path, json_safe(obj))


def is_main_process() -> bool:
    try:
        from prunekit.distributed import is_main_process
    except ImportError:  # pragma: no cover - distributed module always ships with prunekit
        return True
    return is_main_process()


def json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from prunekit.models.io import load_with_extra

    return load_with_extra(path)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_floors(hp: PruneConfig, metric: float, allow: bool = False) -> None:
    """Refuse tolerances that reach below zero: a check against a negative floor always passes.

    The model before pruning scores ``metric``; ε1, ε2 and ``eps_pruned`` are subtracted from
    (roughly) it. A model near zero (an untrained detector's AP50) would pass every check.
    """
    worst = max(hp.eps1, hp.eps2, hp.eps_pruned)
    if metric - worst * POINT < 0:
        msg = (
            f"the model scores {metric:.4f} before pruning, so a tolerance of {worst:g} points "
            f"(max of eps1 {hp.eps1:g}, eps2 {hp.eps2:g}, eps_pruned {hp.eps_pruned:g}) reaches below zero "
            "and every check would pass"
        )
        if not allow:
            raise ToleranceFloorError(f"{msg}; train the model further or give smaller tolerances")
        log.warning("%s: the tolerance checks of this run are VACUOUS (forced)", msg)


def check_resume(out: Path, hp: PruneConfig, phases: Sequence[Phase], resume: bool, runner: Runner) -> None:
    cfg_path = out / "prune_config.json"
    current = {"config": hp.to_dict(), "phases": [p.to_dict() for p in phases]}
    if resume and cfg_path.is_file():
        previous = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(previous.get("config"), dict):  # runs from before a setting existed used its default
            defaults = PruneConfig().to_dict()
            previous["config"] = {**defaults, **previous["config"]}
        if json_safe(previous) != json_safe(current):
            raise ValueError(
                f"{cfg_path}: the earlier run used other hyper-parameters or phases; "
                "use a new --out or the same settings to resume"
            )
    runner.write_json(cfg_path, current)
