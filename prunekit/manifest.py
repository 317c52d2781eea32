"""The run manifest: what each stage consumed and produced, with hashes; it drives ``--resume``.

Every update is an atomic rewrite, so a SIGKILL at any instant leaves either the previous or the
next consistent manifest on disk, never a torn one. A stage is trusted on resume only if it is
``done``, it was run on the same inputs (its *fingerprint*: every setting, the content of every
file a setting names, the data's file list; and the hashes of the upstream artifacts it read),
and every output it recorded still hashes to what it recorded. The manifest also keeps the
names of the entries each stage created at the top of the run folder (``meta["created_entries"]``), so
``--force`` can later remove exactly what prunekit wrote (:mod:`prunekit.rundir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

from prunekit import __version__
from prunekit.fileio import DiskFullError, atomic_write_json, file_sha256

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED, INTERRUPTED, SKIPPED = (
    "pending", "running", "done", "failed", "interrupted", "skipped",
)  # fmt: skip
MANIFEST_FILE = "manifest.json"
CREATED = "created_entries"  # meta key: top-level entries of the run folder that the stages created
FINGERPRINTS = "fingerprints"  # meta key: digest -> fingerprint (input key -> digest)


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
    # what the stage was run on: the key of its fingerprint in meta["fingerprints"] (stages share
    # one, so it is kept once per distinct fingerprint rather than once per stage)
    fingerprint: str | None = None


_RECORD_FIELDS = {f.name for f in dataclasses.fields(StageRecord)}


class Manifest:
    """``manifest.json`` in a run directory. Paths inside are relative to the run directory."""

    def __init__(self, run_dir: Path, stages: list[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_FILE
        self.stages: dict[str, StageRecord] = {s: StageRecord(s) for s in stages}
        self.meta: dict[str, Any] = {"prunekit_version": __version__, "created": time.time()}
        self._before: set[str] | None = None  # the run folder's entries when the running stage started

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: Path, stages: list[str]) -> Manifest:
        m = cls(run_dir, stages)
        if not m.path.is_file():
            return m
        try:
            data = json.loads(m.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{m.path}: corrupt manifest ({e}); move the folder aside or choose another --out"
            ) from e
        m.meta.update(data.get("meta", {}))
        for name, rec in data.get("stages", {}).items():
            if name in m.stages:
                # a field a newer prunekit added is dropped rather than refused
                m.stages[name] = StageRecord(**{k: v for k, v in rec.items() if k in _RECORD_FIELDS})
        return m

    def save(self) -> None:
        used = {r.fingerprint for r in self.stages.values()}
        prints = {k: v for k, v in self.meta.get(FINGERPRINTS, {}).items() if k in used}
        self.meta[FINGERPRINTS] = prints
        data = {"meta": self.meta, "stages": {n: asdict(r) for n, r in self.stages.items()}}
        atomic_write_json(self.path, data)

    # -- stage bookkeeping -------------------------------------------------------------------
    def _entry(self, path: Path) -> dict[str, str]:
        path = Path(path)
        rel = path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path
        return {"path": str(rel), "sha256": file_sha256(path)}

    def _entries(self) -> set[str]:
        try:
            return {p.name for p in self.run_dir.iterdir()}
        except FileNotFoundError:
            return set()

    def _record_created(self) -> None:
        """Add what appeared in the run folder since the stage started to ``meta["created_entries"]``."""
        if self._before is None:
            return
        new = self._entries() - self._before
        self._before = None
        if new:
            self.meta[CREATED] = sorted(set(self.meta.get(CREATED, [])) | new)

    def start(
        self, name: str, inputs: dict[str, Path] | None = None, fingerprint: dict[str, str] | None = None
    ) -> None:
        """Mark ``name`` running on ``inputs`` (upstream artifacts, hashed) and ``fingerprint``."""
        self._before = self._entries()
        rec = self.stages[name] = StageRecord(name, status=RUNNING, started=time.time())
        rec.inputs = {k: self._entry(p) for k, p in (inputs or {}).items() if Path(p).is_file()}
        if fingerprint is not None:
            rec.fingerprint = _digest(fingerprint)
            self.meta.setdefault(FINGERPRINTS, {})[rec.fingerprint] = dict(fingerprint)
        self.save()

    def finish(self, name: str, outputs: dict[str, Path] | None = None, metrics: dict | None = None) -> None:
        rec = self.stages[name]
        rec.status = DONE
        rec.ended = time.time()
        rec.wall_s = round(rec.ended - (rec.started or rec.ended), 3)
        rec.outputs = {k: self._entry(p) for k, p in (outputs or {}).items()}
        rec.metrics = metrics or {}
        rec.error = None
        self._record_created()
        self.save()

    def skip(self, name: str, reason: str) -> None:
        self.stages[name] = StageRecord(name, status=SKIPPED, error=reason, ended=time.time())
        self.save()

    def fail(self, name: str, error: str, interrupted: bool = False) -> None:
        rec = self.stages[name]
        rec.status = INTERRUPTED if interrupted else FAILED
        rec.ended = time.time()
        # A full disk reads "no space left on device: PATH" on its own; its class name adds nothing.
        rec.error = error.removeprefix(f"{DiskFullError.__name__}: ")
        self._record_created()  # what a failed stage left behind is still prunekit's
        self.save()

    def stale(
        self,
        name: str,
        fingerprint: dict[str, str] | None = None,
        inputs: dict[str, Path] | None = None,
        ignore: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Why stage ``name`` cannot be reused, naming what changed; None when it can.

        Reusable: ``done`` (or ``skipped``), recorded with the same ``fingerprint`` (when one is
        given; keys for which ``ignore`` is true are not compared: settings the stage never
        reads), its recorded upstream ``inputs`` still hash as recorded (and none appeared), and
        every recorded output still exists with its recorded hash.
        """
        rec = self.stages[name]
        if rec.status == PENDING:
            return "it has not run yet"
        if rec.status not in (DONE, SKIPPED):
            return f"it did not finish (status {rec.status})"
        if fingerprint is not None:
            recorded = self.meta.get(FINGERPRINTS, {}).get(rec.fingerprint)
            if recorded is None:
                return "its inputs were not recorded (a run by an older prunekit)"
            changed = fingerprint_changes(recorded, fingerprint, ignore)
            if changed:
                return ", ".join(changed) + " since it ran"
        for label, entry in rec.inputs.items():
            p = self.run_dir / entry["path"]
            if not p.is_file() or file_sha256(p) != entry["sha256"]:
                return f"its input {label} ({p}) changed or is missing"
        for label, p in (inputs or {}).items():
            if label not in rec.inputs and Path(p).is_file():
                return f"its input {label} ({p}) appeared since it ran"
        for label, entry in rec.outputs.items():
            p = self.run_dir / entry["path"]
            if not p.is_file() or file_sha256(p) != entry["sha256"]:
                return f"its output {label} ({p}) changed or is missing"
        return None

    def reusable(
        self, name: str, fingerprint: dict[str, str] | None = None, inputs: dict[str, Path] | None = None
    ) -> bool:
        """:meth:`stale` is None: the stage's recorded work stands for these inputs."""
        return self.stale(name, fingerprint, inputs) is None

    def output(self, name: str, label: str) -> Path:
        return self.run_dir / self.stages[name].outputs[label]["path"]

    def complete(self) -> bool:
        return all(r.status in (DONE, SKIPPED) for r in self.stages.values())


# ---------------------------------------------------------------------------------------------
# fingerprints: what a stage was run on


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_fingerprint(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``setting:KEY`` -> a digest of each value (nested sections flattened: ``setting:prune.eps1``).

    A string value naming an existing file also adds ``file:KEY`` -> the file's sha256, so a
    checkpoint (or phases file) replaced under the same name counts as a change. Generic on
    purpose: a setting added to the config is covered without a list to keep up to date.
    """
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= settings_fingerprint(value, f"{name}.")
            continue
        out[f"setting:{name}"] = _digest(value)
        if isinstance(value, str | os.PathLike) and os.fspath(value) and Path(value).is_file():
            out[f"file:{name}"] = file_sha256(value)
    return out


def describe_input(key: str) -> str:
    """A fingerprint key in words: ``setting:lr`` -> ``setting 'lr'``."""
    kind, _, name = key.partition(":")
    if kind == "setting":
        return f"setting {name!r}"
    if kind == "file":
        return f"the file named by setting {name!r}"
    if kind == "data":
        return "the data files (names or contents)"
    return key


def fingerprint_changes(
    recorded: Mapping[str, str], current: Mapping[str, str], ignore: Callable[[str], bool] | None = None
) -> list[str]:
    """What differs between two fingerprints, in words (``setting 'lr' changed``), sorted; keys for
    which ``ignore`` is true are left out."""
    changes = []
    for key in sorted(set(recorded) | set(current)):
        if ignore is not None and ignore(key):
            continue
        if key not in current:
            changes.append(f"{describe_input(key)} is gone")
        elif key not in recorded:
            changes.append(f"{describe_input(key)} is new")
        elif recorded[key] != current[key]:
            changes.append(f"{describe_input(key)} changed")
    return changes


# ---------------------------------------------------------------------------------------------
# reading a run folder's manifest (for --resume/--force checks)


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` prunekit wrote in ``run_dir``; None when there is none.

    Raises ``ValueError`` when the file is there but unreadable or not prunekit's (no
    ``meta.prunekit_version``): such a folder is not a run prunekit may continue or replace.
    """
    path = Path(run_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); not a run prunekit can continue or replace") from e
    meta = data.get("meta") if isinstance(data, dict) else None
    if (
        not isinstance(meta, dict)
        or "prunekit_version" not in meta
        or not isinstance(data.get("stages"), dict)
    ):
        raise ValueError(f"{path}: not a manifest prunekit wrote; not a run prunekit can continue or replace")
    return data


def recorded_entries(data: Mapping[str, Any]) -> set[str]:
    """Top-level names in the run folder that a parsed manifest accounts for: every recorded
    input and output inside the folder, the entries its stages created, and the manifest itself."""
    names = {MANIFEST_FILE, *data.get("meta", {}).get(CREATED, [])}
    for rec in data.get("stages", {}).values():
        for section in ("inputs", "outputs"):
            for entry in (rec.get(section) or {}).values():
                rel = PurePath(str(entry.get("path", "")))
                if rel.parts and not rel.is_absolute() and rel.parts[0] != "..":
                    names.add(rel.parts[0])
    return names
