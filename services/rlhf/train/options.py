"""Command-line flags and ``--config YAML`` for the training commands, through frozen dataclasses.

Each command takes two dataclasses: its own run options (paths, processes, output) and the core stage's
hyperparameters (`SFTConfig`, `RewardTrainingConfig`, `PPOConfig`), so the command, the demo and the trainer service
share one definition of every field. Every field becomes a flag (``learning_rate`` -> ``--learning-rate``) whose help
is the field's docstring (the string under it) or its ``metadata["help"]``. Values come from, in order: the flag, the
YAML file (a flat mapping of field names), the field's default. A field without a default is required.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


class UsageError(Exception):
    """Bad input the user can fix (a missing file, a bad field, a model of the wrong kind): printed as one message,
    without a traceback, and the command exits with status 2."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (cleanrl's style), from its source and its bases'."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return "A,B,..."
    return getattr(tp, "__name__", "VALUE").upper()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                            skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` (string-valued, parsed later, so that an unset flag falls through to YAML)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        default = _default(f)
        tp = hints[f.name]
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if tp is bool:
            group.add_argument(_flag(f.name), dest=f.name, default=None, nargs="?", const="true",
                               metavar="BOOL", help=f"{doc} ({shown.replace('%', '%%')}; --no-{_flag(f.name)[2:]} "
                                                    "for false)")
            group.add_argument("--no-" + _flag(f.name)[2:], dest=f.name, action="store_const", const="false",
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(_flag(f.name), dest=f.name, default=None, metavar=_type_name(tp),
                               help=f"{doc} ({shown.replace('%', '%%')})")


def parse_value(tp: Any, raw: Any, where: str) -> Any:
    """``raw`` (a flag's string, or a YAML value) as a value of type ``tp``; UsageError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            if len(args) < len(typing.get_args(tp)):
                return None
        errors = []
        for a in args:
            try:
                return parse_value(a, raw, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise UsageError(f"{where}: must be one of {list(choices)}, got {raw!r}")
        return raw
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{where}: expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise UsageError(f"{where}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected an integer, got {raw!r}") from None
    if tp is float:
        if isinstance(raw, bool):
            raise UsageError(f"{where}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a number, got {raw!r}") from None
    if tp is str:
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise UsageError(f"{where}: expected a string, got {raw!r}")
        return str(raw)
    if origin is tuple:
        items = raw if isinstance(raw, list | tuple) else [s for s in str(raw).split(",")]
        return tuple(str(s).strip() for s in items if str(s).strip())
    raise UsageError(f"{where}: unsupported type {tp!r}")


def read_yaml(path: str) -> dict[str, Any]:
    """A flat mapping of field names from a YAML file; UsageError naming the file when it is not one."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UsageError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must be a mapping of option names to values, got {type(data).__name__}")
    return data


def build(classes: Sequence[type], args: argparse.Namespace, yaml_values: Mapping[str, Any] | None = None,
          yaml_path: str = "", overrides: Mapping[str, Any] | None = None) -> list[Any]:
    """One instance of each of ``classes`` from flags, then YAML, then defaults; the dataclasses' own checks
    (``__post_init__``) become UsageErrors."""
    yaml_values = dict(yaml_values or {})
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(yaml_values) - known)
    if unknown:
        raise UsageError(f"{yaml_path}: unknown option(s) {unknown}; see --help for the names (snake_case)")
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            raw = getattr(args, f.name, None)
            if overrides and f.name in overrides:
                values[f.name] = overrides[f.name]
            elif raw is not None:
                values[f.name] = parse_value(hints[f.name], raw, _flag(f.name))
            elif f.name in yaml_values:
                values[f.name] = parse_value(hints[f.name], yaml_values[f.name], f"{yaml_path}: {f.name}")
            elif _default(f) is dataclasses.MISSING:
                raise UsageError(f"{_flag(f.name)} is required (or '{f.name}' in --config)")
        try:
            out.append(cls(**values))
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    return out
