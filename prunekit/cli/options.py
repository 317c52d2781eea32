"""Click options generated from a config dataclass, so each setting and its default live in one place.

``dataclass_options(PruneConfig, help=FIELD_HELP)`` adds one ``--field-name`` per field (bool
fields as ``--x/--no-x``, lists as comma-separated values, dicts as ``a=1,b=2``, ``none`` for an
optional value); every option defaults to "not given" so that a YAML config or the dataclass
default applies, and :func:`collect` turns what was given into constructor keywords.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click

from prunekit.cli.common import UserError


def _inner(tp: Any) -> tuple[Any, bool]:
    """(type without ``None``, whether ``None`` is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse(tp: Any, text: str, flag: str) -> Any:
    base, optional = _inner(tp)
    if optional and text.strip().lower() == "none":
        return None
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            return [item(x) for x in text.replace(" ", "").split(",") if x]
        if origin is dict:
            _, val = typing.get_args(base)
            out = {}
            for part in text.replace(" ", "").split(","):
                if part:
                    k, v = part.split("=", 1)
                    out[k] = val(v)
            return out
        return base(text)
    except ValueError:
        raise UserError(f"{flag}: cannot read {text!r} as {getattr(base, '__name__', base)}") from None


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def dataclass_options(
    cls: type,
    help: Mapping[str, str] | None = None,
    choices: Mapping[str, Iterable[str]] | None = None,
    exclude: Iterable[str] = (),
    prefix: str = "",
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click option per field of ``cls`` (see the module docstring).

    ``prefix`` (e.g. ``"joint_"``) goes before every option and parameter name, for a second
    dataclass whose short field names would collide with the first's; give it to :func:`collect`.
    ``defaults``: the command's own defaults for some fields (shown in ``--help``), where the
    command builds ``cls`` over them (the pipeline's short stages), so help never shows a value the
    run does not use.
    """
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(fields):
            tp = hints[f.name]
            base, _ = _inner(tp)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = (defaults or {}).get(f.name, default)
            text = (help or {}).get(f.name, "")
            shown = f" [default: {_show(default)}]"
            name = prefix + f.name
            if base is bool:
                opt = click.option(f"{option_name(name)}/--no-{name.replace('_', '-')}", name,
                                   default=None, help=text + shown)  # fmt: skip
            elif choices and f.name in choices:
                vals = list(choices[f.name])
                opt = click.option(option_name(name), name, type=click.Choice(vals), default=None,
                                   help=text + shown)  # fmt: skip
            else:
                metavar = (
                    "A,B,..."
                    if typing.get_origin(base) is list
                    else {int: "INTEGER", float: "FLOAT"}.get(base, "TEXT")
                )
                opt = click.option(
                    option_name(name), name, type=str, default=None, metavar=metavar, help=text + shown
                )
            fn = opt(fn)
        return fn

    return deco


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def collect(
    cls: type, opts: Mapping[str, Any], base: Mapping[str, Any] | None = None, prefix: str = ""
) -> dict[str, Any]:
    """``base`` (e.g. a YAML section) updated with the options of ``cls`` that were given."""
    hints = typing.get_type_hints(cls)
    out = dict(base or {})
    for f in dataclasses.fields(cls):
        val = opts.get(prefix + f.name)
        if val is None:
            continue
        out[f.name] = (
            _parse(hints[f.name], val, option_name(prefix + f.name)) if isinstance(val, str) else val
        )
    return out


def given_names(cls: type, prefix: str = "") -> set[str]:
    """The click parameter names :func:`dataclass_options` made for ``cls``."""
    return {prefix + f.name for f in dataclasses.fields(cls)}
