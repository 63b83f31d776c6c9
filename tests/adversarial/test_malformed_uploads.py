"""Malformed uploads: broken safetensors, smuggled formats and hostile datasheets, all refused.

Every case is invalid by construction (each breaks one stated rule of docs/validation.md,
drawn with random parameters by hypothesis), and each is submitted as ``POST /v1/experts``
would process it. The figures: N tried, 0 accepted, 0 server errors (anything but a 4xx
problem with a ``code``), 0 blobs, staging files or rows left, 0 calls to an unpickler.

- In process, the bulk: ``registry.services.experts.validate_submission``, the function the
  upload route calls on the staged files, for every family; each refusal is also rendered
  by the app's problem+json renderer (an error quoting unencodable input would be a 500).
- Through HTTP, a sample of every family: the real app (TestClient, lifespan) on SQLite and
  on PostgreSQL, a contributor token, then a check of every table, the blob store and the
  staging directory against their state before the run.

For the whole module ``pickle``/``_pickle`` loads, ``Unpickler``, ``numpy.load`` with
``allow_pickle`` and (when torch is loaded) ``torch.load`` raise and record the call;
torch not loaded before must still not be loaded after. Heavier run, printing the figures
(docs/reliability.md)::

    AGORA_ADVERSARIAL=heavy .venv/bin/pytest -s tests/adversarial/test_malformed_uploads.py
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import struct
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.adversarial import report, scaled
from helpers.artifacts import (
    RawTensor,
    base_revision,
    bf16,
    make_base_files,
    make_datasheet,
    make_expert_bytes,
    make_expert_schema,
    raw_safetensors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The base every case is submitted against: the schema the registry tests' ``base`` uses.
SCHEMA = make_expert_schema()
BASE_FILES = make_base_files(SCHEMA)
REVISION = base_revision(BASE_FILES)
VALID = make_expert_bytes(SCHEMA, base_revision=REVISION)
VALID_SHEET = make_datasheet()


def split(file: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", file[:8])
    return json.loads(file[8 : 8 + n]), file[8 + n :]


def frame(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return raw_safetensors(raw, data)


VALID_HEADER, VALID_DATA = split(VALID)
NAMES = [name for name in VALID_HEADER if name != "__metadata__"]


@dataclass(frozen=True)
class Case:
    family: str
    weights: bytes
    datasheet: bytes = VALID_SHEET

    def __repr__(self) -> str:  # what a failure report needs, not megabytes
        sheet = "valid" if self.datasheet == VALID_SHEET else repr(self.datasheet[:600])
        return f"Case({self.family}, weights={self.weights[:300]!r}..., datasheet={sheet})"


# --------------------------------------------------------------------------- the families


def _header_text() -> bytes:
    (n,) = struct.unpack("<Q", VALID[:8])
    return VALID[8 : 8 + n]


_STRING = re.compile(rb'"[^"\\]*"')


def _insert_into_a_string(draw: Any, insert: bytes) -> bytes:
    """The valid header with ``insert`` placed inside one of its JSON strings."""
    header = _header_text()
    spans = [m.span() for m in _STRING.finditer(header)]
    begin, end = draw(st.sampled_from(spans))
    at = draw(st.integers(begin + 1, end - 1))
    return header[:at] + insert + header[at:]


def _pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object written from pairs, repeats included."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


@st.composite
def length_lie(draw: Any) -> Case:
    n = len(_header_text())
    lie = draw(
        st.one_of(
            st.sampled_from([0, 1, 2, 7, 8, 2**63, 2**64 - 1]),
            st.integers(1, n).map(lambda k: n - k),
            st.integers(1, 64).map(lambda k: n + k),
            st.integers(len(VALID) - 7, 2**64 - 1),
        )
    )
    return Case("length_lie", struct.pack("<Q", lie) + VALID[8:])


@st.composite
def not_an_object(draw: Any) -> Case:
    header = _header_text()
    prefix = draw(
        st.one_of(
            st.sampled_from([b" ", b"\t", b"\n", b"\r", b"\xef\xbb\xbf", b"[", b"\x00", b"}"]),
            st.binary(min_size=1, max_size=4).filter(lambda b: not b.startswith(b"{")),
        )
    )
    whole = draw(st.booleans())
    if whole:  # a header that is some other JSON value, or no JSON at all
        other = draw(st.sampled_from([b"[]", b"null", b'"{}"', b"1", b"true", b"", b"{"]))
        return Case("not_an_object", frame(other, VALID_DATA))
    return Case("not_an_object", frame(prefix + header, VALID_DATA))


@st.composite
def invalid_utf8(draw: Any) -> Case:
    bad = draw(
        st.sampled_from(
            [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
        )
    )
    return Case("invalid_utf8", frame(_insert_into_a_string(draw, bad), VALID_DATA))


@st.composite
def lone_surrogate(draw: Any) -> Case:
    unit = draw(st.integers(0xD800, 0xDFFF))
    escape = b"\\u%04x" % unit
    if draw(st.booleans()):
        escape = escape.upper().replace(b"\\U", b"\\u")
    return Case("lone_surrogate", frame(_insert_into_a_string(draw, escape), VALID_DATA))


@st.composite
def duplicate_key(draw: Any) -> Case:
    pairs = list(VALID_HEADER.items())
    where = draw(st.sampled_from(["tensor", "metadata", "entry", "__metadata__"]))
    if where == "tensor":
        name = draw(st.sampled_from(NAMES))
        entry = dict(VALID_HEADER[name])
        if draw(st.booleans()):
            entry = {**entry, "shape": [1]}
        pairs.insert(draw(st.integers(0, len(pairs))), (name, entry))
        return Case("duplicate_key", frame(_pairs(pairs), VALID_DATA))
    if where == "__metadata__":
        pairs.append(("__metadata__", {"format": "x"}))
        return Case("duplicate_key", frame(_pairs(pairs), VALID_DATA))
    if where == "metadata":
        meta = list(VALID_HEADER["__metadata__"].items())
        meta.append(draw(st.sampled_from(meta)))
        target, inner = "__metadata__", _pairs(meta)
    else:  # a key repeated inside one tensor entry
        target = draw(st.sampled_from(NAMES))
        entry = list(VALID_HEADER[target].items())
        entry.append(draw(st.sampled_from(entry)))
        inner = _pairs(entry)
    text = b",".join(
        json.dumps(k).encode() + b":" + (inner if k == target else json.dumps(v).encode())
        for k, v in VALID_HEADER.items()
    )
    return Case("duplicate_key", frame(b"{" + text + b"}", VALID_DATA))


def _tensors() -> list[tuple[str, dict[str, Any]]]:
    """The valid header's entries in data order."""
    return sorted(
        ((n, VALID_HEADER[n]) for n in NAMES), key=lambda item: item[1]["data_offsets"][0]
    )


def _relaid(
    shift: Callable[[int, str], int], data: bytes, extra: dict[str, Any] | None = None
) -> bytes:
    header = {"__metadata__": VALID_HEADER["__metadata__"]}
    for i, (name, entry) in enumerate(_tensors()):
        begin, end = entry["data_offsets"]
        header[name] = {**entry, "data_offsets": [begin + shift(i, name), end + shift(i, name)]}
    header.update(extra or {})
    return frame(header, data)


@st.composite
def gap(draw: Any) -> Case:
    order = _tensors()
    i = draw(st.integers(0, len(order)))  # bytes inserted before tensor i (or at the end)
    size = draw(st.integers(1, 64))
    at = order[i][1]["data_offsets"][0] if i < len(order) else len(VALID_DATA)
    filler = draw(st.binary(min_size=size, max_size=size))
    data = VALID_DATA[:at] + filler + VALID_DATA[at:]
    return Case("gap", _relaid(lambda j, _: size if j >= i else 0, data))


@st.composite
def overlap(draw: Any) -> Case:
    order = _tensors()
    i = draw(st.integers(1, len(order) - 1))
    previous = order[i - 1][1]["data_offsets"]
    k = draw(st.integers(1, previous[1] - previous[0]))
    at = order[i][1]["data_offsets"][0]
    data = VALID_DATA[: at - k] + VALID_DATA[at:]
    if draw(st.booleans()):  # or an extra name aliasing an existing tensor's bytes
        name, entry = draw(st.sampled_from(order))
        return Case("overlap", _relaid(lambda j, _: 0, VALID_DATA, {name + ".alias": entry}))
    return Case("overlap", _relaid(lambda j, _: -k if j >= i else 0, data))


@st.composite
def trailing(draw: Any) -> Case:
    tail = draw(
        st.one_of(
            st.binary(min_size=1, max_size=256),
            st.just(b"\x00"),
            st.integers(0, 5).map(lambda p: pickle.dumps({"w": [1.0]}, protocol=p)),
            st.just(VALID),
        )
    )
    return Case("trailing", VALID + tail)


@st.composite
def truncated(draw: Any) -> Case:
    return Case("truncated", VALID[: draw(st.integers(0, len(VALID) - 1))])


def _with_entry(name: str, **changes: Any) -> dict[str, Any]:
    header = json.loads(json.dumps(VALID_HEADER))
    header[name].update(changes)
    return header


@st.composite
def offsets_out_of_range(draw: Any) -> Case:
    name = draw(st.sampled_from(NAMES))
    begin, end = VALID_HEADER[name]["data_offsets"]
    total = len(VALID_DATA)
    offsets = draw(
        st.sampled_from(
            [
                [end, begin],
                [begin, end + total],
                [begin + total, end + total],
                [-1, end],
                [begin, -end],
                [begin, 2**64],
                [2**64, 2**64 + end - begin],
                [2**70, 2**70],
                [begin, end, end],
                [begin],
                [],
                [float(begin), float(end)],
                [str(begin), end],
                [begin, None],
                [True, end],
                None,
                f"{begin}-{end}",
            ]
        )
    )
    return Case("offsets_out_of_range", frame(_with_entry(name, data_offsets=offsets), VALID_DATA))


@st.composite
def overflowing_shape(draw: Any) -> Case:
    name = draw(st.sampled_from(NAMES))
    shape = draw(
        st.one_of(
            st.sampled_from(
                [
                    [2**32, 2**32],
                    [2**63],
                    [2**64 + 1],
                    [0, 2**64],
                    [2**62, 0],
                    [2**40, 2**40, 0],
                    [2**21] * 3,
                    [1] * 33,
                    [1] * 65,
                    [10**30, 0],
                ]
            ),
            st.lists(st.integers(2**16, 2**40), min_size=2, max_size=4).filter(
                lambda dims: int(np.prod([float(d) for d in dims])) > 2**63
            ),
        )
    )
    return Case("overflowing_shape", frame(_with_entry(name, shape=shape), VALID_DATA))


@st.composite
def size_disagreement(draw: Any) -> Case:
    name = draw(st.sampled_from(NAMES))
    entry = VALID_HEADER[name]
    how = draw(st.sampled_from(["dim", "dtype", "transpose", "rank"]))
    if how == "dim":
        i = draw(st.integers(0, len(entry["shape"]) - 1))
        shape = list(entry["shape"])
        shape[i] = draw(st.integers(0, 3 * shape[i]).filter(lambda d: d != shape[i]))
        return Case("size_disagreement", frame(_with_entry(name, shape=shape), VALID_DATA))
    if how == "dtype":
        dtype = draw(st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "C64"]))
        return Case("size_disagreement", frame(_with_entry(name, dtype=dtype), VALID_DATA))
    if how == "transpose":  # the same byte count in the wrong shape
        return Case(
            "size_disagreement",
            frame(_with_entry(name, shape=list(reversed(entry["shape"]))), VALID_DATA),
        )
    numel = int(np.prod(entry["shape"]))
    return Case("size_disagreement", frame(_with_entry(name, shape=[numel]), VALID_DATA))


@st.composite
def unknown_dtype(draw: Any) -> Case:
    from registry.validation.safetensors_format import DTYPE_ITEMSIZE

    dtype = draw(
        st.one_of(
            st.sampled_from(
                ["F128", "f32", "float32", "FP32", "F8_E4M3FNUZ", "F4", "F6_E2M3", "", "F32 "]
            ),
            st.text(max_size=8).filter(lambda s: s not in DTYPE_ITEMSIZE),
            st.sampled_from([0, 32, None, ["F32"], {"F32": 1}, True]),
        )
    )
    name = draw(st.sampled_from(NAMES))
    return Case("unknown_dtype", frame(_with_entry(name, dtype=dtype), VALID_DATA))


@st.composite
def wrong_dtype(draw: Any) -> Case:
    """Framing intact, dtypes wrong for the base: not allowed, mixed, or not as declared."""
    how = draw(st.sampled_from(["float64", "integer", "mixed", "declared"]))
    seed = draw(st.integers(0, 3))
    if how == "float64":
        return Case(
            "wrong_dtype",
            make_expert_bytes(SCHEMA, base_revision=REVISION, dtype="float64", seed=seed),
        )
    if how == "integer":
        st_dtype = draw(st.sampled_from(["I32", "U32", "I16", "U16", "I8", "U8", "BOOL"]))
        size = {"I32": 4, "U32": 4, "I16": 2, "U16": 2}.get(st_dtype, 1)
        overrides = {
            s["name"]: RawTensor(
                st_dtype, tuple(s["shape"]), b"\x01" * size * int(np.prod(s["shape"]))
            )
            for s in SCHEMA["tensors"]
        }
        return Case(
            "wrong_dtype",
            make_expert_bytes(SCHEMA, base_revision=REVISION, tensor_overrides=overrides),
        )
    if how == "mixed":
        spec = draw(st.sampled_from(SCHEMA["tensors"]))
        values = np.zeros(tuple(spec["shape"]), np.float32)
        other = draw(st.sampled_from(["f16", "bf16", "f64"]))
        tensor = {"f16": values.astype(np.float16), "f64": values.astype(np.float64)}.get(
            other, bf16(values)
        )
        return Case(
            "wrong_dtype",
            make_expert_bytes(
                SCHEMA, base_revision=REVISION, seed=seed, tensor_overrides={spec["name"]: tensor}
            ),
        )
    tensors, declared = draw(
        st.sampled_from(
            [(t, d) for t in ("float32", "float16", "bfloat16") for d in
             ("float32", "float16", "bfloat16", "float64", "F32", "")]
        ).filter(lambda pair: pair[0] != pair[1])
    )  # fmt: skip
    return Case(
        "wrong_dtype",
        make_expert_bytes(
            SCHEMA, base_revision=REVISION, dtype=tensors, metadata_overrides={"dtype": declared}
        ),
    )


@st.composite
def tensor_set(draw: Any) -> Case:
    how = draw(st.sampled_from(["missing", "extra", "renamed", "none"]))
    names = [s["name"] for s in SCHEMA["tensors"]]
    if how == "missing":
        dropped = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        return Case(
            "tensor_set",
            make_expert_bytes(
                SCHEMA, base_revision=REVISION, tensor_overrides=dict.fromkeys(dropped)
            ),
        )
    if how == "none":
        return Case("tensor_set", frame({"__metadata__": VALID_HEADER["__metadata__"]}, b""))
    if how == "extra":
        extra = draw(
            st.one_of(
                st.sampled_from(
                    ["layers.2.moe.router_row", "layers.0.moe.module.w_gate", "lm_head.weight"]
                ),
                st.text(min_size=1, max_size=20).filter(
                    lambda s: s not in names and s != "__metadata__"
                ),
            )
        )
        tensor = np.zeros(draw(st.sampled_from([(1,), (1, 16), (0,)])), np.float32)
        return Case(
            "tensor_set",
            make_expert_bytes(SCHEMA, base_revision=REVISION, tensor_overrides={extra: tensor}),
        )
    victim = draw(st.sampled_from(names))
    renamed = draw(
        st.sampled_from(
            [victim.upper(), victim + " ", " " + victim, victim.replace(".", "_"),
             victim.replace("layers", "layer"), victim.replace("0", "\u0660"),
             victim.replace("e", "\u0435")]
        ).filter(lambda s: s != victim)
    )  # fmt: skip
    header = {
        (renamed if k == victim else k): v for k, v in json.loads(json.dumps(VALID_HEADER)).items()
    }
    return Case("tensor_set", frame(header, VALID_DATA))


_NON_FINITE_BITS = {
    "float32": ("<u4", [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF]),
    "float16": ("<u2", [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF]),
    "bfloat16": ("<u2", [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF]),
}


@st.composite
def non_finite(draw: Any) -> Case:
    dtype = draw(st.sampled_from(sorted(_NON_FINITE_BITS)))
    file = make_expert_bytes(
        SCHEMA, base_revision=REVISION, dtype=dtype, seed=draw(st.integers(0, 3))
    )
    header, data = split(file)
    code, patterns = _NON_FINITE_BITS[dtype]
    itemsize = np.dtype(code).itemsize
    poked = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(NAMES))
        begin, end = header[name]["data_offsets"]
        index = draw(st.integers(0, (end - begin) // itemsize - 1))
        bits = np.array([draw(st.sampled_from(patterns))], dtype=code).tobytes()
        poked[begin + index * itemsize : begin + (index + 1) * itemsize] = bits
    return Case("non_finite", file[: len(file) - len(data)] + bytes(poked))


# Metadata values that break contract B for this file (layers 0 and 1, one module, float32).
_BAD_METADATA: dict[str, list[Any]] = {
    "format": [None, "agora.expert/0", "AGORA.EXPERT/1", "agora.expert/1 ", "", "pt"],
    "base_revision": [None, "0" * 64, REVISION.upper(), REVISION + "\n", REVISION[:12], ""],
    "layers": [None, "[0]", "[1,0]", "[0,1,2]", "[]", "[0,0,1]", "[-1,1]", "[0,1.0]", "0,1",
               '["0","1"]', "null", "[0,1e0]", "{}", "", "[false,true]", "[0,1]x", "[1]"],
    "n_modules": [None, "0", "2", "01", "1.0", "", "-1", " 1", "\u0661", "1e0", "true"],
    "dtype": [None, "float16", "bfloat16", "float64", "F32", "", "FLOAT32"],
}  # fmt: skip


@st.composite
def metadata_disagrees(draw: Any) -> Case:
    how = draw(st.sampled_from([*_BAD_METADATA, "non_string", "not_an_object"]))
    if how == "not_an_object":
        meta = draw(st.sampled_from([None, [], "format", 1, [["format", "agora.expert/1"]]]))
        return Case(
            "metadata_disagrees",
            frame({**json.loads(json.dumps(VALID_HEADER)), "__metadata__": meta}, VALID_DATA),
        )
    if how == "non_string":
        key = draw(st.sampled_from([*_BAD_METADATA, "note"]))
        value = draw(st.sampled_from([1, None, [0, 1], {"a": "b"}, True, 1.5]))
        raw = frame(
            {
                **json.loads(json.dumps(VALID_HEADER)),
                "__metadata__": {**VALID_HEADER["__metadata__"], key: value},
            },
            VALID_DATA,
        )
        return Case("metadata_disagrees", raw)
    value = draw(st.sampled_from(_BAD_METADATA[how]))
    return Case(
        "metadata_disagrees",
        make_expert_bytes(SCHEMA, base_revision=REVISION, metadata_overrides={how: value}),
    )


@st.composite
def huge_metadata(draw: Any) -> Case:
    """A header past the 16 MiB cap: one huge value, or very many keys."""
    from registry.validation import DEFAULT_MAX_HEADER_BYTES

    meta = dict(VALID_HEADER["__metadata__"])
    if draw(st.booleans()):
        meta["note"] = "x" * (DEFAULT_MAX_HEADER_BYTES + draw(st.integers(0, 1024)))
    else:
        meta.update({f"k{i}": "v" * 4096 for i in range(DEFAULT_MAX_HEADER_BYTES // 4096)})
    return Case(
        "huge_metadata",
        frame({**json.loads(json.dumps(VALID_HEADER)), "__metadata__": meta}, VALID_DATA),
    )


# ---- format smuggling

_HARMLESS = [{"w": [1.0, 2.0]}, [0.5] * 16, "weights", {"layers.0.moe.router_row": [[0.0] * 16]}]


def _zip(members: dict[str, bytes], compression: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _torch_archive(protocol: int, compression: int) -> bytes:
    """The layout torch.save writes (a zip of data.pkl, byteorder, version and raw
    storages), built by hand around a pickle of harmless data."""
    return _zip(
        {
            "archive/data.pkl": pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol),
            "archive/byteorder": b"little",
            "archive/data/0": np.ones(16, np.float32).tobytes(),
            "archive/version": b"3\n",
            "archive/.data/serialization_id": b"0123456789",
        },
        compression,
    )


def _npy(allow_object: bool) -> bytes:
    buffer = io.BytesIO()
    if allow_object:  # an object array: np.save writes a pickle inside the .npy
        np.save(buffer, np.array([{"w": 1.0}, None], dtype=object), allow_pickle=True)
    else:
        np.save(buffer, np.ones((4, 4), np.float32))
    return buffer.getvalue()


@st.composite
def smuggled(draw: Any) -> Case:
    how = draw(
        st.sampled_from(
            ["pickle", "torch_zip", "zip", "zip_of_safetensors", "pickle_appended",
             "zip_appended", "zip_then_safetensors", "npy", "npz", "gzip"]
        )
    )  # fmt: skip
    protocol = draw(st.integers(0, pickle.HIGHEST_PROTOCOL))
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    if how == "pickle":
        data = pickle.dumps(draw(st.sampled_from(_HARMLESS)), protocol=protocol)
    elif how == "torch_zip":
        data = _torch_archive(protocol, compression)
    elif how == "zip":
        names = st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
        )
        members = draw(st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=3))
        data = _zip(members, compression)
    elif how == "zip_of_safetensors":
        data = _zip({"expert.safetensors": VALID}, compression)
    elif how == "pickle_appended":
        data = VALID + pickle.dumps(draw(st.sampled_from(_HARMLESS)), protocol=protocol)
    elif how == "zip_appended":  # a polyglot: zip readers find the archive at the end
        data = VALID + _torch_archive(protocol, compression)
        assert zipfile.is_zipfile(io.BytesIO(data))
    elif how == "zip_then_safetensors":
        data = _torch_archive(protocol, compression) + VALID
    elif how == "npy":
        data = _npy(draw(st.booleans()))
    elif how == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, w=np.ones(4, np.float32))
        data = buffer.getvalue()
    else:
        data = gzip.compress(VALID)
    return Case(f"smuggled_{how}", data)


def every_smuggled_format() -> list[Case]:
    """Each format at least once whatever hypothesis draws: a pickle of every protocol,
    alone and appended to a valid expert, and a torch.save-style archive of every one."""
    cases = []
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for harmless in _HARMLESS:
            cases.append(Case(f"pickle_p{protocol}", pickle.dumps(harmless, protocol=protocol)))
        appended = VALID + pickle.dumps(_HARMLESS[0], protocol=protocol)
        cases.append(Case(f"pickle_p{protocol}_appended", appended))
        for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            cases.append(Case(f"torch_zip_p{protocol}", _torch_archive(protocol, compression)))
    cases.append(Case("zip_appended", VALID + _zip({"a": b"b"}, zipfile.ZIP_STORED)))
    cases.append(Case("npy_object", _npy(True)))
    return cases


# ---- datasheets (the weights are valid)

_FIELDS = ["name", "domain", "license", "pii_handling", "contact", "collection"]


def _sheet_with_front(front_yaml: str, body: str = "# Expert\n") -> bytes:
    return f"---\n{front_yaml}---\n\n{body}".encode()


def _valid_front_without(*keys: str) -> str:
    import yaml
    from helpers.artifacts import datasheet_front_matter

    front = datasheet_front_matter(**dict.fromkeys(keys))
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True)


@st.composite
def hostile_datasheet(draw: Any) -> Case:
    how = draw(
        st.sampled_from(
            ["alias", "alias_bomb", "merge_key", "deep_flow", "deep_block", "huge_int",
             "huge_hex", "non_finite", "surrogate", "surrogate_key", "nul", "nul_body",
             "raw_nul", "not_utf8", "python_tag", "binary_tag", "set_tag", "non_string_key",
             "duplicate_key", "no_front_matter", "unclosed", "list_front", "too_large",
             "too_long_name"]
        )
    )  # fmt: skip
    field = draw(st.sampled_from(_FIELDS))
    rest = _valid_front_without(field)
    if how == "alias":
        if draw(st.booleans()):
            front = _valid_front_without("name", "domain") + "name: &n Tide\ndomain: *n\n"
        else:
            front = _valid_front_without("tags") + "x-t: &t [a, b]\ntags: *t\n"
        sheet = _sheet_with_front(front)
    elif how == "alias_bomb":
        levels = draw(st.integers(2, 9))
        lines = ["x-a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"x-a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
        sheet = _sheet_with_front(rest + f"{field}: ok\n" + "\n".join(lines) + "\n")
    elif how == "merge_key":
        sheet = _sheet_with_front(rest + f"x-base: &b {{k: v}}\nx-m:\n  <<: *b\n{field}: ok\n")
    elif how == "deep_flow":
        depth = draw(st.sampled_from([100, 400, 1000, 5000, 20000]))
        value = draw(st.sampled_from(["[", "{a: "]))
        closing = "]" if value == "[" else "}"
        sheet = _sheet_with_front(rest + f"{field}: {value * depth}x{closing * depth}\n")
    elif how == "deep_block":  # block sequences nest on one line: "- - - x"
        depth = draw(st.sampled_from([100, 400, 1000, 5000, 20000]))
        sheet = _sheet_with_front(rest + f"{field}: ok\nx-deep:\n  {'- ' * depth}x\n")
    elif how == "huge_int":
        digits = draw(st.integers(4301, 20000))
        key = draw(st.sampled_from(["token_count", "x-n"]))
        base = (
            _valid_front_without("token_count") if key == "token_count" else rest + f"{field}: ok\n"
        )
        sheet = _sheet_with_front(base + f"{key}: {'9' * digits}\n")  # fmt: skip
    elif how == "huge_hex":  # a hex literal: int() takes it, but it has > 4300 decimal digits
        sheet = _sheet_with_front(
            rest + f"{field}: ok\nx-n: 0x{'f' * draw(st.integers(3600, 9000))}\n"
        )
    elif how == "non_finite":
        # YAML 1.1 floats: a dot, and a signed exponent (1e400 is a string there).
        value = draw(st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "1.0e+400", "-9.9e+999"]))
        key = draw(st.sampled_from(["token_count", "x-f"]))
        base = (
            _valid_front_without("token_count") if key == "token_count" else rest + f"{field}: ok\n"
        )
        sheet = _sheet_with_front(base + f"{key}: {value}\n")  # fmt: skip
    elif how in ("surrogate", "surrogate_key"):
        unit = draw(st.integers(0xD800, 0xDFFF))
        text = f'"Tide\\u{unit:04x}pools"'
        if how == "surrogate":
            sheet = _sheet_with_front(rest + f"{field}: {text}\n")
        else:  # in an extension key
            sheet = _sheet_with_front(rest + f'{field}: ok\n"x-Tide\\u{unit:04x}": 1\n')
    elif how == "nul":
        escape = draw(st.sampled_from(["\\0", "\\x00", "\\u0000", "\\U00000000"]))
        target = draw(st.sampled_from([*_FIELDS, "samples", "x-note", "key"]))
        if target == "samples":
            sheet = _sheet_with_front(
                _valid_front_without("samples") + f'samples: ["a{escape}b"]\n'
            )
        elif target == "key":
            sheet = _sheet_with_front(rest + f'{field}: ok\n"x-a{escape}b": 1\n')
        else:
            base = _valid_front_without(target) if target in _FIELDS else rest + f"{field}: ok\n"
            sheet = _sheet_with_front(base + f'{target}: "a{escape}b"\n')
    elif how == "nul_body":
        sheet = _sheet_with_front(rest + f"{field}: ok\n", body="# Expert\n\nbad \x00 byte\n")
    elif how == "raw_nul":
        sheet = _sheet_with_front(rest + f"{field}: a\x00b\n")
    elif how == "not_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"\x80"]))
        sheet = _sheet_with_front(rest + f"{field}: ok\n").replace(b"# Expert", b"# Ex" + bad)
    elif how == "python_tag":
        tag = draw(
            st.sampled_from(
                ["!!python/object/apply:os.system ['true']", "!!python/name:os.system",
                 "!!python/object:collections.OrderedDict {}", "!!python/tuple [1, 2]"]
            )
        )  # fmt: skip
        sheet = _sheet_with_front(rest + f"{field}: {tag}\n")
    elif how == "binary_tag":
        sheet = _sheet_with_front(rest + f"{field}: !!binary aGVsbG8=\n")
    elif how == "set_tag":
        sheet = _sheet_with_front(rest + f"{field}: !!set {{a, b}}\n")
    elif how == "non_string_key":
        key = draw(st.sampled_from(["1", "true", "null", "[a, b]", "1.5"]))
        sheet = _sheet_with_front(rest + f"{field}: ok\n? {key}\n: v\n")
    elif how == "duplicate_key":
        sheet = _sheet_with_front(rest + f"{field}: one\n{field}: two\n")
    elif how == "no_front_matter":
        sheet = draw(
            st.sampled_from(
                [b"", b"# just markdown\n", b"--\nname: x\n--\n", b"\n---\nname: x\n---\n"]
            )
        )
    elif how == "unclosed":
        sheet = _sheet_with_front(rest + f"{field}: ok\n").split(b"\n---\n")[0]
    elif how == "list_front":
        sheet = _sheet_with_front("- name\n- domain\n")
    elif how == "too_large":
        from registry.settings import Settings

        cap = Settings().max_datasheet_bytes
        sheet = _sheet_with_front(
            rest + f"{field}: ok\n", body="x" * (cap + draw(st.integers(1, 1024)))
        )
    else:
        length = (
            draw(st.integers(301, 5000))
            if field in ("name", "contact")
            else draw(st.integers(10001, 20000))
        )
        sheet = _sheet_with_front(rest + f"{field}: {'y' * length}\n")
    return Case(f"datasheet_{how}", VALID, sheet)


WEIGHT_FAMILIES: dict[str, Callable[[], Any]] = {
    "length_lie": length_lie,
    "not_an_object": not_an_object,
    "invalid_utf8": invalid_utf8,
    "lone_surrogate": lone_surrogate,
    "duplicate_key": duplicate_key,
    "gap": gap,
    "overlap": overlap,
    "trailing": trailing,
    "truncated": truncated,
    "offsets_out_of_range": offsets_out_of_range,
    "overflowing_shape": overflowing_shape,
    "size_disagreement": size_disagreement,
    "unknown_dtype": unknown_dtype,
    "wrong_dtype": wrong_dtype,
    "tensor_set": tensor_set,
    "non_finite": non_finite,
    "metadata_disagrees": metadata_disagrees,
}
FAMILIES: dict[str, Callable[[], Any]] = {
    **WEIGHT_FAMILIES,
    "smuggled": smuggled,
    "datasheet": hostile_datasheet,
}
# Cases per family in process (huge_metadata: a few, each writes 16 MiB) and through HTTP.
IN_PROCESS = {name: scaled(100, 2_000) for name in FAMILIES} | {
    "smuggled": scaled(150, 3_000),
    "datasheet": scaled(250, 6_000),
}
HUGE = scaled(2, 10)
OVER_HTTP = scaled(120, 1_500)  # per backend, drawn across all families


# --------------------------------------------------------------------------- the unpickler guard


class UnpicklerReached(AssertionError):
    pass


@pytest.fixture(scope="module", autouse=True)
def unpickler_calls() -> Iterator[list[str]]:
    """Every unpickler raises and records the call for the whole module; none may run."""
    import _pickle

    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise UnpicklerReached(f"{name} was called")

        return refused

    real_np_load = np.load

    def np_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("allow_pickle"):
            calls.append("numpy.load(allow_pickle=True)")
            raise UnpicklerReached("numpy.load(allow_pickle=True) was called")
        return real_np_load(*args, **kwargs)

    torch_loaded = "torch" in sys.modules
    with pytest.MonkeyPatch.context() as patch:
        for module in (pickle, _pickle):
            for name in ("loads", "load", "Unpickler"):
                patch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
        patch.setattr(np, "load", np_load)
        if torch_loaded:
            patch.setattr(sys.modules["torch"], "load", refuse("torch.load"))
        # The guard works: an unpickler called now raises and is recorded.
        with pytest.raises(UnpicklerReached):
            pickle.loads(pickle.dumps(1))
        with pytest.raises(UnpicklerReached):
            np.load(io.BytesIO(_npy(True)), allow_pickle=True)
        assert calls == ["pickle.loads", "numpy.load(allow_pickle=True)"]
        calls.clear()
        yield calls
    # torch was not loaded before, so the registry must not have loaded it (no torch.load).
    assert torch_loaded or "torch" not in sys.modules, "the upload path imported torch"
    assert calls == [], f"an unpickler was reached: {calls}"


# --------------------------------------------------------------------------- in process


@dataclass
class Tally:
    tried: Counter[str]
    accepted: list[str]
    server_errors: list[str]

    @classmethod
    def new(cls) -> Tally:
        return cls(Counter(), [], [])


def _base_row() -> Any:
    from registry.db.models import BaseModel

    return BaseModel(revision=REVISION, config=json.loads(BASE_FILES["config.json"]))


def verdict_in_process(case: Case, path: Path, base: Any, limits: Any) -> str:
    """'refused' (a 4xx problem the app can render), 'accepted', or 'server error: ...'.

    A case with a hostile datasheet goes through ``validate_submission`` (what the upload
    route runs: the datasheet, then the weights); one with valid datasheet goes straight to
    ``validate_expert``, the weights check ``validate_submission`` calls, saving the ~10 ms
    of parsing that same valid datasheet again.
    """
    from registry.api.problems import problem_response
    from registry.errors import AgoraError
    from registry.services.experts import validate_submission
    from registry.validation import validate_expert

    path.write_bytes(case.weights)
    try:
        if case.datasheet is VALID_SHEET:
            validate_expert(
                path,
                expert_schema=base.config["expert_schema"],
                base_revision=REVISION,
                max_bytes=limits.max_expert_bytes,
            )
        else:
            validate_submission(
                base=base,
                base_revision=REVISION,
                weights_path=path,
                datasheet=case.datasheet,
                max_expert_bytes=limits.max_expert_bytes,
                max_datasheet_bytes=limits.max_datasheet_bytes,
            )
    except AgoraError as exc:
        if not 400 <= exc.status < 500:
            return f"server error: {exc.status} {exc.code}"
        try:
            problem_response(exc.problem(instance="/v1/experts"), exc.status)
        except Exception as render:  # the response could not be written: a 500
            return f"server error: rendering {exc.code}: {render!r}"
        return "refused"
    except Exception as exc:
        return f"server error: {exc!r}"[:300]
    return "accepted"


def test_malformed_cases_are_refused_in_process(tmp_path: Path, unpickler_calls: list[str]) -> None:
    """The bulk: every family through the validation the upload route runs."""
    from registry.settings import Settings

    tally = Tally.new()
    path = tmp_path / "weights.safetensors"
    base = _base_row()
    limits = Settings()  # the limits the route applies

    for name, family in [*FAMILIES.items(), ("huge_metadata", huge_metadata)]:
        examples = HUGE if name == "huge_metadata" else IN_PROCESS[name]

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(family())
        def check(case: Case) -> None:
            tally.tried[case.family] += 1
            outcome = verdict_in_process(case, path, base, limits)
            if outcome == "accepted":
                tally.accepted.append(case.family)
            elif outcome != "refused":
                tally.server_errors.append(f"{case.family}: {outcome}")
            assert outcome == "refused", f"{case.family}: {outcome}"

        check()
    for case in every_smuggled_format():
        tally.tried[case.family] += 1
        outcome = verdict_in_process(case, path, base, limits)
        assert outcome == "refused", f"{case.family}: {outcome}"
    report(
        "malformed uploads (in process)",
        tried=sum(tally.tried.values()),
        accepted=len(tally.accepted),
        server_errors=len(tally.server_errors),
        unpickler_calls=len(unpickler_calls),
        per_family=",".join(f"{k}:{v}" for k, v in sorted(tally.tried.items())),
    )
    assert sum(tally.tried.values()) >= 2_000
    assert unpickler_calls == []


# --------------------------------------------------------------------------- through HTTP


@dataclass(frozen=True)
class Snapshot:
    rows: dict[str, int]
    blob_files: list[str]
    staging_files: list[str]


@contextmanager
def running_app(database_url: str, data_dir: Path) -> Iterator[tuple[Any, Any, str]]:
    """The real app (lifespan included) with a contributor token and the stored base."""
    from fastapi.testclient import TestClient

    from registry.app import create_app
    from registry.services.tokens import create_token
    from registry.settings import Settings

    # Hundreds of uploads from one token: the rate limits are not under test here.
    unlimited = {
        key: 0
        for key in ("rate_limit_token_per_second", "rate_limit_anonymous_per_second")
        if key in Settings.model_fields
    }
    app = create_app(Settings(data_dir=data_dir, database_url=database_url, **unlimited))
    with TestClient(app, raise_server_exceptions=False) as client:
        with app.state.runtime.sessions() as session, session.begin():
            _, admin = create_token(session=session, name="admin", role="admin")
            _, contributor = create_token(session=session, name="mallory", role="contributor")
        files = {
            "config": ("config.json", BASE_FILES["config.json"]),
            "tokenizer": ("tokenizer.json", BASE_FILES["tokenizer.json"]),
            "weights": ("model.safetensors", BASE_FILES["model.safetensors"]),
        }
        stored = client.post(
            "/v1/base-models", files=files, headers={"Authorization": f"Bearer {admin}"}
        )
        assert stored.status_code == 201, stored.text
        assert stored.json()["revision"] == REVISION
        yield app, client, contributor


def snapshot(app: Any) -> Snapshot:
    from sqlalchemy import func, select

    from registry.db.models import Base

    runtime = app.state.runtime
    with runtime.sessions() as session:
        rows = {
            table.name: session.scalar(select(func.count()).select_from(table)) or 0
            for table in Base.metadata.sorted_tables
        }
    root = Path(runtime.store.location)
    blobs = sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    staging = sorted(str(p) for p in runtime.staging.directory.rglob("*") if p.is_file())
    return Snapshot(rows, blobs, staging)


def submit(client: Any, token: str, case: Case) -> Any:
    return client.post(
        "/v1/experts",
        files={
            "weights": ("expert.safetensors", case.weights),
            "datasheet": ("DATASHEET.md", case.datasheet),
        },
        data={"base_revision": REVISION},
        headers={"Authorization": f"Bearer {token}"},
    )


def test_malformed_uploads_over_http_leave_nothing(
    database_url: str, tmp_path: Path, unpickler_calls: list[str]
) -> None:
    """A sample of every family through the upload route, on this database backend."""
    tally = Tally.new()
    statuses: Counter[int] = Counter()
    backend = database_url.split(":", 1)[0].split("+", 1)[0]
    with running_app(database_url, tmp_path / "agora") as (app, client, token):
        before = snapshot(app)
        assert before.staging_files == []

        @settings(
            max_examples=OVER_HTTP,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.one_of([family() for family in FAMILIES.values()]))
        def check(case: Case) -> None:
            tally.tried[case.family] += 1
            response = submit(client, token, case)
            statuses[response.status_code] += 1
            if response.is_success:
                tally.accepted.append(case.family)
            elif response.status_code >= 500:
                tally.server_errors.append(f"{case.family}: {response.text[:300]}")
            assert response.status_code in (413, 422), (case.family, response.text[:500])
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"]

        check()
        # Every smuggled format, and the heaviest case: a header past the 16 MiB cap.
        for case in every_smuggled_format():
            tally.tried[case.family] += 1
            response = submit(client, token, case)
            statuses[response.status_code] += 1
            assert response.status_code == 422, (case.family, response.text[:300])
            assert response.json()["code"] == "not_safetensors" or "appended" in case.family
        for case in _huge_cases():
            tally.tried[case.family] += 1
            response = submit(client, token, case)
            statuses[response.status_code] += 1
            assert response.status_code == 422, response.text[:300]
            assert response.json()["code"] == "header_too_large"
        after = snapshot(app)
    report(
        f"malformed uploads (HTTP, {backend})",
        tried=sum(tally.tried.values()),
        kinds=len(tally.tried),
        accepted=len(tally.accepted),
        server_errors=len(tally.server_errors),
        rows_left=sum(after.rows.values()) - sum(before.rows.values()),
        blobs_left=len(after.blob_files) - len(before.blob_files),
        staging_left=len(after.staging_files),
        unpickler_calls=len(unpickler_calls),
        statuses=dict(sorted(statuses.items())),
    )
    assert after == before
    assert unpickler_calls == []


def _huge_cases() -> list[Case]:
    from registry.validation import DEFAULT_MAX_HEADER_BYTES

    header = json.loads(json.dumps(VALID_HEADER))
    header["__metadata__"]["note"] = "x" * DEFAULT_MAX_HEADER_BYTES
    return [Case("huge_metadata", frame(header, VALID_DATA))]


def test_html_in_a_datasheet_is_stored_and_served_as_text(
    database_url: str, tmp_path: Path
) -> None:
    """Markup is text in a datasheet (valid, not refused): it comes back byte for byte,
    never as an HTML document, and JSON-encoded in the expert's record."""
    script = "<script>alert(document.cookie)</script>"
    sheet = make_datasheet(
        name=f"Tide pools {script}",
        domain='<img src=x onerror="alert(1)"> intertidal notes',
        body=f"# Notes\n\n{script}\n<iframe src='javascript:alert(1)'></iframe>\n",
    )
    with running_app(database_url, tmp_path / "agora") as (_app, client, token):
        created = submit(client, token, Case("html", VALID, sheet))
        assert created.status_code == 201, created.text
        expert_id = created.json()["id"]
        served = client.get(f"/v1/experts/{expert_id}/datasheet")
        assert served.status_code == 200
        assert served.content == sheet
        assert not served.headers["content-type"].startswith("text/html")
        record = client.get(f"/v1/experts/{expert_id}")
        assert record.headers["content-type"].startswith("application/json")
        assert record.json()["name"] == f"Tide pools {script}"
