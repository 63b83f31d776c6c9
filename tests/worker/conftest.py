"""Tiny artifacts for the worker tests: a random tiny base bundle and experts on disk.

Random weights are enough: the worker tests check what the worker does with files and
payloads (and that its numbers are the composition's), not that composition helps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 2,
    "The quick brown fox jumps over the lazy dog. " * 3,
    "SELECT name FROM users WHERE id = 3;\n" * 2,
]


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def expert_ref(path: Path, name: str, version: int = 1) -> dict[str, Any]:
    return {
        "id": "exp_" + (name.upper() * 26)[:26],
        "version": version,
        "digest": digest_of(path),
        "size": path.stat().st_size,
    }


def make_tiny_base(root: Path, *, seed: int = 0, n_experts: int = 3) -> dict[str, Any]:
    """A random tiny base (peaked predictions) and ``n_experts`` strong random experts."""
    from modelcore.artifacts import save_base
    from modelcore.config import ModelConfig
    from modelcore.data.tokenizer import train_tokenizer
    from modelcore.experts import add_modules, extract_expert, remove_modules, save_expert
    from modelcore.model import ModularLM

    torch.manual_seed(seed)
    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    config = ModelConfig.from_name("tiny").replace(max_seq_len=32, vocab_size=320)
    model = ModularLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    revision = save_base(root / "base", model, tok)
    experts: dict[str, Path] = {}
    for i, name in enumerate("abcdefgh"[:n_experts]):
        gen = torch.Generator().manual_seed(seed * 100 + i + 1)
        idx = add_modules(model, None, generator=gen)
        tensors = extract_expert(model, idx)
        remove_modules(model, idx)
        for k, v in tensors.items():
            if k.endswith("w_out"):
                tensors[k] = v * 8
            elif k.endswith("router_row"):
                tensors[k] = torch.randn(v.shape, generator=gen) * 2
        path = root / f"{name}.safetensors"
        save_expert(path, tensors, base_revision=revision)
        experts[name] = path
    return {"root": root, "base": root / "base", "revision": revision, "experts": experts}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_base(tmp_path_factory.mktemp("worker-tiny"))
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def make_ref():
    return expert_ref


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)
