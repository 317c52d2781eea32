"""Atomic artifact writes: a crash or SIGKILL never leaves a half-written file under its final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A writer that is not Python's own file I/O (torch.save's C++ zip writer) reports a full disk as a
# RuntimeError; with less than this much space left beside the file, that is what it was.
_FULL_BELOW_BYTES = 1 << 20


class DiskFullError(OSError):
    """No space left (or the quota exhausted) while writing ``filename``; one line, names the file.

    An ``OSError`` with ``errno.ENOSPC``/``EDQUOT``, so code that handles OSErrors still does.
    """

    def __init__(self, path: str | os.PathLike, code: int = errno.ENOSPC) -> None:
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        super().__init__(code, what, os.fspath(path))

    def __str__(self) -> str:
        return f"{self.strerror}: {self.filename}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.filename, self.errno)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    # root may fill the blocks reserved for it; everyone else stops at the available ones
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def disk_full_error(e: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` if ``e`` (raised while writing it) means a full disk."""
    if isinstance(e, DiskFullError):
        return e
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return DiskFullError(path, e.errno)
    if isinstance(e, RuntimeError):
        free = _free_bytes(Path(path).parent)
        if free is not None and free < _FULL_BELOW_BYTES:
            return DiskFullError(path)
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it into place.

    On any failure the temp file is removed and ``path`` is left as it was; a full disk raises
    :class:`DiskFullError` ("no space left on device: PATH") whichever writer hit it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        full = disk_full_error(e, path)
        if full is not None:
            raise full from e
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        full = disk_full_error(e, path) if isinstance(e, Exception) else None
        tmp_path.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays and paths appear in metrics; keep JSON writing in one place.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in chunks (checkpoints and engines can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """One sha256 over the names, modes and contents of everything under ``path`` (or of the file
    itself): it changes when anything there is added, removed, rewritten or re-moded."""
    root = Path(path)
    h = hashlib.sha256()
    for p in [root] if root.is_file() else sorted(root.rglob("*")):
        h.update(f"{p.relative_to(root) if p != root else p.name}:{p.stat().st_mode}\n".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
