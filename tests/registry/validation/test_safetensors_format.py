"""What the framing check accepts, the safetensors library reads: the JSON and shape rules
that differential fuzzing (tests/adversarial/test_differential_fuzz.py) showed were missing."""

from __future__ import annotations

import json
import math

import pytest
import safetensors
import safetensors.numpy
from helpers.artifacts import raw_safetensors

from registry.errors import ValidationFailed
from registry.validation import read_header, strict_json, validate_base_config, validate_tokenizer
from registry.validation.safetensors_format import MAX_RANK


def test_negative_zero_is_a_float_as_in_serde_json() -> None:
    value = strict_json.loads("-0")
    assert isinstance(value, float)
    assert math.copysign(1.0, value) == -1.0
    assert strict_json.loads("[0, -1, 12]") == [0, -1, 12]
    assert all(type(v) is int for v in strict_json.loads("[0, -1, 12]"))


@pytest.mark.parametrize("text", ["1e400", "-1e400", "[1.5e309]", '{"a": 9e999}'])
def test_numbers_beyond_a_float_are_refused(text: str) -> None:
    with pytest.raises(strict_json.StrictJSONError, match="out of range"):
        strict_json.loads(text)


def test_a_surrogate_pair_is_one_character() -> None:
    assert strict_json.loads('"\\ud83d\\ude00"') == "\U0001f600"
    assert strict_json.loads('{"\\uD83D\\uDE00": ["\\u00e9"]}') == {"\U0001f600": ["é"]}


@pytest.mark.parametrize(
    "text",
    [
        '"\\ud800"',
        '"x\\udfff"',
        '"\\ude00\\ud83d"',  # a pair in the wrong order is two lone surrogates
        '{"k": "\\ud83d"}',
        '{"\\udc00": 1}',
        '[["a", ["\\ud800"]]]',
        '{"a": {"b": [1, {"c": "\\udbff"}]}}',
        '{"\\ud800": 1, "\\ud800": 2}',  # a surrogate key, repeated: not a duplicate_key error
        "[" * 900 + '"\\ud800"' + "]" * 900,  # deep: the walk is iterative
    ],
)
def test_lone_surrogates_are_refused_with_an_encodable_message(text: str) -> None:
    with pytest.raises(strict_json.StrictJSONError) as info:
        strict_json.loads(text)
    assert info.value.duplicate_key is None
    assert "surrogate" in str(info.value)
    str(info.value).encode("utf-8")


def test_a_lone_surrogate_from_a_str_caller_is_refused() -> None:
    with pytest.raises(strict_json.StrictJSONError, match="surrogate"):
        strict_json.loads('{"k": "\ud800"}')


def test_base_files_with_lone_surrogates_or_huge_numbers_are_refused() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_tokenizer(b'{"model": {"vocab": {"\\ud800": 0}}}')
    assert info.value.code == "tokenizer_invalid"
    with pytest.raises(ValidationFailed) as info:
        validate_base_config(b'{"dropout": 1e400, "expert_schema": {}}')
    assert info.value.code == "config_invalid"


def _file(header: str, data: bytes = b"") -> bytes:
    return raw_safetensors(header.encode(), data)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b""),
        ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[-0,1]}}', b"x"),
        ('{"a\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        ('{"__metadata__":{"k\\udfff":"v"}}', b""),
    ],
)
def test_headers_serde_json_refuses_are_refused(write, header: str, data: bytes) -> None:
    file = _file(header, data)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(file)
    with pytest.raises(ValidationFailed) as info:
        read_header(write(file))
    assert info.value.code in ("header_invalid", "tensor_entry_invalid")
    json.dumps(info.value.problem(), ensure_ascii=False).encode("utf-8")


def _empty_tensor(dtype: str, shape: list[int]) -> bytes:
    return _file(json.dumps({"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}))


@pytest.mark.parametrize(
    ("dtype", "largest"),
    [("U8", 2**63 - 1), ("F32", (2**63 - 1) // 4), ("F64", (2**63 - 1) // 8)],
)
def test_an_empty_tensor_may_not_describe_more_than_2_63_bytes(
    write, dtype: str, largest: int
) -> None:
    """``[0, n]`` holds nothing, but numpy (and the library's numpy loader) refuse any n
    whose bytes would not fit in 2**63: the limit is exactly numpy's."""
    fits = _empty_tensor(dtype, [0, largest])
    (tensor,) = read_header(write(fits)).tensors
    assert tensor.shape == (0, largest)
    assert safetensors.numpy.load(fits)["a"].shape == (0, largest)

    over = _empty_tensor(dtype, [0, largest + 1])
    with pytest.raises(ValidationFailed) as info:
        read_header(write(over))
    assert info.value.code == "tensor_entry_invalid"
    assert "more than" in info.value.errors[0]["message"]
    with pytest.raises(ValueError, match=r"too big|dimension exceeded"):
        safetensors.numpy.load(over)


def test_size_arithmetic_that_overflows_64_bits_is_refused(write) -> None:
    # The library multiplies dims left to right in 64 bits: 2**40 * 2**40 overflows
    # before the 0 is reached.
    file = _empty_tensor("U8", [2**40, 2**40, 0])
    with pytest.raises(safetensors.SafetensorError, match="overflow"):
        safetensors.deserialize(file)
    with pytest.raises(ValidationFailed):
        read_header(write(file))


def test_rank_is_bounded_by_what_numpy_1_holds(write) -> None:
    def of_rank(rank: int) -> bytes:
        header = {"a": {"dtype": "U8", "shape": [1] * rank, "data_offsets": [0, 1]}}
        return _file(json.dumps(header), b"\x07")

    assert read_header(write(of_rank(MAX_RANK))).tensors[0].shape == (1,) * MAX_RANK
    assert safetensors.numpy.load(of_rank(MAX_RANK))["a"].shape == (1,) * MAX_RANK
    with pytest.raises(ValidationFailed) as info:
        read_header(write(of_rank(MAX_RANK + 1)))
    assert "dimensions" in info.value.errors[0]["message"]


def test_a_huge_integer_in_the_header_is_refused_not_a_crash(write) -> None:
    # Past int()'s 4300-digit limit: a ValueError inside the JSON parser, reported as such.
    header = '{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,0]}}'
    with pytest.raises(ValidationFailed) as info:
        read_header(write(_file(header)))
    assert info.value.code == "header_invalid"
