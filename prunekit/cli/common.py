"""Shared CLI plumbing: one-line errors and the exit codes users script against."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("prunekit")


class UserError(click.ClickException):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


def friendly_errors(fn: F) -> F:
    """Turn library errors about user input (bad file, bad checkpoint) into one-line messages.

    Library code raises ``ValueError``/``FileNotFoundError`` subclasses that already name the file;
    the CLI only strips the traceback. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as e:
            raise UserError(str(e)) from e

    return wrapper  # type: ignore[return-value]
