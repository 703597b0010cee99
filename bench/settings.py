"""Typed settings from a recipe file: each value checked against its dataclass field's type.

A stage of a recipe file is a dataclass; `build_settings` turns the mapping a user wrote into one,
refusing an unknown key, a value of the wrong type, or one its `check()` finds out of range, each with
the key named and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class SettingError(ValueError):
    """A bad setting: `key` is the one at fault, the message says what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def build_settings(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` after checking each value against the field's annotation."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingError(unknown[0], f"unknown key; {_allowed_keys(fields)}")
    missing = [name for name, f in fields.items() if name not in values and _required(f)]
    if missing:
        raise SettingError(missing[0], f"missing; {_allowed_keys(fields)}")
    checked = {key: coerce(key, value, hints[key]) for key, value in values.items()}
    try:
        return cls(**checked)
    except SettingError:
        raise
    except ValueError as err:  # a range check of the settings class itself
        raise SettingError(_first_key(str(err), fields), str(err)) from None


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (bool, int, float, str, tuple[int, ...], dict, Literal, X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(key, value, options[0]) if len(options) == 1 else value
    if origin is Literal:
        if value not in args:
            raise SettingError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingError(key, f"must be a list, got {value!r}")
        return tuple(coerce(key, item, args[0]) for item in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise SettingError(key, f"must be a mapping, got {value!r}")
        return dict(value)
    return _scalar(key, value, annotation)


def _scalar(key: str, value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise SettingError(key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(key, f"must be a whole number, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SettingError(key, f"must be text, got {value!r}")
        return value
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _allowed_keys(fields: dict[str, dataclasses.Field]) -> str:
    return f"allowed: {', '.join(fields) or 'none'}"


def _first_key(message: str, fields: dict[str, dataclasses.Field]) -> str:
    """The first field a range-check message names (checks write 'key must ...'), else 'settings'."""
    words = {word.strip(":,;'\"()") for word in message.split()}
    named = [name for name in fields if name in words]
    first = message.split(" ", 1)[0].rstrip(":")
    return first if first in fields else (named[0] if named else "settings")
