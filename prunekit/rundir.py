"""Run folders: where a command may write, what ``--force`` may remove, what a run was made from.

Every command that writes a run folder (``compress-and-export``, ``prune``, ``train``) calls
:func:`prepare_run_dir` before any work. It refuses, with a one-line error:

* an ``--out`` that is, contains or lies inside the data folder (a run's files would mix with the
  dataset's, and a reader that lists a folder would read them as data), or that is or contains
  the folder of the model file, the current directory, the home directory or a filesystem root.
  Always, with or without ``--resume``/``--force``: these are never a run folder. A folder
  *inside* the model file's folder is allowed: ``train/last.pt`` -> ``--out train/pruned`` is a
  common layout, and nothing there can reach the model file;
* a non-empty ``--out`` without ``--resume`` or ``--force``;
* for commands that keep a manifest (``compress-and-export``): ``--resume`` or ``--force`` on a
  non-empty folder without a ``manifest.json`` that prunekit wrote.

``--force`` replaces a previous run by deleting, inside ``--out``, only the entries prunekit
accounts for: what the manifest lists (recorded inputs and outputs, and the entries each stage
created) and the artifact names a run writes (:data:`RUN_ARTIFACTS`, for a stage killed before
it could record them). Anything else there makes ``--force`` refuse, deleting nothing: it is not
prunekit's to delete, and keeping it would leave a file from elsewhere looking like part of the
new run. The old run is deleted rather than moved aside (``<out>.old-<time>``) because moving
writes outside ``--out``, where the user never pointed us (another filesystem, a read-only or
shared parent), and piles up copies nobody asked for.

The fingerprint functions describe what a run was made from (settings, the files they name, the
data's file list) for :meth:`prunekit.manifest.Manifest.stale`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from prunekit import distributed as D
from prunekit.manifest import read_manifest, recorded_entries, settings_fingerprint

log = logging.getLogger(__name__)

PROBE_PREFIX = ".write-test"
DATA_INDEX = ".data_index.json"  # in a run folder: each data file's size, time and content digest
# What a compress-and-export run writes at the top of its folder, by name or pattern. The
# manifest records what each finished (or failed) stage created, so this list only matters for
# a stage killed (SIGKILL, out of memory) before it could record anything; a name missing here
# makes --force refuse, never delete more.
RUN_ARTIFACTS = (
    "manifest.json", "config.yaml", "split.json",
    "original.pt", "model.pt", "control.pt",
    "original.onnx", "model.onnx", "model_decoded.onnx", "model_trt.onnx",
    "original_int8.onnx", "model_int8.onnx",
    "verify.json", "verify_int8.json", "bench.json", "REPORT.md",
    "fps_vs_accuracy.png", "latency.png", "channels.png",
    "train", "phases", "joint", "search", "control", "engines", "onnx", "operating_points.png",
    f"{PROBE_PREFIX}*", ".*.tmp",  # a write probe, an atomic write's temp file
    DATA_INDEX,  # what the data fingerprint read (rundir.data_fingerprint)
)  # fmt: skip


class UnsafeOutDir(ValueError):
    """``--out`` is (or holds, or lies in) a folder a run must never write into or replace."""


class OutDirInUse(FileExistsError):
    """``--out`` holds files that this command may not continue or replace as asked."""


# ---------------------------------------------------------------------------------------------
# data specs -> paths


def data_paths(spec: str, splits: Iterable[str] = ("train", "val")) -> list[Path]:
    """The files and folders a dataset spec reads (``{split}`` filled in for each of ``splits``).

    ``synth`` alone names none (generated into prunekit's cache from the spec); ``coco:ANN,IMAGES``
    both; ``yolo:DATA.yaml`` the YAML, its dataset root and the folders it lists (when readable).
    """
    from prunekit.data.build import parse_spec

    kind, arg = parse_spec(spec)
    if arg is None:
        return []
    args = list(dict.fromkeys(arg.replace("{split}", s) for s in splits if s)) or [arg]
    if "{split}" in arg:  # a split the set has no file for (val, held out of train) adds nothing
        args = [a for a in args if Path(a.split(",")[0]).exists()] or args
    paths: list[Path] = []
    for a in args:
        if kind == "coco":
            ann, _, images = a.partition(",")
            paths += [Path(ann)] + ([Path(images)] if images else [])
        elif kind == "yolo":
            paths += _yolo_paths(Path(a))
        else:
            paths.append(Path(a))
    return list(dict.fromkeys(paths))


def _yolo_paths(path: Path) -> list[Path]:
    from prunekit.data.errors import DatasetError
    from prunekit.data.yolo import _dataset_root, _resolve_entry, read_data_yaml

    try:
        yaml_file, data = read_data_yaml(path)
    except (OSError, DatasetError):
        return [path]  # the reader reports it when the run gets there
    root = _dataset_root(data, yaml_file)
    listed = []
    for key in ("train", "val", "test"):
        entries = data.get(key)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            listed.append(_resolve_entry(root, str(entry)))
    return [yaml_file, root, *listed]


def data_fingerprint(
    spec: str, splits: Iterable[str] = ("train", "val"), index: Path | None = None, save: bool = True
) -> str:
    """A digest of the data's file list and each file's *content*, so that a data set copied or
    re-downloaded with the same bytes (new modification times) still resumes its run, and an
    annotation edited in place (same size) does not.

    Reading every byte at every start would cost a large set minutes, so ``index`` (a JSON file in
    the run folder) keeps each file's size, modification time and digest, as git's index and DVC's
    cache do: a file whose size and time are unchanged is not read again. Only a file whose time
    changed (a copy, an edit) is read, and a copy with the same bytes gives the same fingerprint.
    ``save`` False reads the index without writing it (the other ranks of a distributed run).

    A ``synth`` set is generated from its spec and the generator's version and parameters: their key
    is its fingerprint (a prunekit whose embedded set changed does not resume on the old one).
    """
    import json

    from prunekit.data.build import parse_spec
    from prunekit.fileio import atomic_write_json, file_sha256

    kind, arg = parse_spec(spec)
    if kind == "synth" and arg is None:
        from prunekit.data.synth import default_synth_voc_key

        return default_synth_voc_key()
    t0 = time.perf_counter()
    roots: list[Path] = []
    for p in sorted({p.resolve() for p in data_paths(spec, splits)}):
        if not any(p.is_relative_to(r) for r in roots):  # a folder listed inside another: once
            roots.append(p)
    known: dict[str, list] = {}
    if index is not None and index.is_file():
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):  # unreadable or cut short: read the files again
            known = {}
        known = known if isinstance(known, dict) else {}
    # (root number, name, size, time, path, digest the index still holds or None: to be read)
    listed = []
    for n, root in enumerate(roots):
        for rel, size, mtime in _stat_tree(root):
            path = str(root / rel) if rel else str(root)
            listed.append(
                (n, rel, size, mtime, path, _cached(known, path, size, mtime) if size >= 0 else "-")
            )
    fresh_bytes = sum(e[2] for e in listed if e[5] is None)
    fresh = sum(e[5] is None for e in listed)
    if fresh_bytes > 1e9:  # a first start on a large set: say why it waits
        log.info("reading %d data files (%.1f GB) once to fingerprint them; a resume reads only the changed ones",
                 fresh, fresh_bytes / 1e9)  # fmt: skip
    seen: dict[str, list] = {}
    h = hashlib.sha256()
    for n, rel, size, mtime, path, digest in listed:
        if digest is None:
            try:
                digest = file_sha256(path)
            except OSError:  # unreadable now: the reader reports it when the run gets there
                digest = "unreadable"
        if size >= 0 and digest != "unreadable":  # an unreadable file's digest is never kept
            seen[path] = [size, mtime, digest]
        # the roots' paths are settings; here their order counts, with each file's name and bytes
        h.update(f"{n}\t{rel}\t{size}\t{digest}\n".encode())
    merged = {**known, **seen}  # one index for every split's call (train+val, then test)
    if index is not None and save and merged != known:
        atomic_write_json(index, merged, indent=0)
    took = time.perf_counter() - t0
    (log.info if took > 5 else log.debug)("data fingerprint of %s: %d files, %d read (%.1f MB) in %.1f s",
                                          spec, len(listed), fresh, fresh_bytes / 1e6, took)  # fmt: skip
    return h.hexdigest()[:16]


def _cached(known: Mapping[str, Any], key: str, size: int, mtime: int) -> str | None:
    """The digest ``known`` holds for ``key`` when its size and time still match, else None."""
    entry = known.get(key)
    if isinstance(entry, list) and len(entry) == 3 and entry[0] == size and entry[1] == mtime:
        return str(entry[2])
    return None


def _stat_tree(root: Path) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under ``root``, sorted, symlinks followed
    (datasets are often linked in) but each real folder visited once."""
    try:
        st = root.stat()
    except OSError:
        yield "<missing>", -1, -1
        return
    if not root.is_dir():
        yield "", st.st_size, st.st_mtime_ns
        return
    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            fst = folder.stat()
            if (fst.st_dev, fst.st_ino) in seen:
                continue
            seen.add((fst.st_dev, fst.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            name = f"{rel}{e.name}"
            try:
                if e.is_dir():
                    subdirs.append((Path(e.path), f"{name}/"))
                else:
                    est = e.stat()
                    yield name, est.st_size, est.st_mtime_ns
            except OSError:  # a dangling link
                yield name, -1, -1
        stack.extend(reversed(subdirs))


def input_fingerprint(
    settings: Mapping[str, Any],
    data: str | None = None,
    splits: Iterable[str] = ("train", "val"),
    index: Path | None = None,
    save: bool = True,
) -> dict[str, str]:
    """What a run is made from: every setting, every file a setting names, and the data files
    (``index`` and ``save`` as :func:`data_fingerprint`'s)."""
    fp = settings_fingerprint(settings)
    if data:
        fp["data"] = data_fingerprint(data, splits, index, save)
    return fp


# ---------------------------------------------------------------------------------------------
# where a run may go


@dataclass(frozen=True)
class _Guard:
    path: Path  # resolved
    what: str
    inside: bool  # an --out inside it is refused too


def _guards(
    data: str | None, inputs: Iterable[str | os.PathLike | None], splits: Iterable[str]
) -> list[_Guard]:
    guards = []
    for p in data_paths(data, splits) if data else []:
        folder = p.parent if p.is_file() else p
        guards.append(_Guard(folder.resolve(), f"the data folder {folder} (--data {data})", True))
    for f in inputs:
        if f and Path(f).is_file():
            guards.append(_Guard(Path(f).resolve().parent, f"the folder of the model file {f}", False))
    guards.append(_Guard(Path.cwd().resolve(), "the current directory", False))
    try:
        guards.append(_Guard(Path.home().resolve(), "the home directory", False))
    except RuntimeError:  # no HOME and no password entry: nothing to guard
        pass
    return guards


def check_out_location(
    out: str | os.PathLike,
    data: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    splits: Iterable[str] = ("train", "val"),
) -> None:
    """Raise :class:`UnsafeOutDir` if ``out`` is a place no run may use (see the module doc)."""
    o = Path(out).resolve()
    if o == Path(o.anchor):
        raise UnsafeOutDir(f"--out {out} is a filesystem root; give the run a folder of its own")
    for g in _guards(data, inputs, splits):
        if o == g.path:
            rel = "is"
        elif g.path.is_relative_to(o):
            rel = "contains"
        elif g.inside and o.is_relative_to(g.path):
            rel = "lies inside"
        else:
            continue
        raise UnsafeOutDir(f"--out {out} {rel} {g.what}; give the run a folder of its own (e.g. runs/NAME)")


# ---------------------------------------------------------------------------------------------
# what may be done to it


def _listing(out: Path) -> list[str]:
    """The folder's entries, a leftover write probe aside (it holds nothing)."""
    if not out.is_dir():
        return []
    return sorted(n for n in os.listdir(out) if not n.startswith(PROBE_PREFIX))


def _replaceable(out: Path, entries: list[str], manifest: Mapping[str, Any]) -> list[Path]:
    """The entries ``--force`` deletes; raises if anything there is not prunekit's."""
    known = recorded_entries(manifest)
    foreign = [n for n in entries if n not in known and not any(fnmatchcase(n, p) for p in RUN_ARTIFACTS)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutDirInUse(
            f"{out}: --force replaces only what prunekit wrote there, and {shown} "
            f"{'is' if len(foreign) == 1 else 'are'} not from the previous run; move "
            f"{'it' if len(foreign) == 1 else 'them'} out or choose another --out"
        )
    return [out / n for n in os.listdir(out)]  # the probes too


def prepare_run_dir(
    out: str | os.PathLike,
    resume: bool = False,
    force: bool = False,
    data: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    splits: Iterable[str] = ("train", "val"),
    manifest: bool = True,
) -> None:
    """Check ``out`` may be used as asked, clear it for ``force``, and check it is writable.

    ``data`` (a dataset spec) and ``inputs`` (model files; names that are not files are ignored)
    say what the run reads, which ``out`` must keep clear of. ``manifest``: the command keeps a
    prunekit ``manifest.json`` in ``out``, which ``resume``/``force`` then require in a non-empty
    folder; a command without one (``prune``, ``train``) has no ``force``, and its ``resume``
    continues whatever its own files there say. Raises :class:`UnsafeOutDir` or
    :class:`OutDirInUse` (both one line, exit code 2 on the command line) before touching
    anything. Under torchrun every rank checks before rank 0 deletes.
    """
    out = Path(out)
    if resume and force:
        raise ValueError("--resume and --force contradict each other; pick one")
    if force and not manifest:
        raise ValueError("--force needs a run folder with a manifest")
    splits = list(splits)
    check_out_location(out, data, inputs, splits)
    if out.exists() and not out.is_dir():
        raise OutDirInUse(f"{out}: exists and is not a directory")
    doomed: list[Path] = []
    entries = _listing(out)
    if entries:
        if not (resume or force):
            raise OutDirInUse(
                f"{out}: output directory exists and is not empty; use --resume to continue it"
                f"{' or --force to replace it' if manifest else ''}, or choose another --out"
            )
        if manifest:
            recorded = read_manifest(out)
            if recorded is None:
                raise OutDirInUse(
                    f"{out}: not a prunekit run (no manifest.json) and not empty; --resume and --force "
                    "only continue or replace a previous run: choose another --out"
                )
            if force:
                doomed = _replaceable(out, entries, recorded)
    D.barrier()  # every rank has checked before anything is deleted
    if doomed and D.is_main_process():
        log.warning("--force: removing the previous run in %s (%d entries)", out, len(doomed))
        for p in doomed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    D.barrier()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=out)  # one per rank: no race on unlink
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{out}: output directory is not writable ({e.strerror})") from e
