"""Reading a --config YAML file strictly: every problem is one ConfigError line naming the file and the line.

The file must be UTF-8 text holding one YAML mapping of setting names to values. Refused, each with its line:
bytes that are not UTF-8, YAML syntax errors, a key that is not a plain string (`1: 2`), a key given twice
(also as `batch-size` and `batch_size`), and the tags and constructs YAML's safe loader refuses.
Unquoted exponents without a dot (`blr: 1e-4`) are floats, as in YAML 1.2 (PyYAML's YAML 1.1 rules read
them as strings).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moca_fast.errors import ConfigError

_STR_TAG = "tag:yaml.org,2002:str"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2 floats (1e-4, 2E+3, .5e1)."""


_Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


@dataclass(frozen=True)
class Entry:
    """One top-level `key: value` of a config file."""

    key: str  # with '-' written as '_'
    value: Any
    line: int  # 1-based


def _where(path: Path, line: int | None) -> str:
    return f"config file {path}" + (f", line {line}" if line is not None else "")


def _yaml_error(path: Path, text: str, e: yaml.YAMLError) -> ConfigError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = "; ".join(part for part in (e.context, e.problem) if part) or type(e).__name__
        return ConfigError(f"{_where(path, mark.line + 1 if mark else None)}: {what}")
    if isinstance(e, yaml.reader.ReaderError):  # a control character YAML does not allow in text
        line = text[:e.position].count("\n") + 1 if isinstance(e.position, int) else None
        return ConfigError(f"{_where(path, line)}: character #x{e.character:04x} is not allowed in YAML")
    return ConfigError(f"{_where(path, None)} is not valid YAML: {(str(e).splitlines() or [type(e).__name__])[0]}")


def read_text_file(path: Path, what: str = "config file") -> str:
    """The UTF-8 text of a settings file (`what` names its kind in the errors)."""
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column "
                          f"{column})") from None


def read_config_file(path: str | Path) -> list[Entry]:
    """The top-level entries of a YAML config file, in file order (see the module docstring)."""
    path = Path(path)
    text = read_text_file(path)
    loader = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        if root is None:  # an empty file (or only comments)
            return []
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{_where(path, root.start_mark.line + 1)}: the file must hold a mapping of "
                              f"setting: value, not a {type(loader.construct_object(root, deep=True)).__name__}")
        entries, first_line = [], {}
        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                key = loader.construct_object(key_node, deep=True)
                raise ConfigError(f"{_where(path, line)}: the key {key!r} ({type(key).__name__}) is not a setting "
                                  f"name")
            key = key_node.value.replace("-", "_")
            if key in first_line:
                raise ConfigError(f"{_where(path, line)}: {key} is given twice (first on line {first_line[key]})")
            first_line[key] = line
            entries.append(Entry(key, loader.construct_object(value_node, deep=True), line))
        return entries
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    finally:
        if loader is not None:
            loader.dispose()
