"""Where a prune-while-training run keeps its state, so that a kill at any moment resumes.

The schedule's book (pruning points done, the sizes per epoch, λ once set) lives in the training
state's history, saved by :func:`prunekit.train.train` with every epoch. A surgery commits the
state first, carrying the new model, then the weights: a kill between the two writes is repaired
by :func:`recover` on resume. Rank 0 writes; every rank reloads what it wrote.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import distributed as D
from prunekit.fileio import atomic_write
from prunekit.prune.config import JointConfig, PruneConfig
from prunekit.prune.graph import DependencyGraph
from prunekit.prune.report import layer_channels, model_stats
from prunekit.prune.surgery import slice_optimizer_state

log = logging.getLogger(__name__)


class Book:
    """The schedule's state, kept in the training state's history (JSON-like, weights_only-safe)."""

    def __init__(self, d: dict[str, Any]):
        self.d = d

    @classmethod
    def new(cls, joint: JointConfig, hp: PruneConfig, model: nn.Module, epochs: int) -> Book:
        return cls({"config": joint.to_dict(), "prune": hp.to_dict(), "epochs": epochs,
                    "original": model_stats(model), "channels": layer_channels(model), "points": [], "stopped": None, "multipliers": None,
                    "sizes": {}})  # fmt: skip

    def done(self, epoch: int) -> bool:
        return any(p["epoch"] == epoch for p in self.d["points"])


def state_path(tdir: Path) -> Path:
    from prunekit.train import STATE_FILE

    return tdir / STATE_FILE


def read_state(tdir: Path) -> dict[str, Any] | None:
    path = state_path(tdir)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from e


def write_state(tdir: Path, state: dict[str, Any]) -> None:
    atomic_write(state_path(tdir), lambda p: torch.save(state, p))


def recover(tdir: Path) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The model and state to continue from: finishes a surgery commit a kill interrupted."""
    from prunekit.models import build_model, save
    from prunekit.models.config import ArchConfig
    from prunekit.models.io import load_state, load_with_extra
    from prunekit.train import LAST_FILE

    state = read_state(tdir)
    last = tdir / LAST_FILE
    if state is None or not last.is_file():
        return None, None
    model, extra = load_with_extra(last)
    embedded = state.get("joint_model")
    if embedded is not None and embedded["config"] != model.prunekit_config.to_dict():
        if D.is_main_process():
            log.warning(
                "%s: the last surgery was interrupted before the weights were written; finishing it", last
            )
        new = build_model(ArchConfig.from_dict(embedded["config"]))
        load_state(new, embedded["state_dict"], state_path(tdir))
        if D.is_main_process():
            save(new, last, extra=extra)
        D.barrier()
        model = new
    return model, state


def reload(tdir: Path, last_file: str) -> nn.Module:
    """Every rank continues from the checkpoint rank 0 wrote: one architecture and one set of
    weights everywhere (BN running statistics are per rank during training)."""
    from prunekit.models import load

    D.barrier()
    return load(tdir / last_file)


def commit_book(tdir: Path, book: Book) -> None:
    if not D.is_main_process():
        D.barrier()
        return
    state = read_state(tdir)
    if state is not None:
        state["history"]["joint"] = book.d
        write_state(tdir, state)
    D.barrier()


def commit_surgery(
    tdir: Path,
    book: Book,
    old: nn.Module,
    new: nn.Module,
    keep: dict[str, torch.Tensor],
    graph: DependencyGraph,
    epoch: int,
) -> None:
    """The training state and checkpoint of the model a pruning point after ``epoch`` shrank: the
    optimizer's buffers cut like the weights, the state written first (it carries the new model)."""
    from prunekit.models import save
    from prunekit.train import LAST_FILE

    if D.is_main_process():
        state = read_state(tdir)
        assert state is not None
        state["optimizer"] = slice_optimizer_state(state["optimizer"], state["param_names"], old, keep, graph)
        state["arch"] = new.prunekit_config.to_dict()
        state["history"]["joint"] = book.d
        state["joint_model"] = {"config": new.prunekit_config.to_dict(),
                                "state_dict": {k: v.detach().cpu() for k, v in new.state_dict().items()}}  # fmt: skip
        write_state(
            tdir, state
        )  # first: it carries the new model, so a kill before the next line is repaired
        extra = {"epoch": state["epoch"], "step": state["step"], "train_config": state["train_config"],
                 "joint_point": epoch}  # fmt: skip
        save(new, tdir / LAST_FILE, extra=extra)
    D.barrier()
