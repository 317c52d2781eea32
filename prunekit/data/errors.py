"""Bad-input handling shared by every dataset reader.

Readers either stop at the first malformed input with a :class:`DatasetError` that names the file
and the line or object, or (``skip_bad=True``) drop what is broken and log one warning with the
count, so a real-world set with a few bad annotations can still be used knowingly.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A malformed dataset input; the message names the file and the line/object at fault."""


class BadInputs:
    """Collects problems met while reading one dataset.

    With ``skip_bad=False`` :meth:`report` raises at once; otherwise it records the problem and the
    caller drops the object or image. :meth:`finish` logs the count once the reader is done.
    """

    def __init__(self, skip_bad: bool, source: str | os.PathLike):
        self.skip_bad = skip_bad
        self.source = os.fspath(source)
        self.problems: list[str] = []

    def report(self, message: str) -> None:
        """Raise ``DatasetError(message)`` unless skipping; the message already names the file."""
        if not self.skip_bad:
            raise DatasetError(f"{message} (pass skip_bad=True / --skip-bad to skip bad inputs)")
        self.problems.append(message)
        log.debug("skipping: %s", message)

    def finish(self) -> None:
        if self.problems:
            log.warning(
                "%s: skipped %d bad input(s); first: %s", self.source, len(self.problems), self.problems[0]
            )

    def __len__(self) -> int:
        return len(self.problems)
