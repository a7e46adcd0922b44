"""Reading back the JSON files we wrote (scan journals, metrics.jsonl, checkpoint meta.json, evaluation results),
where any of them may be damaged: a line torn by a kill, bytes that are not UTF-8, JSON of another shape, a
number that is not finite.

A damaged record is never an error: the reader skips it, counts it and names the first in one log line
(Skipped), and goes on. The shape of a record is checked by a `check` function that returns the record
(possibly converted) or raises BadRecord saying what is wrong; check_int, check_number, ... are its parts.
Files are read as bytes and each line decoded on its own, so a damaged line never hides the others.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: the largest integer accepted where a count or a step is expected (what an int64 holds)
MAX_INT = 2**63 - 1


class BadRecord(ValueError):
    """A record that is not what its file should hold; the message says what is wrong (one phrase)."""


@dataclass
class Skipped:
    """The damaged records of one file: how many, and the first one's place and why."""

    path: str
    count: int = 0
    first: str = ""

    def add(self, where: str, why: str) -> None:
        if not self.count:
            self.first = f"{where}: {why}"
        self.count += 1

    def log(self, logger: logging.Logger, what: str = "records") -> None:
        """One warning line when anything was skipped."""
        if self.count:
            logger.warning("%s: skipped %d damaged %s (first: %s)", self.path, self.count, what, self.first)


def _reject_constant(name: str):
    raise BadRecord(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRecord(f"{text} is not a finite number")
    return value


def parse_json(data: bytes) -> Any:
    """The JSON value of `data`: strict UTF-8, finite numbers only (no NaN, Infinity or 1e400); BadRecord else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except BadRecord:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of too many digits, deep nesting
        raise BadRecord(f"not JSON ({str(e).splitlines()[0][:80]})") from None


def read_json_lines(data: bytes, path: str | os.PathLike, check: Callable[[Any], Any],
                    first_line: int = 1) -> tuple[list, Skipped]:
    """(the checked records of the non-empty lines of `data`, the lines skipped); line numbers start at
    `first_line` (for a file whose first lines were read apart)."""
    records, skipped = [], Skipped(os.fspath(path))
    for number, line in enumerate(data.split(b"\n"), first_line):
        if not line.strip():
            continue
        try:
            records.append(check(parse_json(line)))
        except BadRecord as e:
            skipped.add(f"line {number}", str(e))
    return records, skipped


def read_json_file(path: str | os.PathLike, check: Callable[[Any], Any]) -> Any:
    """The checked JSON document of file `path`. FileNotFoundError when it is missing; BadRecord (naming the
    file) when it cannot be read or is damaged."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise BadRecord(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return check(parse_json(data))
    except BadRecord as e:
        raise BadRecord(f"{path}: {e}") from None


def check_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadRecord(f"{what} is not an object")
    return value


def check_list(value: Any, what: str, length: int | None = None) -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise BadRecord(f"{what} is not a list" + (f" of {length}" if length is not None else ""))
    return value


def check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is not a string")
    return value


def check_int(value: Any, what: str, low: int = -MAX_INT - 1, high: int = MAX_INT) -> int:
    """`value` when it is an integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRecord(f"{what} is not an integer in [{low}, {high}]")
    return value


def check_number(value: Any, what: str) -> float:
    """`value` as a float when it is a finite number (not a bool)."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.nan
    if not math.isfinite(number):
        raise BadRecord(f"{what} is not a finite number")
    return number


def required(record: dict, key: str, check: Callable[[Any, str], Any], *args) -> Any:
    """check(record[key]) of an object; a missing key is a BadRecord too."""
    if key not in record:
        raise BadRecord(f"no {key!r}")
    return check(record[key], repr(key), *args)


def metrics_record(value: Any) -> dict:
    """A record of a run's metrics.jsonl (launch/train.py writes one per logged step and evaluation): an object
    with an integer "step" >= 0 whose numbers are all finite; returned with its numbers as floats."""
    record = check_dict(value, "the record")
    checked = {"step": required(record, "step", check_int, 0)}
    for key, item in record.items():
        if key != "step" and isinstance(item, (int, float)) and not isinstance(item, bool):
            checked[key] = check_number(item, repr(key))
    return checked


def read_pointer(path: str | os.PathLike) -> str:
    """The name a pointer file (`latest`: one line) gives of a folder beside it; BadRecord (naming the file)
    when it is not UTF-8 or names no such sibling (empty, a path, '..')."""
    data = Path(path).read_bytes()
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRecord(f"{path}: damaged (not UTF-8)") from None
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise BadRecord(f"{path}: damaged (it names no folder beside it: {name[:40]!r})")
    return name
