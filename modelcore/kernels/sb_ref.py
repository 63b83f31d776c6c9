"""Stick-breaking attention: the PyTorch reference (CPU path and test oracle).

Shape legend: B batch, H heads, T length, D head dim.

Convention (Tan et al. 2024, "Scaling Stick-Breaking Attention", Eq. 2-4; ModuleFormer
uses the same causal stick-breaking heads without position embeddings). For query i and
an earlier key j < i::

    z_ij = q_i . k_j * scale                 (scale defaults to 1/sqrt(D))
    beta_ij = sigmoid(z_ij)
    A_ij = beta_ij * prod_{j<l<i} (1 - beta_il)

The stick is broken from the nearest earlier key backwards, so recency is built in and no
position embedding is needed. Everything happens in log space::

    log beta_ij     = -softplus(-z_ij)
    log(1 - beta_ij) = -softplus(z_ij)

never ``log`` of a rounded sigmoid: for z = 20, sigmoid rounds to 1.0 in fp32 and
log(1 - beta) would be -inf, while -softplus(20) = -20.000000002 is exact.

The remaining mass ``r_i = prod_{j<i} (1 - beta_ij) = 1 - sum_j A_ij`` goes to the current
token's own value: ``o_i = sum_j A_ij v_j + r_i v_i``. For i = 0 there is no earlier key
and o_0 = v_0. With ``include_diagonal`` the stick also covers j = i (then
``A_ii = beta_ii`` and the remainder is ``prod_{j<=i}(1 - beta_ij)``, still sent to v_i).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stickbreaking_attention_ref(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    scale: float | None = None,
    include_diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(o_BHTD, rem_BHT)``: the attention output and each query's remaining mass.

    O(T^2) memory; computed in fp32 (or fp64 if the inputs are fp64) and cast back.
    Differentiable through autograd.
    """
    T = q_BHTD.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
    ctype = torch.float64 if q_BHTD.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(ctype) for t in (q_BHTD, k_BHTD, v_BHTD))
    z_BHTT = torch.matmul(q, k.transpose(-1, -2)) * scale
    i_idx = torch.arange(T, device=q.device)
    # mask_ij: key j is inside query i's stick.
    if include_diagonal:
        mask_TT = i_idx[None, :] <= i_idx[:, None]
    else:
        mask_TT = i_idx[None, :] < i_idx[:, None]
    log_beta = -F.softplus(-z_BHTT)
    log_not_beta = (-F.softplus(z_BHTT)).masked_fill(~mask_TT, 0.0)
    # sum_{j<l<i} log(1 - beta_il) = (sum over the whole stick) - (inclusive cumsum up to j)
    total_BHT = log_not_beta.sum(-1)
    after_j = total_BHT.unsqueeze(-1) - torch.cumsum(log_not_beta, dim=-1)
    log_A = (log_beta + after_j).masked_fill(~mask_TT, float("-inf"))
    A_BHTT = torch.exp(log_A)
    rem_BHT = torch.exp(total_BHT)
    o = torch.matmul(A_BHTT, v) + rem_BHT.unsqueeze(-1) * v
    return o.to(q_BHTD.dtype), rem_BHT.to(q_BHTD.dtype)
