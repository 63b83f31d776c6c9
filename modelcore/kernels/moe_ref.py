"""Grouped sparse MoE matmul: the PyTorch reference (CPU path and test oracle).

Shape legend: T tokens, K top-k, A = T*K assignments, E experts, D input dim, H output dim.

A token routed to K experts makes K *assignments*, numbered ``a = t * K + slot``. The
routing plan sorts assignments by expert (``sort``, then the block ends with one
``searchsorted``, equal to ``cumsum(bincount)``; no host synchronisation, no padding), so
each expert's rows are one contiguous block:

* ``sorted_expert_A``: expert id of the p-th assignment in sorted order.
* ``sorted_assign_A``: which assignment ``a`` sits at sorted position p.
* ``offsets_E``: end of each expert's block (inclusive cumsum of the counts).

``grouped_mm`` then computes, for every sorted position p with expert e and assignment a::

    out[dst(p)] = x[src(p)] @ w_EDH[e]

with ``src(p) = a // K`` (gather inside the load) unless the input is already grouped
(``grouped_in``: row p), and ``dst(p) = a`` (scatter inside the store) unless the output
stays grouped (``grouped_out``). With ``gates_TK`` the K outputs of a token are summed,
each times its gate, into a (T, H) result. This is the contract the Triton kernel in
``moe_triton.py`` implements (cf. ScatterMoE, Tan et al. 2024).

The reference runs one of two schedules. With autograd (CPU training): whole-batch ops
(one gather, a matmul per block, one cat, one scatter), each a single autograd node.
Without (inference, and the speed that ``benchmarks/moe_cpu.py`` measures): expert by
expert, gather into a small buffer, ``torch.mm``, scatter or gated add from another,
spread over one worker thread per intra-op thread when the call is big enough. Both
give the same numbers (tested).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from modelcore.threads import run_blocks


@dataclass(frozen=True)
class RoutingPlan:
    """Assignments sorted by expert. Built once per layer call, shared by all its matmuls."""

    sorted_expert_A: torch.Tensor  # int64 (A,)
    sorted_assign_A: torch.Tensor  # int64 (A,)
    offsets_E: torch.Tensor  # int64 (E,): inclusive cumsum of per-expert counts
    k: int  # assignments per token
    n_experts: int


def plan_routing(expert_idx_TK: torch.Tensor, n_experts: int) -> RoutingPlan:
    """Sort the T*K assignments by expert, stably, without a host sync."""
    k = expert_idx_TK.shape[-1]
    flat_A = expert_idx_TK.reshape(-1).long()
    sorted_expert_A, sorted_assign_A = torch.sort(flat_A, stable=True)
    # The inclusive cumsum of the per-expert counts is, for each expert, where its block
    # ends in the sorted ids: one searchsorted. torch.bincount + cumsum gives the same
    # numbers but synchronises with the host on CUDA (it reads max() to size its output),
    # which exposed the launch overhead of every MoE layer call (docs/kernels.md, "Figures
    # behind the code").
    experts_E = torch.arange(n_experts, device=flat_A.device, dtype=sorted_expert_A.dtype)
    offsets_E = torch.searchsorted(sorted_expert_A, experts_E, right=True)
    return RoutingPlan(sorted_expert_A, sorted_assign_A, offsets_E, k, n_experts)


def grouped_mm_ref(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    plan: RoutingPlan,
    *,
    gates_TK: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """Reference grouped matmul: one ``torch.mm`` per expert over its contiguous block.

    ``x`` is (T, D) token-ordered, or (A, D) expert-sorted when ``grouped_in``.
    Returns (A, H) expert-sorted when ``grouped_out``; else (A, H) assignment-ordered,
    or (T, H) when ``gates_TK`` is given (gated sum over each token's K slots).
    Differentiable through autograd (x, w and gates), which is how the CPU path trains.
    """
    if gates_TK is not None and grouped_out:
        raise ValueError("gates combine token outputs; they cannot be used with grouped_out")
    k = plan.k
    # Expert blocks are contiguous, so split sizes come from the offsets. tolist() is the
    # one host sync of the reference; the Triton kernel reads offsets on the device.
    counts = torch.diff(plan.offsets_E, prepend=plan.offsets_E.new_zeros(1)).tolist()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_EDH, gates_TK)
    )
    if not needs_grad:
        return _grouped_inference(x, w_EDH, plan, counts, gates_TK, grouped_in, grouped_out)
    y_AH = _grouped_autograd(x, w_EDH, plan, counts, grouped_in, grouped_out)
    if grouped_out or gates_TK is None:
        return y_AH
    T = gates_TK.shape[0]
    y_TKH = y_AH.view(T, k, -1)
    out: torch.Tensor = _GatedSum.apply(y_TKH, gates_TK.to(y_TKH.dtype))  # type: ignore[no-untyped-call]
    return out


class _GatedSum(torch.autograd.Function):
    """``einsum("tkh,tk->th")`` whose backward gives d(y) as an elementwise product: the
    einsum's own backward ran it as T batched (H, 1) @ (1, K) products, slower on the CPU
    (docs/kernels.md, "CPU: the whole model"). Every value is the one autograd computed:
    each d(y) entry is a single product, and d(gates) is the same batched product."""

    @staticmethod
    def forward(ctx: Any, y_TKH: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_TKH, gates_TK)
        return torch.einsum("tkh,tk->th", y_TKH, gates_TK)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout_TH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y_TKH, gates_TK = ctx.saved_tensors
        dy_TKH = dgates_TK = None
        if ctx.needs_input_grad[0]:
            dy_TKH = gates_TK.unsqueeze(-1) * dout_TH.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            dgates_TK = torch.bmm(y_TKH, dout_TH.unsqueeze(-1)).squeeze(-1)
        return dy_TKH, dgates_TK


def _grouped_autograd(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    plan: RoutingPlan,
    counts: list[int],
    grouped_in: bool,
    grouped_out: bool,
) -> torch.Tensor:
    """One gather, one matmul per block, one cat, one scatter: every step is a single
    autograd node over the whole batch, so the backward costs O(A) too (per-expert gathers
    or in-place scatters would each add a full-size gradient buffer to the backward)."""
    x_sorted_AD = x if grouped_in else x.index_select(0, plan.sorted_assign_A // plan.k)
    # unbind, not w_EDH[e]: each index's backward would be a zero (E, D, H) gradient
    # with one slice filled, E of them summed per call (O(E^2 D H)); unbind's is one stack.
    w_DH = w_EDH.unbind(0)
    pieces = [blk @ w_DH[e] for e, blk in enumerate(torch.split(x_sorted_AD, counts, dim=0))]
    y_sorted_AH = torch.cat(pieces, dim=0) if pieces else x_sorted_AD.new_zeros(0, w_EDH.shape[-1])
    if grouped_out:
        return y_sorted_AH
    return torch.empty_like(y_sorted_AH).index_copy(0, plan.sorted_assign_A, y_sorted_AH)


# Below this many multiply-adds (A * D * H) the inference schedule runs in the calling
# thread: the hand-off to the worker threads has a fixed cost per call that a call this
# small does not earn back (docs/kernels.md, "Figures behind the code"), and the tiny
# preset's FFN at 2048 tokens (4096 x 64 x 64 = 1.7e7) gains nothing.
_PARALLEL_MIN_MACS = 1 << 26


def _grouped_inference(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    plan: RoutingPlan,
    counts: list[int],
    gates_TK: torch.Tensor | None,
    grouped_in: bool,
    grouped_out: bool,
) -> torch.Tensor:
    """The same products without autograd, one expert block at a time, each block's rows
    gathered into a small reused buffer right before its ``torch.mm`` (so they are still in
    cache when the GEMM reads them) and its result scattered from another small buffer
    straight into the returned tensor. No (A, D) or (A, H) intermediate is allocated:
    a fresh 32-64 MiB tensor costs its page faults on every call, more than the gather
    itself (docs/kernels.md, "CPU reference speed").

    Blocks are independent, so on the CPU, when the call is large enough and torch has
    more than one intra-op thread, the blocks are spread over that many worker threads
    that each run single-threaded GEMMs (expert parallelism, as a grouped GEMM kernel
    spreads tiles over cores): MKL splitting each small block over all cores ran slower
    than one block per core (docs/kernels.md, "CPU reference speed";
    benchmarks/moe_cpu.py). The threads are ``modelcore.threads``'.
    """
    A, H = plan.sorted_assign_A.numel(), w_EDH.shape[-1]
    k = plan.k
    assign_A = plan.sorted_assign_A
    # Gated: each block's rows are multiplied by their gates while in cache, then summed
    # into the token's output row. With K <= 2 that is an index_add_ into zeros under a
    # lock (the workers may hold both rows of a token): 0 + a + b == 0 + b + a exactly,
    # so the result is the same whichever block lands first, and no (A, H) buffer is
    # needed. With K > 2 the order would change the rounding, so the rows are scattered
    # to assignment order and the K rows of a token summed in a fixed order.
    gate_A = None
    if gates_TK is not None:
        gate_A = gates_TK.reshape(-1).to(x.dtype).index_select(0, assign_A).unsqueeze(1)
    add_in_place = gate_A is not None and k <= 2
    if add_in_place:
        assert gates_TK is not None
        y_AH = x.new_zeros(gates_TK.shape[0], H)
    else:
        y_AH = x.new_empty(A, H)
    tok_A = assign_A // k
    combine_lock = threading.Lock()
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    # Largest blocks first, so the last block a worker takes is a small one.
    blocks = sorted(((n, e) for e, n in enumerate(counts) if n), reverse=True)
    widest = blocks[0][0] if blocks else 0

    # Grad mode is per thread: a worker thread has it on even when the caller runs under
    # no_grad, and mm(out=) refuses inputs that require grad when it is on. This path is
    # only taken when no gradient is needed.
    def buffers() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        buf_in = None if grouped_in else x.new_empty(widest, x.shape[1])
        buf_out = None if grouped_out else x.new_empty(widest, H)
        return buf_in, buf_out

    @torch.no_grad()
    def work(i: int, bufs: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        buf_in, buf_out = bufs
        n, e = blocks[i]
        rows = slice(starts[e], starts[e] + n)
        if grouped_in:
            x_blk = x[rows]
        else:
            assert buf_in is not None
            x_blk = torch.index_select(x, 0, tok_A[rows], out=buf_in[:n])
        if grouped_out:
            torch.mm(x_blk, w_EDH[e], out=y_AH[rows])
            return
        assert buf_out is not None
        y_blk = torch.mm(x_blk, w_EDH[e], out=buf_out[:n])
        if gate_A is not None:
            y_blk.mul_(gate_A[rows])
        if add_in_place:
            with combine_lock:
                y_AH.index_add_(0, tok_A[rows], y_blk)
        else:
            y_AH.index_copy_(0, assign_A[rows], y_blk)

    # The caller keeps its intra-op threads (it only waits): the blocks go to one worker
    # thread per intra-op thread, each running single-threaded GEMMs.
    n_threads = torch.get_num_threads()
    big = A * x.shape[-1] * H >= _PARALLEL_MIN_MACS
    parallel = x.device.type == "cpu" and n_threads > 1 and len(blocks) > 1 and big
    run_blocks(len(blocks), work, buffers, n_threads if parallel else 1, caller_works=False)
    if gate_A is None or add_in_place:
        return y_AH
    return y_AH.view(-1, k, H).sum(dim=1)
