"""Triton kernels of causal stick-breaking attention (launched by ``sb_triton``).

Shape legend: BH batch*heads (flattened), T length, D head dim; tiles of BLOCK queries
(i) by BLOCK keys (j), queries and keys cut at the same boundaries.

Notation, per query i and key j inside its stick S_i (j < i, or j <= i with the
diagonal): z = scale * q_i.k_j, lb = log beta = -softplus(-z), lo = log(1 - beta) =
-softplus(z), computed from one shared log1p(exp(-|z|)) term so neither is the log of a
rounded sigmoid. log A_ij = lb_ij + sum_{l in S_i, l > j} lo_il, log r_i = sum_{S_i} lo_il,
o_i = sum_j A_ij v_j + r_i v_i (the convention of ``sb_ref``; Tan et al. 2024).

Forward: one program per query block walks key blocks from the diagonal backwards,
keeping the running log-sum of lo over the keys already passed (those nearer the query),
so every A_ij is a sum of non-positive terms: exact, no cancellation.

Backward, with do = dL/do, G_i = dL/dlog r_i = dlogr_i + r_i do_i.v_i (precomputed):
    g_ij = A_ij (do_i . v_j),  C_ij = sum_{k in S_i, k < j} g_ik
    dz_ij = g_ij (1 - beta_ij) - beta_ij (C_ij + G_i)
    dq_i = scale sum_j dz_ij k_j,  dk_j = scale sum_i dz_ij q_i,  dv_j = sum_i A_ij do_i + r_j do_j
C is a prefix over keys, so the backward walks keys forwards and gets A from the saved
log r_i: log A_ij = lb_ij + log r_i - sum_{l <= j} lo_il. The dQ kernel (one program per
query block) also writes, for every key block it passes, each row's two running prefixes
(sum lo and sum g before that block). The dK/dV kernel (one program per key block, looping
over query blocks in order) reads them back instead of re-walking the row, so every dK/dV
tile has a single owner accumulating in fp32 registers: deterministic, no atomics. The
price is 8 bytes per (row, key block), e.g. 0.8 GB at B*H=48, T=16384, BLOCK=64.

Wide heads (ModuleFormer's MoLM uses one 1024-wide head): the head dim is cut into
NUM_DC chunks of BLOCK_D. Each program owns one chunk of the *output* columns (grid axis
2) and sums the contractions over D (q.k, do.v) chunk by chunk, in a rolled loop: an
unrolled one keeps a shared-memory buffer per chunk operand (320 KB at D = 1024, past the
227 KB of an H100). With one chunk (D <= 128) q and do stay in registers for the whole
key loop, as in flash attention.
"""

import triton.language as tl


def sb_fwd_kernel(
    Q,
    K,
    V,
    O,
    LOGR,
    scale,
    T,
    D,
    INCLUDE_DIAG: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_DC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK), BH, NUM_DC). Longest rows first: the last block is program 0."""
    ib = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dc = tl.program_id(2)
    base = bh * T * D
    i = ib * BLOCK + tl.arange(0, BLOCK)
    d = dc * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's output columns
    i_mask = i < T
    d_mask = d < D
    if NUM_DC == 1:
        q = tl.load(
            Q + base + i[:, None] * D + d[None, :],
            mask=i_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
    acc_o = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK,), dtype=tl.float32)  # sum of lo over keys already passed
    for t in range(0, ib + 1):
        jb = ib - t
        j = jb * BLOCK + tl.arange(0, BLOCK)
        j_mask = j < T
        v = tl.load(
            V + base + j[:, None] * D + d[None, :],
            mask=j_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if NUM_DC == 1:
            k = tl.load(
                K + base + j[:, None] * D + d[None, :],
                mask=j_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            z = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            z = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for c in range(0, NUM_DC):
                dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
                q_c = tl.load(
                    Q + base + i[:, None] * D + dd[None, :],
                    mask=i_mask[:, None] & (dd < D)[None, :],
                    other=0.0,
                )
                k_c = tl.load(
                    K + base + j[:, None] * D + dd[None, :],
                    mask=j_mask[:, None] & (dd < D)[None, :],
                    other=0.0,
                )
                z = tl.dot(q_c, tl.trans(k_c), z, input_precision=PRECISION)
        z = z * scale
        if INCLUDE_DIAG:
            inside = (j[None, :] <= i[:, None]) & i_mask[:, None]
        else:
            inside = (j[None, :] < i[:, None]) & i_mask[:, None]
        log1p_e = tl.log(1.0 + tl.exp(-tl.abs(z)))
        lo = tl.where(inside, -tl.maximum(z, 0.0) - log1p_e, 0.0)
        lb = tl.minimum(z, 0.0) - log1p_e
        # keys l > j inside this tile: reverse inclusive cumsum minus the key itself
        later = tl.cumsum(lo, axis=1, reverse=True) - lo
        attn = tl.where(inside, tl.exp(lb + later + acc_lo[:, None]), 0.0)
        acc_o = tl.dot(attn.to(v.dtype), v, acc_o, input_precision=PRECISION)
        acc_lo += tl.sum(lo, axis=1)
    # remaining mass goes to the query's own value
    own = tl.load(
        V + base + i[:, None] * D + d[None, :], mask=i_mask[:, None] & d_mask[None, :], other=0.0
    )
    out = acc_o + tl.exp(acc_lo)[:, None] * own.to(tl.float32)
    tl.store(
        O + base + i[:, None] * D + d[None, :],
        out.to(O.dtype.element_ty),
        mask=i_mask[:, None] & d_mask[None, :],
    )
    tl.store(LOGR + bh * T + i, acc_lo, mask=i_mask & (dc == 0))


def sb_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LOGR,
    GR,
    DQ,
    PRE_LO,
    PRE_G,
    scale,
    T,
    D,
    n_blocks,
    INCLUDE_DIAG: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_DC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (n_blocks, BH, NUM_DC). Writes dQ and the per-(key block, row) prefixes."""
    ib = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dc = tl.program_id(2)
    base = bh * T * D
    i = ib * BLOCK + tl.arange(0, BLOCK)
    d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    i_mask = i < T
    d_mask = d < D
    qd_mask = i_mask[:, None] & d_mask[None, :]
    if NUM_DC == 1:
        q = tl.load(Q + base + i[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + base + i[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
    logr = tl.load(LOGR + bh * T + i, mask=i_mask, other=0.0)
    gr = tl.load(GR + bh * T + i, mask=i_mask, other=0.0)
    pre_lo = tl.zeros((BLOCK,), dtype=tl.float32)
    pre_g = tl.zeros((BLOCK,), dtype=tl.float32)
    dq = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    pre_base = bh * n_blocks * T
    for jb in range(0, ib + 1):
        # every D-chunk program computes the same prefixes; chunk 0 writes them
        tl.store(PRE_LO + pre_base + jb * T + i, pre_lo, mask=i_mask & (dc == 0))
        tl.store(PRE_G + pre_base + jb * T + i, pre_g, mask=i_mask & (dc == 0))
        j = jb * BLOCK + tl.arange(0, BLOCK)
        j_mask = j < T
        k = tl.load(
            K + base + j[:, None] * D + d[None, :],
            mask=j_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if NUM_DC == 1:
            v = tl.load(
                V + base + j[:, None] * D + d[None, :],
                mask=j_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            z = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            dattn = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        else:
            z = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            dattn = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for c in range(0, NUM_DC):
                dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
                row_m = i_mask[:, None] & (dd < D)[None, :]
                col_m = j_mask[:, None] & (dd < D)[None, :]
                q_c = tl.load(Q + base + i[:, None] * D + dd[None, :], mask=row_m, other=0.0)
                do_c = tl.load(DO + base + i[:, None] * D + dd[None, :], mask=row_m, other=0.0)
                k_c = tl.load(K + base + j[:, None] * D + dd[None, :], mask=col_m, other=0.0)
                v_c = tl.load(V + base + j[:, None] * D + dd[None, :], mask=col_m, other=0.0)
                z = tl.dot(q_c, tl.trans(k_c), z, input_precision=PRECISION)
                dattn = tl.dot(do_c, tl.trans(v_c), dattn, input_precision=PRECISION)
        z = z * scale
        if INCLUDE_DIAG:
            inside = (j[None, :] <= i[:, None]) & i_mask[:, None]
        else:
            inside = (j[None, :] < i[:, None]) & i_mask[:, None]
        log1p_e = tl.log(1.0 + tl.exp(-tl.abs(z)))
        lo = tl.where(inside, -tl.maximum(z, 0.0) - log1p_e, 0.0)
        lb = tl.minimum(z, 0.0) - log1p_e
        upto = pre_lo[:, None] + tl.cumsum(lo, axis=1)  # sum_{l <= j} lo_il
        attn = tl.where(inside, tl.exp(lb + logr[:, None] - upto), 0.0)
        g = attn * dattn
        before = pre_g[:, None] + tl.cumsum(g, axis=1) - g  # sum_{k < j} g_ik
        dz = g * tl.exp(lo) - tl.exp(lb) * (before + gr[:, None])
        dz = tl.where(inside, dz, 0.0)
        dq = tl.dot(dz.to(k.dtype), k, dq, input_precision=PRECISION)
        pre_lo += tl.sum(lo, axis=1)
        pre_g += tl.sum(g, axis=1)
    tl.store(
        DQ + base + i[:, None] * D + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask
    )


def sb_bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    LOGR,
    GR,
    DK,
    DV,
    PRE_LO,
    PRE_G,
    scale,
    T,
    D,
    n_blocks,
    INCLUDE_DIAG: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_DC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (n_blocks, BH, NUM_DC). Key block 0 sees the most query blocks: it goes first."""
    jb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dc = tl.program_id(2)
    base = bh * T * D
    j = jb * BLOCK + tl.arange(0, BLOCK)
    d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    j_mask = j < T
    d_mask = d < D
    kv_mask = j_mask[:, None] & d_mask[None, :]
    k = tl.load(K + base + j[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + j[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    pre_base = bh * n_blocks * T + jb * T
    for ib in range(jb, n_blocks):
        i = ib * BLOCK + tl.arange(0, BLOCK)
        i_mask = i < T
        qd_mask = i_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + base + i[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + base + i[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        logr = tl.load(LOGR + bh * T + i, mask=i_mask, other=0.0)
        gr = tl.load(GR + bh * T + i, mask=i_mask, other=0.0)
        pre_lo = tl.load(PRE_LO + pre_base + i, mask=i_mask, other=0.0)
        pre_g = tl.load(PRE_G + pre_base + i, mask=i_mask, other=0.0)
        if NUM_DC == 1:
            z = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            dattn = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        else:
            z = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            dattn = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for c in range(0, NUM_DC):
                dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
                row_m = i_mask[:, None] & (dd < D)[None, :]
                col_m = j_mask[:, None] & (dd < D)[None, :]
                q_c = tl.load(Q + base + i[:, None] * D + dd[None, :], mask=row_m, other=0.0)
                do_c = tl.load(DO + base + i[:, None] * D + dd[None, :], mask=row_m, other=0.0)
                k_c = tl.load(K + base + j[:, None] * D + dd[None, :], mask=col_m, other=0.0)
                v_c = tl.load(V + base + j[:, None] * D + dd[None, :], mask=col_m, other=0.0)
                z = tl.dot(q_c, tl.trans(k_c), z, input_precision=PRECISION)
                dattn = tl.dot(do_c, tl.trans(v_c), dattn, input_precision=PRECISION)
        z = z * scale
        if INCLUDE_DIAG:
            inside = (j[None, :] <= i[:, None]) & i_mask[:, None]
        else:
            inside = (j[None, :] < i[:, None]) & i_mask[:, None]
        log1p_e = tl.log(1.0 + tl.exp(-tl.abs(z)))
        lo = tl.where(inside, -tl.maximum(z, 0.0) - log1p_e, 0.0)
        lb = tl.minimum(z, 0.0) - log1p_e
        upto = pre_lo[:, None] + tl.cumsum(lo, axis=1)
        attn = tl.where(inside, tl.exp(lb + logr[:, None] - upto), 0.0)
        g = attn * dattn
        before = pre_g[:, None] + tl.cumsum(g, axis=1) - g
        dz = g * tl.exp(lo) - tl.exp(lb) * (before + gr[:, None])
        dz = tl.where(inside, dz, 0.0)
        dv = tl.dot(tl.trans(attn).to(do.dtype), do, dv, input_precision=PRECISION)
        dk = tl.dot(tl.trans(dz).to(q.dtype), q, dk, input_precision=PRECISION)
    # the remainder term r_j v_j of query j itself
    do_own = tl.load(DO + base + j[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
    r_own = tl.exp(tl.load(LOGR + bh * T + j, mask=j_mask, other=0.0))
    dv += r_own[:, None] * do_own.to(tl.float32)
    tl.store(
        DK + base + j[:, None] * D + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(DV + base + j[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
