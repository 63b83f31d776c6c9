"""Strict safetensors framing, read from a file on disk without loading the data section.

Layout of a safetensors file::

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``__metadata__`` of string pairs.
We accept a file only if that description is exact: the tensors tile the data section
from byte 0 to its last byte, with no gaps, overlaps or trailing bytes, so there is no
room anywhere in the file for content the header does not account for. And whatever we
accept, the ``safetensors`` library reads identically: the same tensors, dtypes, shapes and
bytes (tests/adversarial/test_differential_fuzz.py fuzzes that claim). Where the two
parsers differ we refuse (``strict_json`` lists the JSON cases; shapes are bounded below).

Finiteness is checked tensor by tensor, ``chunk_bytes`` (8 MiB) at a time over a read-only
memory map, releasing each chunk's pages once scanned: validating a 1 GiB expert adds a
few MiB to the process's RSS.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from registry.validation import strict_json
from registry.validation.codes import ErrorCode, invalid, shorten

DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

# Bytes per element of each safetensors dtype we accept (sub-byte F4/F6 formats are refused:
# nothing Agora stores uses them, and their sizes are not whole bytes per element).
DTYPE_ITEMSIZE: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# Exponent-field masks: a float is non-finite exactly when all its exponent bits are set.
# For the 16-bit types, testing the raw bits is faster than numpy's float16 isfinite
# (docs/validation.md, "Speed") and avoids widening bfloat16, which numpy lacks, to float32.
_HALF_EXPONENT_MASK: Mapping[str, int] = {"F16": 0x7C00, "BF16": 0x7F80}
_FLOAT_NUMPY: Mapping[str, str] = {"F32": "<f4", "F64": "<f8"}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# The readers of an accepted file must be able to hold each tensor's description: numpy
# (what ``safetensors.numpy`` and the SDK load into) allows 32 dimensions before 2.0 and
# sizes below 2**63 bytes, counting only the non-zero dims; the safetensors library's own
# size arithmetic is in 64-bit integers.
MAX_RANK = 32
MAX_TENSOR_BYTES = 2**63 - 1

_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_PICKLE_PROTOCOL_BYTES = frozenset({2, 3, 4, 5})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    file_size: int
    header_size: int
    metadata: Mapping[str, str]
    tensors: tuple[TensorInfo, ...]  # sorted by data offset

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _describe(prefix: bytes) -> str:
    """Name what a non-safetensors file probably is, for a message a human can act on."""
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"PK\x05\x06"):
        return "a zip archive (torch.save writes these); upload safetensors instead"
    if len(prefix) >= 2 and prefix[0] == 0x80 and prefix[1] in _PICKLE_PROTOCOL_BYTES:
        return "a Python pickle; pickles are never loaded, upload safetensors instead"
    if prefix.startswith(b"\x1f\x8b"):
        return "a gzip stream"
    return "not a safetensors file"


def read_header(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Check the framing of the safetensors file at ``path`` and return its parsed header."""
    with open(path, "rb") as f:
        return read_header_from(f, os.fstat(f.fileno()).st_size, max_header_bytes=max_header_bytes)


def read_header_from(
    f: BinaryIO, file_size: int, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Like ``read_header`` for an open binary file positioned at its start."""
    if file_size == 0:
        raise invalid(ErrorCode.NOT_SAFETENSORS, "the file is empty")
    prefix = f.read(8)
    if file_size < 8 or len(prefix) < 8:
        raise invalid(
            ErrorCode.NOT_SAFETENSORS,
            f"{file_size} bytes is too short for a safetensors file (8-byte header length)",
        )
    (header_size,) = struct.unpack("<Q", prefix)
    # Judge "longer than the file" before "over the cap": a pickle or zip read as a length
    # is astronomically large, and "not safetensors" is the answer its sender needs.
    if header_size > file_size - 8:
        what = _describe(prefix)
        if what == "not a safetensors file":
            what = (
                f"not a safetensors file (header length {header_size} exceeds the "
                f"{file_size - 8} bytes after it: truncated or another format)"
            )
        raise invalid(ErrorCode.NOT_SAFETENSORS, what)
    if header_size > max_header_bytes:
        raise invalid(
            ErrorCode.HEADER_TOO_LARGE,
            f"header is {header_size} bytes; the limit is {max_header_bytes}",
        )
    raw = f.read(header_size)
    if len(raw) != header_size:
        raise invalid(ErrorCode.NOT_SAFETENSORS, "the file ended inside its header")
    if not raw.startswith(b"{"):
        what = _describe(prefix + raw[:8])
        if what == "not a safetensors file":
            what += " (its header does not start with '{')"
        raise invalid(ErrorCode.NOT_SAFETENSORS, what)
    try:
        header = strict_json.loads_bytes(raw)
    except strict_json.StrictJSONError as exc:
        if exc.duplicate_key is not None:
            raise invalid(
                ErrorCode.DUPLICATE_KEY,
                f"the header repeats the key {shorten(exc.duplicate_key)!r}",
                [{"key": shorten(exc.duplicate_key), "message": "duplicate key"}],
            ) from None
        raise invalid(ErrorCode.HEADER_INVALID, f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise invalid(ErrorCode.HEADER_INVALID, "the header is not a JSON object")
    metadata = _check_metadata(header.get("__metadata__", {}))
    tensors = _check_entries(header)
    _check_offsets(tensors, data_size=file_size - 8 - header_size)
    return SafetensorsHeader(
        file_size=file_size, header_size=header_size, metadata=metadata, tensors=tensors
    )


def _check_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise invalid(
            ErrorCode.METADATA_NOT_STRING,
            f"__metadata__ must be an object of strings, not {type(metadata).__name__}",
        )
    bad = [
        {"key": shorten(k), "message": f"value is {type(v).__name__}, not a string"}
        for k, v in metadata.items()
        if not isinstance(v, str)
    ]
    if bad:
        raise invalid(ErrorCode.METADATA_NOT_STRING, "__metadata__ values must be strings", bad)
    return dict(metadata)


def _is_count(value: Any) -> bool:
    # bool is an int subclass in Python; JSON true is not a dimension.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _describes_too_many_bytes(shape: list[int], itemsize: int) -> bool:
    """Whether itemsize times the product of the non-zero dims exceeds ``MAX_TENSOR_BYTES``.

    Zero dims are skipped, as numpy does: ``[0, 2**62]`` holds no bytes, but neither numpy
    nor the safetensors library (whose size arithmetic overflows on ``[2**40, 2**40, 0]``)
    can read it, so a file that declares it is refused like one that would need the bytes.
    """
    size = itemsize
    for dim in shape:
        if dim:
            size *= dim
            if size > MAX_TENSOR_BYTES:
                return True
    return False


def _check_entries(header: dict[str, Any]) -> tuple[TensorInfo, ...]:
    problems: list[dict[str, Any]] = []
    tensors: list[TensorInfo] = []

    def bad(name: str, message: str) -> None:
        problems.append({"tensor": shorten(name), "message": message})

    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not name:
            bad(name, "empty tensor name")
            continue
        if not isinstance(entry, dict):
            bad(name, f"entry is {type(entry).__name__}, not an object")
            continue
        if set(entry) != _ENTRY_KEYS:
            missing = sorted(_ENTRY_KEYS - set(entry))
            extra = sorted(set(entry) - _ENTRY_KEYS)
            extra_names = [shorten(k, 40) for k in extra]
            bad(
                name,
                f"keys must be dtype, shape, data_offsets (missing {missing}, extra {extra_names})",
            )
            continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            bad(name, f"unknown dtype {shorten(repr(dtype), 40)}")
            continue
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            bad(name, "shape must be a list of non-negative integers")
            continue
        if len(shape) > MAX_RANK:
            bad(name, f"shape has {len(shape)} dimensions; at most {MAX_RANK} are readable")
            continue
        if _describes_too_many_bytes(shape, DTYPE_ITEMSIZE[dtype]):
            bad(name, f"shape describes more than {MAX_TENSOR_BYTES} bytes")
            continue
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            bad(name, "data_offsets must be [begin, end] with 0 <= begin <= end")
            continue
        info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
        expected = info.numel * DTYPE_ITEMSIZE[dtype]
        if info.nbytes != expected:
            bad(name, f"data_offsets span {info.nbytes} bytes; {dtype}{shape} needs {expected}")
            continue
        tensors.append(info)
    if problems:
        raise invalid(
            ErrorCode.TENSOR_ENTRY_INVALID,
            f"{len(problems)} tensor entr{'y is' if len(problems) == 1 else 'ies are'} invalid",
            problems,
        )
    return tuple(sorted(tensors, key=lambda t: (t.begin, t.end, t.name)))


def _check_offsets(tensors: tuple[TensorInfo, ...], *, data_size: int) -> None:
    problems: list[dict[str, Any]] = []
    cursor = 0
    for t in tensors:
        if t.begin > cursor:
            problems.append(
                {"tensor": shorten(t.name), "message": f"gap: bytes {cursor}..{t.begin} unused"}
            )
        elif t.begin < cursor:
            problems.append(
                {
                    "tensor": shorten(t.name),
                    "message": f"overlap: begins at {t.begin}, inside bytes before {cursor}",
                }
            )
        cursor = max(cursor, t.end)
    if problems:
        raise invalid(
            ErrorCode.TENSOR_OFFSETS_INVALID,
            "tensor data must be contiguous from offset 0 with no gaps or overlaps",
            problems,
        )
    if cursor != data_size:
        what = "truncated" if cursor > data_size else "trailing bytes after the last tensor"
        raise invalid(
            ErrorCode.DATA_SIZE_MISMATCH,
            f"the tensors cover {cursor} bytes but the data section holds {data_size} ({what})",
        )


def _count_non_finite(buf: mmap.mmap, dtype: str, offset: int, nbytes: int) -> int:
    """NaN/inf count in ``nbytes`` of ``buf`` at ``offset``; the view dies with the call."""
    mask = _HALF_EXPONENT_MASK.get(dtype)
    if mask is not None:
        bits = np.frombuffer(buf, dtype="<u2", count=nbytes // 2, offset=offset)
        exponents = np.bitwise_and(bits, mask)
        # max() of the masked exponents is one fast reduction; count only when it hits.
        if int(exponents.max(initial=0)) != mask:
            return 0
        return int(np.count_nonzero(exponents == mask))
    itemsize = DTYPE_ITEMSIZE[dtype]
    values = np.frombuffer(buf, dtype=_FLOAT_NUMPY[dtype], count=nbytes // itemsize, offset=offset)
    finite = np.isfinite(values)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def _release(buf: mmap.mmap, offset: int, nbytes: int) -> None:
    """Unmap the scanned pages from this process (they stay in the page cache).

    Without this, every page the scan touched counts in the process's RSS: validating a
    1 GiB expert would show ~1 GiB of (reclaimable, file-backed) RSS growth in the server.
    """
    if hasattr(mmap, "MADV_DONTNEED"):
        begin = offset - offset % mmap.PAGESIZE
        buf.madvise(mmap.MADV_DONTNEED, begin, offset + nbytes - begin)


def find_non_finite(
    path: str | os.PathLike[str],
    header: SafetensorsHeader,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, int]:
    """Count NaN/inf values per floating-point tensor; tensors with none are omitted.

    The file is memory-mapped read-only and scanned ``chunk_bytes`` at a time: numpy reads
    straight from the page cache (no copy into a buffer, faster than ``readinto``:
    docs/validation.md, "Speed"), and the temporaries stay chunk-sized. The file must not
    shrink while this runs (the service validates its own staged copy), or the kernel raises
    SIGBUS.
    """
    scanned = [t for t in header.tensors if t.dtype in FLOAT_DTYPES and t.nbytes]
    if not scanned:
        return {}
    found: dict[str, int] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if len(buf) != header.file_size:
            raise invalid(ErrorCode.DATA_SIZE_MISMATCH, "the file changed during validation")
        if hasattr(buf, "madvise"):
            buf.madvise(mmap.MADV_SEQUENTIAL)
        for t in scanned:
            itemsize = DTYPE_ITEMSIZE[t.dtype]
            step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
            start = header.data_start + t.begin
            count = 0
            for off in range(start, start + t.nbytes, step):
                n = min(step, start + t.nbytes - off)
                count += _count_non_finite(buf, t.dtype, off, n)
                _release(buf, off, n)
            if count:
                found[t.name] = count
    return found
