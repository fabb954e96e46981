"""Declared settings: every setting is one dataclass field made with :func:`param`.

A field carries its default, its help text and its constraint (``ewc.checks``); the command line
is generated from the fields (``ewc.cli.add_config_flags``: ``batch_size`` → ``--batch-size``),
:func:`validate` checks a config against the same declarations, and :func:`command_line` writes
the command that reproduces a config. So a default, a flag or a valid range is written once.

Field metadata (all optional besides ``help``):

- ``check``: a :class:`ewc.checks.Constraint`; ``choices`` (a tuple) implies ``Options``;
- ``type``: how a command-line string becomes the value (where the default does not say, e.g.
  ``None``); tuples of the default's item type are comma-separated lists;
- ``cli``: False for a setting that has no flag (set by the library, e.g. ``progress``);
- ``positional``, ``metavar``, ``aliases``, ``group``, ``action`` (``"append"``), ``shown``
  (the default as the help shows it) — presentation only.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ewc.checks import Constraint, Options, check

__all__ = [
    "accepted_options",
    "command_line",
    "config_dict",
    "field_check",
    "names_parser",
    "param",
    "parse_floats",
    "parse_ints",
    "parse_strength",
    "parse_setting",
    "validate",
]

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    help: str = "",
    *,
    check: Constraint | None = None,
    choices: Sequence[Any] | None = None,
    type: Callable[[str], Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
    **cli: Any,
) -> Any:
    """A config field with its help text, its constraint and how the command line reads it."""
    meta: dict[str, Any] = {"help": help, **cli}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    if type is not None:
        meta["type"] = type
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def accepted_options(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options ``fn`` declares (all of them when it takes ``**kwargs``): a registered
    factory or loader receives the settings it knows and is not handed the others."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options)
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in options.items() if k in names}


def field_check(f: dataclasses.Field) -> Constraint | None:
    """The constraint a field declares (``choices`` are an ``Options`` constraint)."""
    constraint = f.metadata.get("check")
    if constraint is None and "choices" in f.metadata:
        constraint = Options(f.metadata["choices"], allow_none=f.default is None)
    return constraint


def validate(config: Any, *, prefix: str = "") -> None:
    """Check every field of a config dataclass against its declared constraint (one wording)."""
    for f in dataclasses.fields(config):
        constraint = field_check(f)
        if constraint is not None:
            check(getattr(config, f.name), constraint, prefix + f.name)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default (calling its factory)."""
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as JSON-able values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def command_line(name: str, config: Any, prefix: Sequence[str] = ("ewc", "experiment")) -> str:
    """The command (``ewc experiment NAME`` by default) that reproduces ``config``, with only the
    non-default flags."""
    parts = [*prefix, name]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("cli", True) or value == default_of(f):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple | list):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts) + " --out OUT"


# -- command-line readers of values whose default does not say how to read them ---------------


def parse_floats(text: str) -> tuple[float, ...]:
    """``"1,10,100"`` → ``(1.0, 10.0, 100.0)`` (a λ grid)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def parse_strength(text: str) -> float | str:
    """``"300"`` → ``300.0``; ``"auto"`` stays ``"auto"`` (a strength chosen by a search)."""
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_ints(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)`` (a list of seeds)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_setting(text: str) -> tuple[str, str, object]:
    """``METHOD.PARAM=VALUE`` → (method, param, value); numbers become int/float, 'none' None."""
    head, sep, raw = text.partition("=")
    method, dot, name = head.partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"expected METHOD.PARAM=VALUE, got {text!r}")
    value: object = raw
    for kind in (int, float):
        try:
            value = kind(raw)
            break
        except ValueError:
            continue
    if raw.lower() == "none":
        value = None
    return method, name, value


def names_parser(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """A reader of comma-separated names, each one of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return names

    return parse
