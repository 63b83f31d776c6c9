"""Losses on small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from modelcore.losses import (
    concentration_loss,
    lm_loss,
    mi_loss,
    routing_reg,
    switch_balance_loss,
    z_loss,
)

LN2, LN4 = math.log(2), math.log(4)


def test_mi_loss_hand_cases() -> None:
    # Uniform routing: H(e|x) = ln 4 = H(e), so the MI loss is 0.
    uniform = torch.full((6, 4), 0.25)
    assert mi_loss(uniform).item() == pytest.approx(0.0, abs=1e-7)
    # Each token sure of a different module, all four used: H(e|x) = 0, H(e) = ln 4.
    one_hot = torch.eye(4)
    assert mi_loss(one_hot).item() == pytest.approx(-LN4, abs=1e-6)
    # Every token sure of module 0: H(e|x) = 0 and H(e) = 0 (0 log 0 counts as 0).
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 3)
    assert mi_loss(collapsed).item() == pytest.approx(0.0, abs=1e-7)
    # Two tokens, each 50/50 over its own pair: H(e|x) = ln 2, H(e) = ln 4 -> -ln 2.
    pairs = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    assert mi_loss(pairs).item() == pytest.approx(LN2 - LN4, abs=1e-6)


def test_concentration_is_the_marginal_entropy() -> None:
    assert concentration_loss(torch.eye(4)).item() == pytest.approx(LN4, abs=1e-6)
    concentrated = torch.tensor([[0.5, 0.5, 0, 0]] * 5)
    assert concentration_loss(concentrated).item() == pytest.approx(LN2, abs=1e-6)


def test_routing_reg_is_the_sum_of_row_norms() -> None:
    rows = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0, 2.0]])]
    assert routing_reg(rows).item() == pytest.approx(7.0)
    rows_grad = torch.tensor([3.0, 4.0], requires_grad=True)
    routing_reg(rows_grad).backward()
    torch.testing.assert_close(rows_grad.grad, torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError):
        routing_reg([])


def test_switch_balance_and_z_loss() -> None:
    uniform = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert switch_balance_loss(uniform, idx, 4).item() == pytest.approx(1.0)
    # All load on module 0, probability 1 there: E * 1 * 1 = 4.
    probs = torch.tensor([[1.0, 0, 0, 0]] * 4)
    assert switch_balance_loss(probs, torch.zeros(4, 1, dtype=torch.long), 4).item() == 4.0
    logits = torch.zeros(3, 4)  # logsumexp = ln 4
    assert z_loss(logits).item() == pytest.approx(LN4**2, abs=1e-6)
    active = torch.tensor([True, True, False, False])
    assert z_loss(logits, active).item() == pytest.approx(LN2**2, abs=1e-6)


def test_lm_loss_uniform_logits_is_log_vocab() -> None:
    logits = torch.zeros(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    assert lm_loss(logits, targets).item() == pytest.approx(math.log(10), abs=1e-6)
