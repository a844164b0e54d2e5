"""Typed configuration machinery: dataclass sections, YAML loading, dotted overrides, validation.

A config is a tree of dataclasses (see ``config/__init__.py``). Every field is declared with :func:`option`,
which carries its help text (shown by ``--help``) and its constraints (choices, lower bound). Loading
walks a plain dict (from YAML, then dotted command-line overrides) against that tree and fails on the
first problem with a one-line :class:`ConfigError` that names the dotted key, the bad value and what
was expected. Unknown keys are errors and come with a "did you mean" where a close name exists.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, stated in one line that names the key."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    greater_than: float | None = None,
    max: float | None = None,
):
    """Declare a config field with its help text and constraints.

    ``choices`` restricts the value to a set; ``min``/``max`` are inclusive bounds and ``greater_than``
    an exclusive lower bound (for numbers, or for every element of a list of numbers).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "greater_than": greater_than}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# value checking against a type annotation
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # try the most specific member first: bool before int before float before str
        for arg in sorted((a for a in args if a is not type(None)), key=_specificity):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        if not math.isfinite(number):  # nan passes every bound check (all comparisons are false)
            raise ConfigError(f"{key}: got {number}, expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a path or tag written as a bare number
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _specificity(tp: Any) -> int:
    order = {bool: 0, int: 1, float: 2}
    if typing.get_origin(tp) is list:
        return 3
    return order.get(tp, 4)


def _check_bounds(value: Any, meta: dict, key: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{key}: got {value!r}, expected a value >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{key}: got {value!r}, expected a value <= {meta['max']}")
        if meta.get("greater_than") is not None and v <= meta["greater_than"]:
            raise ConfigError(f"{key}: got {value!r}, expected a value > {meta['greater_than']}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(map(str, choices))}")


# --------------------------------------------------------------------------------------------------
# dict  <->  dataclass tree
# --------------------------------------------------------------------------------------------------


def _unknown_key(key: str, known: list[str], prefix: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{full}'{hint}")


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, validating every key and value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: got {data!r}, expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, key = hints[name], f"{prefix}{name}"
        value = data[name]
        if isinstance(value, bool) and f.metadata.get("choices"):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean: give back the word the choices use
            words = ("off", "false", "no") if value is False else ("on", "true", "yes")
            value = next((c for c in f.metadata["choices"] if c in words), value)
            data = {**data, name: value}
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name], prefix=f"{key}.")
        else:
            value = _coerce(data[name], tp, key)
            _check_bounds(value, f.metadata, key)
            kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> dict:
    """The plain-dict form of a config tree (what is written into a run directory)."""
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'``, creating sub-dicts as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn ``['--model.chunk_size', '256', '--train.lr=3e-4']`` into ``[(key, value), ...]``.

    Values are read as YAML scalars/lists (``256`` → int, ``true`` → bool, ``[1, 2]`` → list), so a
    value on the command line means the same as in the file.
    """
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg[2:]}: missing value after '{arg}'")
            key, raw = arg[2:], args[i + 1]
            i += 2
        key = key.replace("-", "_")
        pairs.append((key, parse_scalar(raw)))
    return pairs


def parse_scalar(raw: str) -> Any:
    """Read one command-line value as YAML would (falling back to the raw string)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors for a missing file or malformed content."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def write_yaml(data: dict, path: str | Path) -> None:
    """Write a mapping as YAML atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf field: the source of ``--help`` listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows
