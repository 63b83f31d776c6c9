"""Incremental decoding: a KV cache per attention layer and the new tokens' attention.

Shape legend: B batch (rows of the cache), H key/value heads, K experts per token (query
slots), N new tokens, L cached tokens after the new ones are appended, Dh head dim.

A ``KVCache`` holds, for every Mixture-of-Attention layer, the shared keys and values of
the tokens seen so far (docs/modelcore.md, "Generation (KV cache)"). Keys of softmax
attention are stored after RoPE, rotated at their own position, so a new query rotated at
its position scores against them exactly as in the full forward. ``ModularLM.forward(ids,
cache=cache)`` (and ``ExpertEnsemble.hidden``) appends the new tokens' keys and values and
attends from the new queries only: a new token's stick-breaking row is ``z = q.K^T`` over
the cached keys, its log-betas and the reverse cumulative sum of ``log(1 - beta)`` from the
nearest key backwards, the same recurrence as ``modelcore.kernels.sb_ref`` restricted to
the rows of the new queries. Routers and MoE modules work token by token, so they need no
cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LayerCache:
    """One attention layer's keys and values of the cached tokens: (B, H, length, Dh) views
    of buffers that grow by doubling (amortised O(1) copies per token)."""

    k_BHCD: torch.Tensor | None = None  # noqa: N815  (C = capacity >= length)
    v_BHCD: torch.Tensor | None = None  # noqa: N815
    length: int = 0

    def append(
        self, k_BHND: torch.Tensor, v_BHND: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values; returns all cached ones (B, H, L, Dh)."""
        N = k_BHND.shape[2]
        need = self.length + N
        if self.k_BHCD is None or self.v_BHCD is None or need > self.k_BHCD.shape[2]:
            B, H, _, Dh = k_BHND.shape
            capacity = max(need, 2 * (0 if self.k_BHCD is None else self.k_BHCD.shape[2]), 16)
            k_new = k_BHND.new_empty(B, H, capacity, Dh)
            v_new = v_BHND.new_empty(B, H, capacity, v_BHND.shape[3])
            if self.k_BHCD is not None and self.v_BHCD is not None and self.length:
                k_new[:, :, : self.length] = self.k_BHCD[:, :, : self.length]
                v_new[:, :, : self.length] = self.v_BHCD[:, :, : self.length]
            self.k_BHCD, self.v_BHCD = k_new, v_new
        self.k_BHCD[:, :, self.length : need] = k_BHND
        self.v_BHCD[:, :, self.length : need] = v_BHND
        self.length = need
        return self.k_BHCD[:, :, :need], self.v_BHCD[:, :, :need]


@dataclass
class KVCache:
    """Every attention layer's cache, created on first use (``layer(i)``)."""

    layers: list[LayerCache] = field(default_factory=list)

    def layer(self, i: int) -> LayerCache:
        while len(self.layers) <= i:
            self.layers.append(LayerCache())
        return self.layers[i]

    @property
    def length(self) -> int:
        """Tokens cached (the position of the next token)."""
        return self.layers[0].length if self.layers else 0


def stickbreaking_rows(
    q_BKHND: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    *,
    include_diagonal: bool = False,
) -> torch.Tensor:
    """Stick-breaking attention of the last N positions over all L cached ones.

    ``q_BKHND``: the queries of the new tokens (positions L-N..L-1) for K slots sharing the
    keys/values ``k_BHLD`` / ``v_BHLD`` (the new tokens' own included, last). The rows of
    ``sb_ref.stickbreaking_attention_ref`` for these queries: (B, K, H, N, Dh).
    """
    N, L = q_BKHND.shape[-2], k_BHLD.shape[-2]
    ctype = torch.float64 if q_BKHND.dtype == torch.float64 else torch.float32
    q = q_BKHND.to(ctype)
    k, v = k_BHLD.to(ctype).unsqueeze(1), v_BHLD.to(ctype).unsqueeze(1)
    scale = 1.0 / math.sqrt(q_BKHND.shape[-1])
    own_v = v[..., L - N :, :]
    if N == 1:
        # One new token: its stick covers every earlier key (and itself with the
        # diagonal), so no mask is needed.
        stick = L if include_diagonal else L - 1
        if stick == 0:
            return own_v.expand_as(q).to(q_BKHND.dtype)
        z = torch.matmul(q, k[..., :stick, :].transpose(-1, -2)) * scale  # (B, K, H, 1, stick)
        log_not_beta = -F.softplus(z)
        total = log_not_beta.sum(-1)
        after_j = total.unsqueeze(-1) - torch.cumsum(log_not_beta, dim=-1)
        A = torch.exp(after_j - F.softplus(-z))
        o = torch.matmul(A, v[..., :stick, :]) + torch.exp(total).unsqueeze(-1) * own_v
        return o.to(q_BKHND.dtype)
    z = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, K, H, N, L)
    pos_N = torch.arange(L - N, L, device=q.device)
    key_L = torch.arange(L, device=q.device)
    if include_diagonal:
        mask_NL = key_L[None, :] <= pos_N[:, None]
    else:
        mask_NL = key_L[None, :] < pos_N[:, None]
    log_beta = -F.softplus(-z)
    log_not_beta = (-F.softplus(z)).masked_fill(~mask_NL, 0.0)
    # sum_{j<l<i} log(1 - beta_il): the whole stick minus the inclusive cumsum up to j.
    total = log_not_beta.sum(-1)
    after_j = total.unsqueeze(-1) - torch.cumsum(log_not_beta, dim=-1)
    A = torch.exp((log_beta + after_j).masked_fill(~mask_NL, float("-inf")))
    # The remaining mass goes to each new token's own value.
    o = torch.matmul(A, v) + torch.exp(total).unsqueeze(-1) * own_v
    return o.to(q_BKHND.dtype)


def softmax_rows(q_BKHND: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of the last N positions over all L cached ones (queries
    and keys already rotated at their positions): (B, K, H, N, Dh)."""
    B, K, H, N, Dh = q_BKHND.shape
    L = k_BHLD.shape[-2]
    k = k_BHLD.unsqueeze(1).expand(B, K, H, L, Dh)
    v = v_BHLD.unsqueeze(1).expand(B, K, H, L, v_BHLD.shape[-1])
    if N == 1:  # the new token sees every cached key
        return F.scaled_dot_product_attention(q_BKHND, k, v)
    pos_N = torch.arange(L - N, L, device=q_BKHND.device)
    mask_NL = torch.arange(L, device=q_BKHND.device)[None, :] <= pos_N[:, None]
    return F.scaled_dot_product_attention(q_BKHND, k, v, attn_mask=mask_NL)


# Decoding a few new tokens: at most this many (token, expert) assignments per layer use
# ``gathered_mm``; more go through the backend's grouped matmul, as in training.
GATHER_MAX_ASSIGNMENTS = 16


def gathered_mm(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    idx_TK: torch.Tensor,
    *,
    gates_TK: torch.Tensor | None = None,
    per_assignment: bool = False,
) -> torch.Tensor:
    """``backend.grouped_mm`` for a handful of tokens: one matmul per assignment with its
    expert's weights read in place, instead of a routing plan (a sort), a gather of the
    rows and one matmul per expert block.

    ``x``: (T, D) token rows, or (A, D) assignment rows (token-major, A = T*K) when
    ``per_assignment``. Returns (A, H) assignment-ordered, or with ``gates_TK`` the
    gated sum over each token's K slots, (T, H).
    """
    T, K = idx_TK.shape
    experts = idx_TK.reshape(-1).tolist()  # a few ints: one host read on a GPU
    rows = [a if per_assignment else a // K for a in range(T * K)]
    y_AH = torch.cat([x[r : r + 1] @ w_EDH[e] for r, e in zip(rows, experts, strict=True)])
    if gates_TK is None:
        return y_AH
    return torch.bmm(gates_TK.to(y_AH.dtype).unsqueeze(1), y_AH.view(T, K, -1)).squeeze(1)
