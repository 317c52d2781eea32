"""Shared CLI plumbing: one-line errors and the exit codes users script against."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("prunekit")

# OSErrors about the user's disk or paths rather than a bug: a full disk or quota, a read-only
# file system, a path that names a folder where a file belongs.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)


class UserError(click.ClickException):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: str) -> str:
    """A message for the terminal's one error line (a DataLoader worker's traceback reduced to
    the worker's message, line breaks joined)."""
    from prunekit.data.errors import one_line as _one_line

    return _one_line(message)


def describe_os_error(e: OSError) -> str:
    """``PATH: what went wrong`` for an OSError Python formatted as ``[Errno N] text: 'PATH'``;
    a full disk reads ``no space left on device: PATH`` whoever raised it."""
    text = str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # as prunekit.fileio.DiskFullError says it
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what}: {e.filename}" if e.filename else what
    if e.filename is not None and text.startswith("[Errno"):
        return f"{e.filename}: {(e.strerror or text).lower()}"
    return text


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is about the user's input, files or disk (one line, exit 2) rather than a bug."""
    if isinstance(e, _USER_ERRORS):
        return True
    return isinstance(e, OSError) and e.errno in _USER_ERRNOS


def friendly_errors(fn: F) -> F:
    """Turn library errors about user input (bad file, bad checkpoint, full disk) into one-line messages.

    Library code raises ``ValueError``/``FileNotFoundError`` subclasses that already name the file;
    the CLI only strips the traceback. A full disk (``ENOSPC``), an exceeded quota, a read-only
    file system or a folder where a file belongs is the user's to fix too. Anything else is a bug
    and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            if not is_user_error(e):
                raise
            raise UserError(describe_os_error(e) if isinstance(e, OSError) else str(e)) from e

    return wrapper  # type: ignore[return-value]


def auto_device(device: str) -> str:
    """``--device auto``: the first CUDA device when torch sees one, else the CPU; others as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
