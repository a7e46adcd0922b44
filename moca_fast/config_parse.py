"""Settings given as text or typed values (key=value, YAML, a checkpoint's JSON) into the fields' types: one
ConfigError line naming the setting for anything else."""
from __future__ import annotations

import dataclasses
from typing import Any

from moca_fast.errors import ConfigError


def _parse_text(value: str, base: str, optional: bool) -> Any:
    """A value written as text (key=value on the command line, or a quoted YAML string) in the field's type."""
    if value.lower() in ("none", "null"):
        if optional:
            return None
        raise ValueError("None is not allowed")
    if base == "tuple":
        return tuple(float(v) for v in value.strip("[]() ").replace(",", " ").split())
    if base == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if base == "int":
        try:
            return int(value)
        except ValueError:
            pass
        try:
            number = float(value)  # 1e3
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if not number.is_integer():
            raise ValueError(f"{value} is not an integer")
        return int(number)
    if base == "float":
        return float(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_typed(value: Any, base: str) -> Any:
    """A value that already has a type (YAML, JSON, Python) must be of the field's type: refused, never coerced
    (`epochs: yes` is a boolean, not 1; `output: [a, b]` is a list, not a folder name)."""
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "tuple": "a list of numbers"}[base]
    shown = type(value).__name__
    if base == "tuple" and isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "float" and _is_number(value):
        return float(value)
    if base == "int" and _is_number(value) and float(value).is_integer():
        return int(value)
    if base == "int" and isinstance(value, float):
        raise ValueError(f"{value} is not an integer")
    article = "an" if shown[0] in "aeiou" else "a"
    raise ValueError(f"must be {expected}, not {article} {shown}" + (" (quote it to give text)" if base == "str" else ""))


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """The value of field `name` (annotated `annotation`, e.g. "float | None") in its type: text is parsed, a
    typed value must already have the type; one-line ConfigError naming the field otherwise."""
    optional = "None" in annotation
    base = "tuple" if annotation.startswith("tuple") else annotation.replace(" | None", "").strip()
    try:
        if value is None:
            if optional:
                return None
            raise ValueError("None is not allowed")
        if isinstance(value, str):
            return _parse_text(value, base, optional)
        return _check_typed(value, base)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"setting {name}={value!r}: {e}") from None


def apply_overrides(cfg, overrides: dict[str, Any]):
    """A copy of the Config `cfg` with `overrides` ({field name: value}) applied, each checked (_coerce)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    values = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"setting name {key!r} is not a string")
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown setting {key!r} (see moca_fast/config.py for the fields)")
        if name in values:
            raise ConfigError(f"setting {name} is given twice")
        values[name] = _coerce(name, value, fields[name].type)
    return dataclasses.replace(cfg, **values)


def parse_kv(items: list[str]) -> dict[str, str]:
    """`key=value` strings -> {key: value text}; a key given twice (also as a-b and a_b) is refused."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in out:
            raise ConfigError(f"setting {key} is given twice ({key}={out[key]} and {item.strip()})")
        out[key] = value.strip()
    return out
