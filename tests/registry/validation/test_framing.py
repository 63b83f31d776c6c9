"""Safetensors framing: every malformed layout is refused with its own code."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers.artifacts import encode_safetensors
from helpers.artifacts import raw_safetensors as frame
from safetensors.numpy import save_file

from registry.errors import ValidationFailed
from registry.validation import read_header, validate_base_weights

# Hand-written pickles (we never run the pickle module, not even to build test input):
# {"a": 1} at protocol 2 (torch's legacy format opens with one) and protocol 4.
PICKLE_P2 = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s."
PICKLE_P4 = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."

F32_4 = np.arange(4, dtype="<f4").tobytes()  # 16 bytes


def entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None):
    return {"dtype": dtype, "shape": shape or [4], "data_offsets": offsets or [0, 16]}


def code_of(path: Path, **kwargs: int) -> str:
    with pytest.raises(ValidationFailed) as info:
        read_header(path, **kwargs)
    assert info.value.status == 422
    return info.value.code


def test_accepts_a_file_written_by_the_safetensors_library(tmp_path: Path) -> None:
    path = tmp_path / "lib.safetensors"
    tensors = {
        "b": np.ones((3, 5), dtype=np.float16),
        "a": np.arange(6, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    save_file(tensors, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    assert {t.name: t.shape for t in header.tensors} == {"a": (6,), "b": (3, 5), "empty": (0, 4)}
    assert header.data_start + sum(t.nbytes for t in header.tensors) == header.file_size


def test_accepts_unsorted_entries_and_no_metadata(write) -> None:
    header = {"second": entry(offsets=[16, 32]), "first": entry()}
    parsed = read_header(write(frame(header, F32_4 * 2)))
    assert [t.name for t in parsed.tensors] == ["first", "second"]
    assert parsed.metadata == {}


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b"", "empty"),
        (b"\x05\x00\x00", "too short"),
        (PICKLE_P2, "pickle"),
        (PICKLE_P4, "pickle"),
        (b"\x00" * 64, "not start"),  # header length 0: no '{'
        (struct.pack("<Q", 4) + b"[12]", "not a safetensors"),
        (struct.pack("<Q", 1000) + b"{}", "exceeds"),
    ],
)
def test_not_safetensors(write, data: bytes, hint: str) -> None:
    path = write(data)
    with pytest.raises(ValidationFailed) as info:
        read_header(path)
    assert info.value.code == "not_safetensors"
    if hint != "not start":
        assert hint in info.value.detail


def test_zip_archive_like_torch_save_is_refused(write) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", PICKLE_P2)
        z.writestr("archive/version", "3\n")
    path = write(buf.getvalue())
    with pytest.raises(ValidationFailed) as info:
        validate_base_weights(path)
    assert info.value.code == "not_safetensors"
    assert "zip" in info.value.detail


def test_header_over_the_cap(write) -> None:
    path = write(frame({"__metadata__": {"pad": "x" * 200}}))
    assert code_of(path, max_header_bytes=100) == "header_too_large"
    assert read_header(path, max_header_bytes=1000).metadata["pad"] == "x" * 200


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":',  # truncated JSON
        b'{"\xff": 1}',  # not UTF-8
        b'{"__metadata__": {"a": NaN}}',  # not JSON, although Python's json accepts it
        b"{}[]",  # trailing garbage
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested past any parser's limit
    ],
)
def test_header_invalid(write, raw: bytes) -> None:
    assert code_of(write(frame(raw))) == "header_invalid"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},'
        b' "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
        b'{"__metadata__": {"format": "agora.expert/1", "format": "x"}}',
        b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
    ],
)
def test_duplicate_keys(write, raw: bytes) -> None:
    path = write(frame(raw, F32_4))
    with pytest.raises(ValidationFailed) as info:
        read_header(path)
    assert info.value.code == "duplicate_key"


@pytest.mark.parametrize("metadata", [{"n": 1}, {"a": "ok", "b": None}, {"l": ["x"]}, ["x"], "x"])
def test_metadata_not_string(write, metadata: object) -> None:
    path = write(frame({"__metadata__": metadata, "w": entry()}, F32_4))
    assert code_of(path) == "metadata_not_string"


@pytest.mark.parametrize(
    "bad",
    [
        ["not", "an", "object"],
        {"dtype": "F32", "shape": [4]},  # no data_offsets
        {**entry(), "extra": 1},
        entry(dtype="F128"),
        {**entry(), "dtype": 4},
        entry(shape=[-4]),
        {**entry(), "shape": [True, 4]},
        {**entry(), "shape": "4"},
        {**entry(), "shape": [4.0]},
        entry(offsets=[0, 8, 16]),
        entry(offsets=[16, 0]),
        entry(offsets=[-1, 15]),
        entry(shape=[5]),  # 20 bytes of F32 described by 16 bytes of offsets
        entry(dtype="F16"),  # 8 bytes described by 16
    ],
)
def test_tensor_entry_invalid(write, bad: object) -> None:
    path = write(frame({"w": bad}, F32_4))
    with pytest.raises(ValidationFailed) as info:
        read_header(path)
    assert info.value.code == "tensor_entry_invalid"
    assert info.value.errors is not None
    assert info.value.errors[0]["tensor"] == "w"


def test_empty_tensor_name_is_invalid(write) -> None:
    assert code_of(write(frame({"": entry()}, F32_4))) == "tensor_entry_invalid"


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"w": entry(offsets=[16, 32])}, F32_4 * 2),  # gap at the start
        ({"a": entry(), "b": entry(offsets=[32, 48])}, F32_4 * 3),  # gap in the middle
        ({"a": entry(), "b": entry(offsets=[8, 24])}, F32_4 + F32_4[:8]),  # overlap
        ({"a": entry(), "b": entry()}, F32_4),  # two tensors aliasing the same bytes
    ],
)
def test_tensor_offsets_invalid(write, header: dict, data: bytes) -> None:
    assert code_of(write(frame(header, data))) == "tensor_offsets_invalid"


@pytest.mark.parametrize(
    "data",
    [
        F32_4 + b"\x00",  # one trailing byte
        F32_4 + PICKLE_P2,  # a pickle smuggled after the tensors
        F32_4[:12],  # truncated data section
    ],
)
def test_data_size_mismatch(write, data: bytes) -> None:
    assert code_of(write(frame({"w": entry()}, data))) == "data_size_mismatch"


def test_every_truncation_of_a_valid_file_is_refused(write) -> None:
    valid = encode_safetensors(
        {"x": np.ones((3, 3), np.float32), "y": np.zeros(5, np.float16)}, {"a": "b"}
    )
    read_header(write(valid))
    for n in range(len(valid)):
        with pytest.raises(ValidationFailed):
            read_header(write(valid[:n]))


def test_random_bytes_are_refused(write) -> None:
    rng = np.random.default_rng(1234)
    for size in [*range(1, 40), 100, 1000, 4096, 65536]:
        for _ in range(3):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            with pytest.raises(ValidationFailed):
                read_header(write(data))


def test_random_bytes_after_a_plausible_prefix_are_refused(write) -> None:
    # A length that fits the file and a '{', then noise: exercises the JSON and entry checks.
    rng = np.random.default_rng(99)
    for _ in range(200):
        body = b"{" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
        n = int(rng.integers(1, len(body) + 1))
        with pytest.raises(ValidationFailed):
            read_header(write(struct.pack("<Q", n) + body))


def test_header_metadata_and_offsets_survive_a_round_trip(write) -> None:
    meta = {"format": "agora.expert/1", "note": json.dumps({"nested": True})}
    data = encode_safetensors({"a": np.ones(3, np.float64)}, meta)
    header = read_header(write(data))
    assert header.metadata == meta
    (t,) = header.tensors
    assert (t.dtype, t.shape, t.nbytes, t.numel) == ("F64", (3,), 24, 3)


def test_a_file_that_changes_after_its_header_was_read_is_refused(write) -> None:
    from registry.validation import find_non_finite

    path = write(encode_safetensors({"x": np.ones(4, np.float32)}))
    header = read_header(path)
    assert find_non_finite(path, header) == {}
    with path.open("ab") as f:
        f.write(b"\x00" * 8)
    with pytest.raises(ValidationFailed) as info:
        find_non_finite(path, header)
    assert info.value.code == "data_size_mismatch"
