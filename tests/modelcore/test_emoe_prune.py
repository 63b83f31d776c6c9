"""EMoE splitting of a dense FFN, and pruning by activation frequency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelcore.config import ModelConfig
from modelcore.emoe import EMoEFeedForward, apply_emoe, balanced_kmeans, emoe_split
from modelcore.kernels import reference_backend
from modelcore.model import ModularLM
from modelcore.prune import activation_frequency, prune, threshold_for_fraction


def test_balanced_kmeans_gives_equal_clusters_that_follow_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    # Three well-separated directions, 8 noisy points each, shuffled.
    dirs = torch.eye(6)[:3] * 5
    pts = torch.cat([d + 0.3 * torch.randn(8, 6, generator=gen) for d in dirs])
    perm = torch.randperm(24, generator=gen)
    labels = balanced_kmeans(pts[perm], 3, seed=1)
    assert torch.bincount(labels).tolist() == [8, 8, 8]
    truth = (torch.arange(24) // 8)[perm]
    for c in range(3):
        assert truth[labels == c].unique().numel() == 1  # each cluster is one direction
    with pytest.raises(ValueError):
        balanced_kmeans(pts[:23], 3, seed=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_emoe_split_with_all_modules_reproduces_the_dense_ffn(with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    D, F_total, E = 16, 64, 8
    w_in = torch.randn(D, F_total, generator=gen) / 4
    w_out = torch.randn(F_total, D, generator=gen) / 8
    b_in = torch.randn(F_total, generator=gen) if with_bias else None
    x = torch.randn(37, D, generator=gen)
    dense = F.gelu(x @ w_in + (0 if b_in is None else b_in)) @ w_out
    weights = emoe_split((w_in, w_out, b_in), E, seed=3)
    assert weights.w_in_EDF.shape == (E, D, F_total // E)
    assert sorted(weights.neurons_EF.flatten().tolist()) == list(range(F_total))
    full = EMoEFeedForward(weights, E, reference_backend())
    y, routing = full(x)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=0)
    assert (routing.gates_TK == 1).all()
    # avg-k: module e's score is the mean of its neurons' key pre-activations.
    e = 2
    pre = x @ w_in[:, weights.neurons_EF[e]] + (0 if b_in is None else b_in[weights.neurons_EF[e]])
    torch.testing.assert_close(full.scores(x)[:, e], pre.mean(-1), atol=1e-5, rtol=1e-5)
    # Sparse: top-2 runs exactly the chosen modules' neurons.
    sparse = EMoEFeedForward(weights, 2, reference_backend())
    y2, r2 = sparse(x)
    keep = weights.neurons_EF[r2.topk_idx_TK[0]].flatten()
    h = x[:1] @ w_in[:, keep] + (0 if b_in is None else b_in[keep])
    torch.testing.assert_close(y2[:1], F.gelu(h) @ w_out[keep], atol=1e-5, rtol=0)


def test_apply_emoe_to_a_dense_model_keeps_its_logits() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=97, ffn_experts=1, ffn_top_k=1, d_ffn=96)
    model = ModularLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 10))
    before = model(ids).logits
    apply_emoe(model, n_modules=6, top_k=6, seed=0)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    apply_emoe_err = ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=97))
    with pytest.raises(ValueError, match="dense"):
        apply_emoe(apply_emoe_err, n_modules=2, top_k=1)


def test_prune_by_frequency_normalised_per_layer() -> None:
    torch.manual_seed(0)
    model = ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=97)).eval()
    batches = [torch.randint(0, 97, (4, 16)) for _ in range(3)]
    freq = activation_frequency(model, batches)
    assert [f.shape[0] for f in freq] == [8, 8]
    for f in freq:  # each token counts once per top-k slot
        assert f.sum().item() == pytest.approx(2.0)
    # Hand-made frequencies: layer 1 is 10x less busy overall but has the same shape,
    # so per-layer normalisation prunes the same modules in both layers.
    f0 = torch.tensor([0.5, 0.4, 0.05, 0.3, 0.01, 0.2, 0.02, 0.52])
    report = prune(model, [f0, f0 / 10], threshold=0.3)
    assert report.kept_per_layer == [5, 5]
    assert report.pruned_per_layer == [[2, 4, 6], [2, 4, 6]]
    for active in model.active_modules:
        assert active.tolist() == [True, True, False, True, False, True, False, True]
    out = model(batches[0])
    for r in out.routing:
        assert not torch.isin(r.topk_idx_TK, torch.tensor([2, 4, 6])).any()
    # Removing instead of masking drops the modules for good (0.4/0.52, 0.3/0.52 and
    # 0.2/0.52 are under 0.9; the already-disabled modules stay, still disabled).
    report = prune(model, [f0, f0], threshold=0.9, remove=True)
    assert report.pruned_per_layer == [[1, 3, 5], [1, 3, 5]]
    assert model.n_modules == [5, 5]
    assert model.active_modules[0].tolist() == [True, False, False, False, True]


def test_threshold_for_fraction_keeps_at_most_that_share() -> None:
    freq = [torch.tensor([0.9, 0.5, 0.1, 0.3]), torch.tensor([0.02, 0.01, 0.04, 0.005])]
    model = ModularLM(ModelConfig.from_name("tiny").replace(vocab_size=97, ffn_experts=4))
    threshold = threshold_for_fraction(freq, 0.5)
    report = prune(model, freq, threshold)
    assert sum(report.kept_per_layer) <= 4
    assert report.kept_fraction <= 0.5
    assert min(report.kept_per_layer) >= 1
