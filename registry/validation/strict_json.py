"""JSON parsing that refuses what ``json.loads`` quietly accepts.

A safetensors header is read by two parsers: ours, at upload, and the Rust ``safetensors``
library (serde_json), wherever the file is later loaded. Whatever this module returns, the
library must read the same way (tests/adversarial/test_differential_fuzz.py checks it), so
everything ``json.loads`` accepts and serde_json reads differently or refuses is refused
or typed here:

- duplicate keys: ``json.loads`` keeps the last, serde_json the last or an error;
- ``NaN``/``Infinity``, and numbers too large for a float (``1e400``, which ``json.loads``
  turns into infinity): not JSON, and refused by serde_json;
- ``\\ud800``-style escapes of a lone UTF-16 surrogate: ``json.loads`` returns a string no
  UTF-8 encoder (a database driver, a JSON response) can write; serde_json refuses them;
- ``-0``: an integer 0 to ``json.loads``, a float to serde_json (so not a valid size or
  offset there); it is returned as the float ``-0.0`` here, so integer checks refuse it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


class StrictJSONError(ValueError):
    """Not valid strict JSON; ``duplicate_key`` is set when that was the reason."""

    def __init__(self, message: str, *, duplicate_key: str | None = None) -> None:
        super().__init__(message)
        self.duplicate_key = duplicate_key


_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = "a \\u escape encodes a lone UTF-16 surrogate (not a Unicode character)"


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        # Before the duplicate check: its error quotes the key, which must be encodable.
        if _SURROGATE.search(key):
            raise StrictJSONError(_LONE_SURROGATE)
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _integer(text: str) -> int | float:
    # int() itself refuses more than sys.get_int_max_str_digits() digits (a ValueError).
    return -0.0 if text == "-0" else int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates in string values (keys were checked while parsing)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise StrictJSONError(_LONE_SURROGATE)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(text: str) -> Any:
    """Parse ``text``; raise ``StrictJSONError`` on any syntax error, duplicate key,
    non-finite number or lone surrogate."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_pairs,
            parse_constant=_no_constants,
            parse_int=_integer,
            parse_float=_finite_float,
        )
    except StrictJSONError:
        raise
    except DuplicateKeyError as exc:
        raise StrictJSONError(str(exc), duplicate_key=exc.key) from None
    except RecursionError:
        # Deeply nested arrays exhaust the C scanner's recursion limit.
        raise StrictJSONError("JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise StrictJSONError(str(exc)) from None
    # A lone surrogate reaches a string only through a \u escape, or from a str caller.
    if "\\u" in text or _SURROGATE.search(text):
        _check_strings(value)
    return value


def loads_bytes(data: bytes) -> Any:
    """UTF-8 bytes -> strict JSON (a BOM or any invalid UTF-8 is refused)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not valid UTF-8 at byte {exc.start}") from None
    return loads(text)
