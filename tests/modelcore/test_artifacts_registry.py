"""Every artifact modelcore writes is accepted by the registry's validation (which never
imports torch), and corrupted ones are refused with the right code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modelcore.artifacts import save_base
from modelcore.config import ModelConfig
from modelcore.experts import (
    add_modules,
    extract_expert,
    load_expert,
    save_expert,
    write_canonical,
)
from modelcore.model import ModularLM

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("registry.validation") is None, reason="registry.validation absent"
)


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["print('agora')\n"] * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, ModularLM]:
    torch.manual_seed(0)
    model = ModularLM(ModelConfig.from_name("tiny"))
    out = tmp_path_factory.mktemp("base")
    revision = save_base(out, model, _tokenizer())
    return out, revision, model


def test_base_bundle_is_accepted(base: tuple[Path, str, ModularLM]) -> None:
    from registry.validation import (
        validate_base_config,
        validate_base_weights,
        validate_tokenizer,
    )

    directory, _revision, model = base
    cfg = validate_base_config((directory / "config.json").read_bytes())
    assert cfg.n_layers == model.config.n_layers
    # w_in, w_out, router_row, router_bias per layer
    assert len(cfg.expert_schema.tensors) == 4 * model.config.n_layers
    header = validate_base_weights(directory / "model.safetensors")
    assert {t.name for t in header.tensors} == set(model.consolidated_state_dict())
    validate_tokenizer((directory / "tokenizer.json").read_bytes())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_expert_files_are_accepted(
    base: tuple[Path, str, ModularLM], tmp_path: Path, dtype: str
) -> None:
    from registry.validation import validate_base_config, validate_expert

    directory, revision, model = base
    schema = validate_base_config((directory / "config.json").read_bytes()).expert_schema
    path = tmp_path / "expert.safetensors"
    save_expert(path, extract_expert(model, [0, 3]), base_revision=revision, dtype=dtype)
    info = validate_expert(path, expert_schema=schema, base_revision=revision)
    assert info.dtype == dtype
    assert info.layers == (0, 1)
    # A freshly inserted (untrained) module is a valid expert too.
    fresh = ModularLM(model.config)
    new = add_modules(fresh)
    save_expert(path, extract_expert(fresh, new), base_revision=revision, dtype=dtype)
    validate_expert(path, expert_schema=schema, base_revision=revision)


def test_corrupted_artifacts_are_refused(base: tuple[Path, str, ModularLM], tmp_path: Path) -> None:
    from registry.errors import ValidationFailed
    from registry.validation import validate_base_config, validate_base_weights, validate_expert

    directory, revision, model = base
    schema = validate_base_config((directory / "config.json").read_bytes()).expert_schema
    path = tmp_path / "expert.safetensors"
    save_expert(path, extract_expert(model, [1, 1]), base_revision=revision)
    good = path.read_bytes()

    path.write_bytes(good[:-7])  # truncated data
    with pytest.raises(ValidationFailed) as exc:
        validate_expert(path, expert_schema=schema, base_revision=revision)
    assert exc.value.code == "data_size_mismatch"

    path.write_bytes(b"\xff" * 8 + good[8:])  # header length overwritten
    with pytest.raises(ValidationFailed):
        validate_expert(path, expert_schema=schema, base_revision=revision)

    path.write_bytes(good)
    with pytest.raises(ValidationFailed) as exc:
        validate_expert(path, expert_schema=schema, base_revision="cd" * 32)
    assert exc.value.code == "base_revision_mismatch"

    bad = extract_expert(model, [1, 1])
    bad["layers.0.modules.0.w_in"] = torch.full_like(bad["layers.0.modules.0.w_in"], float("nan"))
    save_expert(path, bad, base_revision=revision)
    with pytest.raises(ValidationFailed) as exc:
        validate_expert(path, expert_schema=schema, base_revision=revision)
    assert exc.value.code == "non_finite_values"

    # An expert of layer 0 only is accepted (docs/composition.md, "Experts in some layers
    # only") ...
    only_layer0 = extract_expert(model, [1, -1])
    save_expert(path, only_layer0, base_revision=revision)
    assert validate_expert(path, expert_schema=schema, base_revision=revision).layers == (0,)
    # ... but not when it declares a layer whose tensors it lacks.
    _, metadata = load_expert(path)
    write_canonical(path, only_layer0, metadata={**metadata, "layers": "[0, 1]"})
    with pytest.raises(ValidationFailed) as exc:
        validate_expert(path, expert_schema=schema, base_revision=revision)
    assert exc.value.code == "tensor_set_mismatch"

    weights = tmp_path / "model.safetensors"
    weights.write_bytes((directory / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValidationFailed):
        validate_base_weights(weights)
