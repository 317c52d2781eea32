"""Seeded train/val splits for sets that come without one (a labelImg or Roboflow VOC export).

The split is a pure function of (sorted stems, seed, train fraction): each stem is ranked by a
SHA-256 of ``seed`` and the stem, so it does not depend on the file system's listing order, on
the Python or numpy version, or on which images a ``skip_bad`` read later dropped. Writing it as
``split.json`` into a run folder records exactly which images were trained and validated on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prunekit.fileio import atomic_write_json

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class SeededSplit:
    """Stems per split plus what produced them, so a run can state (and redo) its split."""

    seed: int
    train_fraction: float
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)

    def stems(self, split: str) -> list[str]:
        """The stems of ``train``, ``val`` or ``trainval``/``all`` (both, sorted)."""
        if split == "train":
            return list(self.train)
        if split == "val":
            return list(self.val)
        if split in ("trainval", "all"):
            return sorted(self.train + self.val)
        raise KeyError(split)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "train_fraction": self.train_fraction,
            "train": self.train,
            "val": self.val,
        }


def _rank(seed: int, stem: str) -> str:
    return hashlib.sha256(f"{seed}\0{stem}".encode()).hexdigest()


def seeded_split(stems: Iterable[str], train_fraction: float = 0.8, seed: int = 0) -> SeededSplit:
    """Split ``stems`` into train/val; the same (set of stems, seed, fraction) gives the same split.

    ``round(n * train_fraction)`` stems go to train, kept within 1..n-1 once there are two stems so
    that neither side of a tiny set is empty. Both lists come back sorted.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    unique = sorted(set(stems))
    n = len(unique)
    n_train = round(n * train_fraction)
    if n >= 2:
        n_train = min(max(n_train, 1), n - 1)
    ordered = sorted(unique, key=lambda s: _rank(seed, s))
    return SeededSplit(
        seed=int(seed),
        train_fraction=float(train_fraction),
        train=sorted(ordered[:n_train]),
        val=sorted(ordered[n_train:]),
    )


def write_split_json(split: SeededSplit, folder: str | os.PathLike) -> Path:
    """Write ``split`` as ``folder/split.json`` (atomically, so a killed run never leaves half of it)."""
    return atomic_write_json(Path(folder) / SPLIT_FILE, split.to_json())
