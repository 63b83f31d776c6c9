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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    # which cost ~0.5 ms of exposed launch overhead per MoE layer call on an H100.
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
    if needs_grad:
        y_AH = _grouped_autograd(x, w_EDH, plan, counts, grouped_in, grouped_out)
    else:
        y_AH = _grouped_inference(x, w_EDH, plan, counts, grouped_in, grouped_out)
    if grouped_out:
        return y_AH
    if gates_TK is None:
        return y_AH
    T = gates_TK.shape[0]
    y_TKH = y_AH.view(T, k, -1)
    return torch.einsum("tkh,tk->th", y_TKH, gates_TK.to(y_TKH.dtype))


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
    pieces = [blk @ w_EDH[e] for e, blk in enumerate(torch.split(x_sorted_AD, counts, dim=0))]
    y_sorted_AH = torch.cat(pieces, dim=0) if pieces else x_sorted_AD.new_zeros(0, w_EDH.shape[-1])
    if grouped_out:
        return y_sorted_AH
    return torch.empty_like(y_sorted_AH).index_copy(0, plan.sorted_assign_A, y_sorted_AH)


def _grouped_inference(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    plan: RoutingPlan,
    counts: list[int],
    grouped_in: bool,
    grouped_out: bool,
) -> torch.Tensor:
    """The same products without autograd: each expert's ``torch.mm`` writes its block of
    the sorted result in place (``out=``), which drops the cat of ``_grouped_autograd``
    (one full copy of the (A, H) output) and keeps the op count at E + 2 (one gather, E
    matmuls, one scatter): on 2 busy cores every extra parallel op also pays a thread
    barrier, which made a per-expert gather/scatter schedule slower, not faster."""
    A, H = plan.sorted_assign_A.numel(), w_EDH.shape[-1]
    x_sorted_AD = x if grouped_in else x.index_select(0, plan.sorted_assign_A // plan.k)
    y_sorted_AH = x.new_empty(A, H)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            torch.mm(x_sorted_AD[rows], w_EDH[e], out=y_sorted_AH[rows])
        start += n
    if grouped_out:
        return y_sorted_AH
    return torch.empty_like(y_sorted_AH).index_copy_(0, plan.sorted_assign_A, y_sorted_AH)
