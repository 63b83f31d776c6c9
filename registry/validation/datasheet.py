"""Datasheets: markdown with YAML front matter, checked against ``datasheet.schema.json``.

::

    ---
    name: Tide-pool ecology notes
    license: CC-BY-4.0
    ...
    samples:
      - At low tide the ochre sea stars cling to the mussel beds.
    ---
    # Free-form markdown body

The YAML is read with a safe loader that also refuses aliases (a few hundred bytes of
nested aliases expand to billions of nodes when walked), duplicate keys (YAML keeps the
last one silently) and implicit timestamps (``2024-01-01`` stays a string, as in JSON).
Composing YAML recurses once per level of nesting, so the loader refuses nesting deeper
than ``MAX_NESTING`` while composing, before a deeper level is entered; an integer literal
longer than ``MAX_INT_LITERAL`` characters is refused before it is converted (Python
refuses to convert more than 4,300 digits, and no datasheet number needs 100).

Every string, key included, must be storable (registry/validation/text.py: no NUL, no lone
surrogate from a ``"\ud800"`` escape), every integer must fit in 64 bits, and the markdown
body holds no NUL: the name, domain, license and language are stored in columns, the text
whole, and all of it is refused here, before any byte of the upload is committed.

A string value that begins with ``UNFILLED_MARKER`` (``FILL IN:``) is a field its author
has still to write: ``agora expert datasheet`` leaves one for every human field not given
by a flag, with what to write after the marker. Once everything else passes, any such
value, at any depth, refuses the datasheet (``datasheet_unfilled``), each one listed by
JSON path with its instruction (docs/validation.md, "Datasheet").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from registry.validation.codes import ErrorCode, invalid, shorten, too_large
from registry.validation.text import key_segment, text_problem

DEFAULT_MAX_DATASHEET_BYTES = 1024 * 1024
DEFAULT_MAX_SAMPLES_BYTES = 64 * 1024
# The schema nests 3 levels (sources[i].name); x- extensions get ten times that.
MAX_NESTING = 32
MAX_INT_LITERAL = 100
# Each of these is stored in a column of at most 200 characters (registry/db/models.py,
# Expert.name, .license, .language: a list of languages joined with ", ").
MAX_STORED_CHARS = 200
_INT64 = (-(2**63), 2**63 - 1)
# A value that begins with this (after leading whitespace) is a placeholder still to fill in.
UNFILLED_MARKER = "FILL IN:"
_INT_TAG = "tag:yaml.org,2002:int"


class _Refused(yaml.YAMLError):
    """A YAML construct the loader refuses, at a JSON path of the front matter."""

    def __init__(self, path: str, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.problem_mark = mark


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` minus aliases, deep nesting, huge integer literals, duplicate
    keys and implicit timestamps."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []  # the JSON path of the node being composed

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Refused while scanning, a level past the limit: the scanner keeps one possible
        # simple key per open flow level and re-checks all of them on every token, so a
        # run of 1,000 '[' alone costs it a second before the composer sees any.
        if self.flow_level >= MAX_NESTING:
            raise _Refused(
                "", f"nested deeper than {MAX_NESTING} levels of [ or {{", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[no-untyped-call]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        segment = _segment(parent, index)
        path = "".join([*self._path, segment])
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _Refused(
                path, "YAML aliases (*name) are not allowed in datasheets", event.start_mark
            )
        if len(self._path) >= MAX_NESTING:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _Refused(path, f"nested deeper than {MAX_NESTING} levels", event.start_mark)
        self._path.append(segment)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._path.pop()
        if (
            isinstance(node, yaml.ScalarNode)
            and node.tag == _INT_TAG
            and len(node.value) > MAX_INT_LITERAL
        ):
            raise _Refused(
                path,
                f"an integer of {len(node.value)} characters (at most {MAX_INT_LITERAL})",
                node.start_mark,
            )
        return node  # type: ignore[no-any-return]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(repr(key), 60)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


# Without the timestamp resolver, dates stay strings: front matter maps onto JSON types only.
_StrictSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _segment(parent: yaml.Node | None, index: Any) -> str:
    """The path segment of a node ``compose_node`` is about to compose."""
    if parent is None:
        return "$"
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, yaml.ScalarNode):  # a mapping value: index is its key
        return key_segment(index.value)
    return ""  # a mapping key: reported at the mapping's path


@dataclass(frozen=True)
class Source:
    name: str
    url: str | None = None
    description: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class Parent:
    expert_id: str
    version: int
    weight: float | None = None


@dataclass(frozen=True)
class Datasheet:
    name: str
    domain: str
    license: str
    language: tuple[str, ...]
    sources: tuple[Source, ...]
    token_count: int
    pii_handling: str
    intended_uses: tuple[str, ...]
    contact: str
    samples: tuple[str, ...]
    out_of_scope_uses: tuple[str, ...] = ()
    collection: str | None = None
    parents: tuple[Parent, ...] = ()
    tags: tuple[str, ...] = ()
    extensions: Mapping[str, Any] = field(default_factory=dict)  # the x-* keys
    body: str = ""  # the markdown after the front matter
    front_matter: Mapping[str, Any] = field(default_factory=dict)  # as parsed, JSON-compatible

    @property
    def samples_bytes(self) -> int:
        return sum(len(s.encode("utf-8")) for s in self.samples)


@cache
def datasheet_schema() -> dict[str, Any]:
    """The JSON schema (Draft 2020-12) every datasheet's front matter must satisfy."""
    text = resources.files("registry.validation").joinpath("datasheet.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = datasheet_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _split_front_matter(text: str) -> tuple[str, str]:
    """``---\\n<yaml>\\n---\\n<body>`` -> (yaml, body). ``...`` may also close the block."""
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        raise invalid(
            ErrorCode.DATASHEET_FRONT_MATTER,
            "a datasheet starts with YAML front matter: a first line '---', the YAML, then '---'",
        )
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            # The YAML keeps the line break before the closing line: a last value written
            # as a block (``|``) ends with it, as in any YAML file.
            return "".join(f"{line}\n" for line in lines[1:i]), "\n".join(lines[i + 1 :])
    raise invalid(ErrorCode.DATASHEET_FRONT_MATTER, "the front matter has no closing '---' line")


def _json_problems(value: Any, path: str) -> list[dict[str, Any]]:
    """Places where parsed YAML holds something JSON cannot (so the schema can't judge it),
    or a string or number no row can store. Nesting is bounded by the loader."""
    if isinstance(value, dict):
        out: list[dict[str, Any]] = []
        for k, v in value.items():
            if not isinstance(k, str):
                out.append({"path": path, "message": f"key {shorten(repr(k), 60)} is not a string"})
            elif (problem := text_problem(k)) is not None:
                out.append({"path": f"{path}{key_segment(k)}", "message": f"the key {problem}"})
            else:
                out += _json_problems(v, f"{path}.{k}")
        return out
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _json_problems(v, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [{"path": path, "message": "NaN and infinity are not allowed"}]
    if isinstance(value, str) and (problem := text_problem(value)) is not None:
        return [{"path": path, "message": problem}]
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return [{"path": path, "message": "an integer beyond 64 bits"}]
    if value is None or isinstance(value, str | int | float | bool):
        return []
    return [{"path": path, "message": f"a {type(value).__name__} is not a JSON value"}]


def _field_at(yaml_text: str, line: int) -> str:
    """The top-level key whose value holds front matter line ``line`` (0-based), as a path;
    for a refusal the scanner makes before the composer knows where it is."""
    for text in reversed(yaml_text.split("\n")[: line + 1]):
        key, colon, _ = text.partition(":")
        if colon and key and not key[0].isspace() and key[0] not in "-#[{?":
            return "$" + key_segment(key.strip().strip("'\""))
    return "$"


def _nul_problem(text: str, yaml_text: str) -> dict[str, Any] | None:
    """A NUL anywhere in the datasheet (the text is stored whole): where, by line."""
    at = text.find("\x00")
    if at < 0:
        return None
    line = text.count("\n", 0, at) + 1
    # The front matter is lines 2 .. len(yaml lines) + 1 (after the opening '---'); each
    # YAML line ends with its line break.
    part = "front matter" if line <= yaml_text.count("\n") + 1 else "body"
    return {"path": part, "message": f"a NUL character on line {line}"}


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def parse_datasheet(
    data: bytes | None,
    *,
    max_bytes: int = DEFAULT_MAX_DATASHEET_BYTES,
    max_samples_bytes: int = DEFAULT_MAX_SAMPLES_BYTES,
) -> Datasheet:
    """Parse and check a datasheet; raise with a code and every problem's JSON path."""
    if not data:
        raise invalid(ErrorCode.DATASHEET_MISSING, "a datasheet (markdown) is required")
    if len(data) > max_bytes:
        raise too_large(
            ErrorCode.DATASHEET_TOO_LARGE,
            f"the datasheet is {len(data)} bytes; the limit is {max_bytes}",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            ErrorCode.DATASHEET_FRONT_MATTER, f"the datasheet is not UTF-8 (byte {exc.start})"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    yaml_text, body = _split_front_matter(text)
    nul = _nul_problem(text, yaml_text)
    if nul is not None:
        raise invalid(ErrorCode.DATASHEET_INVALID, f"the datasheet holds {nul['message']}", [nul])
    try:
        front = yaml.load(yaml_text, Loader=_StrictSafeLoader)  # noqa: S506 (a SafeLoader)
    except _Refused as exc:
        mark = exc.problem_mark
        where = f" (front matter line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        path = exc.path or _field_at(yaml_text, mark.line if mark else 0)
        raise invalid(
            ErrorCode.DATASHEET_FRONT_MATTER,
            f"the front matter is refused at {path}: {exc.message}{where}",
            [{"path": path, "message": exc.message}],
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (front matter line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise invalid(
            ErrorCode.DATASHEET_FRONT_MATTER,
            f"the front matter is not valid YAML: {problem}{where}",
        ) from None
    if not isinstance(front, dict):
        raise invalid(
            ErrorCode.DATASHEET_FRONT_MATTER,
            "the front matter must be a YAML mapping of keys such as name, license, samples",
        )
    problems = _json_problems(front, "$")
    if problems:
        raise invalid(
            ErrorCode.DATASHEET_INVALID,
            "the front matter holds values that are not JSON or cannot be stored",
            problems,
        )
    errors = _schema_problems(front)
    if errors:
        raise invalid(
            ErrorCode.DATASHEET_INVALID,
            f"the datasheet does not match its schema ({len(errors)} problem(s))",
            errors,
        )
    sheet = _to_datasheet(front, body)
    stored_language = ", ".join(sheet.language)
    if len(stored_language) > MAX_STORED_CHARS:
        raise invalid(
            ErrorCode.DATASHEET_INVALID,
            f"language lists {len(stored_language)} characters; at most {MAX_STORED_CHARS}",
            [
                {
                    "path": "$.language",
                    "message": f"at most {MAX_STORED_CHARS} characters, joined with ', '",
                }
            ],
        )
    if sheet.samples_bytes > max_samples_bytes:
        raise invalid(
            ErrorCode.SAMPLES_TOO_LARGE,
            f"samples hold {sheet.samples_bytes} bytes of UTF-8; the limit is {max_samples_bytes}",
            [{"path": "$.samples", "message": f"at most {max_samples_bytes} bytes in total"}],
        )
    unfilled = unfilled_fields(front)
    if unfilled:
        paths = ", ".join(p["path"] for p in unfilled)
        raise invalid(
            ErrorCode.DATASHEET_UNFILLED,
            shorten(
                f"{len(unfilled)} field(s) still to fill in: {paths} (each value that begins "
                f"with {UNFILLED_MARKER!r} says what to write there)",
                500,
            ),
            unfilled,
        )
    return sheet


def unfilled_fields(front: Any, path: str = "$") -> list[dict[str, Any]]:
    """Every string value of the front matter (lists and extensions included) that is still
    a placeholder beginning with ``UNFILLED_MARKER``: its JSON path and what to write there.
    Nesting is bounded by the loader."""
    if isinstance(front, dict):
        return [p for k, v in front.items() for p in unfilled_fields(v, path + key_segment(k))]
    if isinstance(front, list):
        return [p for i, v in enumerate(front) for p in unfilled_fields(v, f"{path}[{i}]")]
    if isinstance(front, str) and front.lstrip().startswith(UNFILLED_MARKER):
        instruction = front.lstrip()[len(UNFILLED_MARKER) :].strip() or "write this field"
        return [
            {
                "path": path,
                "message": f"not filled in: {shorten(instruction, 200)} (replace the whole "
                f"value, {UNFILLED_MARKER!r} included)",
            }
        ]
    return []


def _schema_problems(front: dict[str, Any]) -> list[dict[str, Any]]:
    """Schema violations, one per JSON path, in words a datasheet author can act on.

    jsonschema reports a missing or unknown key at the *object's* path; we point at the key
    itself (``$.contact``), and replace regex dumps with the schema's description.
    """
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def add(path: str, message: str, keyword: str) -> None:
        out.setdefault((path, message), {"path": path, "message": message, "keyword": keyword})

    def handle(e: jsonschema.ValidationError) -> None:
        keyword = str(e.validator)
        instance = e.instance
        schema: Mapping[str, Any] = e.schema if isinstance(e.schema, Mapping) else {}
        if keyword == "required" and isinstance(instance, dict):
            for key in schema.get("required", []):
                if key not in instance:
                    add(f"{e.json_path}.{key}", "required key is missing", keyword)
        elif keyword == "additionalProperties" and isinstance(instance, dict):
            known = set(schema.get("properties", {}))
            patterns = list(schema.get("patternProperties", {}))
            hint = " (extension keys start with x-)" if patterns else ""
            for key in instance:
                if key not in known and not any(re.search(p, key) for p in patterns):
                    add(f"{e.json_path}.{key}", f"unknown key{hint}", keyword)
        elif keyword in ("oneOf", "anyOf") and (branch := _matching_branch(e)) is not None:
            for sub in branch:
                handle(sub)
        elif keyword in ("pattern", "oneOf", "anyOf") and "description" in schema:
            found = shorten(repr(instance), 80)
            add(e.json_path, f"{found} is not {schema['description']}", keyword)
        else:
            add(e.json_path, shorten(e.message, 300), keyword)

    for error in _validator().iter_errors(front):
        handle(error)
    return sorted(out.values(), key=lambda p: (p["path"], p["message"]))


def _matching_branch(e: jsonschema.ValidationError) -> list[jsonschema.ValidationError] | None:
    """For a failed oneOf/anyOf, the errors of the one branch whose type fits the value.

    ``language: [en, "??"]`` fails both "a tag" and "a list of tags"; the useful report is
    the list branch's ``$.language[1]``, not "valid under none of the given schemas".
    """
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for sub in e.context or []:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [
        errs
        for errs in branches.values()
        if not any(sub.validator == "type" and not sub.path for sub in errs)
    ]
    return fitting[0] if len(fitting) == 1 else None


def _to_datasheet(front: dict[str, Any], body: str) -> Datasheet:
    sources = tuple(Source(name=s) if isinstance(s, str) else Source(**s) for s in front["sources"])
    parents = tuple(
        Parent(
            expert_id=p["expert_id"],
            version=int(p["version"]),
            weight=None if p.get("weight") is None else float(p["weight"]),
        )
        for p in front.get("parents", ())
    )
    return Datasheet(
        name=front["name"],
        domain=front["domain"],
        license=front["license"],
        language=_as_tuple(front["language"]),
        sources=sources,
        # JSON Schema counts 5.0 as an integer; the typed field is a Python int.
        token_count=int(front["token_count"]),
        pii_handling=front["pii_handling"],
        intended_uses=_as_tuple(front["intended_uses"]),
        contact=front["contact"],
        samples=tuple(front["samples"]),
        out_of_scope_uses=_as_tuple(front.get("out_of_scope_uses")),
        collection=front.get("collection"),
        parents=parents,
        tags=tuple(front.get("tags", ())),
        extensions={k: v for k, v in front.items() if k.startswith("x-")},
        body=body,
        front_matter=front,
    )
