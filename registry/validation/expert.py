"""Experts checked against their base model's ``expert_schema`` (contracts A and B).

An expert is accepted only if, in this order: it is within the size limit; its safetensors
framing is exact; ``__metadata__`` says ``format = agora.expert/1`` and pins the base
revision it was submitted for; ``layers``/``n_modules``/``dtype`` are well formed, and
every declared layer is one the schema has tensors for (and, if the schema states
``layers``, one of those); the tensor names and shapes are exactly the schema's tensors of
the declared layers (an expert may cover some layers only: docs/composition.md, "Experts
in some layers only"); ``layers`` is the ascending list of the layers the tensor names
hold (and ``n_modules`` their module count), whether or not the schema states them; all
tensors share one dtype the base allows (and the metadata names); and every value is
finite. Pure functions: no torch,
no database; the caller resolves the base revision and passes its schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from registry.validation.codes import ErrorCode, invalid, shorten, too_large
from registry.validation.safetensors_format import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    find_non_finite,
    read_header,
)

EXPERT_FORMAT = "agora.expert/1"
# Expert dtype names (contract A/B spelling) -> safetensors dtype strings.
EXPERT_DTYPES: Mapping[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_SAFETENSORS_TO_NAME: Mapping[str, str] = {v: k for k, v in EXPERT_DTYPES.items()} | {
    "F64": "float64"
}
DEFAULT_MAX_EXPERT_BYTES = 2 * 1024**3

_POSITIVE_DECIMAL = re.compile(r"[1-9][0-9]{0,8}")
# Tensor names place a tensor in a layer (and a module): layers.{i}.[modules.{j}.]...
# (modelcore/experts.py). ASCII digits only, and few of them: int() of a name's digits
# is cheap and never refused.
_LAYER_NAME = re.compile(r"layers\.([0-9]{1,9})\.")
_MODULE_NAME = re.compile(r"layers\.([0-9]{1,9})\.modules\.([0-9]{1,9})\.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertSchema:
    """The exact tensor set of a one-module expert for one base revision."""

    dtypes: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    layers: tuple[int, ...] | None = None  # when the base states which layers experts cover
    n_modules: int = 1
    format: str = EXPERT_FORMAT

    @classmethod
    def from_dict(cls, obj: Any, *, path: str = "$.expert_schema") -> ExpertSchema:
        """Parse and check a config's ``expert_schema``; every problem is listed."""
        problems: list[dict[str, Any]] = []

        def bad(where: str, message: str) -> None:
            problems.append({"path": f"{path}{where}", "message": message})

        if not isinstance(obj, dict):
            raise invalid(
                ErrorCode.EXPERT_SCHEMA_INVALID,
                "expert_schema must be an object",
                [{"path": path, "message": f"found {type(obj).__name__}"}],
            )
        if obj.get("format") != EXPERT_FORMAT:
            bad(".format", f"must be {EXPERT_FORMAT!r}")
        dtypes = obj.get("dtypes")
        if not isinstance(dtypes, list) or not dtypes:
            bad(".dtypes", f"must be a non-empty list drawn from {sorted(EXPERT_DTYPES)}")
            dtypes = []
        else:
            for i, d in enumerate(dtypes):
                if d not in EXPERT_DTYPES:
                    bad(
                        f".dtypes[{i}]",
                        f"{shorten(repr(d), 40)} is not one of {sorted(EXPERT_DTYPES)}",
                    )
                elif dtypes.index(d) != i:
                    bad(f".dtypes[{i}]", f"{d!r} is listed twice")
        specs: list[TensorSpec] = []
        tensors = obj.get("tensors")
        if not isinstance(tensors, list) or not tensors:
            bad(".tensors", "must be a non-empty list of {name, shape} objects")
            tensors = []
        seen: set[str] = set()
        for i, t in enumerate(tensors):
            where = f".tensors[{i}]"
            if not isinstance(t, dict):
                bad(where, "must be an object with name and shape")
                continue
            name, shape = t.get("name"), t.get("shape")
            ok = True
            if not isinstance(name, str) or not name or name == "__metadata__":
                bad(f"{where}.name", "must be a non-empty string other than __metadata__")
                ok = False
            elif name in seen:
                bad(f"{where}.name", f"{shorten(name)!r} is listed twice")
                ok = False
            if (
                not isinstance(shape, list)
                or not shape
                or not all(_is_int(d) and d > 0 for d in shape)
            ):
                bad(f"{where}.shape", "must be a non-empty list of positive integers")
                ok = False
            if ok and isinstance(name, str) and isinstance(shape, list):
                seen.add(name)
                specs.append(TensorSpec(name, tuple(shape)))
        layers = obj.get("layers")
        if layers is not None and (
            not isinstance(layers, list)
            or not all(_is_int(i) and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)
        ):
            bad(".layers", "must be a list of distinct non-negative integers")
        n_modules = obj.get("n_modules", 1)
        if not _is_int(n_modules) or n_modules < 1:
            bad(".n_modules", "must be a positive integer")
        if problems:
            raise invalid(ErrorCode.EXPERT_SCHEMA_INVALID, "expert_schema is invalid", problems)
        return cls(
            dtypes=tuple(dtypes),
            tensors=tuple(specs),
            layers=None if layers is None else tuple(layers),
            n_modules=n_modules,
        )

    def tensor_layers(self) -> list[int]:
        """The layers the schema has tensors for (``layers.{i}.`` names), ascending."""
        return sorted(
            {int(m.group(1)) for t in self.tensors if (m := _LAYER_NAME.match(t.name)) is not None}
        )

    def for_layers(self, layers: tuple[int, ...]) -> tuple[TensorSpec, ...]:
        """The tensors an expert covering ``layers`` holds: the schema's tensors of those
        layers (and any tensor named outside a layer, which every expert holds)."""
        chosen = set(layers)
        out = []
        for t in self.tensors:
            m = _LAYER_NAME.match(t.name)
            if m is None or int(m.group(1)) in chosen:
                out.append(t)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "dtypes": list(self.dtypes),
            "tensors": [{"name": t.name, "shape": list(t.shape)} for t in self.tensors],
        }
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.n_modules != 1:
            out["n_modules"] = self.n_modules
        return out


@dataclass(frozen=True)
class ExpertInfo:
    """What validation learned about an accepted expert file."""

    size: int
    base_revision: str
    layers: tuple[int, ...]
    n_modules: int
    dtype: str
    metadata: Mapping[str, str]
    tensors: tuple[TensorInfo, ...]

    @property
    def n_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)


def validate_expert(
    path: str | os.PathLike[str],
    *,
    expert_schema: ExpertSchema | Mapping[str, Any],
    base_revision: str,
    max_bytes: int = DEFAULT_MAX_EXPERT_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ExpertInfo:
    """Accept the expert file at ``path`` for ``base_revision`` or raise with its code.

    ``base_revision`` is the form field the contributor submitted with the file; the caller
    has already checked that a base with that revision exists and passes its schema.
    """
    schema = (
        expert_schema
        if isinstance(expert_schema, ExpertSchema)
        else ExpertSchema.from_dict(expert_schema)
    )
    size = os.stat(path).st_size
    if size > max_bytes:
        raise too_large(
            ErrorCode.EXPERT_TOO_LARGE, f"the expert is {size} bytes; the limit is {max_bytes}"
        )
    header = read_header(path, max_header_bytes=max_header_bytes)
    layers, n_modules, meta_dtype = _check_metadata(header, schema, base_revision)
    _check_tensors(header, schema, layers)
    _check_metadata_against_names(header, layers, n_modules)
    dtype = _check_dtypes(header, schema, meta_dtype)
    non_finite = find_non_finite(path, header, chunk_bytes=chunk_bytes)
    if non_finite:
        raise invalid(
            ErrorCode.NON_FINITE_VALUES,
            f"{sum(non_finite.values())} NaN or infinite values in {len(non_finite)} tensor(s)",
            [
                {"tensor": name, "count": count, "message": f"{count} NaN/inf values"}
                for name, count in non_finite.items()
            ],
        )
    return ExpertInfo(
        size=size,
        base_revision=base_revision,
        layers=layers,
        n_modules=n_modules,
        dtype=dtype,
        metadata=header.metadata,
        tensors=header.tensors,
    )


def _check_metadata(
    header: SafetensorsHeader, schema: ExpertSchema, base_revision: str
) -> tuple[tuple[int, ...], int, str]:
    meta = header.metadata
    fmt = meta.get("format")
    if fmt != EXPERT_FORMAT:
        found = "no format" if fmt is None else f"format {shorten(fmt, 60)!r}"
        raise invalid(
            ErrorCode.WRONG_FORMAT,
            f"__metadata__ has {found}; an Agora expert has format {EXPERT_FORMAT!r}",
        )
    claimed = meta.get("base_revision")
    if claimed != base_revision:
        found = "no base_revision" if claimed is None else f"base_revision {shorten(claimed, 80)!r}"
        raise invalid(
            ErrorCode.BASE_REVISION_MISMATCH,
            f"__metadata__ has {found}, but the expert was submitted for {base_revision!r}",
        )
    problems: list[dict[str, Any]] = []
    layers: tuple[int, ...] = ()
    try:
        parsed = json.loads(meta.get("layers", ""))
    except (ValueError, RecursionError):
        parsed = None
    if (
        not isinstance(parsed, list)
        or not parsed
        or not all(_is_int(i) and i >= 0 for i in parsed)
        or len(set(parsed)) != len(parsed)
    ):
        message = 'must be a JSON list of distinct non-negative integers, e.g. "[0,1]"'
        problems.append({"key": "layers", "message": message})
    else:
        layers = tuple(parsed)
        # A subset of the base's layers (docs/composition.md, "Experts in some layers
        # only"): each one the schema has tensors for, and one it allows if it says.
        known = schema.tensor_layers()
        allowed = known if schema.layers is None else sorted(set(known) & set(schema.layers))
        allowed_set = set(allowed)  # a long list in the metadata is checked in linear time
        absent = [i for i in layers if i not in allowed_set]
        if absent:
            if absent[0] not in known:
                why = f"the base's expert_schema has tensors for layers {known} only"
            else:
                why = f"the base's experts may cover layers {allowed} only"
            problems.append(
                {
                    "key": "layers",
                    "message": f"layer {absent[0]} is not a layer of the base: {why}; "
                    "list only the layers whose tensors the file holds",
                }
            )
    n_modules = 0
    raw_n = meta.get("n_modules", "")
    if not _POSITIVE_DECIMAL.fullmatch(raw_n):
        problems.append({"key": "n_modules", "message": 'must be a positive integer, e.g. "1"'})
    else:
        n_modules = int(raw_n)
        if n_modules != schema.n_modules:
            problems.append(
                {
                    "key": "n_modules",
                    "message": f"the base's expert schema is for {schema.n_modules} module(s)",
                }
            )
    meta_dtype = meta.get("dtype", "")
    if meta_dtype not in _SAFETENSORS_TO_NAME.values():
        problems.append(
            {
                "key": "dtype",
                "message": f"must name the tensors' dtype, one of {sorted(EXPERT_DTYPES)}",
            }
        )
    if problems:
        raise invalid(ErrorCode.METADATA_INVALID, "__metadata__ is invalid", problems)
    return layers, n_modules, meta_dtype


def _check_metadata_against_names(
    header: SafetensorsHeader, layers: tuple[int, ...], n_modules: int
) -> None:
    """``layers`` and ``n_modules`` must say what the tensor names say, whatever the base's
    schema states: the worker reads the file's layers from its names and refuses a file
    whose metadata differs (modelcore/experts.py, ``load_expert``), so an expert accepted
    with other metadata would fail every job that uses it."""
    covered = sorted(
        {int(m.group(1)) for t in header.tensors if (m := _LAYER_NAME.match(t.name)) is not None}
    )
    problems: list[dict[str, Any]] = []
    if list(layers) != covered:
        problems.append(
            {
                "key": "layers",
                "message": f"must be {json.dumps(covered)}: the layers the tensor names "
                "hold, ascending",
            }
        )
    modules: dict[int, set[int]] = {}
    for t in header.tensors:
        m = _MODULE_NAME.match(t.name)
        if m is not None:
            modules.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    wrong = sorted(i for i, found in modules.items() if found != set(range(n_modules)))
    if wrong:
        problems.append(
            {
                "key": "n_modules",
                "message": f"the tensor names of layer {wrong[0]} hold modules "
                f"{sorted(modules[wrong[0]])}, not 0 to {n_modules - 1}",
            }
        )
    if problems:
        raise invalid(
            ErrorCode.METADATA_INVALID,
            "__metadata__ disagrees with the tensors in the file",
            problems,
        )


def _check_tensors(
    header: SafetensorsHeader, schema: ExpertSchema, layers: tuple[int, ...]
) -> None:
    """The tensors must be exactly the schema's tensors of the declared ``layers``."""
    present = header.by_name()
    specs = schema.for_layers(layers)
    expected = {t.name: t for t in specs}
    in_schema = {t.name for t in schema.tensors}
    declared = json.dumps(sorted(layers))
    missing = [n for n in expected if n not in present]
    unexpected = sorted(n for n in present if n not in expected)
    if missing or unexpected:
        raise invalid(
            ErrorCode.TENSOR_SET_MISMATCH,
            f"tensor names differ from the base's expert_schema for the declared layers "
            f"{declared}: {len(missing)} missing, {len(unexpected)} unexpected",
            [
                {
                    "tensor": n,
                    "problem": "missing",
                    "message": f"required by the base for the declared layers {declared}",
                }
                for n in missing
            ]
            + [
                {
                    "tensor": shorten(n),
                    "problem": "unexpected",
                    "message": (
                        f"in a layer __metadata__ layers {declared} does not declare"
                        if n in in_schema
                        else "not in the schema"
                    ),
                }
                for n in unexpected
            ],
        )
    wrong = [
        {
            "tensor": spec.name,
            "expected": list(spec.shape),
            "actual": list(present[spec.name].shape),
            "message": f"shape {list(present[spec.name].shape)}, expected {list(spec.shape)}",
        }
        for spec in specs
        if present[spec.name].shape != spec.shape
    ]
    if wrong:
        raise invalid(
            ErrorCode.TENSOR_SHAPE_MISMATCH,
            f"{len(wrong)} tensor shape(s) differ from the base's expert_schema",
            wrong,
        )


def _check_dtypes(header: SafetensorsHeader, schema: ExpertSchema, meta_dtype: str) -> str:
    by_dtype: dict[str, list[str]] = {}
    for t in header.tensors:
        by_dtype.setdefault(t.dtype, []).append(t.name)
    if len(by_dtype) > 1:
        raise invalid(
            ErrorCode.MIXED_DTYPES,
            f"an expert has one dtype; found {sorted(by_dtype)}",
            [
                {"dtype": d, "count": len(names), "example": names[0]}
                for d, names in sorted(by_dtype.items())
            ],
        )
    (st_dtype,) = by_dtype
    name = _SAFETENSORS_TO_NAME.get(st_dtype, st_dtype)
    if name not in schema.dtypes:
        raise invalid(
            ErrorCode.DTYPE_NOT_ALLOWED,
            f"tensors are {name}; the base allows {list(schema.dtypes)}",
        )
    if meta_dtype != name:
        raise invalid(
            ErrorCode.METADATA_INVALID,
            f"__metadata__ dtype is {meta_dtype!r} but the tensors are {name}",
            [{"key": "dtype", "message": f"the tensors are {name}"}],
        )
    return name
