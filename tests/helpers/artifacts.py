"""Numpy-only factories for Agora's artifacts: base bundles, experts and datasheets.

Valid by default; the ``*_overrides`` arguments make them invalid in one chosen way, so a
test states exactly which rule it breaks. Nothing here imports torch or the registry: the
safetensors bytes are written by hand (the format is an 8-byte little-endian header length,
a JSON header, then the raw tensor bytes), which also lets tests write bfloat16 without torch.

Usage from any test (pytest puts ``tests/`` on ``sys.path``)::

    from helpers.artifacts import make_base_files, base_revision, make_expert_schema, write_expert
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

EXPERT_FORMAT = "agora.expert/1"
ALL_EXPERT_DTYPES = ("float32", "bfloat16", "float16")

# Multipart field of POST /v1/base-models -> file name in the revision manifest (contract A).
BASE_FILE_FIELDS = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "weights": "model.safetensors",
}

_NUMPY_TO_ST = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
_EXPERT_DTYPE_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True)
class RawTensor:
    """A tensor given as its safetensors dtype string, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


TensorLike = np.ndarray | RawTensor


def bf16(values: np.ndarray) -> RawTensor:
    """float32 values -> bfloat16 (round to nearest even), as the top 16 bits of each float32."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    # NaN must stay NaN: rounding can carry a NaN's mantissa into the sign bit otherwise.
    nan = np.isnan(f32)
    rounded[nan] = 0x7FC0
    return RawTensor("BF16", tuple(f32.shape), rounded.astype("<u2").tobytes())


def _as_raw(value: TensorLike) -> RawTensor:
    if isinstance(value, RawTensor):
        return value
    arr = np.ascontiguousarray(value)
    st = _NUMPY_TO_ST.get(arr.dtype)
    if st is None:
        raise ValueError(f"no safetensors dtype for numpy dtype {arr.dtype}")
    return RawTensor(st, tuple(arr.shape), arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def _header_bytes(tensors: Mapping[str, RawTensor], metadata: Mapping[str, Any] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, raw in tensors.items():
        header[name] = {
            "dtype": raw.dtype,
            "shape": list(raw.shape),
            "data_offsets": [offset, offset + len(raw.data)],
        }
        offset += len(raw.data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so the data section starts 8-byte aligned.
    return encoded + b" " * (-len(encoded) % 8)


def encode_safetensors(
    tensors: Mapping[str, TensorLike], metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (in the given order) and metadata."""
    raws = {name: _as_raw(t) for name, t in tensors.items()}
    header = _header_bytes(raws, metadata)
    return b"".join([struct.pack("<Q", len(header)), header, *(r.data for r in raws.values())])


def write_safetensors(
    path: str | Path, tensors: Mapping[str, TensorLike], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a safetensors file tensor by tensor (never the whole file in memory at once)."""
    path = Path(path)
    raws = {name: _as_raw(t) for name, t in tensors.items()}
    header = _header_bytes(raws, metadata)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for raw in raws.values():
            f.write(raw.data)
    return path


def raw_safetensors(header: Mapping[str, Any] | bytes, data: bytes = b"") -> bytes:
    """Safetensors-shaped bytes around any header, broken or not (for malformed-file tests).

    ``header`` is a JSON-able mapping or the exact header bytes; nothing is checked.
    """
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


# --------------------------------------------------------------------------- base model


def make_expert_schema(
    n_layers: int = 2,
    d_model: int = 16,
    d_ffn: int = 32,
    *,
    layers: Iterable[int] | None = None,
    dtypes: Iterable[str] = ALL_EXPERT_DTYPES,
) -> dict[str, Any]:
    """Contract A's ``expert_schema``: one feed-forward module (and its router row) per layer.

    Per covered layer ``i``: ``w_in`` (F, D) and ``w_out`` (D, F) of the module, and the
    router row (1, D) that routes tokens to it (ModuleFormer section 4.3).
    """
    covered = list(range(n_layers)) if layers is None else list(layers)
    tensors: list[dict[str, Any]] = []
    for i in covered:
        tensors += [
            {"name": f"layers.{i}.moe.module.w_in", "shape": [d_ffn, d_model]},
            {"name": f"layers.{i}.moe.module.w_out", "shape": [d_model, d_ffn]},
            {"name": f"layers.{i}.moe.router_row", "shape": [1, d_model]},
        ]
    return {"format": EXPERT_FORMAT, "dtypes": list(dtypes), "tensors": tensors}


def make_base_config(expert_schema: Mapping[str, Any], **extra: Any) -> bytes:
    """config.json bytes: a small architecture description plus the expert schema."""
    d_model = 16
    n_layers = 0
    for t in expert_schema.get("tensors", []):
        m = re.match(r"layers\.(\d+)\.", str(t.get("name", "")))
        if m:
            n_layers = max(n_layers, int(m.group(1)) + 1)
        if str(t.get("name", "")).endswith("router_row"):
            d_model = int(t["shape"][-1])
    config: dict[str, Any] = {
        "architecture": "moduleformer",
        "vocab_size": 64,
        "n_layers": n_layers,
        "d_model": d_model,
        "expert_schema": dict(expert_schema),
    }
    config.update(extra)
    return json.dumps(config, indent=2, sort_keys=True).encode("utf-8")


def make_tokenizer_json(vocab_size: int = 64) -> bytes:
    """A tiny word-level tokenizer in the Hugging Face ``tokenizers`` JSON format."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    return json.dumps(tokenizer, indent=2).encode("utf-8")


def make_base_files(
    expert_schema: Mapping[str, Any] | None = None, *, seed: int = 0, **config_extra: Any
) -> dict[str, bytes]:
    """The three files of a base revision, keyed by their manifest names (contract A).

    Map them to multipart fields with ``BASE_FILE_FIELDS`` (``config``, ``tokenizer``, ``weights``).
    """
    schema = make_expert_schema() if expert_schema is None else expert_schema
    config = make_base_config(schema, **config_extra)
    parsed = json.loads(config)
    vocab, d_model = int(parsed["vocab_size"]), int(parsed["d_model"])
    rng = np.random.default_rng(seed)
    weights: dict[str, TensorLike] = {
        "embed.weight": rng.standard_normal((vocab, d_model), dtype=np.float32) * 0.02,
    }
    for i in range(int(parsed["n_layers"])):
        weights[f"layers.{i}.attn.w_qkv"] = (
            rng.standard_normal((3 * d_model, d_model), dtype=np.float32) * 0.02
        )
    return {
        "config.json": config,
        "tokenizer.json": make_tokenizer_json(vocab),
        "model.safetensors": encode_safetensors(weights, {"format": "pt"}),
    }


def base_revision(files: Mapping[str, bytes]) -> str:
    """Contract A: sha256 of the canonical manifest of the three files' sha256 hex digests."""
    manifest = {name: hashlib.sha256(files[name]).hexdigest() for name in BASE_FILE_FIELDS.values()}
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


# --------------------------------------------------------------------------- experts


def _schema_layers(expert_schema: Mapping[str, Any]) -> list[int]:
    if "layers" in expert_schema:
        return [int(i) for i in expert_schema["layers"]]
    found = {
        int(m.group(1))
        for t in expert_schema["tensors"]
        if (m := re.match(r"layers\.(\d+)\.", str(t["name"])))
    }
    return sorted(found)


def expert_tensors(
    expert_schema: Mapping[str, Any], *, dtype: str = "float32", seed: int = 0
) -> dict[str, TensorLike]:
    """Small random (finite) values for every tensor of the schema, in ``dtype``."""
    rng = np.random.default_rng(seed)
    out: dict[str, TensorLike] = {}
    for spec in expert_schema["tensors"]:
        values = rng.standard_normal(tuple(spec["shape"]), dtype=np.float32) * 0.02
        if dtype == "bfloat16":
            out[spec["name"]] = bf16(values)
        elif dtype in ("float32", "float16", "float64"):
            out[spec["name"]] = values.astype(dtype)
        else:
            raise ValueError(f"unsupported expert dtype {dtype!r}")
    return out


def expert_metadata(
    expert_schema: Mapping[str, Any], *, base_revision: str, dtype: str = "float32"
) -> dict[str, str]:
    """Contract B's ``__metadata__`` for a one-module expert of this schema."""
    return {
        "format": EXPERT_FORMAT,
        "base_revision": base_revision,
        "layers": json.dumps(_schema_layers(expert_schema), separators=(",", ":")),
        "n_modules": str(expert_schema.get("n_modules", 1)),
        "dtype": dtype,
    }


def make_expert_bytes(
    expert_schema: Mapping[str, Any],
    *,
    base_revision: str,
    dtype: str = "float32",
    seed: int = 0,
    metadata_overrides: Mapping[str, Any] | None = None,
    tensor_overrides: Mapping[str, TensorLike | None] | None = None,
) -> bytes:
    """The bytes of an expert file; see ``write_expert`` for the overrides."""
    metadata, tensors = _expert_parts(
        expert_schema, base_revision, dtype, seed, metadata_overrides, tensor_overrides
    )
    return encode_safetensors(tensors, metadata)


def write_expert(
    path: str | Path,
    expert_schema: Mapping[str, Any],
    *,
    base_revision: str,
    dtype: str = "float32",
    seed: int = 0,
    metadata_overrides: Mapping[str, Any] | None = None,
    tensor_overrides: Mapping[str, TensorLike | None] | None = None,
) -> Path:
    """Write an expert that is valid for ``expert_schema`` and ``base_revision`` by default.

    ``metadata_overrides``: key -> new value (any JSON value, so non-strings can be tested),
    or ``None`` to drop the key. ``tensor_overrides``: name -> numpy array / ``RawTensor``
    (written in its own dtype; use ``bf16(...)`` for bfloat16), or ``None`` to drop the tensor.
    """
    metadata, tensors = _expert_parts(
        expert_schema, base_revision, dtype, seed, metadata_overrides, tensor_overrides
    )
    return write_safetensors(path, tensors, metadata)


def _expert_parts(
    expert_schema: Mapping[str, Any],
    base_revision: str,
    dtype: str,
    seed: int,
    metadata_overrides: Mapping[str, Any] | None,
    tensor_overrides: Mapping[str, TensorLike | None] | None,
) -> tuple[dict[str, Any], dict[str, TensorLike]]:
    metadata: dict[str, Any] = expert_metadata(
        expert_schema, base_revision=base_revision, dtype=dtype
    )
    for key, value in (metadata_overrides or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    tensors = expert_tensors(expert_schema, dtype=dtype, seed=seed)
    for name, tensor in (tensor_overrides or {}).items():
        if tensor is None:
            tensors.pop(name, None)
        else:
            tensors[name] = tensor
    return metadata, tensors


# --------------------------------------------------------------------------- datasheets


def datasheet_front_matter(**overrides: Any) -> dict[str, Any]:
    """A valid datasheet's front matter; an override of ``None`` removes that key."""
    front: dict[str, Any] = {
        "name": "Tide-pool ecology notes",
        "domain": "Field notes and short articles about intertidal ecology and marine life.",
        "license": "CC-BY-4.0",
        "language": ["en"],
        "sources": [
            {
                "name": "Coastal field notebooks",
                "url": "https://example.org/tidepools",
                "description": "Transcribed observation logs, 2019-2024.",
            }
        ],
        "collection": "Transcribed by volunteers; deduplicated by exact paragraph hash.",
        "token_count": 1_250_000,
        "pii_handling": "Observer names and GPS traces removed before tokenization.",
        "intended_uses": ["Language modelling of marine-biology field notes"],
        "out_of_scope_uses": ["Species identification for safety decisions"],
        "contact": "mailto:tidepools@example.org",
        "samples": [
            "At low tide the ochre sea stars cling to the mussel beds on the north face.",
            "Anemones closed within minutes once the shade moved off the pool.",
        ],
        "tags": ["ecology", "marine-biology"],
    }
    for key, value in overrides.items():
        if value is None:
            front.pop(key, None)
        else:
            front[key] = value
    return front


def make_datasheet(*, body: str | None = None, **overrides: Any) -> bytes:
    """Markdown datasheet bytes with YAML front matter, valid unless ``overrides`` break it."""
    front = datasheet_front_matter(**overrides)
    text = (
        body
        if body is not None
        else (f"# {front.get('name', 'Expert')}\n\nAn expert for intertidal ecology field notes.\n")
    )
    yaml_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{yaml_text}---\n\n{text}".encode()
