"""Incremental decoding with a KV cache (modelcore.decode) computes what the full forward
computes: the same logits token by token, and the same generated text as rescoring the
whole window at every step, for every composition method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import digest_of, make_tiny_base

from modelcore.compose.composed import MANIFEST_FORMAT, ComposedModel
from modelcore.config import ModelConfig
from modelcore.decode import KVCache, stickbreaking_rows
from modelcore.kernels.sb_ref import stickbreaking_attention_ref
from modelcore.model import ModularLM

CONFIGS: dict[str, dict[str, Any]] = {
    "stickbreaking": {},
    "stickbreaking-diagonal": {"sb_include_diagonal": True},
    "softmax": {"attention": "softmax"},
    "softmax-2heads": {"attention": "softmax", "att_heads": 2, "head_dim": 16},
}


def _model(kind: str, seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny").replace(vocab_size=97, **CONFIGS[kind])
    model = ModularLM(config).eval()
    with torch.no_grad():  # peaked predictions, so that a wrong cache changes the argmax
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("prompt_len", [1, 7, 13])
def test_token_by_token_logits_equal_the_full_forward(kind: str, prompt_len: int) -> None:
    model = _model(kind)
    ids_BT = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        want_BTV = model(ids_BT, aux="none").logits
        cache = KVCache()
        got = [model(ids_BT[:, :prompt_len], aux="none", cache=cache).logits]
        for t in range(prompt_len, ids_BT.shape[1]):
            got.append(model(ids_BT[:, t : t + 1], aux="none", cache=cache).logits)
    assert cache.length == ids_BT.shape[1]
    torch.testing.assert_close(torch.cat(got, dim=1), want_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["stickbreaking", "softmax"])
def test_chunks_after_a_prefix_equal_the_full_forward(kind: str) -> None:
    """Several new tokens at once over a cached prefix (causal among themselves)."""
    model = _model(kind, seed=1)
    ids_BT = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_BTV = model(ids_BT, aux="none").logits
        cache = KVCache()
        parts = [model(ids_BT[:, a:b], aux="none", cache=cache).logits for a, b in
                 [(0, 5), (5, 6), (6, 17), (17, 23)]]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts, dim=1), want_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_stickbreaking_rows_are_the_reference_rows(include_diagonal: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    B, K, H, T, D = 2, 3, 2, 19, 8
    q = torch.randn(B, K, H, T, D, generator=gen) * 2
    k = torch.randn(B, H, T, D, generator=gen) * 2
    v = torch.randn(B, H, T, D, generator=gen)
    want, _ = stickbreaking_attention_ref(
        q.reshape(B, K * H, T, D),
        k.repeat(1, K, 1, 1),
        v.repeat(1, K, 1, 1),
        include_diagonal=include_diagonal,
    )
    for n in (1, 4):  # the last n queries over all T keys
        got = stickbreaking_rows(q[..., T - n :, :], k, v, include_diagonal=include_diagonal)
        torch.testing.assert_close(
            got.reshape(B, K * H, n, D), want[..., T - n :, :], rtol=1e-5, atol=1e-6
        )


# -- generation through ComposedModel -------------------------------------------------------
PROMPTS = ["def add(a, b):", "import", "the quick brown fox jumps", "x = [1, 2, 3]\nfor i in x:"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    made: dict[str, Any] = make_tiny_base(tmp_path_factory.mktemp("kv"), n_experts=2)
    return made


def _ref(path: Path, weight: float) -> dict[str, Any]:
    return {"id": "exp_" + "A" * 26, "version": 1, "digest": digest_of(path), "weight": weight}


def _composed(files: dict[str, Any], method: str) -> ComposedModel:
    a, b = files["experts"]["a"], files["experts"]["b"]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "method": method,
        "base_revision": files["revision"],
        "experts": [_ref(a, 0.3), _ref(b, 0.7)],
        "output": _ref(b, 1.0) if method in ("average", "distill") else None,
    }
    if method == "ensemble":
        manifest["with_base"] = True
    return ComposedModel.from_manifest(manifest, files["base"], {digest_of(a): a, digest_of(b): b})


def _no_eot(composed: ComposedModel) -> None:
    """Make <|endoftext|> unreachable, so that generation runs past the window (32)."""
    from modelcore.data.tokenizer import eot_id

    model = composed.base
    with torch.no_grad():  # channel 0 of the final norm's output is ~100 for every token
        model.ln_f.bias[0] = 100.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eot_id(composed.tokenizer), 0] = -1.0


@pytest.mark.parametrize("method", ["mixture", "ensemble", "average", "distill"])
def test_greedy_generation_equals_rescoring(files: dict[str, Any], method: str) -> None:
    composed = _composed(files, method)
    texts = []
    for prompt in PROMPTS:
        got = composed.generate(prompt, max_new_tokens=12)
        assert got == composed._generate_rescoring(prompt, max_new_tokens=12)
        texts.append(got)
    assert any(texts), "every continuation was empty: the comparison saw nothing"


@pytest.mark.parametrize("method", ["mixture", "ensemble"])
def test_seeded_sampling_equals_rescoring(files: dict[str, Any], method: str) -> None:
    composed = _composed(files, method)
    for seed in (0, 3):
        got = composed.generate(PROMPTS[0], 10, temperature=1.0, top_k=20, seed=seed)
        want = composed._generate_rescoring(PROMPTS[0], 10, temperature=1.0, top_k=20, seed=seed)
        assert got == want


@pytest.mark.parametrize("method", ["mixture", "ensemble"])
def test_generation_past_the_window_equals_rescoring(files: dict[str, Any], method: str) -> None:
    """The window (max_seq_len 32) slides: both start from the last 32 tokens each step."""
    composed = _composed(files, method)
    _no_eot(composed)
    window = int(composed.base.config.max_seq_len)
    long_prompt = " ".join(["def add(a, b):"] * 12)  # more tokens than the window
    for prompt, n in [(PROMPTS[0], window + 8), (long_prompt, 6)]:
        got = composed.generate(prompt, max_new_tokens=n)
        assert got == composed._generate_rescoring(prompt, max_new_tokens=n)
        # It did run past the window (counted on the text, re-tokenised).
        assert len(composed.tokenizer.encode(prompt + got).ids) > window + 4


def test_emoe_layers_decode_with_the_cache() -> None:
    """An EMoE model (its FFN layers replaced, modelcore.emoe) decodes token by token too."""
    from modelcore.emoe import apply_emoe

    torch.manual_seed(2)
    config = ModelConfig.from_name("tiny").replace(vocab_size=97, ffn_experts=1, ffn_top_k=1)
    model = ModularLM(config).eval()
    apply_emoe(model, 4, 2)
    ids_BT = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_BTV = model(ids_BT, aux="none").logits
        cache = KVCache()
        got = [model(ids_BT[:, :4], aux="none", cache=cache).logits]
        got += [model(ids_BT[:, t : t + 1], aux="none", cache=cache).logits for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(got, dim=1), want_BTV, rtol=1e-5, atol=1e-5)
