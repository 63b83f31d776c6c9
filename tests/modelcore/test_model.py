"""The modular LM on the tiny preset: shapes, gradients, routing invariants, both attentions."""

from __future__ import annotations

import pytest
import torch

from modelcore.config import ModelConfig
from modelcore.losses import lm_loss
from modelcore.model import ModularLM


def _tiny(**kw: object) -> ModelConfig:
    return ModelConfig.from_name("tiny").replace(vocab_size=97, max_seq_len=32, **kw)


@pytest.mark.parametrize("attention", ["stickbreaking", "softmax"])
def test_forward_shapes_routing_and_backward(attention: str) -> None:
    torch.manual_seed(0)
    cfg = _tiny(attention=attention)
    model = ModularLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    out = model(ids)
    assert out.logits.shape == (3, 11, cfg.vocab_size)
    assert set(out.aux_losses) == {"mi"}
    assert len(out.routing) == cfg.n_layers == len(out.att_routing)
    for r in out.routing:
        assert r.probs_TE.shape == (33, cfg.ffn_experts)
        assert r.topk_idx_TK.shape == r.gates_TK.shape == (33, cfg.ffn_top_k)
        torch.testing.assert_close(r.gates_TK.sum(-1), torch.ones(33))
    loss = lm_loss(out.logits[:, :-1], ids[:, 1:]) + 0.1 * out.aux_losses["mi"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_causal_prefix_invariance() -> None:
    """A token's logits depend only on its prefix (both attentions are causal)."""
    torch.manual_seed(1)
    for attention in ("stickbreaking", "softmax"):
        model = ModularLM(_tiny(attention=attention)).eval()
        ids = torch.randint(0, 97, (2, 9))
        full = model(ids, aux="none").logits
        prefix = model(ids[:, :5], aux="none").logits
        torch.testing.assert_close(full[:, :5], prefix, atol=1e-5, rtol=1e-5)


def test_training_lowers_loss_on_a_repeated_pattern() -> None:
    torch.manual_seed(2)
    cfg = _tiny()
    model = ModularLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(17).remainder(7).repeat(2, 1)  # a period-7 sequence
    first = last = 0.0
    for step in range(25):
        out = model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:]) + 0.01 * out.aux_losses["mi"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    assert last < 0.5 * first


def test_inactive_modules_are_never_routed_and_dense_uses_all_active() -> None:
    torch.manual_seed(3)
    cfg = _tiny()
    model = ModularLM(cfg).eval()
    mask = torch.ones(cfg.ffn_experts, dtype=torch.bool)
    mask[[0, 3, 5]] = False
    model.set_active_modules(0, mask)
    ids = torch.randint(0, 97, (2, 16))
    r = model(ids).routing[0]
    assert not torch.isin(r.topk_idx_TK, torch.tensor([0, 3, 5])).any()
    assert (r.probs_TE[:, ~mask] == 0).all()
    torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(32))
    model.dense = True
    r = model(ids).routing[0]
    assert r.topk_idx_TK.shape[1] == int(mask.sum())
    assert set(r.topk_idx_TK.unique().tolist()) == set(mask.nonzero().flatten().tolist())
    # Dense gates are exactly the router's probabilities over the active modules.
    dense_probs = torch.zeros_like(r.probs_TE).scatter(1, r.topk_idx_TK, r.gates_TK)
    torch.testing.assert_close(dense_probs, r.probs_TE)


@pytest.mark.parametrize("aux", ["mi", "switch", "concentration", "none"])
def test_forward_makes_the_requested_aux_losses(aux: str) -> None:
    model = ModularLM(_tiny())
    out = model(torch.randint(0, 97, (2, 8)), aux=aux)
    expected = {"mi": {"mi"}, "switch": {"switch", "z"}, "concentration": {"concentration"}}
    assert set(out.aux_losses) == expected.get(aux, set())
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    with pytest.raises(ValueError):
        model(torch.randint(0, 97, (2, 8)), aux="bogus")


def test_presets_and_config_round_trip() -> None:
    for name in ("tiny", "small", "molm_4b_k2"):
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    molm = ModelConfig.from_name("molm_4b_k2")
    assert (molm.n_layers, molm.d_model, molm.att_experts, molm.ffn_experts) == (24, 1024, 16, 32)
    assert (molm.att_top_k, molm.ffn_top_k, molm.d_ffn, molm.router_hidden) == (2, 2, 2048, 256)
    with pytest.raises(ValueError):
        ModelConfig.from_name("huge")
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**molm.to_dict(), "surprise": 1})
    with pytest.raises(ValueError):
        molm.replace(ffn_top_k=33)
