"""Experts against their base's expert_schema: one test per refusal code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.artifacts import bf16, expert_metadata, write_expert
from safetensors.numpy import save_file

from registry.errors import PayloadTooLarge, ValidationFailed
from registry.validation import ExpertSchema, validate_expert

W_IN = "layers.0.moe.module.w_in"  # shape (12, 8) in the fixture schema
ROUTER = "layers.1.moe.router_row"  # shape (1, 8)


def refused(path: Path, schema: Any, revision: str, **kwargs: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        validate_expert(path, expert_schema=schema, base_revision=revision, **kwargs)
    assert info.value.status == 422
    return info.value


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_valid_expert_is_accepted(tmp_path: Path, schema, revision, dtype: str) -> None:
    path = write_expert(tmp_path / "e.safetensors", schema, base_revision=revision, dtype=dtype)
    info = validate_expert(path, expert_schema=schema, base_revision=revision)
    assert info.dtype == dtype
    assert info.layers == (0, 1)
    assert info.n_modules == 1
    assert info.size == path.stat().st_size
    assert info.n_parameters == sum(int(np.prod(t["shape"])) for t in schema["tensors"])


def test_expert_written_by_the_safetensors_library_is_accepted(tmp_path, schema, revision):
    rng = np.random.default_rng(0)
    tensors = {
        t["name"]: rng.standard_normal(t["shape"]).astype(np.float16) for t in schema["tensors"]
    }
    path = tmp_path / "lib.safetensors"
    save_file(
        tensors,
        str(path),
        metadata=expert_metadata(schema, base_revision=revision, dtype="float16"),
    )
    assert (
        validate_expert(
            path, expert_schema=ExpertSchema.from_dict(schema), base_revision=revision
        ).dtype
        == "float16"
    )


def test_expert_too_large(tmp_path, schema, revision) -> None:
    path = write_expert(tmp_path / "e", schema, base_revision=revision)
    size = path.stat().st_size
    validate_expert(path, expert_schema=schema, base_revision=revision, max_bytes=size)
    with pytest.raises(PayloadTooLarge) as info:
        validate_expert(path, expert_schema=schema, base_revision=revision, max_bytes=size - 1)
    assert (info.value.code, info.value.status) == ("expert_too_large", 413)


def test_a_plain_safetensors_file_is_not_an_expert(tmp_path, schema, revision) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(path))
    assert refused(path, schema, revision).code == "wrong_format"


@pytest.mark.parametrize("fmt", [None, "agora.expert/2", "pt", ""])
def test_wrong_format(tmp_path, schema, revision, fmt) -> None:
    path = write_expert(
        tmp_path / "e", schema, base_revision=revision, metadata_overrides={"format": fmt}
    )
    assert refused(path, schema, revision).code == "wrong_format"


@pytest.mark.parametrize("claimed", [None, "0" * 64, ""])
def test_base_revision_mismatch(tmp_path, schema, revision, claimed) -> None:
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        metadata_overrides={"base_revision": claimed},
    )
    assert refused(path, schema, revision).code == "base_revision_mismatch"


def test_base_revision_must_equal_the_form_field(tmp_path, schema, revision) -> None:
    path = write_expert(tmp_path / "e", schema, base_revision=revision)
    err = refused(path, schema, "f" * 64)
    assert err.code == "base_revision_mismatch"
    assert revision in err.detail


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"layers": None}, "layers"),
        ({"layers": "0,1"}, "layers"),
        ({"layers": "[]"}, "layers"),
        ({"layers": "[0,0]"}, "layers"),
        ({"layers": "[true]"}, "layers"),
        ({"layers": "[-1]"}, "layers"),
        ({"layers": "[" * 50_000}, "layers"),
        ({"n_modules": None}, "n_modules"),
        ({"n_modules": "0"}, "n_modules"),
        ({"n_modules": "one"}, "n_modules"),
        ({"n_modules": "+1"}, "n_modules"),
        ({"n_modules": "2"}, "n_modules"),  # the schema describes a one-module expert
        ({"dtype": None}, "dtype"),
        ({"dtype": "fp32"}, "dtype"),
        ({"dtype": "float16"}, "dtype"),  # well formed, but the tensors are float32
    ],
)
def test_metadata_invalid(tmp_path, schema, revision, overrides, key) -> None:
    path = write_expert(
        tmp_path / "e", schema, base_revision=revision, metadata_overrides=overrides
    )
    err = refused(path, schema, revision)
    assert err.code == "metadata_invalid"
    assert err.errors is not None
    assert [e["key"] for e in err.errors] == [key]


def test_layers_must_match_a_schema_that_states_them(tmp_path, schema, revision) -> None:
    stated = {**schema, "layers": [0, 1]}
    ok = write_expert(tmp_path / "ok", stated, base_revision=revision)
    validate_expert(ok, expert_schema=stated, base_revision=revision)
    bad = write_expert(
        tmp_path / "bad", stated, base_revision=revision, metadata_overrides={"layers": "[0,2]"}
    )
    assert refused(bad, stated, revision).code == "metadata_invalid"


def test_tensor_set_mismatch_lists_missing_and_unexpected(tmp_path, schema, revision) -> None:
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        tensor_overrides={W_IN: None, "layers.0.moe.module.bias": np.zeros(12, np.float32)},
    )
    err = refused(path, schema, revision)
    assert err.code == "tensor_set_mismatch"
    assert {(e["tensor"], e["problem"]) for e in err.errors or []} == {
        (W_IN, "missing"),
        ("layers.0.moe.module.bias", "unexpected"),
    }


def test_tensor_shape_mismatch(tmp_path, schema, revision) -> None:
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        tensor_overrides={W_IN: np.zeros((8, 12), np.float32)},
    )
    err = refused(path, schema, revision)
    assert err.code == "tensor_shape_mismatch"
    assert err.errors == [
        {
            "tensor": W_IN,
            "expected": [12, 8],
            "actual": [8, 12],
            "message": "shape [8, 12], expected [12, 8]",
        }
    ]


def test_dtype_not_allowed_by_the_base(tmp_path, schema, revision) -> None:
    only_f32 = {**schema, "dtypes": ["float32"]}
    path = write_expert(tmp_path / "e", only_f32, base_revision=revision, dtype="bfloat16")
    assert refused(path, only_f32, revision).code == "dtype_not_allowed"


def test_float64_is_never_an_expert_dtype(tmp_path, schema, revision) -> None:
    path = write_expert(tmp_path / "e", schema, base_revision=revision, dtype="float64")
    assert refused(path, schema, revision).code == "dtype_not_allowed"


def test_integer_tensors_are_not_allowed(tmp_path, schema, revision) -> None:
    ints = {t["name"]: np.zeros(t["shape"], np.int32) for t in schema["tensors"]}
    path = write_expert(tmp_path / "e", schema, base_revision=revision, tensor_overrides=ints)
    assert refused(path, schema, revision).code == "dtype_not_allowed"


def test_mixed_dtypes(tmp_path, schema, revision) -> None:
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        tensor_overrides={ROUTER: np.zeros((1, 8), np.float16)},
    )
    err = refused(path, schema, revision)
    assert err.code == "mixed_dtypes"
    assert {e["dtype"]: e["count"] for e in err.errors or []} == {"F16": 1, "F32": 5}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, schema, revision, dtype, bad_value) -> None:
    values = np.zeros((12, 8), np.float32)
    values[11, 7] = bad_value  # the very last element: crosses every chunk boundary below
    values[3, 2] = bad_value
    tensor = bf16(values) if dtype == "bfloat16" else values.astype(dtype)
    path = write_expert(
        tmp_path / "e", schema, base_revision=revision, dtype=dtype, tensor_overrides={W_IN: tensor}
    )
    for chunk_bytes in (8, 24, 1 << 20):  # chunks smaller than, unaligned to, and above the tensor
        err = refused(path, schema, revision, chunk_bytes=chunk_bytes)
        assert err.code == "non_finite_values"
        assert err.errors == [{"tensor": W_IN, "count": 2, "message": "2 NaN/inf values"}]


def test_largest_finite_values_are_accepted(tmp_path, schema, revision) -> None:
    values = np.full((12, 8), np.finfo(np.float16).max, np.float16)
    values[0, 0] = -np.finfo(np.float16).max
    values[0, 1] = np.finfo(np.float16).tiny / 4  # subnormal
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        dtype="float16",
        tensor_overrides={W_IN: values},
    )
    validate_expert(path, expert_schema=schema, base_revision=revision)


def test_every_truncation_of_an_expert_is_refused(tmp_path, revision) -> None:
    from helpers.artifacts import make_expert_schema

    small = make_expert_schema(n_layers=1, d_model=2, d_ffn=3)
    path = write_expert(tmp_path / "e", small, base_revision=revision)
    data = path.read_bytes()
    validate_expert(path, expert_schema=small, base_revision=revision)
    cut = tmp_path / "cut"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(ValidationFailed):
            validate_expert(cut, expert_schema=small, base_revision=revision)


def test_every_single_byte_flip_in_the_header_is_refused_or_harmless(tmp_path, revision) -> None:
    # Flipping a header byte must never yield a file that is accepted yet describes
    # different tensors: whatever passes must still match the schema exactly.
    from helpers.artifacts import make_expert_schema

    small = make_expert_schema(n_layers=1, d_model=2, d_ffn=3)
    path = write_expert(tmp_path / "e", small, base_revision=revision)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    flipped = tmp_path / "flip"
    for i in range(header_end):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        flipped.write_bytes(mutated)
        try:
            info = validate_expert(flipped, expert_schema=small, base_revision=revision)
        except ValidationFailed:
            continue
        assert {t.name: t.shape for t in info.tensors} == {
            t["name"]: tuple(t["shape"]) for t in small["tensors"]
        }


def test_a_bad_schema_is_reported_as_such(tmp_path, schema, revision) -> None:
    path = write_expert(tmp_path / "e", schema, base_revision=revision)
    err = refused(path, {**schema, "tensors": []}, revision)
    assert err.code == "expert_schema_invalid"


# -- metadata against the tensor names (the worker reads layers from the names) ---------------


@pytest.mark.parametrize("layers", ["[1,0]", "[1, 0]", "[0,1,2]", "[0,0,1]"])
def test_layers_must_be_the_layers_the_tensors_hold(tmp_path, schema, revision, layers) -> None:
    """The fixture schema states no layers; its tensors hold layers 0 and 1. (A file that
    declares fewer layers than it holds is refused for its tensors: below.)"""
    assert "layers" not in schema
    path = write_expert(
        tmp_path / "e", schema, base_revision=revision, metadata_overrides={"layers": layers}
    )
    err = refused(path, schema, revision)
    assert err.code == "metadata_invalid"
    assert [e["key"] for e in err.errors or []] == ["layers"]


def test_layers_out_of_order_are_refused_when_the_schema_states_them(
    tmp_path, schema, revision
) -> None:
    stated = {**schema, "layers": [0, 1]}
    path = write_expert(
        tmp_path / "e", stated, base_revision=revision, metadata_overrides={"layers": "[1,0]"}
    )
    assert refused(path, stated, revision).code == "metadata_invalid"


def _module_schema(n_modules: int, *, declared: int | None = None) -> dict[str, Any]:
    """modelcore's layout: layers.{i}.modules.{j}.*, two layers of ``n_modules`` modules."""
    tensors = [
        {"name": f"layers.{i}.modules.{j}.{kind}", "shape": shape}
        for i in range(2)
        for j in range(n_modules)
        for kind, shape in (("w_in", [4, 3]), ("router_row", [2]))
    ]
    schema: dict[str, Any] = {"format": "agora.expert/1", "dtypes": ["float32"], "tensors": tensors}
    if declared is not None:
        schema["n_modules"] = declared
    return schema


def test_n_modules_must_be_the_modules_the_tensors_hold(tmp_path, revision) -> None:
    two = _module_schema(2, declared=2)
    ok = write_expert(tmp_path / "ok", two, base_revision=revision)
    assert validate_expert(ok, expert_schema=two, base_revision=revision).n_modules == 2
    # A schema that names two modules per layer but leaves n_modules at its default (1):
    # a file that says "1" holds two, which the worker would not load as described.
    undeclared = _module_schema(2)
    path = write_expert(tmp_path / "bad", undeclared, base_revision=revision)
    err = refused(path, undeclared, revision)
    assert err.code == "metadata_invalid"
    assert [e["key"] for e in err.errors or []] == ["n_modules"]


# -- experts of some layers only (docs/composition.md, "Experts in some layers only") -------


def _layer_names(schema: dict[str, Any], layer: int) -> set[str]:
    return {t["name"] for t in schema["tensors"] if t["name"].startswith(f"layers.{layer}.")}


@pytest.mark.parametrize("layer", [0, 1])
def test_an_expert_of_one_layer_is_accepted(tmp_path, schema, revision, layer) -> None:
    other = 1 - layer
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        metadata_overrides={"layers": f"[{layer}]"},
        tensor_overrides=dict.fromkeys(_layer_names(schema, other)),
    )
    info = validate_expert(path, expert_schema=schema, base_revision=revision)
    assert info.layers == (layer,)
    assert {t.name for t in info.tensors} == _layer_names(schema, layer)


def test_tensors_of_an_undeclared_layer_are_refused_by_name(tmp_path, schema, revision) -> None:
    # Declares layer 0 and holds both layers: layer 1's tensors are unexpected.
    path = write_expert(
        tmp_path / "e", schema, base_revision=revision, metadata_overrides={"layers": "[0]"}
    )
    err = refused(path, schema, revision)
    assert err.code == "tensor_set_mismatch"
    assert {(e["tensor"], e["problem"]) for e in err.errors or []} == {
        (n, "unexpected") for n in _layer_names(schema, 1)
    }
    assert all("does not declare" in e["message"] for e in err.errors or [])


def test_a_declared_layer_without_its_tensors_is_refused_by_name(tmp_path, schema, revision):
    # Declares layers 0 and 1, holds layer 0 and only the router row of layer 1.
    dropped = {n for n in _layer_names(schema, 1) if n != ROUTER}
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        tensor_overrides=dict.fromkeys(dropped),
    )
    err = refused(path, schema, revision)
    assert err.code == "tensor_set_mismatch"
    assert {(e["tensor"], e["problem"]) for e in err.errors or []} == {
        (n, "missing") for n in dropped
    }
    assert "declared layers [0, 1]" in err.detail


def test_a_layer_the_base_does_not_have_is_refused_by_number(tmp_path, schema, revision):
    # The file's own tensors are renamed to layer 5 so names and metadata agree.
    tensors = {n: None for n in _layer_names(schema, 1)}
    tensors["layers.5.moe.router_row"] = np.zeros((1, 8), np.float32)
    path = write_expert(
        tmp_path / "e",
        schema,
        base_revision=revision,
        metadata_overrides={"layers": "[0,5]"},
        tensor_overrides=tensors,
    )
    err = refused(path, schema, revision)
    assert err.code == "metadata_invalid"
    [problem] = err.errors or []
    assert problem["key"] == "layers"
    assert "layer 5 is not a layer of the base" in problem["message"]
    assert "[0, 1]" in problem["message"]


def test_a_schema_that_states_layers_bounds_the_subsets(tmp_path, schema, revision) -> None:
    # The base's experts may cover layer 1 only: a layer-1 expert passes, layer 0 does not.
    stated = {**schema, "layers": [1]}
    ok = write_expert(
        tmp_path / "ok",
        stated,
        base_revision=revision,
        metadata_overrides={"layers": "[1]"},
        tensor_overrides=dict.fromkeys(_layer_names(schema, 0)),
    )
    assert validate_expert(ok, expert_schema=stated, base_revision=revision).layers == (1,)
    bad = write_expert(
        tmp_path / "bad",
        stated,
        base_revision=revision,
        metadata_overrides={"layers": "[0]"},
        tensor_overrides=dict.fromkeys(_layer_names(schema, 1)),
    )
    err = refused(bad, stated, revision)
    assert err.code == "metadata_invalid"
    assert "may cover layers [1] only" in (err.errors or [{}])[0]["message"]
