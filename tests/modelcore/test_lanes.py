"""Router biases of inserted modules and their calibration on general text (no training)."""

from __future__ import annotations

import pytest
import torch

from modelcore import lanes
from modelcore.config import ModelConfig
from modelcore.experts import (
    add_modules,
    check_expert,
    extract_expert,
    load_expert,
    remove_modules,
    save_expert,
)
from modelcore.model import ModularLM

REV = "cd" * 32


def _model(seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    return ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=61, max_seq_len=32))


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (4, 25), generator=g) for _ in range(n)]


def _greedy_module(model: ModularLM) -> list[int]:
    """A module whose row wins most tokens' top-k (scaled up mean row)."""
    idx = add_modules(model, generator=torch.Generator().manual_seed(3))
    for i, j in enumerate(idx):
        ffn = model.ffn_layers[i]
        b = ffn.block_of(j)
        with torch.no_grad():
            feats = torch.randn(
                ffn.router.rows[b].shape, generator=torch.Generator().manual_seed(i)
            )
            ffn.router.rows[b].copy_(feats * 5)
            ffn.w_out[b].mul_(30)
    return idx


def test_calibration_bounds_the_share_and_only_lowers_the_bias():
    model = _model()
    idx = _greedy_module(model)
    general = _batches(3, seed=1)
    before = lanes.routing_share(model, idx, general)
    assert max(before.values()) > 0.3  # the module takes a lot of general text
    report = lanes.calibrate_router_bias(model, idx, general, max_share=0.1)
    after = lanes.routing_share(model, idx, general)
    for i in after:
        assert after[i] <= 0.1 + 1e-9
        assert after[i] > 0.0  # not switched off: the bias is the least shift needed
        if i == 0:  # later layers are measured on what the calibrated earlier ones give
            assert report[i]["share_before"] == pytest.approx(before[i])
        assert report[i]["share_after"] == pytest.approx(after[i], abs=0.02)
        assert report[i]["bias"] < 0
    # Already inside its lane: calibrating again (a looser share) changes nothing.
    biases = [model.ffn_layers[i].router.expert_biases().clone() for i in range(2)]
    lanes.calibrate_router_bias(model, idx, general, max_share=0.5)
    assert all(
        torch.equal(b, model.ffn_layers[i].router.expert_biases()) for i, b in enumerate(biases)
    )
    with pytest.raises(ValueError, match="max_share"):
        lanes.calibrate_router_bias(model, idx, general, max_share=1.0)
    with pytest.raises(ValueError, match="general text"):
        lanes.calibrate_router_bias(model, idx, [], max_share=0.1)


def test_a_module_switched_off_by_its_bias_leaves_the_base_bit_for_bit():
    model = _model()
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        want = model(ids, aux="none").logits
    idx = _greedy_module(model)
    with torch.no_grad():
        assert not torch.equal(model(ids, aux="none").logits, want)
        for i, j in enumerate(idx):
            model.ffn_layers[i].router.bias_of_block(model.ffn_layers[i].block_of(j)).fill_(-1e4)
        # Outside every token's top-k the gates renormalise over base modules only.
        assert torch.equal(model(ids, aux="none").logits, want)


def test_the_bias_travels_with_the_expert_file(tmp_path):
    model = _model()
    idx = _greedy_module(model)
    lanes.calibrate_router_bias(model, idx, _batches(2, seed=5), max_share=0.05)
    tensors = extract_expert(model, idx)
    assert {n for n in tensors if n.endswith("router_bias")} == {
        "layers.0.modules.0.router_bias",
        "layers.1.modules.0.router_bias",
    }
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        want = model(ids, aux="none").logits
    remove_modules(model, idx)
    save_expert(tmp_path / "e.safetensors", tensors, base_revision=REV)
    loaded, _ = load_expert(tmp_path / "e.safetensors", config=model.config)
    again = add_modules(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(ids, aux="none").logits, want)
    remove_modules(model, again)


def test_an_expert_file_without_a_bias_loads_with_bias_zero(tmp_path):
    model = _model()
    idx = _greedy_module(model)
    tensors = extract_expert(model, idx)
    legacy = {n: t for n, t in tensors.items() if not n.endswith("router_bias")}
    assert check_expert(legacy, model.config) == [0, 1]
    remove_modules(model, idx)
    new = add_modules(model, legacy)
    assert all(
        float(model.ffn_layers[i].router.expert_biases()[j].detach()) == 0.0
        for i, j in enumerate(new)
    )


def test_a_base_cannot_absorb_a_calibrated_module():
    model = _model()
    idx = _greedy_module(model)
    model.consolidated_state_dict()  # bias 0: becomes a base module as before
    lanes.calibrate_router_bias(model, idx, _batches(2, seed=1), max_share=0.05)
    with pytest.raises(ValueError, match="router bias"):
        model.consolidated_state_dict()


def test_removing_modules_keeps_the_other_biases_aligned():
    model = _model()
    first = _greedy_module(model)
    second = _greedy_module(model)
    ffn = model.ffn_layers[0]
    with torch.no_grad():
        ffn.router.bias_of_block(ffn.block_of(first[0])).fill_(-1.0)
        ffn.router.bias_of_block(ffn.block_of(second[0])).fill_(-2.0)
    remove_modules(model, first)
    bias_E = ffn.router.expert_biases()
    assert bias_E.shape == (9,)
    assert float(bias_E[8].detach()) == -2.0
    assert bool((bias_E[:8] == 0).all())
    remove_modules(model, [j - 1 for j in second])
    assert ffn.router.expert_biases() is None
    assert "router.biases" not in "".join(model.state_dict())


def test_inserted_modules_never_take_a_tokens_first_base_module():
    from modelcore.router import topk_keeping_base

    # 3 base modules, 2 inserted ones that beat every base module on both tokens.
    probs = torch.tensor([[0.10, 0.05, 0.02, 0.50, 0.33], [0.01, 0.20, 0.03, 0.40, 0.36]])
    top, idx = topk_keeping_base(probs, 2, n_base=3)
    assert idx.tolist() == [[0, 3], [1, 3]]  # the best base module stays, one expert joins
    torch.testing.assert_close(top, torch.tensor([[0.10, 0.50], [0.20, 0.40]]))
    # Without inserted modules it is plain top-k.
    plain = probs[:, :3]
    for got, want in zip(topk_keeping_base(plain, 2, n_base=3), plain.topk(2), strict=True):
        assert torch.equal(got, want)
    # k = 3: the inserted modules compete for the two slots after the best base module.
    _, idx3 = topk_keeping_base(probs, 3, n_base=3)
    assert idx3.tolist() == [[0, 3, 4], [1, 3, 4]]
