"""Triton kernels of the grouped sparse MoE matmul (launched by ``moe_triton``).

Shape legend: T tokens, K top-k, A = T*K assignments, E experts; a matmul maps rows of
width Din to rows of width Dout through the expert's (Din, Dout) weight.

Rows live in three orders, named by an integer ``*_MODE`` (constexpr):

* 0 ``grouped``: sorted position p (expert blocks contiguous, as in ``RoutingPlan``);
* 1 ``token``: row ``a // K`` of a (T, .) tensor (a = sorted_assign[p]);
* 2 ``assign``: row ``a`` of an (A, .) tensor.

So one kernel gathers inside its load and scatters inside its store, with no data padded
or permuted beforehand (cf. ScatterMoE, Tan et al. 2024). Plain functions here; they are
JIT-wrapped on first launch (see ``_triton_util.jit``).
"""

import triton.language as tl


def grouped_mm_kernel(
    X,
    W,
    Y,
    SORTED_ASSIGN,
    OFFSETS,
    ROW_SCALE,
    Din,
    Dout,
    n_experts,
    top_k,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    IN_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y[out(p)] = scale(p) * X[in(p)] @ W[e(p)] for every sorted position p.

    Grid: ((cdiv(A, BLOCK_M) + E) * cdiv(Dout, BLOCK_N),). Each expert's rows are cut into
    ceil(count_e / BLOCK_M) row blocks; program m finds its expert and block from the
    offsets on the device (a prefix sum over E block counts), so the launch needs no host
    synchronisation. The grid is an upper bound (sum_e ceil(c_e/BM) <= cdiv(A,BM) + E - 1);
    surplus programs return at once.

    Programs are numbered in groups of GROUP_M row blocks that sweep all column blocks
    together, so the programs resident at one time share a few row blocks of X and one
    band of W in L2. Row-block-fastest order re-read all of X from HBM for every column
    block: at Mixtral's T=4096 that is 64 MB x 112 columns, most of the layer's time on
    a GPU (docs/kernels.md, "GPU numbers", the first run before this order).
    """
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(Dout, BLOCK_N)
    n_pid_m = tl.num_programs(0) // n_pid_n
    per_group = GROUP_M * n_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # Which expert block does this program own?
    e_idx = tl.arange(0, BLOCK_E)
    in_range = e_idx < n_experts
    ends = tl.load(OFFSETS + e_idx, mask=in_range, other=0)
    starts = tl.load(OFFSETS + e_idx - 1, mask=in_range & (e_idx > 0), other=0)
    n_blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
    # Inclusive prefix sum over E as a masked (E, E) reduction: E <= a few hundred, and it
    # avoids tl.cumsum, whose interpreter implementation is slow on the CPU test path
    # (docs/kernels.md, "Figures behind the code").
    block_ends = tl.sum(tl.where(e_idx[None, :] <= e_idx[:, None], n_blocks[None, :], 0), axis=1)
    expert = tl.sum((block_ends <= pid_m).to(tl.int32))
    if expert >= n_experts:
        return
    mine = e_idx == expert
    first_block = tl.sum(tl.where(mine, block_ends - n_blocks, 0))
    row_start = tl.sum(tl.where(mine, starts, 0))
    row_end = tl.sum(tl.where(mine, ends, 0))

    p = row_start + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < row_end
    a = tl.load(SORTED_ASSIGN + p, mask=p_mask, other=0)
    if IN_MODE == 0:
        in_row = p.to(tl.int64)
    elif IN_MODE == 1:
        in_row = a // top_k
    else:
        in_row = a
    if OUT_MODE == 0:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
        out_row = p.to(tl.int64)
    else:
        out_row = a

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < Dout
    w_base = W + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Din, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < Din
        x = tl.load(
            X + in_row[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=p_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + k[:, None] * stride_wk + n[None, :] * stride_wn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_SCALE:
        # A per-row scale commutes with the matmul, so the gate is applied once here
        # instead of on every loaded tile.
        s = tl.load(ROW_SCALE + a, mask=p_mask, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    tl.store(
        Y + out_row[:, None] * stride_ym + n[None, :] * stride_yn,
        acc.to(Y.dtype.element_ty),
        mask=p_mask[:, None] & n_mask[None, :],
    )


def grouped_dw_kernel(
    X,
    DY,
    DW,
    SORTED_ASSIGN,
    OFFSETS,
    ROW_SCALE,
    Din,
    Dout,
    top_k,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_we,
    stride_wk,
    stride_wn,
    X_MODE: tl.constexpr,
    DY_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DW[e] = sum over e's sorted rows p of X[x(p)]^T (scale(p) * DY[dy(p)]).

    Grid: (cdiv(Din, BLOCK_K) * cdiv(Dout, BLOCK_N), E). One program owns one tile of one
    expert's weight gradient and walks that expert's contiguous rows in BLOCK_M chunks,
    gathering both operands inside the loads: a grouped GEMM whose reduction dimension is
    the expert's token count. Each tile has exactly one writer, so the result is
    deterministic; an expert with no rows writes zeros.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    n_tiles_n = tl.cdiv(Dout, BLOCK_N)
    pid_k = pid // n_tiles_n
    pid_n = pid % n_tiles_n

    row_end = tl.load(OFFSETS + expert)
    row_start = tl.load(OFFSETS + expert - 1, mask=expert > 0, other=0)

    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = k < Din
    n_mask = n < Dout
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        p_mask = p < row_end
        a = tl.load(SORTED_ASSIGN + p, mask=p_mask, other=0)
        if X_MODE == 0:
            x_row = p.to(tl.int64)
        elif X_MODE == 1:
            x_row = a // top_k
        else:
            x_row = a
        if DY_MODE == 0:
            dy_row = p.to(tl.int64)
        elif DY_MODE == 1:
            dy_row = a // top_k
        else:
            dy_row = a
        x_t = tl.load(
            X + x_row[None, :] * stride_xm + k[:, None] * stride_xk,
            mask=p_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        dy = tl.load(
            DY + dy_row[:, None] * stride_dym + n[None, :] * stride_dyn,
            mask=p_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            s = tl.load(ROW_SCALE + a, mask=p_mask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * s[:, None]).to(x_t.dtype)
        acc = tl.dot(x_t, dy, acc, input_precision=PRECISION)
    tl.store(
        DW + expert.to(tl.int64) * stride_we + k[:, None] * stride_wk + n[None, :] * stride_wn,
        acc.to(DW.dtype.element_ty),
        mask=k_mask[:, None] & n_mask[None, :],
    )
