"""Config dataclasses as command-line flags and TOML keys: a flag, a TOML key and a config field
always have the same name, and the docstring under each field is its --help text."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from store.errors import AtlasError


def _field_type(f: dataclasses.Field, hints: dict) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a dataclass field."""
    tp = hints[f.name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _parse_scalar(tp: type, text: str, flag: str):
    try:
        if tp is bool:
            low = str(text).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(float(text)) if "e" in str(text).lower() else int(text)
        return tp(text)
    except (TypeError, ValueError):
        raise AtlasError(f"{flag}: {text!r} is not a valid {tp.__name__}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_list, _ = _field_type(f, hints)
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "").replace("%", "%%")
        if tp is bool and not is_list:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            metavar = f.name.upper() + ("[,…]" if is_list else "")
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the convention used by our configs)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def build_config(cls, values: dict, required: dict | None = None):
    """Make a dataclass from flag/TOML values (strings, numbers or lists), validating every key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = dict(required or {})
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise AtlasError(f"unknown option {key!r}", f"valid options: {known}")
        tp, is_list, optional = _field_type(fields[name], hints)
        flag = "--" + name.replace("_", "-")
        if raw is None:
            if not optional:
                raise AtlasError(f"{flag} cannot be empty")
            kwargs[name] = None
            continue
        if is_list:
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(",") if p.strip()]
            if not items and name != "matryoshka_prefixes":
                raise AtlasError(f"{flag} needs at least one value")
            kwargs[name] = [_parse_scalar(tp, str(i).strip(), flag) if not isinstance(i, tp) else i for i in items]
        elif isinstance(raw, str) and optional and raw.lower() in ("none", "null", ""):
            kwargs[name] = None
        else:
            kwargs[name] = raw if isinstance(raw, tp) and not (tp is int and isinstance(raw, bool)) else _parse_scalar(tp, raw, flag)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise AtlasError(f"incomplete options: {exc}") from None


def load_toml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise AtlasError(f"config file {p} does not exist", "check the path")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise AtlasError(f"config file {p} is not valid TOML: {exc}") from None
    # Accept both a flat file and one with a [train] / [analyze] table.
    return data
