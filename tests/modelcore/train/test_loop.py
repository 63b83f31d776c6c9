"""The training loop and modes, on a tiny model and a learnable synthetic stream: fast."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from modelcore import experts
from modelcore.config import ModelConfig
from modelcore.model import ModularLM
from modelcore.train import (
    cosine_lr,
    finetune_concentration,
    finetune_full,
    pretrain,
    train_expert,
)

VOCAB = 64


def small_model(seed: int = 0) -> ModularLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny").replace(vocab_size=VOCAB, max_seq_len=32, d_model=32)
    return ModularLM(config)


def counting_batches(seed: int = 0, *, batch: int = 8, length: int = 16, step: int = 1):
    """Rows count up mod VOCAB from a random start: next token = this token + step."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start_B1 = torch.randint(0, VOCAB, (batch, 1), generator=gen)
        yield (start_B1 + step * torch.arange(length + 1)) % VOCAB


def test_cosine_schedule_warms_up_peaks_and_decays_to_the_floor():
    lrs = [cosine_lr(s, total=100, peak=1.0, warmup=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert cosine_lr(100, total=100, peak=1.0, warmup=10) == pytest.approx(0.1)


def test_pretraining_learns_a_predictable_stream():
    model = small_model()
    result = pretrain(model, counting_batches(), 60, 1e-2, progress=False)
    assert len(result.losses) == 60
    assert result.losses[0] > math.log(VOCAB) - 0.5  # starts near uniform
    assert result.final_loss < 0.5 * result.losses[0]
    assert "mi" in result.metrics


def test_same_seed_same_curve_and_weights():
    a, b = small_model(3), small_model(3)
    ra = pretrain(a, counting_batches(5), 8, 3e-3, seed=7, progress=False)
    rb = pretrain(b, counting_batches(5), 8, 3e-3, seed=7, progress=False)
    assert ra.losses == rb.losses
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_dense_phase_routes_every_token_to_every_module_then_goes_sparse():
    model = small_model()
    seen: list[int] = []
    model.ffn_layers[0].register_forward_hook(
        lambda _mod, _inp, out: seen.append(out[1].topk_idx_TK.shape[-1])
    )
    pretrain(model, counting_batches(), 6, 1e-3, dense_steps=3, progress=False)
    E, K = model.config.ffn_experts, model.config.ffn_top_k
    assert seen == [E, E, E, K, K, K]
    assert model.dense is False


def test_dense_steps_cannot_exceed_steps():
    with pytest.raises(ValueError, match="dense_steps"):
        pretrain(small_model(), counting_batches(), 3, dense_steps=4, progress=False)


def test_running_out_of_batches_is_an_error_not_a_short_run():
    batches = iter([next(counting_batches())] * 2)
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        pretrain(small_model(), batches, 5, progress=False)


def test_insertion_trains_only_the_new_module_and_leaves_the_base_bit_identical():
    model = small_model()
    pretrain(model, counting_batches(), 20, 1e-2, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A new "domain": the stream counts in steps of 3.
    trained = train_expert(
        model, counting_batches(1, step=3), 40, 1e-2, routing_reg=0.01, progress=False
    )
    assert trained.result.final_loss < trained.result.losses[0]
    assert model.n_modules == [model.config.ffn_experts + 1] * model.config.n_layers
    experts.remove_modules(model, trained.module_idx)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert all(p.requires_grad for p in model.parameters())
    names = {t["name"] for t in experts.expert_schema(model.config)["tensors"]}
    assert set(trained.tensors) == names


def test_expert_initialised_from_another_starts_where_that_one_ended():
    model = small_model()
    pretrain(model, counting_batches(), 20, 1e-2, progress=False)
    first = train_expert(model, counting_batches(1, step=3), 40, 1e-2, progress=False)
    experts.remove_modules(model, first.module_idx)
    fresh = train_expert(model, counting_batches(2, step=3), 1, 1e-9, progress=False)
    experts.remove_modules(model, fresh.module_idx)
    warm = train_expert(
        model, counting_batches(2, step=3), 1, 1e-9, init_from=first.tensors, progress=False
    )
    # With a negligible learning rate the first loss is the starting point's loss.
    assert warm.result.losses[0] < fresh.result.losses[0] - 0.1
    for name, tensor in first.tensors.items():
        assert torch.allclose(warm.tensors[name], tensor, atol=1e-6), name


def test_routing_regularization_shrinks_the_new_router_rows():
    model = small_model()
    pretrain(model, counting_batches(), 10, 1e-2, progress=False)

    def row_norm(reg: float) -> float:
        trained = train_expert(
            model, counting_batches(1, step=3), 30, 1e-2, routing_reg=reg, progress=False
        )
        experts.remove_modules(model, trained.module_idx)
        rows = [t for n, t in trained.tensors.items() if n.endswith("router_row")]
        return float(torch.stack(rows).norm())

    assert row_norm(1.0) < 0.5 * row_norm(0.0)


def test_concentration_finetuning_lowers_the_marginal_routing_entropy():
    model = small_model()
    pretrain(model, counting_batches(), 20, 1e-2, progress=False)
    result = finetune_concentration(
        model, counting_batches(4), 40, 1e-2, weight=1.0, progress=False
    )
    h = result.metrics["concentration"]
    assert sum(h[-5:]) / 5 < sum(h[:5]) / 5 - 0.2


def test_full_finetuning_moves_every_part_of_the_model():
    model = small_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    finetune_full(model, counting_batches(), 3, 1e-2, progress=False)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "embed.weight" in changed
    assert any("ffn.w_in" in k for k in changed)
    assert any("ffn.router.proj" in k for k in changed)


@pytest.mark.parametrize("coverage", [0.25, 0.5])
def test_calibrated_new_module_is_routed_for_the_requested_share_of_tokens(coverage):
    from modelcore.train.insertion import calibrate_new_rows

    model = small_model()
    pretrain(model, counting_batches(), 10, 1e-2, progress=False)
    domain = [next(counting_batches(9, step=3, batch=16)) for _ in range(2)]
    idx = experts.add_modules(model)
    calibrate_new_rows(model, idx, domain, coverage=coverage)
    chosen: list[torch.Tensor] = []
    model.ffn_layers[0].register_forward_hook(
        lambda _m, _i, out: chosen.append((out[1].topk_idx_TK == idx[0]).any(-1))
    )
    with torch.no_grad():
        for batch in domain:
            model(batch[:, :-1], aux="none")
    # Layer 0's input does not depend on any new module, so the share is exact up to ties.
    share = float(torch.cat(chosen).float().mean())
    assert share == pytest.approx(coverage, abs=0.05)
