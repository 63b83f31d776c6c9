"""On a CUDA device: the model on the Triton backend matches the same model on the
PyTorch references (outputs and gradients), and the MoLM-4B-K2 shapes run."""

from __future__ import annotations

import pytest
import torch

from modelcore.config import ModelConfig
from modelcore.losses import lm_loss
from modelcore.model import ModularLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("attention", ["stickbreaking", "softmax"])
def test_triton_backend_matches_the_reference_backend(attention: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny").replace(attention=attention, head_dim=40, d_ffn=72)
    fast = ModularLM(cfg, device="cuda", kernels="auto")
    ref = ModularLM(cfg, device="cuda", kernels="reference")
    ref.load_state_dict(fast.state_dict())
    assert fast.backend.name == "triton"
    ids = torch.randint(0, cfg.vocab_size, (3, 77), device="cuda")
    outs = []
    for model in (fast, ref):
        out = model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:]) + 0.1 * out.aux_losses["mi"]
        loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    (lf, gf), (lr, gr) = outs
    torch.testing.assert_close(lf, lr, atol=1e-4, rtol=1e-4)
    for name, g in gr.items():
        torch.testing.assert_close(gf[name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_molm_4b_k2_layer_shapes_train_in_bf16() -> None:
    cfg = ModelConfig.from_name("molm_4b_k2").replace(n_layers=2)
    model = ModularLM(cfg, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda")
    out = model(ids[:, :-1])
    assert out.logits.shape == (2, 256, cfg.vocab_size)
    (lm_loss(out.logits, ids[:, 1:]) + 0.01 * out.aux_losses["mi"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
