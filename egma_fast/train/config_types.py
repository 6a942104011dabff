"""Convert config values to their field's declared type, or say which key wants what.

Config files and ``--set`` overrides arrive as YAML / JSON / TOML scalars; a value is converted
to the type its dataclass field declares (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[...]``, ``dict``, ``Literal[...]``, ``Any``). Numbers written as text convert
(``--set optim.lr=3e-4``: YAML reads ``3e-4`` as a string); anything else that does not fit is
a :class:`ConfigError` naming the key and the expected type::

    optim.lr: expected a number, got 'abc'
    data.use_gaze: expected true or false, got 'maybe'
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

__all__ = ["ConfigError", "coerce", "coerce_fields"]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _to_int(path: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _fail(path, "an integer", value)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _fail(path, "an integer", value) from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _fail(path, "an integer", value)


def _to_float(path: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _fail(path, "a number", value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(path, "a number", value)


def _to_bool(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(path, "true or false", value)


def _to_str(path: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. run_dir: 2024
        return str(value)
    raise _fail(path, "a string", value)


def coerce(path: str, value: Any, hint: Any) -> Any:
    """``value`` converted to type ``hint`` (a resolved annotation); ConfigError naming ``path``."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        errors = []
        for option in options:
            try:
                return coerce(path, value, option)
            except ConfigError as exc:
                errors.append(str(exc).split(": expected ", 1)[-1].split(", got")[0])
        nullable = " or null" if len(options) < len(args) else ""
        raise _fail(path, " or ".join(errors) + nullable, value)
    if origin is Literal:
        if value in args:
            return value
        raise _fail(path, f"one of {list(args)}", value)
    if hint is bool:
        return _to_bool(path, value)
    if hint is int:
        return _to_int(path, value)
    if hint is float:
        return _to_float(path, value)
    if hint is str:
        return _to_str(path, value)
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, "a list", value)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(path, f"a list of {len(args)} values", value)
        return tuple(coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(path, "a mapping", value)
        return dict(value)
    return value  # a type this module does not know: left to the dataclass's own checks


def coerce_fields(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` (field name -> raw value) of dataclass ``cls``, each converted to its field's
    type; ``prefix`` ("optim.") names the keys in errors. Unknown names pass through."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: coerce(prefix + k, v, hints[k]) if k in names else v for k, v in values.items()}
