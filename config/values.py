"""Typed values from TOML or the environment: the checks every configuration key goes
through (types strict from a file, parsed from the environment; ranges; Enums)."""

from __future__ import annotations

import enum
import json
import typing
from dataclasses import fields
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


def value_range(low: float, high: float | None = None) -> dict:
    return {"range": (low, high)}


PORT = value_range(1, 65535)


def check_value(where: str, kind: Any, value: Any, from_text: bool) -> Any:
    """``value`` as ``kind`` (a field's type); ConfigError naming ``where`` otherwise.

    From a file types are strict; from the environment (``from_text``) text is parsed.
    """
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {', '.join(kind)}, got {value!r}") \
                from None
    if kind is bool:
        if from_text and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int or kind is float:
        if from_text and isinstance(value, str):
            try:
                value = kind(value) if kind is float else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                     else int):
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}: expected {noun}, got {value!r}")
        return kind(value)
    if typing.get_origin(kind) is tuple:
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        item = typing.get_args(kind)[0]
        if isinstance(item, type) and issubclass(item, enum.Enum):
            if not value:
                raise ConfigError(f"{where}: expected at least one of {', '.join(item)}")
            return tuple(dict.fromkeys(check_value(where, item, v, from_text) for v in value))
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    return value


def build_section(cls, values: Mapping[str, Any], where: str, origin: Mapping[str, str],
           from_env: frozenset[str] = frozenset()):
    """A section's dataclass from raw values; ``origin`` says where each came from
    (``FILE: section.key`` or the environment variable), for the errors; the keys in
    ``from_env`` came from the environment (text, parsed)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        named = origin.get(f.name, f"{where}.{f.name}")
        value = check_value(named, hints[f.name], values[f.name], f.name in from_env)
        low, high = f.metadata.get("range", (None, None))
        if low is not None and (value < low or (high is not None and value > high)):
            span = f"{low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{named}: {span}, got {value}")
        out[f.name] = value
    return cls(**out)


def check_table(where: str, raw: Any, cls) -> None:
    """A ``[[...]]`` table of the configuration: a table, with none but ``cls``'s keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
