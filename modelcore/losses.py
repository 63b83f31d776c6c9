"""Losses: pure functions over tensors (nothing kept between calls).

Shape legend: B batch, T tokens, V vocab, E modules, K top-k, R router hidden dim.

Routing losses take ``probs_TE``, the router's softmax over the active modules (inactive
modules have probability exactly 0, and ``0 * log 0`` counts as 0 via ``xlogy``):

* ``mi_loss`` (ModuleFormer section 3.3): ``H(e|x) - H(e)``, i.e. minus the mutual
  information between tokens and modules. Minimising it makes each token's routing sharp
  (low ``H(e|x)``) while the batch uses all modules (high ``H(e)``).
* ``concentration_loss`` (ModuleFormer section 4.2): ``H(e)`` alone, so finetuning
  concentrates a task on few modules and the rest can be pruned.
* ``routing_reg`` (ModuleFormer section 4.3): the L2 norm of the new modules' router rows,
  which keeps an inserted module from grabbing tokens the old modules handled.
* ``switch_balance_loss`` (Fedus et al. 2021) and ``z_loss`` (Zoph et al. 2022, ST-MoE):
  the baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim)


def marginal_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """``H(e)`` of the batch's average routing distribution, in nats."""
    return _entropy(probs_TE.float().mean(0))


def conditional_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """``H(e|x)``: the mean over tokens of each token's routing entropy, in nats."""
    return _entropy(probs_TE.float()).mean()


def mi_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """``H(e|x) - H(e)`` = minus the mutual information between token and module."""
    return conditional_entropy(probs_TE) - marginal_entropy(probs_TE)


def concentration_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """``H(e)``: low when the batch's tokens go to few modules."""
    return marginal_entropy(probs_TE)


def routing_reg(router_rows: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the L2 norms of the new modules' router rows (each row an R-vector)."""
    rows = [router_rows] if isinstance(router_rows, torch.Tensor) else list(router_rows)
    if not rows:
        raise ValueError("routing_reg needs at least one router row")
    return sum(
        (r.float().reshape(-1, r.shape[-1]).norm(dim=-1).sum() for r in rows),
        start=torch.zeros((), device=rows[0].device),
    )


def switch_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """``E * sum_e f_e * P_e``: f_e the fraction of assignments to e, P_e its mean prob.

    Equals 1 for perfectly uniform routing, and grows as load piles on few modules.
    """
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=n_experts).float()
    f_E = counts_E / counts_E.sum()
    P_E = probs_TE.float().mean(0)
    return n_experts * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, active_E: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits (keeps them from drifting large)."""
    logits = logits_TE.float()
    if active_E is not None:
        logits = logits.masked_fill(~active_E, float("-inf"))
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def lm_loss(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy in nats (targets already shifted by the caller)."""
    V = logits_BTV.shape[-1]
    return F.cross_entropy(
        logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1), ignore_index=ignore_index
    )
