"""Base model files: config.json with its expert_schema, tokenizer.json, model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_base_config, make_base_files, make_expert_schema

from registry.errors import ValidationFailed
from registry.validation import (
    ExpertSchema,
    validate_base_config,
    validate_base_weights,
    validate_tokenizer,
)


def test_valid_config_yields_its_schema_and_display_fields() -> None:
    schema = make_expert_schema(n_layers=3, d_model=8, d_ffn=16, dtypes=["bfloat16"])
    config = validate_base_config(make_base_config(schema, vocab_size=100, rope_theta=10000.0))
    assert config.vocab_size == 100
    assert config.n_layers == 3
    assert config.raw["rope_theta"] == 10000.0
    assert config.expert_schema.dtypes == ("bfloat16",)
    assert len(config.expert_schema.tensors) == 9
    assert config.expert_schema.tensors[0].shape == (16, 8)
    assert ExpertSchema.from_dict(config.expert_schema.to_dict()) == config.expert_schema


def test_display_fields_are_optional() -> None:
    config = validate_base_config(json.dumps({"expert_schema": make_expert_schema()}).encode())
    assert (config.vocab_size, config.n_layers) == (None, None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b'{"expert_schema": {}, "expert_schema": {}}',  # duplicate key
        b"\xff\xfe{}",
        b'{"x": NaN}',
    ],
)
def test_config_invalid(data: bytes) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_base_config(data)
    assert info.value.code == "config_invalid"


def _schema_errors(expert_schema: Any) -> list[str]:
    data = json.dumps({"vocab_size": 10, "expert_schema": expert_schema}).encode()
    with pytest.raises(ValidationFailed) as info:
        validate_base_config(data)
    assert info.value.code == "expert_schema_invalid"
    return [e["path"] for e in info.value.errors or []]


def test_missing_expert_schema() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_base_config(b'{"vocab_size": 10}')
    assert info.value.code == "expert_schema_invalid"


GOOD = {"format": "agora.expert/1", "dtypes": ["float32"], "tensors": [{"name": "w", "shape": [2]}]}


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"format": "agora.expert/0"}, "$.expert_schema.format"),
        ({"format": None}, "$.expert_schema.format"),
        ({"dtypes": []}, "$.expert_schema.dtypes"),
        ({"dtypes": "float32"}, "$.expert_schema.dtypes"),
        ({"dtypes": ["float64"]}, "$.expert_schema.dtypes[0]"),
        ({"dtypes": ["float32", "float32"]}, "$.expert_schema.dtypes[1]"),
        ({"tensors": []}, "$.expert_schema.tensors"),
        ({"tensors": ["w"]}, "$.expert_schema.tensors[0]"),
        ({"tensors": [{"name": "", "shape": [2]}]}, "$.expert_schema.tensors[0].name"),
        ({"tensors": [{"name": "__metadata__", "shape": [2]}]}, "$.expert_schema.tensors[0].name"),
        ({"tensors": [{"name": "w", "shape": [2]}] * 2}, "$.expert_schema.tensors[1].name"),
        ({"tensors": [{"name": "w", "shape": []}]}, "$.expert_schema.tensors[0].shape"),
        ({"tensors": [{"name": "w", "shape": [0]}]}, "$.expert_schema.tensors[0].shape"),
        ({"tensors": [{"name": "w", "shape": [1.5]}]}, "$.expert_schema.tensors[0].shape"),
        ({"tensors": [{"name": "w", "shape": ["2"]}]}, "$.expert_schema.tensors[0].shape"),
        ({"tensors": [{"name": "w", "shape": [True]}]}, "$.expert_schema.tensors[0].shape"),
        ({"tensors": [{"name": "w"}]}, "$.expert_schema.tensors[0].shape"),
        ({"layers": [0, 0]}, "$.expert_schema.layers"),
        ({"layers": "all"}, "$.expert_schema.layers"),
        ({"n_modules": 0}, "$.expert_schema.n_modules"),
    ],
)
def test_expert_schema_invalid_names_the_path(change: dict[str, Any], path: str) -> None:
    schema = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert _schema_errors(schema) == [path]


def test_every_schema_problem_is_listed_at_once() -> None:
    bad = {"format": "x", "dtypes": [], "tensors": [{"name": "w", "shape": [-1]}]}
    assert _schema_errors(bad) == [
        "$.expert_schema.format",
        "$.expert_schema.dtypes",
        "$.expert_schema.tensors[0].shape",
    ]


def test_schema_that_is_not_an_object() -> None:
    assert _schema_errors(["w"]) == ["$.expert_schema"]


def test_tokenizer() -> None:
    files = make_base_files()
    assert validate_tokenizer(files["tokenizer.json"])["model"]["type"] == "WordLevel"
    for bad in (b"", b"[]", b"{", b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}"):
        with pytest.raises(ValidationFailed) as info:
            validate_tokenizer(bad)
        assert info.value.code == "tokenizer_invalid"


def test_base_weights(tmp_path: Path) -> None:
    files = make_base_files()
    good = tmp_path / "model.safetensors"
    good.write_bytes(files["model.safetensors"])
    header = validate_base_weights(good)
    assert "embed.weight" in header.by_name()
    bad = tmp_path / "model.bin"
    bad.write_bytes(files["config.json"])  # a JSON file uploaded in the weights field
    with pytest.raises(ValidationFailed) as info:
        validate_base_weights(bad)
    assert info.value.code == "not_safetensors"
