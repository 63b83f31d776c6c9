"""Strings the registry can store and send back: no NUL character, no lone UTF-16 surrogate.

PostgreSQL refuses NUL in text columns (and ``\\u0000`` in JSON ones); a lone surrogate,
which ``json.loads`` and YAML both make from a ``"\\ud800"`` escape, is a Python string that
no UTF-8 encoder (a database driver, a JSON response) can write. Every string a client sends
that may reach a row is checked here first: the JSON body of every request
(registry/api/hygiene.py), multipart form fields, a datasheet's front matter and body
(registry/validation/datasheet.py). Pure functions, iterative: a deeply nested value costs
no stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Problems listed per value: enough to fix a document, small enough for an error body.
MAX_PROBLEMS = 20
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class TextProblem:
    path: str  # JSONPath-like, printable ASCII: $.texts[3], $['a\x00b']
    message: str
    too_deep: bool = False

    def as_error(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored, in words, or None."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"contains a NUL character (at index {nul})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x} at index "
            f"{exc.start}), which is not a Unicode character"
        )
    return None


def key_segment(key: object) -> str:
    """A path segment for a mapping key, safe to echo in an error (ASCII, short)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f".{key}"
    text = key if isinstance(key, str) else repr(key)
    short = text if len(text) <= 60 else text[:57] + "..."
    return f"[{short!a}]"


def text_problems(
    value: Any, path: str = "$", *, max_depth: int | None = None
) -> list[TextProblem]:
    """Every string and mapping key in ``value`` (dicts, lists, tuples, scalars) that cannot
    be stored, with its path; and, with ``max_depth``, where nesting goes deeper than it
    (the value itself is depth 0). At most ``MAX_PROBLEMS`` are returned."""
    out: list[TextProblem] = []
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack and len(out) < MAX_PROBLEMS:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                out.append(TextProblem(where, problem))
            continue
        if not isinstance(item, dict | list | tuple):
            continue
        if max_depth is not None and depth >= max_depth:
            out.append(TextProblem(where, f"nested deeper than {max_depth} levels", True))
            continue
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                segment = key_segment(key)
                if isinstance(key, str) and (problem := text_problem(key)) is not None:
                    out.append(TextProblem(f"{where}{segment}", f"the key {problem}"))
                children.append((child, f"{where}{segment}", depth + 1))
        else:
            children = [(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item)]
        # Reversed onto the stack: problems come out in document order.
        stack.extend(reversed(children))
    return out[:MAX_PROBLEMS]
