"""Stick-breaking attention on Triton: launchers, custom ops and autograd.

Shape legend: B batch, H heads, T length, D head dim.

Same contract as ``sb_ref.stickbreaking_attention_ref`` (read its docstring for the
convention). The op returns ``log r`` in fp32 alongside the output: the backward needs it
(A_ij is rebuilt from it), and ``rem = exp(log r)`` is formed outside the op so that its
gradient reaches the kernel through ``dlogr``. Kernels in ``sb_kernels``.
"""

# Deliberately no ``from __future__ import annotations``: torch.library infers the op
# schema from real annotation objects.

import math
from typing import Any

import torch
import triton

from modelcore.kernels import sb_kernels
from modelcore.kernels._triton_util import check_device, dot_precision, interpreting, jit


def _config(D: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles. The head dim is cut into chunks of at most 128 compiled (64 for fp32, and 64
    interpreted so a 100-wide test head exercises the chunked path)."""
    max_d = 64 if (interpreting() or dtype == torch.float32) else 128
    block_d = min(max(16, triton.next_power_of_2(D)), max_d)
    n_dc = triton.cdiv(D, block_d)
    cfg = {"BLOCK_D": block_d, "NUM_DC": n_dc}
    if interpreting():
        return {**cfg, "BLOCK": 32, "num_warps": 4, "num_stages": 1, "bwd_warps": 4}
    # 64 x 64 tiles: the backward holds q, do, k, v tiles, two (64, D) fp32 accumulators
    # and four (64, 64) fp32 score-sized tiles at once, ~300 registers a thread at 4 warps
    # for D = 128, hence 8 warps there; 128-row tiles would spill. With several D chunks
    # every chunk's q/k (and do/v) tile is a load inside the key loop, and software
    # pipelining would multi-buffer all of them (8 chunks x 2 x 16 KB per stage at D = 1024,
    # past the 227 KB of shared memory), so chunked heads run unpipelined.
    stages = 2 if n_dc == 1 else 1
    return {**cfg, "BLOCK": 64, "num_warps": 4, "num_stages": stages, "bwd_warps": 8}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-2], t.shape[-1])


@torch.library.custom_op("modelcore::stickbreaking_fwd", mutates_args=())
def sb_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, include_diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_BHTD, logr_BHT fp32)."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(
            f"q, k, v must share one (B, H, T, D) shape: {q.shape}, {k.shape}, {v.shape}"
        )
    check_device(q, k, v)
    B, H, T, D = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    o = torch.empty_like(qf)
    logr = torch.empty(qf.shape[0], T, device=q.device, dtype=torch.float32)
    if q.numel() > 0:
        cfg = _config(D, q.dtype)
        grid = (triton.cdiv(T, cfg["BLOCK"]), qf.shape[0], cfg["NUM_DC"])
        jit(sb_kernels.sb_fwd_kernel)[grid](
            qf, kf, vf, o, logr, scale, T, D,
            INCLUDE_DIAG=include_diagonal, BLOCK=cfg["BLOCK"], BLOCK_D=cfg["BLOCK_D"],
            NUM_DC=cfg["NUM_DC"], PRECISION=dot_precision(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return o.view(B, H, T, D), logr.view(B, H, T)


@sb_fwd_op.register_fake
def _(q, k, v, scale, include_diagonal):  # type: ignore[no-untyped-def]
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("modelcore::stickbreaking_bwd", mutates_args=())
def sb_bwd_op(
    do: torch.Tensor,
    dlogr: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logr: torch.Tensor,
    scale: float,
    include_diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv). Two launches: dQ (+ row prefixes), then dK/dV (reads the prefixes)."""
    T, D = q.shape[-2:]
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    BH = qf.shape[0]
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    if q.numel() == 0:
        return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)
    logr_f = logr.reshape(BH, T).contiguous()
    # G_i = dL/dlog r_i: the direct gradient plus the remainder term r_i (do_i . v_i).
    gr = dlogr.reshape(BH, T).float() + logr_f.exp() * (dof.float() * vf.float()).sum(-1)
    cfg = _config(D, q.dtype)
    n_blocks = triton.cdiv(T, cfg["BLOCK"])
    pre_lo = torch.empty(BH, n_blocks, T, device=q.device, dtype=torch.float32)
    pre_g = torch.empty_like(pre_lo)
    common = {
        "INCLUDE_DIAG": include_diagonal, "BLOCK": cfg["BLOCK"], "BLOCK_D": cfg["BLOCK_D"],
        "NUM_DC": cfg["NUM_DC"], "PRECISION": dot_precision(q.dtype),
        "num_warps": cfg["bwd_warps"], "num_stages": cfg["num_stages"],
    }  # fmt: skip
    grid = (n_blocks, BH, cfg["NUM_DC"])
    jit(sb_kernels.sb_bwd_dq_kernel)[grid](
        qf, kf, vf, dof, logr_f, gr, dq, pre_lo, pre_g, scale, T, D, n_blocks, **common
    )
    jit(sb_kernels.sb_bwd_dkv_kernel)[grid](
        qf, kf, vf, dof, logr_f, gr, dk, dv, pre_lo, pre_g, scale, T, D, n_blocks, **common
    )
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)


@sb_bwd_op.register_fake
def _(do, dlogr, q, k, v, logr, scale, include_diagonal):  # type: ignore[no-untyped-def]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, scale, include_diagonal = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale, ctx.include_diagonal = scale, include_diagonal


def _backward(ctx: Any, do: torch.Tensor | None, dlogr: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, logr = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(q)
    if dlogr is None:
        dlogr = torch.zeros_like(logr)
    dq, dk, dv = torch.ops.modelcore.stickbreaking_bwd(
        do, dlogr, q, k, v, logr, ctx.scale, ctx.include_diagonal
    )
    return dq, dk, dv, None, None


sb_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def stickbreaking_attention_triton(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    scale: float | None = None,
    include_diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(o_BHTD, rem_BHT)``; same contract as ``stickbreaking_attention_ref``."""
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
    o, logr = torch.ops.modelcore.stickbreaking_fwd(
        q_BHTD, k_BHTD, v_BHTD, float(scale), include_diagonal
    )
    return o, torch.exp(logr).to(q_BHTD.dtype)
