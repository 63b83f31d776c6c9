"""Stick-breaking attention against a direct O(T^2) evaluation of its definition (float64).

The definition (modelcore.kernels.sb_ref; Tan et al. 2024): for j < i,
``A_ij = sigmoid(z_ij) * prod_{j<l<i} (1 - sigmoid(z_il))``, ``r_i = prod_{j<i} (1 -
sigmoid(z_ij))``, ``o_i = sum_j A_ij v_j + r_i v_i``. The loops below spell that out
literally, one i, j and l at a time, so they share no code or trick with the kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

from modelcore.attention import MixtureOfAttention
from modelcore.config import ModelConfig
from modelcore.kernels import reference_backend, select_backend


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def direct_stickbreaking(
    q_TD: torch.Tensor, k_TD: torch.Tensor, v_TD: torch.Tensor, include_diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head, float64, straight from the formula: returns (o_TD, A_TT, r_T)."""
    T, D = q_TD.shape
    scale = 1.0 / math.sqrt(D)
    q, k, v = q_TD.tolist(), k_TD.tolist(), v_TD.tolist()

    def beta(i: int, j: int) -> float:
        return _sigmoid(sum(q[i][d] * k[j][d] for d in range(D)) * scale)

    A = [[0.0] * T for _ in range(T)]
    r = [0.0] * T
    o = [[0.0] * D for _ in range(T)]
    for i in range(T):
        last = i if include_diagonal else i - 1  # the stick covers keys j <= last
        for j in range(last + 1):
            prod = 1.0
            for m in range(j + 1, last + 1):  # the formula's l
                prod *= 1.0 - beta(i, m)
            A[i][j] = beta(i, j) * prod
        rem = 1.0
        for j in range(last + 1):
            rem *= 1.0 - beta(i, j)
        r[i] = rem
        for d in range(D):
            o[i][d] = sum(A[i][j] * v[j][d] for j in range(T)) + r[i] * v[i][d]
    f64 = torch.float64
    return torch.tensor(o, dtype=f64), torch.tensor(A, dtype=f64), torch.tensor(r, dtype=f64)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_backend_matches_direct_evaluation_and_mass_sums_to_one(include_diagonal: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 13, 5  # odd shapes on purpose
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    o, rem = select_backend("cpu").stickbreaking(q, k, v, include_diagonal=include_diagonal)
    for b in range(B):
        for h in range(H):
            o_ref, A_ref, r_ref = direct_stickbreaking(q[b, h], k[b, h], v[b, h], include_diagonal)
            torch.testing.assert_close(o[b, h], o_ref, atol=1e-6, rtol=0)
            torch.testing.assert_close(rem[b, h], r_ref, atol=1e-6, rtol=0)
            # Attention weights plus the remaining mass are a distribution over the prefix.
            torch.testing.assert_close(A_ref.sum(-1) + r_ref, torch.ones(T, dtype=torch.float64))
    # The same through the kernel alone: with all values 1, every output is exactly 1.
    ones = torch.ones_like(v)
    o1, _ = select_backend("cpu").stickbreaking(q, k, ones, include_diagonal=include_diagonal)
    torch.testing.assert_close(o1, ones, atol=1e-12, rtol=0)


def test_large_logits_stay_finite_in_log_space() -> None:
    """z = +-40: a rounded sigmoid would give log(0); the log-space form must not."""
    q = torch.full((1, 1, 6, 4), 8.0)
    k = torch.full((1, 1, 6, 4), 10.0)
    k[..., 1::2, :] *= -1
    v = torch.randn(1, 1, 6, 4)
    o, rem = reference_backend().stickbreaking(q, k, v)
    assert torch.isfinite(o).all()
    assert torch.isfinite(rem).all()


def test_mixture_of_attention_module_matches_direct_formula() -> None:
    """The whole MoA layer in float64: routed queries, shared keys/values, gated outputs."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny").replace(
        d_model=12, att_experts=3, att_top_k=2, att_heads=2, head_dim=5
    )
    moa = MixtureOfAttention(cfg, reference_backend()).double()
    B, T = 2, 7
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    y, routing = moa(x)
    x_ND = x.reshape(B * T, -1)
    k_all = (x_ND @ moa.w_k_DX).view(B, T, 2, 5)
    v_all = (x_ND @ moa.w_v_DX).view(B, T, 2, 5)
    expected = torch.zeros(B * T, cfg.d_model, dtype=torch.float64)
    for b in range(B):
        for slot in range(2):
            for t in range(T):
                n = b * T + t
                e = int(routing.topk_idx_TK[n, slot])
                gate = routing.gates_TK[n, slot]
                heads = []
                for h in range(2):
                    # Query of expert e for every position (only row t is used from it).
                    q_TD = (x[b] @ moa.w_q_EDX[e]).view(T, 2, 5)[:, h]
                    # Row t attends with the experts chosen at t; keys are shared.
                    o_TD, _, _ = direct_stickbreaking(q_TD, k_all[b, :, h], v_all[b, :, h])
                    heads.append(o_TD[t])
                expected[n] += gate * (torch.cat(heads) @ moa.w_o_EXD[e])
    torch.testing.assert_close(y.reshape(B * T, -1), expected, atol=1e-6, rtol=0)
