"""The run manifest: what each stage consumed and produced, with hashes; it drives ``--resume``.

Every update is an atomic rewrite, so a SIGKILL at any instant leaves either the previous or the
next consistent manifest on disk, never a torn one. A stage is trusted on resume only if it is
``done`` and every output it recorded still hashes to what it recorded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit import __version__
from prunekit.fileio import atomic_write_json
from prunekit.models.io import file_sha256

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED, INTERRUPTED, SKIPPED = (
    "pending", "running", "done", "failed", "interrupted", "skipped",
)  # fmt: skip


@dataclass
class StageRecord:
    name: str
    status: str = PENDING
    started: float | None = None
    ended: float | None = None
    wall_s: float | None = None
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> {path, sha256}
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Manifest:
    """``manifest.json`` in a run directory. Paths inside are relative to the run directory."""

    def __init__(self, run_dir: Path, stages: list[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"
        self.stages: dict[str, StageRecord] = {s: StageRecord(s) for s in stages}
        self.meta: dict[str, Any] = {"prunekit_version": __version__, "created": time.time()}

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: Path, stages: list[str]) -> Manifest:
        m = cls(run_dir, stages)
        if not m.path.is_file():
            return m
        try:
            data = json.loads(m.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{m.path}: corrupt manifest ({e}); rerun with --force to start over") from e
        m.meta.update(data.get("meta", {}))
        for name, rec in data.get("stages", {}).items():
            if name in m.stages:
                m.stages[name] = StageRecord(**rec)
        return m

    def save(self) -> None:
        data = {"meta": self.meta, "stages": {n: asdict(r) for n, r in self.stages.items()}}
        atomic_write_json(self.path, data)

    # -- stage bookkeeping -------------------------------------------------------------------
    def _entry(self, path: Path) -> dict[str, str]:
        path = Path(path)
        rel = path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path
        return {"path": str(rel), "sha256": file_sha256(path)}

    def start(self, name: str, inputs: dict[str, Path] | None = None) -> None:
        rec = self.stages[name] = StageRecord(name, status=RUNNING, started=time.time())
        rec.inputs = {k: self._entry(p) for k, p in (inputs or {}).items() if Path(p).is_file()}
        self.save()

    def finish(self, name: str, outputs: dict[str, Path] | None = None, metrics: dict | None = None) -> None:
        rec = self.stages[name]
        rec.status = DONE
        rec.ended = time.time()
        rec.wall_s = round(rec.ended - (rec.started or rec.ended), 3)
        rec.outputs = {k: self._entry(p) for k, p in (outputs or {}).items()}
        rec.metrics = metrics or {}
        rec.error = None
        self.save()

    def skip(self, name: str, reason: str) -> None:
        self.stages[name] = StageRecord(name, status=SKIPPED, error=reason, ended=time.time())
        self.save()

    def fail(self, name: str, error: str, interrupted: bool = False) -> None:
        rec = self.stages[name]
        rec.status = INTERRUPTED if interrupted else FAILED
        rec.ended = time.time()
        rec.error = error
        self.save()

    def reusable(self, name: str) -> bool:
        """A finished stage whose recorded outputs all still exist with the recorded hashes."""
        rec = self.stages[name]
        if rec.status not in (DONE, SKIPPED):
            return False
        for label, entry in rec.outputs.items():
            p = self.run_dir / entry["path"]
            if not p.is_file() or file_sha256(p) != entry["sha256"]:
                log.warning("stage %s: output %s (%s) changed or missing; rerunning", name, label, p)
                return False
        return True

    def output(self, name: str, label: str) -> Path:
        return self.run_dir / self.stages[name].outputs[label]["path"]

    def complete(self) -> bool:
        return all(r.status in (DONE, SKIPPED) for r in self.stages.values())
