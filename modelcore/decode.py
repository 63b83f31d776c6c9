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

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modelcore.threads import single_thread


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


def _rows(q_BKHND: torch.Tensor) -> torch.Tensor:
    """(B, H, K*N, Dh): each key/value head's queries as rows, slot-major (row r is slot
    r // N at new position r % N), so that one product per head covers every slot without
    repeating the shared keys."""
    B, K, H, N, Dh = q_BKHND.shape
    return q_BKHND.transpose(1, 2).reshape(B, H, K * N, Dh)


def _unrows(o_BHRD: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of ``_rows``: (B, K, H, N, Dh)."""
    B, H, R, Dh = o_BHRD.shape
    return o_BHRD.view(B, H, K, R // K, Dh).transpose(1, 2)


def _row_mask(K: int, N: int, L: int, include_diagonal: bool, device: torch.device) -> torch.Tensor:
    """(K*N, L) True where row r's query (position L-N + r % N) may see the key."""
    pos_R = torch.arange(L - N, L, device=device).repeat(K)
    key_L = torch.arange(L, device=device)
    if include_diagonal:
        return key_L[None, :] <= pos_R[:, None]
    return key_L[None, :] < pos_R[:, None]


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
    K, N, L = q_BKHND.shape[1], q_BKHND.shape[-2], k_BHLD.shape[-2]
    ctype = torch.float64 if q_BKHND.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q_BKHND.shape[-1])
    q_BHRD = _rows(q_BKHND.to(ctype))
    k, v = k_BHLD.to(ctype), v_BHLD.to(ctype)
    # Row r's own value: the new token at position L-N + r % N (the same for every slot).
    own_BHRD = v[:, :, L - N :].repeat(1, 1, K, 1)
    if N == 1:
        # One new token: its stick covers every earlier key (and itself with the
        # diagonal), so no mask is needed.
        stick = L if include_diagonal else L - 1
        if stick == 0:
            return _unrows(own_BHRD, K).to(q_BKHND.dtype)
        k, v = k[:, :, :stick], v[:, :, :stick]
    z = torch.matmul(q_BHRD, k.transpose(-1, -2)).mul_(scale)  # (B, H, R, L or stick)
    log_not_beta = F.softplus(z).neg_()
    log_beta = log_not_beta + z  # log sigmoid(z)
    mask_RL = None if N == 1 else _row_mask(K, N, L, include_diagonal, z.device)
    if mask_RL is not None:
        log_not_beta.masked_fill_(~mask_RL, 0.0)
    # log A_ij = log beta_ij + sum_{j<l<i} log(1 - beta_il), the sum being the whole stick
    # minus the inclusive cumulative sum up to j.
    total = log_not_beta.sum(-1, keepdim=True)
    log_a = torch.cumsum(log_not_beta, dim=-1).neg_().add_(total).add_(log_beta)
    if mask_RL is not None:
        log_a.masked_fill_(~mask_RL, float("-inf"))
    # The remaining mass goes to each new token's own value.
    o = torch.matmul(log_a.exp_(), v).addcmul_(total.exp_(), own_BHRD)
    return _unrows(o, K).to(q_BKHND.dtype)


def softmax_rows(q_BKHND: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of the last N positions over all L cached ones (queries
    and keys already rotated at their positions): (B, K, H, N, Dh)."""
    K, N, L = q_BKHND.shape[1], q_BKHND.shape[-2], k_BHLD.shape[-2]
    q_BHRD = _rows(q_BKHND)
    if N == 1:  # the new token sees every cached key
        o = F.scaled_dot_product_attention(q_BHRD, k_BHLD, v_BHLD)
    else:
        mask_RL = _row_mask(K, N, L, True, q_BKHND.device)
        o = F.scaled_dot_product_attention(q_BHRD, k_BHLD, v_BHLD, attn_mask=mask_RL)
    return _unrows(o, K)


# Up to this many new tokens (batch rows x tokens) are decoded with one intra-op thread.
SINGLE_THREAD_MAX_TOKENS = 8


@contextlib.contextmanager
def decoding_threads(n_tokens: int) -> Iterator[None]:
    """One intra-op thread while decoding a few tokens, else the caller's threads.

    A decoding step is ~100 torch ops on rows of a few hundred numbers: none is worth
    splitting, and with two intra-op threads each op ends in an OpenMP barrier that costs
    more than its arithmetic, much more when another process holds a core
    (modelcore.threads; measured in docs/kernels.md, "CPU: the whole model")."""
    if n_tokens > SINGLE_THREAD_MAX_TOKENS:
        yield
        return
    with single_thread():
        yield


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
