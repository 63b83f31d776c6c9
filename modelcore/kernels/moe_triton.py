"""Grouped sparse MoE matmul on Triton: launchers, custom ops and autograd.

Shape legend: T tokens, K top-k, A = T*K assignments, E experts, D input dim, H output dim.

Implements exactly the contract of ``moe_ref.grouped_mm_ref``. Forward: one grouped GEMM
launch (gather in the load, scatter in the store); with gates, the kernel writes the K
ungated outputs of each token in assignment order and one batched (1 x K) @ (K x H)
product sums them, which keeps the sum deterministic (no atomics) and leaves the ungated
outputs that the gate gradient needs. Backward: dX is the same kernel against W^T (a
strided view, no copy), with the gate multiplied in and ``dout`` gathered by token;
dW is a grouped GEMM over each expert's sorted block (x^T @ dy); d(gates) is a K-wide dot
per token. Everything is registered with ``torch.library`` (custom op + fake + autograd),
so ``torch.compile(fullgraph=True)`` traces through it as one opaque node.
"""

# Deliberately no ``from __future__ import annotations``: torch.library infers the op
# schema from real annotation objects.

from typing import Any

import torch
import triton

from modelcore.kernels import moe_kernels
from modelcore.kernels._triton_util import check_device, dot_precision, interpreting, jit
from modelcore.kernels.moe_ref import RoutingPlan

GROUPED, TOKEN, ASSIGN = 0, 1, 2


def _mm_blocks(n_rows: int, n_experts: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes. Interpreted: small tiles so odd shapes cross several blocks and the
    masks are exercised. Compiled: BLOCK_M follows the mean rows per expert, so decode
    (a handful of rows per expert) does not pay for 128-row tiles of zeros."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    per_expert = max(1, n_rows // max(1, n_experts))
    block_m = (
        16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 64 else 128
    )
    wide = dtype != torch.float32
    stages = 4 if wide else 3
    if block_m == 128:
        bk = 64 if wide else 32
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk, "num_warps": 8, "num_stages": stages}
    # (64x128 + 128x128) bf16 = 48 KB a stage: 3 stages leave room under the 227 KB limit
    bn, bk = (128 if block_m >= 64 else 64), (128 if wide else 32)
    return {"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 3}


def _dw_blocks(dtype: torch.dtype) -> dict[str, int]:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def _launch_mm(
    x: torch.Tensor,
    w_view: torch.Tensor,  # (E, Din, Dout), any strides (W or W^T as a view)
    y: torch.Tensor,
    sorted_assign: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None,
    k: int,
    in_mode: int,
    out_mode: int,
) -> None:
    A = sorted_assign.numel()
    E, Din, Dout = w_view.shape
    if A == 0 or Dout == 0:
        return
    cfg = _mm_blocks(A, E, x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = ((triton.cdiv(A, bm) + E) * triton.cdiv(Dout, bn),)
    jit(moe_kernels.grouped_mm_kernel)[grid](
        x, w_view, y, sorted_assign, offsets, scale if scale is not None else x,
        Din, Dout, E, k,
        x.stride(0), x.stride(1),
        w_view.stride(0), w_view.stride(1), w_view.stride(2),
        y.stride(0), y.stride(1),
        IN_MODE=in_mode, OUT_MODE=out_mode, HAS_SCALE=scale is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_E=max(16, triton.next_power_of_2(E)), GROUP_M=4 if interpreting() else 8,
        PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def _launch_dw(
    x: torch.Tensor,
    dy: torch.Tensor,
    dw: torch.Tensor,
    sorted_assign: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None,
    k: int,
    x_mode: int,
    dy_mode: int,
) -> None:
    E, Din, Dout = dw.shape
    cfg = _dw_blocks(x.dtype)
    bk, bn = cfg["BLOCK_K"], cfg["BLOCK_N"]
    grid = (triton.cdiv(Din, bk) * triton.cdiv(Dout, bn), E)
    jit(moe_kernels.grouped_dw_kernel)[grid](
        x, dy, dw, sorted_assign, offsets, scale if scale is not None else x,
        Din, Dout, k,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        X_MODE=x_mode, DY_MODE=dy_mode, HAS_SCALE=scale is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=bk, BLOCK_N=bn,
        PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def _check(x: torch.Tensor, w: torch.Tensor, sorted_assign: torch.Tensor, k: int,
           gates: torch.Tensor | None, grouped_in: bool, grouped_out: bool) -> None:  # fmt: skip
    if gates is not None and grouped_out:
        raise ValueError("gates combine token outputs; they cannot be used with grouped_out")
    if w.dim() != 3 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x (rows, D) and w (E, D, H) disagree: {tuple(x.shape)}, {tuple(w.shape)}"
        )
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    A = sorted_assign.numel()
    rows = A if grouped_in else A // k
    if x.shape[0] != rows or A % k:
        raise ValueError(f"x has {x.shape[0]} rows, the plan expects {rows}")
    if gates is not None and tuple(gates.shape) != (A // k, k):
        raise ValueError(f"gates must be (T, K) = {(A // k, k)}, got {tuple(gates.shape)}")
    check_device(x, w, sorted_assign)


@torch.library.custom_op("modelcore::grouped_mm", mutates_args=())
def grouped_mm_op(
    x: torch.Tensor,
    w: torch.Tensor,
    sorted_assign: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor | None,
    k: int,
    grouped_in: bool,
    grouped_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, y_saved): y_saved is the ungated (A, H) output when gated, else empty."""
    _check(x, w, sorted_assign, k, gates, grouped_in, grouped_out)
    A, H = sorted_assign.numel(), w.shape[2]
    y = x.new_zeros(A, H) if A == 0 else x.new_empty(A, H)
    _launch_mm(x, w, y, sorted_assign, offsets, None, k,
               GROUPED if grouped_in else TOKEN, GROUPED if grouped_out else ASSIGN)  # fmt: skip
    if gates is None:
        return y, x.new_empty(0)
    T = A // k
    out = torch.bmm(gates.to(y.dtype).unsqueeze(1), y.view(T, k, H)).squeeze(1)
    return out, y


@grouped_mm_op.register_fake
def _(x, w, sorted_assign, offsets, gates, k, grouped_in, grouped_out):  # type: ignore[no-untyped-def]
    A, H = sorted_assign.shape[0], w.shape[2]
    if gates is None:
        return x.new_empty(A, H), x.new_empty(0)
    return x.new_empty(gates.shape[0], H), x.new_empty(A, H)


@torch.library.custom_op("modelcore::grouped_mm_backward", mutates_args=())
def grouped_mm_backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    sorted_assign: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor | None,
    y_saved: torch.Tensor,
    k: int,
    grouped_in: bool,
    grouped_out: bool,
    need_dx: bool,
    need_dw: bool,
    need_dgates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, dgates); an output not asked for is an empty tensor."""
    A = sorted_assign.numel()
    if gates is not None:
        # dy[a] = gates[a] * dout[a // K]: gathered by token, the gate multiplied in-kernel.
        dy_src, dy_mode, scale = dout, TOKEN, gates.reshape(-1)
    else:
        dy_src, dy_mode, scale = dout, GROUPED if grouped_out else ASSIGN, None
    dx = x.new_empty(0)
    if need_dx:
        w_t = w.transpose(1, 2)  # (E, H, D) strided view: dX = dY @ W^T, no copy
        if grouped_in or k == 1:
            dx = x.new_zeros(x.shape) if A == 0 else x.new_empty(x.shape)
            _launch_mm(dy_src, w_t, dx, sorted_assign, offsets, scale, k, dy_mode,
                       GROUPED if grouped_in else ASSIGN)  # fmt: skip
        else:
            # A token's K slots sit in different expert blocks: write them to (A, D) in
            # assignment order, then sum the K rows of each token (deterministic, no atomics).
            dx_AD = x.new_zeros(A, x.shape[1]) if A == 0 else x.new_empty(A, x.shape[1])
            _launch_mm(dy_src, w_t, dx_AD, sorted_assign, offsets, scale, k, dy_mode, ASSIGN)
            dx = dx_AD.view(-1, k, x.shape[1]).sum(1)
    dw = w.new_empty(0)
    if need_dw:
        dw = torch.empty_like(w)
        _launch_dw(x, dy_src, dw, sorted_assign, offsets, scale, k,
                   GROUPED if grouped_in else TOKEN, dy_mode)  # fmt: skip
    dgates = dout.new_empty(0)
    if need_dgates and gates is not None:
        T, H = gates.shape[0], w.shape[2]
        dgates = torch.bmm(y_saved.view(T, k, H), dout.to(y_saved.dtype).unsqueeze(2))
        dgates = dgates.squeeze(2).to(gates.dtype)
    return dx, dw, dgates


@grouped_mm_backward_op.register_fake
def _(dout, x, w, sorted_assign, offsets, gates, y_saved, k, grouped_in, grouped_out,  # type: ignore[no-untyped-def]
      need_dx, need_dw, need_dgates):  # fmt: skip
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw = w.new_empty(w.shape) if need_dw else w.new_empty(0)
    dg = gates.new_empty(gates.shape) if (need_dgates and gates is not None) else dout.new_empty(0)
    return dx, dw, dg


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, w, sorted_assign, offsets, gates, k, grouped_in, grouped_out = inputs
    ctx.save_for_backward(x, w, sorted_assign, offsets, gates, output[1])
    ctx.k, ctx.grouped_in, ctx.grouped_out = k, grouped_in, grouped_out


def _backward(ctx: Any, dout: torch.Tensor, _dy_saved: torch.Tensor) -> tuple[Any, ...]:
    x, w, sorted_assign, offsets, gates, y_saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, dgates = torch.ops.modelcore.grouped_mm_backward(
        dout, x, w, sorted_assign, offsets, gates, y_saved,
        ctx.k, ctx.grouped_in, ctx.grouped_out,
        bool(need[0]), bool(need[1]), bool(gates is not None and need[4]),
    )  # fmt: skip
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        None,
        None,
        dgates if (gates is not None and need[4]) else None,
        None,
        None,
        None,
    )


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm_triton(
    x: torch.Tensor,
    w_EDH: torch.Tensor,
    plan: RoutingPlan,
    *,
    gates_TK: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """Same contract as ``moe_ref.grouped_mm_ref``, on Triton."""
    out, _ = torch.ops.modelcore.grouped_mm(
        x, w_EDH, plan.sorted_assign_A, plan.offsets_E, gates_TK, plan.k, grouped_in, grouped_out
    )
    return out
