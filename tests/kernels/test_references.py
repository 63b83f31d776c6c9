"""The references are the oracles of the kernel tests, so they are checked against the
definitions written out the slow way: a per-token loop for the MoE matmul, and the product
formula of stick-breaking attention."""

from __future__ import annotations

import pytest
import torch

from modelcore.kernels import plan_routing
from modelcore.kernels.moe_ref import grouped_mm_ref
from modelcore.kernels.sb_ref import stickbreaking_attention_ref


def test_plan_routing_sorts_stably_and_counts():
    idx = torch.tensor([[2, 0], [0, 2], [4, 0], [2, 4]])
    plan = plan_routing(idx, 6)
    assert plan.sorted_expert_A.tolist() == [0, 0, 0, 2, 2, 2, 4, 4]
    assert plan.sorted_assign_A.tolist() == [1, 2, 5, 0, 3, 6, 4, 7]  # ties keep token order
    assert plan.offsets_E.tolist() == [3, 3, 6, 6, 8, 8]  # experts 1, 3, 5 are empty
    assert plan.k == 2


@pytest.mark.parametrize(
    ("grouped_in", "grouped_out"), [(False, False), (True, False), (False, True)]
)
def test_grouped_mm_ref_is_the_per_token_loop(grouped_in, grouped_out):
    torch.manual_seed(0)
    T, K, E, D, H = 9, 3, 5, 6, 4
    idx = torch.randint(0, E, (T, K))
    plan = plan_routing(idx, E)
    w = torch.randn(E, D, H)
    x = torch.randn(T * K if grouped_in else T, D)
    y = grouped_mm_ref(x, w, plan, grouped_in=grouped_in, grouped_out=grouped_out)
    for p, a in enumerate(plan.sorted_assign_A.tolist()):
        t, slot = divmod(a, K)
        row = x[p] if grouped_in else x[t]
        want = row @ w[idx[t, slot]]
        torch.testing.assert_close(y[p if grouped_out else a], want)
    gates = torch.rand(T, K)
    y = grouped_mm_ref(
        x[:T] if not grouped_in else x, w, plan, gates_TK=gates, grouped_in=grouped_in
    )
    assert y.shape == (T, H)


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_sb_ref_is_the_stick_breaking_product(include_diagonal):
    torch.manual_seed(0)
    T, D = 7, 3
    q, k, v = (torch.randn(1, 1, T, D, dtype=torch.float64) for _ in range(3))
    o, rem = stickbreaking_attention_ref(q, k, v, include_diagonal=include_diagonal)
    beta = torch.sigmoid((q[0, 0] @ k[0, 0].T) / D**0.5)
    for i in range(T):
        last = i if include_diagonal else i - 1
        out, stick = torch.zeros(D, dtype=torch.float64), 1.0
        for j in range(last, -1, -1):  # nearest key first
            out += stick * beta[i, j] * v[0, 0, j]
            stick = stick * (1 - beta[i, j])
        out += stick * v[0, 0, i]
        torch.testing.assert_close(o[0, 0, i], out)
        torch.testing.assert_close(rem[0, 0, i], torch.as_tensor(stick, dtype=torch.float64))


@pytest.mark.parametrize(
    ("grouped_in", "grouped_out"), [(False, False), (True, False), (False, True)]
)
def test_grouped_mm_ref_inference_schedule_matches_autograd_schedule(grouped_in, grouped_out):
    torch.manual_seed(1)
    T, K, E, D, H = 23, 2, 6, 8, 5
    idx = torch.randint(0, E - 1, (T, K))  # expert E-1 stays empty
    plan = plan_routing(idx, E)
    x = torch.randn(T * K if grouped_in else T, D)
    w = torch.randn(E, D, H, requires_grad=True)
    gates = None if grouped_out else torch.rand(T, K)
    train = grouped_mm_ref(
        x, w, plan, gates_TK=gates, grouped_in=grouped_in, grouped_out=grouped_out
    )
    with torch.no_grad():
        infer = grouped_mm_ref(
            x, w, plan, gates_TK=gates, grouped_in=grouped_in, grouped_out=grouped_out
        )
    assert train.requires_grad
    assert not infer.requires_grad
    torch.testing.assert_close(infer, train.detach())
