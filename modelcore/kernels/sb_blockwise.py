"""Stick-breaking attention on the CPU, block by block (forward and hand-written backward).

Shape legend: B batch, H heads, T length, D head dim, N = B*H (flattened), Q queries in a
block, C keys in a chunk.

Same contract and convention as ``sb_ref.stickbreaking_attention_ref`` (the test oracle):
``o_i = sum_j A_ij v_j + r_i v_i``, ``A_ij = beta_ij prod_{j<l<i} (1 - beta_il)``. The
reference builds several T x T float tensors per head; this path takes Q queries at a
time and walks their keys in chunks of C from the nearest backwards (the walk of the Triton
forward in ``sb_kernels``), carrying one number per query between chunks: the stick
remaining after the keys already passed. Nothing larger than N x Q x C exists at once.
Measurements: docs/kernels.md, "CPU path".

Keys and values are flipped once (``k_rev[r] = k[T-1-r]``), so "nearest first" is plain
column order. The recurrence is carried as the remaining stick itself, not its log::

    1 - beta_ij = sigmoid(-z_ij)            (one ``sigmoid`` of the negated logits)
    stick_ij = carry_i * prod_{l nearer or = j} (1 - beta_il)   (one ``cumprod``)
    A_ij = stick_i,j-1 - stick_ij           (one shifted subtraction)

Three elementwise passes per tile; the log form (``softplus``, ``cumsum``, ``exp``) is
slower, its ``softplus`` alone several times a ``sigmoid`` (docs/kernels.md, "CPU
path"). No log of a rounded
sigmoid is ever taken: ``sigmoid(-z)`` is exact to rounding for any z (9.4e-14 at z = 30),
and every product and difference is accurate to ~1e-7 of the stick, i.e. in absolute
terms, which is what ``o`` needs (the fp32 reference, whose ``total - cumsum`` cancels,
is ~1e-3 off fp64 at |z| ~ 30 over 1100 keys; this path 4e-6). Sticks that shrink past
fp32's smallest normal (1e-38) lose bits and then reach zero, where their weights are
negligible anyway. Keys outside the stick (only in the
diagonal tile) get z = -inf: no break, A = 0. ``r_i`` is the carry after the last chunk.

Backward (do = dL/do, G_i = dL/dlog r_i = r_i (do_i.v_i + drem_i), the rem gradient
folded in), as in ``sb_kernels``: g_ij = A_ij (do_i.v_j) and

    dz_ij = g_ij (1 - beta_ij) - beta_ij (F_ij + G_i) = g_ij - beta_ij h_ij,
    h_ij = g_ij + F_ij + G_i,   F_ij = sum of g_il over keys l *farther* than j.

F is a sum from the far end, so the backward walks each block's chunks farthest first,
starting every chunk from the stick the forward saved there (one (N, Q) number per
chunk), and carries G_i + the g already passed; inside a chunk a far-first ``cumsum`` (of
the flipped tile) gives the rest. Getting F as (row total - near-first running sum)
instead would cancel: at |z| ~ 30 over 1100 keys that put 6e-5 (relative) into dq,
against 1e-6 this way. Each tile is recomputed; nothing T x T is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from modelcore.threads import default_workers, run_blocks, single_thread

# Tile size: the fastest of those tried (docs/kernels.md, "Figures behind the code").
QUERY_BLOCK = 128
KEY_CHUNK = 1024


def _outside_mask(
    n: int, include_diagonal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(n, n) +inf where the key lies outside the query's stick in the diagonal tile, else 0:
    added to -z (an ``add_`` of a broadcast float tile is 4x a ``masked_fill_`` here).

    Row a is query s+a, column c is key s+n-1-c (nearest first); j - i = n-1-c-a."""
    idx = torch.arange(n, device=device)
    diff = (n - 1) - idx[None, :] - idx[:, None]
    outside = diff > 0 if include_diagonal else diff >= 0
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(outside, float("inf"))


def _chunks(T: int, s: int, e: int, key_chunk: int) -> list[tuple[int, int, bool]]:
    """Key ranges, in reversed coordinates, for queries [s, e): the diagonal tile first,
    then the earlier keys [0, s) from the nearest backwards in chunks of ``key_chunk``."""
    out = [(T - e, T - s, True)]
    r = T - s
    while r < T:
        out.append((r, min(r + key_chunk, T), False))
        r += key_chunk
    return out


def _tile_not_beta(
    qn_NQD: torch.Tensor, kt_rev_NDC: torch.Tensor, mask_QC: torch.Tensor | None
) -> torch.Tensor:
    """1 - beta = sigmoid(-z) of one tile, from the negated scaled queries and the keys
    stored (N, D, T) (a bmm against a transposed view ran 2.5x slower); 1 outside the stick
    (z = -inf there: no break, no weight)."""
    zn_NQC = torch.bmm(qn_NQD, kt_rev_NDC)
    if mask_QC is not None:
        zn_NQC.add_(mask_QC)
    return zn_NQC.sigmoid_()


def _weights(stick_NQC: torch.Tensor, carry_NQ1: torch.Tensor) -> torch.Tensor:
    """A from the running stick (inclusive products) and the stick before the chunk:
    A_ij = (stick before j) - (stick after j) = stick_excl * beta_ij."""
    a = torch.empty_like(stick_NQC)
    torch.sub(stick_NQC[:, :, :-1], stick_NQC[:, :, 1:], out=a[:, :, 1:])
    torch.sub(carry_NQ1, stick_NQC[:, :, :1], out=a[:, :, :1])
    return a


def _forward(
    qn: torch.Tensor,
    kt_rev: torch.Tensor,
    v_rev: torch.Tensor,
    v: torch.Tensor,
    include_diagonal: bool,
    query_block: int,
    key_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """(o_NTD, rem_NT, carries) from negated scaled queries, reversed keys (N, D, T) and
    values (N, T, D).

    ``carries[b][c]`` (N, Q, 1) is query block b's remaining stick before its chunk c:
    the backward, which walks the chunks the other way, starts each from it."""
    N, T, D = qn.shape
    o = torch.empty_like(qn)
    rem = torch.empty(N, T, dtype=qn.dtype, device=qn.device)
    carries: list[list[torch.Tensor]] = []
    masks: dict[int, torch.Tensor] = {}
    for s in range(0, T, query_block):
        e = min(s + query_block, T)
        n = e - s
        if n not in masks:
            masks[n] = _outside_mask(n, include_diagonal, qn.dtype, qn.device)
        q_blk = qn[:, s:e]
        acc = torch.zeros(N, n, D, dtype=qn.dtype, device=qn.device)
        carry = torch.ones(N, n, 1, dtype=qn.dtype, device=qn.device)
        block_carries = []
        for r0, r1, diag in _chunks(T, s, e, key_chunk):
            block_carries.append(carry)
            stick = _tile_not_beta(q_blk, kt_rev[:, :, r0:r1], masks[n] if diag else None)
            stick[:, :, :1].mul_(carry)
            stick.cumprod_(-1)
            acc.baddbmm_(_weights(stick, carry), v_rev[:, r0:r1])
            carry = stick[:, :, -1:].clone()
        carries.append(block_carries)
        rem[:, s:e] = carry.squeeze(-1)
        o[:, s:e] = acc.addcmul_(carry, v[:, s:e])
    return o, rem, carries


def _backward(
    qn: torch.Tensor,
    k_rev: torch.Tensor,
    kt_rev: torch.Tensor,
    v_rev: torch.Tensor,
    do: torch.Tensor,
    g_r: torch.Tensor,
    carries: list[list[torch.Tensor]],
    include_diagonal: bool,
    query_block: int,
    key_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz @ k, dz^T @ qs, A^T @ do), the last two in reversed key order; g_r is G_NT."""
    N, T, D = qn.shape
    dq = torch.empty_like(qn)
    dk_rev = torch.zeros_like(qn)
    dv_rev = torch.zeros_like(qn)
    masks: dict[int, torch.Tensor] = {}
    for b, s in enumerate(range(0, T, query_block)):
        e = min(s + query_block, T)
        n = e - s
        if n not in masks:
            masks[n] = _outside_mask(n, include_diagonal, qn.dtype, qn.device)
        q_blk, do_blk = qn[:, s:e], do[:, s:e]
        # Products accumulate into contiguous tensors: a baddbmm_ into a strided slice of
        # (N, T, D) ran as one addmm per batch row, several times slower.
        dq_blk = torch.zeros(N, n, D, dtype=qn.dtype, device=qn.device)
        # G_i + sum of g over the keys already walked (all farther than this chunk)
        farther = g_r[:, s:e].unsqueeze(-1).clone()
        chunks = _chunks(T, s, e, key_chunk)
        for c in range(len(chunks) - 1, -1, -1):
            r0, r1, diag = chunks[c]
            k_c, v_c = k_rev[:, r0:r1], v_rev[:, r0:r1]
            not_beta = _tile_not_beta(q_blk, kt_rev[:, :, r0:r1], masks[n] if diag else None)
            stick = not_beta.cumprod(-1).mul_(carries[b][c])
            a = _weights(stick, carries[b][c])
            g = torch.bmm(do_blk, v_c.transpose(1, 2)).mul_(a)
            # h_ij = g_ij + F_ij + G_i: a far-first running sum (of the flipped tile)
            g_far = g.flip(-1)
            g_far[:, :, :1].add_(farther)
            g_far.cumsum_(-1)
            farther = g_far[:, :, -1:].clone()
            h = g_far.flip(-1)
            # dz = g - beta h = g + (1 - beta) h - h
            dz = torch.addcmul(g, h, not_beta).sub_(h)
            dq_blk.baddbmm_(dz, k_c)
            dk_rev[:, r0:r1].sub_(torch.bmm(dz.transpose(1, 2), q_blk))
            dv_rev[:, r0:r1].add_(torch.bmm(a.transpose(1, 2), do_blk))
        dq[:, s:e] = dq_blk
    return dq, dk_rev, dv_rev


def _workers() -> int:
    """Worker threads: the caller's torch thread count, at most the cores it may use."""
    return max(1, min(default_workers(), torch.get_num_threads()))


def _row_slices(n_rows: int) -> list[slice]:
    """The (batch x head) rows split into one contiguous range per worker thread."""
    n = max(1, min(_workers(), n_rows))
    bounds = [n_rows * i // n for i in range(n + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(n)]


def _run(n_slices: int, work: Callable[[int, None], None]) -> None:
    """``work(i, None)`` for every row range, on the worker threads, each with one intra-op
    thread: per-tile ops are too small to split between OpenMP threads, whose barriers wait
    for a descheduled core (modelcore.threads; docs/kernels.md, "CPU path"). The rows are
    independent: any split gives the same result to rounding (a batched matmul over fewer
    rows may run another kernel)."""
    with single_thread():
        run_blocks(n_slices, work, lambda: None, n_slices)


class _StickBreakingBlockwise(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        include_diagonal: bool,
        query_block: int,
        key_chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = q.shape
        ctype = torch.float64 if q.dtype == torch.float64 else torch.float32
        qn = (q.to(ctype) * -scale).reshape(B * H, T, D)
        kf = k.to(ctype).reshape(B * H, T, D)
        vf = v.to(ctype).reshape(B * H, T, D)
        k_rev, v_rev = kf.flip(1), vf.flip(1)
        kt_rev = k_rev.transpose(1, 2).contiguous()
        # One intra-op thread: per-tile ops are too small to split between OpenMP threads
        # on this shared VM (docs/kernels.md, "CPU path").
        N = B * H
        o, rem = torch.empty_like(qn), torch.empty(N, T, dtype=ctype, device=q.device)
        slices = _row_slices(N)
        carries: list[list[list[torch.Tensor]]] = [[] for _ in slices]

        def work(i: int, _: None) -> None:
            rows = slices[i]
            o[rows], rem[rows], carries[i] = _forward(
                qn[rows], kt_rev[rows], v_rev[rows], vf[rows],
                include_diagonal, query_block, key_chunk,
            )  # fmt: skip

        _run(len(slices), work)
        ctx.save_for_backward(qn, k_rev, kt_rev, v_rev, vf, rem)
        ctx.carries = carries
        ctx.meta = (scale, include_diagonal, query_block, key_chunk, q.dtype, (B, H, T, D))
        return o.view(B, H, T, D).to(q.dtype), rem.view(B, H, T).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, do_BHTD: torch.Tensor | None, drem_BHT: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        qn, k_rev, kt_rev, v_rev, vf, r = ctx.saved_tensors
        scale, include_diagonal, query_block, key_chunk, dtype, (B, H, T, D) = ctx.meta
        N = B * H
        ctype = qn.dtype
        do = torch.zeros_like(qn) if do_BHTD is None else do_BHTD.to(ctype).reshape(N, T, D)
        # G = dL/dlog r: the remainder's own value plus the rem output's gradient.
        g_r = r * (do * vf).sum(-1)
        if drem_BHT is not None:
            g_r = g_r + r * drem_BHT.to(ctype).reshape(N, T)
        dq, dk_rev, dv_rev = torch.empty_like(qn), torch.empty_like(qn), torch.empty_like(qn)
        slices = _row_slices(N)

        def work(i: int, _: None) -> None:
            rows = slices[i]
            dq[rows], dk_rev[rows], dv_rev[rows] = _backward(
                qn[rows], k_rev[rows], kt_rev[rows], v_rev[rows], do[rows], g_r[rows],
                ctx.carries[i], include_diagonal, query_block, key_chunk,
            )  # fmt: skip

        _run(len(slices), work)
        dq = dq.mul_(scale).view(B, H, T, D).to(dtype)
        dk = dk_rev.flip(1).view(B, H, T, D).to(dtype)
        dv = dv_rev.flip(1).addcmul_(r.unsqueeze(-1), do).view(B, H, T, D).to(dtype)
        needs = ctx.needs_input_grad
        return (
            dq if needs[0] else None,
            dk if needs[1] else None,
            dv if needs[2] else None,
            None,
            None,
            None,
            None,
        )


def stickbreaking_attention_blockwise(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    scale: float | None = None,
    include_diagonal: bool = False,
    query_block: int = QUERY_BLOCK,
    key_chunk: int = KEY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(o_BHTD, rem_BHT)`` exactly as ``stickbreaking_attention_ref`` does.

    Computed in fp32 (fp64 for fp64 inputs) and cast back; O(N Q C) scratch memory.
    Differentiable in q, k and v (through o and rem) by a hand-written backward.
    """
    if q_BHTD.dim() != 4 or q_BHTD.shape != k_BHTD.shape or q_BHTD.shape != v_BHTD.shape:
        raise ValueError(
            "q, k, v must share one (B, H, T, D) shape: "
            f"{tuple(q_BHTD.shape)}, {tuple(k_BHTD.shape)}, {tuple(v_BHTD.shape)}"
        )
    if query_block < 1 or key_chunk < 1:
        raise ValueError(f"query_block and key_chunk must be >= 1: {query_block}, {key_chunk}")
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
    o, rem = _StickBreakingBlockwise.apply(  # type: ignore[no-untyped-call]
        q_BHTD, k_BHTD, v_BHTD, scale, include_diagonal, query_block, key_chunk
    )
    return o, rem
