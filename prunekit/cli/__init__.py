"""The ``prunekit`` command line: parses arguments and calls library functions, nothing more.

Each pipeline layer keeps its commands in its own module here; a module exposes ``COMMANDS``
(a list of click commands) and this group registers them in the order users meet them.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from prunekit import __version__

_MODULES = ["pipeline", "data", "train", "prune", "profile", "export", "quantize", "deploy", "bench"]


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # registration order, not alphabetical


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prunekit")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """prunekit: compress SSD/VGG16 with multi-layer pruning, export, build engines, benchmark."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


for _name in _MODULES:
    try:
        _mod = importlib.import_module(f"prunekit.cli.{_name}")
    except ModuleNotFoundError as _e:  # a layer whose commands are not written yet
        if _e.name != f"prunekit.cli.{_name}":
            raise
        continue
    for _cmd in _mod.COMMANDS:
        main.add_command(_cmd)
