"""Bad-input handling shared by every dataset reader.

Readers either stop at the first malformed input with a :class:`DatasetError` that names the file
and the line or object, or (``skip_bad=True``) drop what is broken and log one warning with the
count, so a real-world set with a few bad annotations can still be used knowingly.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

# How torch's DataLoader re-raises an exception from a worker: the same type, built from a message
# that carries the worker's whole traceback (``ExceptionWrapper.reraise``).
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Warning)\w*: ")


def worker_message(message: str) -> str:
    """The original message of an exception a DataLoader worker raised (``message`` otherwise).

    The last line of the formatted traceback is ``module.ExcType: message``; the prefix goes.
    """
    if not _WORKER_MESSAGE.match(message):
        return message
    lines = [ln for ln in message.splitlines() if ln.strip()]
    return _EXCEPTION_LINE.sub("", lines[-1], count=1) if lines else message


def one_line(message: str) -> str:
    """``message`` on one line: a worker's traceback reduced to its message, line breaks to spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", worker_message(message)).strip()


class DatasetError(ValueError):
    """A malformed dataset input; the message names the file and the line/object at fault.

    The message is always one line: text quoted from a file (a YAML parser's excerpt, a class name
    with a line break) is joined, and the error a DataLoader worker re-raises in the main process
    (torch wraps the worker's traceback into the message) is reduced to the worker's message.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


class MissingSplitError(DatasetError):
    """The data has no such split (the reader names the ones it has). Optional splits, like the
    pipeline's test split, are skipped on this error alone; any other problem still fails."""


class BadInputs:
    """Collects problems met while reading one dataset.

    With ``skip_bad=False`` :meth:`report` raises at once; otherwise it records the problem and the
    caller drops the object or image. A zero-area box (a point or a line: the annotator clicked
    without dragging) is not an error: it marks no object extent, so it is dropped and counted
    (:meth:`empty_box`), as torchvision's and Detectron2's readers drop empty boxes.
    :meth:`finish` logs both counts once the reader is done.
    """

    def __init__(self, skip_bad: bool, source: str | os.PathLike):
        self.skip_bad = skip_bad
        self.source = os.fspath(source)
        self.problems: list[str] = []
        self.empty: list[str] = []

    def report(self, message: str) -> None:
        """Raise ``DatasetError(message)`` unless skipping; the message already names the file."""
        if not self.skip_bad:
            raise DatasetError(f"{message} (pass skip_bad=True / --skip-bad to skip bad inputs)")
        self.problems.append(message)
        log.debug("skipping: %s", message)

    def empty_box(self, message: str) -> None:
        """Count a zero-area box; the caller drops it (never an error, whatever ``skip_bad``)."""
        self.empty.append(message)
        log.debug("dropping: %s", message)

    def finish(self) -> None:
        if self.empty:
            log.warning(
                "%s: dropped %d zero-area box(es) (they mark no object); first: %s",
                self.source,
                len(self.empty),
                self.empty[0],
            )
        if self.problems:
            log.warning(
                "%s: skipped %d bad input(s); first: %s", self.source, len(self.problems), self.problems[0]
            )

    def __len__(self) -> int:
        return len(self.problems)
