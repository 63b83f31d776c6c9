"""Evaluation: exact byte accounting, bits per byte against a closed form, batching
independence, and base + experts evaluated as their mixture."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modelcore import experts
from modelcore.config import ModelConfig
from modelcore.data.tokenizer import train_tokenizer
from modelcore.eval import evaluate, evaluate_mixture, module_usage, usage_entropy
from modelcore.model import ModularLM

TEXTS = {
    "prose": [
        "The quick brown fox jumps over the lazy dog. " * 6,
        "Ünïcödé text: naïve café, smörgåsbord, 東京, emoji 🙂 and more.\n",
    ],
    "code": ["def f(x):\n    return x * 2 + 1\n" * 5, "for i in range(10):\n    print(i)\n"],
}


@pytest.fixture(scope="module")
def tok():
    corpus = [t for texts in TEXTS.values() for t in texts]
    return train_tokenizer(corpus, vocab_size=300, seed=0)


class UniformLM(nn.Module):
    """Every next token equally likely: NLL is exactly ln V per token."""

    def __init__(self, vocab: int, max_seq_len: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids_BT, aux="none"):
        return SimpleNamespace(logits=torch.zeros(*ids_BT.shape, self.vocab), routing=[])


def test_bytes_scored_are_exactly_the_utf8_bytes_of_the_texts(tok):
    model = UniformLM(tok.get_vocab_size(), max_seq_len=7)  # odd window: many cuts
    results = evaluate(model, tok, TEXTS, batch_size=3)
    for name, texts in TEXTS.items():
        assert results[name]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert results[name]["tokens"] == sum(len(tok.encode(t).ids) for t in texts)


def test_uniform_model_scores_log2_vocab_bits_per_token(tok):
    V = tok.get_vocab_size()
    results = evaluate(UniformLM(V, max_seq_len=16), tok, TEXTS)
    for r in results.values():
        assert r["perplexity"] == pytest.approx(V, rel=1e-6)
        expected = r["tokens"] * math.log2(V) / r["bytes"]
        assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-6)


def tiny_model(tok, seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny").replace(
        vocab_size=tok.get_vocab_size(), max_seq_len=32, d_model=32
    )
    return ModularLM(config)


def test_results_do_not_depend_on_batch_size(tok):
    model = tiny_model(tok)
    a = evaluate(model, tok, TEXTS, batch_size=1)
    b = evaluate(model, tok, TEXTS, batch_size=64)
    for name in TEXTS:
        assert a[name]["tokens"] == b[name]["tokens"]
        assert a[name]["bits_per_byte"] == pytest.approx(b[name]["bits_per_byte"], rel=1e-5)


def test_evaluate_leaves_training_mode_and_weights_alone(tok):
    model = tiny_model(tok)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, tok, TEXTS)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_mixture_inserts_every_expert_then_restores_the_base(tok):
    model = tiny_model(tok)
    E = model.config.ffn_experts
    reference = evaluate(model, tok, TEXTS)
    # Two experts whose router rows are huge: every token goes to them, so the mixture
    # must differ from the base; afterwards the base must be exactly back.
    added = [experts.add_modules(model) for _ in range(2)]
    tensors = [experts.extract_expert(model, idx) for idx in added]
    for idx in reversed(added):
        experts.remove_modules(model, idx)
    for t in tensors:
        for name in t:
            if name.endswith("router_row"):
                t[name] = t[name] * 1e3
            elif name.endswith("w_out"):
                t[name] = torch.randn_like(t[name])
    seen: list[int] = []
    hook = model.ffn_layers[0].register_forward_hook(
        lambda mod, _inp, _out: seen.append(mod.n_modules)
    )
    mixed = evaluate_mixture(model, tok, TEXTS, tensors)
    hook.remove()
    assert set(seen) == {E + 2}
    assert model.n_modules == [E] * model.config.n_layers
    assert mixed["prose"]["bits_per_byte"] != pytest.approx(reference["prose"]["bits_per_byte"])
    again = evaluate(model, tok, TEXTS)
    assert again["prose"]["bits_per_byte"] == reference["prose"]["bits_per_byte"]


def test_module_usage_counts_k_modules_per_real_token(tok):
    model = tiny_model(tok)
    texts = TEXTS["prose"]
    counts = module_usage(model, tok, texts, seq_len=16, batch_size=2)
    n_tokens = sum(len(tok.encode(t).ids) for t in texts)
    assert len(counts) == model.config.n_layers
    for counts_E in counts:
        assert int(counts_E.sum()) == n_tokens * model.config.ffn_top_k


def test_usage_entropy_is_one_for_uniform_and_zero_for_collapsed_usage():
    assert usage_entropy([torch.tensor([5, 5, 5, 5])]) == pytest.approx(1.0)
    assert usage_entropy([torch.tensor([9, 0, 0, 0])]) == pytest.approx(0.0)
    assert 0 < usage_entropy([torch.tensor([6, 2, 1, 1])]) < 1
