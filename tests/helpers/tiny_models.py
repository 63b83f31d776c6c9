"""A random tiny base bundle and strong random experts on disk, for tests of code that
moves, loads and composes model files (the worker, the SDK's load_composed, ComposedModel).

Random weights are enough there: those tests check what is done with files and manifests,
not that composition helps (tests/modelcore/compose and tests/e2e train real ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 2,
    "The quick brown fox jumps over the lazy dog. " * 3,
    "SELECT name FROM users WHERE id = 3;\n" * 2,
]


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def make_tiny_base(
    root: Path, *, seed: int = 0, n_experts: int = 3, texts: Sequence[str] = TEXTS
) -> dict[str, Any]:
    """A tiny base with peaked predictions (so composition choices show in the numbers)
    and ``n_experts`` experts named a, b, c...: each a strong module with its own router
    direction. Returns root, base (directory), revision and experts (name -> file)."""
    import torch

    from modelcore.artifacts import save_base
    from modelcore.config import ModelConfig
    from modelcore.data.tokenizer import train_tokenizer
    from modelcore.experts import add_modules, extract_expert, remove_modules, save_expert
    from modelcore.model import ModularLM

    torch.manual_seed(seed)
    tok = train_tokenizer(list(texts) * 4, vocab_size=300)
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


def subset_expert(source: Path, out: Path, layers: Sequence[int]) -> Path:
    """The expert file ``source`` restricted to ``layers``: an expert of some MoE layers
    only (docs/composition.md, "Experts in some layers only"), same base revision."""
    from modelcore.experts import load_expert, save_expert

    tensors, meta = load_expert(source)
    keep = {k: v for k, v in tensors.items() if int(k.split(".")[1]) in set(layers)}
    save_expert(out, keep, base_revision=meta["base_revision"], dtype=meta["dtype"])
    return out
