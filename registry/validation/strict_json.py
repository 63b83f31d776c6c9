"""JSON parsing that refuses what ``json.loads`` quietly accepts.

``json.loads`` keeps the *last* of two duplicate keys and accepts ``NaN``/``Infinity``;
a safetensors header with two entries for one tensor name could then be read differently
by two parsers (the Rust reader errors, Python keeps the last), so both are refused here.
"""

from __future__ import annotations

import json
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


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str) -> Any:
    """Parse ``text``; raise ``StrictJSONError`` on any syntax error, duplicate key or NaN."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constants)
    except DuplicateKeyError as exc:
        raise StrictJSONError(str(exc), duplicate_key=exc.key) from None
    except RecursionError:
        # Deeply nested arrays exhaust the C scanner's recursion limit.
        raise StrictJSONError("JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise StrictJSONError(str(exc)) from None


def loads_bytes(data: bytes) -> Any:
    """UTF-8 bytes -> strict JSON (a BOM or any invalid UTF-8 is refused)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not valid UTF-8 at byte {exc.start}") from None
    return loads(text)
