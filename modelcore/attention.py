"""Mixture-of-Attention (ModuleFormer, Shen et al. 2023, section 3.2).

Shape legend: B batch, T length, D model dim, E attention experts, K top-k experts per
token, H heads per expert, Dh head dim, X = H*Dh (one expert's width), A = B*T*K
assignments.

Every attention expert owns a query projection ``w_q_EDX`` and an output projection
``w_o_EXD``; keys and values are shared by all experts (``w_k_DX``, ``w_v_DX``), as in
ModuleFormer's MoA. An MLP router picks K experts per token; the chosen experts' queries
come from one grouped matmul, each (token, slot) pair attends over the shared keys, and
the output projection is a second grouped matmul that sums the K slots with the gates.

Attention kinds (``config.attention``):

* ``stickbreaking`` (default; no position embedding): ``backend.stickbreaking``, whose
  convention is documented in ``modelcore.kernels.sb_ref``: ``beta_ij = sigmoid(q_i.k_j /
  sqrt(Dh))``, ``A_ij = beta_ij * prod_{j<l<i} (1 - beta_il)`` computed in log space
  (``log(1 - beta) = -softplus(z)``), the stick broken from the nearest earlier key
  backwards, and the remaining mass ``r_i`` sent to the token's own value (Tan et al. 2024,
  "Scaling Stick-Breaking Attention"; ModuleFormer uses the same heads). Recency is built
  into the stick, which is why no position embedding is needed.
* ``softmax``: the ablation baseline, causal ``F.scaled_dot_product_attention`` with RoPE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.config import ModelConfig
from modelcore.decode import (
    GATHER_MAX_ASSIGNMENTS,
    LayerCache,
    gathered_mm,
    softmax_rows,
    stickbreaking_rows,
)
from modelcore.kernels import KernelBackend, plan_routing
from modelcore.router import LayerRouting, MLPRouter, route


def rope_tables(
    T: int, head_dim: int, theta: float, device: torch.device | None, *, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions ``start .. start+T-1``: (T, head_dim / 2) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions_T = torch.arange(start, start + T, device=device).float()
    angles_TF = torch.outer(positions_T, inv_freq)
    return angles_TF.cos(), angles_TF.sin()


def apply_rope(x_BHTD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) by position-dependent angles (Su et al. 2021)."""
    x1, x2 = x_BHTD[..., 0::2].float(), x_BHTD[..., 1::2].float()
    out = torch.stack((x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF), dim=-1)
    return out.flatten(-2).to(x_BHTD.dtype)


class MixtureOfAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: KernelBackend,
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        E, D, X = config.att_experts, config.d_model, config.att_width
        self.backend = backend
        self.kind = config.attention
        self.top_k = config.att_top_k
        self.n_heads = config.att_heads
        self.head_dim = config.head_dim
        self.include_diagonal = config.sb_include_diagonal
        self.rope_theta = config.rope_theta
        std = config.init_std
        self.router = MLPRouter(D, config.router_hidden, E, init_std=std, device=device)
        self.w_q_EDX = nn.Parameter(torch.randn(E, D, X, device=device) * std)
        self.w_o_EXD = nn.Parameter(
            torch.randn(E, X, D, device=device) * (std / math.sqrt(2 * config.n_layers))
        )
        self.w_k_DX = nn.Parameter(torch.randn(D, X, device=device) * std)
        self.w_v_DX = nn.Parameter(torch.randn(D, X, device=device) * std)
        self.register_buffer(
            "active_E", torch.ones(E, dtype=torch.bool, device=device), persistent=False
        )

    def attend(
        self, q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor
    ) -> torch.Tensor:
        if self.kind == "stickbreaking":
            o_BHTD, _rem_BHT = self.backend.stickbreaking(
                q_BHTD, k_BHTD, v_BHTD, include_diagonal=self.include_diagonal
            )
            return o_BHTD
        T = q_BHTD.shape[-2]
        cos_TF, sin_TF = rope_tables(T, self.head_dim, self.rope_theta, q_BHTD.device)
        q_BHTD, k_BHTD = apply_rope(q_BHTD, cos_TF, sin_TF), apply_rope(k_BHTD, cos_TF, sin_TF)
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True)

    def attend_cached(
        self,
        q_BSTD: torch.Tensor,
        k_BHTD: torch.Tensor,
        v_BHTD: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """The new tokens' attention over the cached ones and themselves; their keys and
        values are appended to ``cache`` (modelcore.decode)."""
        B, S, T, Dh = q_BSTD.shape
        K = self.top_k
        offset = cache.length
        if self.kind == "softmax":
            cos_TF, sin_TF = rope_tables(
                T, self.head_dim, self.rope_theta, q_BSTD.device, start=offset
            )
            q_BSTD, k_BHTD = apply_rope(q_BSTD, cos_TF, sin_TF), apply_rope(k_BHTD, cos_TF, sin_TF)
        k_BHLD, v_BHLD = cache.append(k_BHTD, v_BHTD)
        if offset == 0:
            # Prefill: the whole causal attention, as in training (stick-breaking through
            # the backend; queries and keys already rotated for softmax).
            k_BSTD, v_BSTD = k_BHTD.repeat(1, K, 1, 1), v_BHTD.repeat(1, K, 1, 1)
            if self.kind == "stickbreaking":
                return self.attend(q_BSTD, k_BSTD, v_BSTD)
            return F.scaled_dot_product_attention(q_BSTD, k_BSTD, v_BSTD, is_causal=True)
        q_BKHTD = q_BSTD.view(B, K, S // K, T, Dh)
        if self.kind == "stickbreaking":
            o = stickbreaking_rows(q_BKHTD, k_BHLD, v_BHLD, include_diagonal=self.include_diagonal)
        else:
            o = softmax_rows(q_BKHTD, k_BHLD, v_BHLD)
        return o.reshape(B, S, T, Dh)

    def forward(
        self, x_BTD: torch.Tensor, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerRouting]:
        """``cache``: decode incrementally (modelcore.decode): the T tokens of ``x_BTD``
        follow the cached ones, and their keys/values are appended to it."""
        B, T, D = x_BTD.shape
        K, H, Dh = self.top_k, self.n_heads, self.head_dim
        x_ND = x_BTD.reshape(B * T, D)  # N = B*T tokens
        routing = route(self.router(x_ND), self.active_E, K)
        idx_NK = routing.topk_idx_TK
        # Decoding a few tokens: gathered expert weights, no routing plan (modelcore.decode).
        few = cache is not None and B * T * K <= GATHER_MAX_ASSIGNMENTS
        plan = None if few else plan_routing(idx_NK, self.w_q_EDX.shape[0])
        # Queries of the K chosen experts, in assignment order a = token*K + slot.
        if plan is None:
            q_AX = gathered_mm(x_ND, self.w_q_EDX, idx_NK)
        else:
            q_AX = self.backend.grouped_mm(x_ND, self.w_q_EDX, plan)
        q_BSTD = q_AX.view(B, T, K * H, Dh).transpose(1, 2)  # S = K*H query heads
        k_BHTD = (x_ND @ self.w_k_DX).view(B, T, H, Dh).transpose(1, 2)
        v_BHTD = (x_ND @ self.w_v_DX).view(B, T, H, Dh).transpose(1, 2)
        if cache is not None:
            o_BSTD = self.attend_cached(q_BSTD, k_BHTD, v_BHTD, cache)
        else:
            # Each slot's heads attend over the same shared keys/values.
            k_BSTD = k_BHTD.repeat(1, K, 1, 1)
            v_BSTD = v_BHTD.repeat(1, K, 1, 1)
            o_BSTD = self.attend(q_BSTD, k_BSTD, v_BSTD)
        o_AX = o_BSTD.transpose(1, 2).reshape(B * T * K, H * Dh)
        if plan is None:
            y_ND = gathered_mm(
                o_AX, self.w_o_EXD, idx_NK, gates_TK=routing.gates_TK, per_assignment=True
            )
            return y_ND.view(B, T, D), routing
        # The output projection reads expert-sorted rows and sums the K slots with gates.
        o_sorted_AX = o_AX.index_select(0, plan.sorted_assign_A)
        y_ND = self.backend.grouped_mm(
            o_sorted_AX, self.w_o_EXD, plan, gates_TK=routing.gates_TK, grouped_in=True
        )
        return y_ND.view(B, T, D), routing
