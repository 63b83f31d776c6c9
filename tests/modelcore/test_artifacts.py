"""Base bundles: save/load round trip, revision stability, refusal of mismatched bundles."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modelcore.artifacts import compute_revision, load_base, save_base
from modelcore.config import ModelConfig
from modelcore.experts import add_modules, expert_schema, extract_expert, save_expert
from modelcore.model import ModularLM


def small_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "hello modular world"] * 10, trainer)
    return tok


def _model(seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    return ModularLM(ModelConfig.from_name("tiny"))


def test_round_trip_reproduces_the_model(tmp_path: Path) -> None:
    model, tok = _model(), small_tokenizer()
    revision = save_base(tmp_path / "base", model, tok)
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    bundle = load_base(tmp_path / "base")
    assert bundle.revision == revision == compute_revision(tmp_path / "base")
    assert bundle.config == model.config
    ids = torch.tensor([tok.encode("def f(x): return x").ids])
    assert torch.equal(bundle.model(ids).logits, model(ids).logits)
    assert bundle.tokenizer.encode("hello world").ids == tok.encode("hello world").ids
    doc = json.loads((tmp_path / "base" / "config.json").read_text())
    assert doc["expert_schema"] == expert_schema(model.config)
    assert doc["d_model"] == model.config.d_model


def test_revision_is_the_manifest_digest_and_is_stable(tmp_path: Path) -> None:
    model, tok = _model(), small_tokenizer()
    first = save_base(tmp_path / "a", model, tok)
    again = save_base(tmp_path / "b", load_base(tmp_path / "a").model, tok)
    assert again == first  # same weights, same bytes, same revision
    digests = {
        name: hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest()
        for name in ("config.json", "model.safetensors", "tokenizer.json")
    }
    manifest = json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()
    assert first == hashlib.sha256(manifest).hexdigest()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert save_base(tmp_path / "c", model, tok) != first


def test_pruned_mask_and_inserted_modules_survive_a_round_trip(tmp_path: Path) -> None:
    model, tok = _model(1), small_tokenizer()
    add_modules(model)
    mask = torch.ones(9, dtype=torch.bool)
    mask[2] = False
    model.set_active_modules(1, mask)
    save_base(tmp_path / "base", model, tok)
    bundle = load_base(tmp_path / "base")
    assert bundle.config.ffn_experts == 9
    assert bundle.model.active_modules[1].tolist() == mask.tolist()
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(bundle.model(ids).logits, model(ids).logits)


def test_mismatched_bundles_are_refused(tmp_path: Path) -> None:
    model, tok = _model(), small_tokenizer()
    save_base(tmp_path / "base", model, tok)
    config_path = tmp_path / "base" / "config.json"
    doc = json.loads(config_path.read_text())
    doc["expert_schema"]["tensors"][0]["shape"] = [1, 1]
    config_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="expert_schema"):
        load_base(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError):
        load_base(tmp_path / "base")
    too_small = ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=100))
    with pytest.raises(ValueError, match="tokenizer"):
        save_base(tmp_path / "other", too_small, tok)
    assert not (tmp_path / "other" / "config.json").exists()


def test_written_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    """Bundles and experts are shared artifacts: readable by whoever a plain file would be."""
    old = os.umask(0o022)
    try:
        model, tok = _model(), small_tokenizer()
        revision = save_base(tmp_path / "base", model, tok)
        new = add_modules(model)
        save_expert(tmp_path / "e.safetensors", extract_expert(model, new), base_revision=revision)
    finally:
        os.umask(old)
    for path in [*sorted((tmp_path / "base").iterdir()), tmp_path / "e.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
