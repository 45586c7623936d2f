"""Double-backward kernels of prefix attention: the VJP of the attention backward, by recomputation.

The backward (kernels/attention_bwd.py) maps ``(q, k, v, dO, dlse)`` to ``(dQ, dK, dV)``; ``O`` and ``lse``
are the forward's outputs, i.e. functions of ``q, k, v``. These kernels take cotangents ``(gQ, gK, gV)`` of
``(dQ, dK, dV)`` and return the gradients of ``<gQ, dQ> + <gK, dK> + <gV, dV>`` with respect to ``q, k, v,
dO, dlse``, the dependence through ``O`` and ``lse`` included. Per pair ``(i, j)`` (``P`` the softmax,
``z`` the dropout keep mask, ``r = 1/(1-p)``, ``delta_i = dO_i.O_i - dlse_i``, ``do_i = dO_i.O_i``)::

    dP_ij = z_ij r dO_i.v_j          dS_ij = P_ij (dP_ij - delta_i)        (the first-order quantities)
    B_ij  = scale (gQ_i.k_j + q_i.gK_j)          C_ij = z_ij r dO_i.gV_j
    beta_i = sum_j P_ij B_ij                     phi_i = sum_j P_ij ((dP_ij - delta_i) B_ij + C_ij)
    psi_i  = phi_i - beta_i dlse_i
    G_ij  = P_ij ((dP_ij - delta_i)(B_ij - beta_i) + C_ij - psi_i)     (the gradient w.r.t. the scores)
    W_ij  = z_ij r P_ij (B_ij - beta_i)

    grad q_i   = scale sum_j (dS_ij gK_j + G_ij k_j)
    grad k_j   = scale sum_i (dS_ij gQ_i + G_ij q_i)        (summed over the query heads of a KV head)
    grad v_j   = sum_i W_ij dO_i
    grad dO_i  = sum_j (W_ij v_j + z_ij r P_ij gV_j)
    grad dlse_i = beta_i

Derivation: ``<gQ,dQ> + <gK,dK> + <gV,dV> = sum_ij P_ij f_ij`` with ``f_ij = (dP_ij - delta_i) B_ij + C_ij``.
Differentiating ``P`` through the softmax gives ``P_ij (f_ij - phi_i)`` on the scores; ``delta_i`` enters
with ``-beta_i``, which puts the cotangent ``-beta_i dO_i`` on ``O_i``; that flows back through the forward
as scores gradient ``-beta_i P_ij (dP_ij - do_i)`` and ``grad v_j -= sum_i z r P_ij beta_i dO_i``.
Collecting the score terms with ``do_i = delta_i + dlse_i`` gives ``G``.

Two kernels, four launches, no atomics, no [Lq, Lk] tensor: ``attn_dbwd_dq_kernel`` (one program per
query block) runs three times, its ``PASS`` constexpr selecting one sweep over the keys: the row statistics
``beta, psi`` (written to [heads, tokens] buffers, since grad q and grad k need the complete rows), then
``grad q``, then ``grad dO`` (separate launches: one fused program holding the query-side tiles across
several sweeps spills on sm_90); ``attn_dbwd_dkdv_kernel`` (one program per key block, looping over the
query heads of its KV head and their query blocks) forms ``grad k`` and ``grad v``. Every score tile is
recomputed from ``q, k`` and the saved ``lse`` in fp32 (fp64 for fp64 inputs) with base-2 exponentials;
mask, window and dropout keep mask are regenerated exactly as in the forward.
"""

import triton
import triton.language as tl

from .attention_common import (
    head_base,
    keep_mask,
    key_keep,
    key_range,
    load_head_rows,
    load_row_stats,
    load_rows,
    load_scalars,
    load_seed,
    query_range,
    rng_key,
    score_mask,
    seq_bounds,
    store_rows,
)


@triton.jit
def _dbwd_row_tiles(
    q,
    do,
    gq,
    kT,
    vT,
    gkT,
    gvT,
    lse2,
    delta,
    offs_m,
    offs_n,
    k_len,
    diag,
    window,
    kp_ok,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    key,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Recomputed [BLOCK_M, BLOCK_N] tiles of the module formulas: (P, dP - delta, B, C, z r)."""
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
    if HAS_KPM:
        valid = valid & kp_ok[None, :]
    p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, vT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    cc = tl.dot(do, gvT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    bb = (
        tl.dot(gq, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        + tl.dot(q, gkT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    ) * sm_scale
    if HAS_DROPOUT:
        keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
        zr = tl.where(keep, rescale, 0.0)
        dp = dp * zr
        cc = cc * zr
    else:
        zr = rescale
    return p, dp - delta[:, None], bb, cc, zr


@triton.jit
def attn_dbwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    gQ,
    gK,
    gV,
    Lse,
    Delta,
    Dlse,
    Beta,
    Psi,
    GradQ,
    GraddOut,
    CuQ,
    CuK,
    Kpm,
    Params,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_gqb,
    stride_gqt,
    stride_gqh,
    stride_gkb,
    stride_gkt,
    stride_gkh,
    stride_gvb,
    stride_gvt,
    stride_gvh,
    stride_oqb,
    stride_oqt,
    stride_oqh,
    stride_odb,
    stride_odt,
    stride_odh,
    stride_lb,
    stride_lh,
    stride_mb,
    seqlen_q,
    seqlen_k,
    num_heads,
    group,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    Seed,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PARAMS_FP64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PASS: tl.constexpr,
):
    """Row statistics and the query-side gradients of the module formulas, for one query block:

    PASS 0: Beta_i = sum_j P_ij B_ij, Psi_i = sum_j P_ij ((dP_ij - delta_i) B_ij + C_ij) - Beta_i dlse_i;
    PASS 1: GradQ_i = scale sum_j (dS_ij gK_j + G_ij k_j)              (reads Beta, Psi);
    PASS 2: GraddOut_i = sum_j (W_ij v_j + z r P_ij gV_j)              (reads Beta).

    The launcher runs the three passes as three launches: one fused program keeps the query-side tiles
    live across several key sweeps and spills on sm_90, and PASS 2 needs only three of the five
    score-shaped products. Grid: (query blocks of the longest sequence, query heads, sequences). Beta
    (= grad dlse) and Psi are written for every real row (0 for rows that see no key).
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    qk_scale, sm_scale, rescale, log2e, ln2 = load_scalars(qk_scale, sm_scale, rescale, Params, PARAMS_FP64)
    seed = load_seed(Seed, HAS_DROPOUT)
    hk = h // group
    q = load_head_rows(Q, b, q_start, h, stride_qb, stride_qt, stride_qh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    if PASS < 2:
        do = load_head_rows(
            dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
        )
    else:
        do = q  # PASS 2 does not use dO
    gq = load_head_rows(gQ, b, q_start, h, stride_gqb, stride_gqt, stride_gqh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    offs_m, m_ok, stat, lse2, delta = load_row_stats(
        Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
    )
    K_base = head_base(K, b, k_start, hk, stride_kb, stride_kt, stride_kh)
    V_base = head_base(V, b, k_start, hk, stride_vb, stride_vt, stride_vh)
    gK_base = head_base(gK, b, k_start, hk, stride_gkb, stride_gkt, stride_gkh)
    gV_base = head_base(gV, b, k_start, hk, stride_gvb, stride_gvt, stride_gvh)
    Kpm_base = Kpm + b.to(tl.int64) * stride_mb + k_start

    # every row statistic needs the complete row: the key range of the block, no unmasked split
    diag, lo, hi, full_lo, full_hi = key_range(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    key = rng_key(seed, b, h, num_heads)

    if PASS == 0:
        # The row statistics need every key of the row before any gradient can be formed.
        _dbwd_row_stats(
            q,
            do,
            gq,
            K_base,
            V_base,
            gK_base,
            gV_base,
            Kpm_base,
            stride_kt,
            stride_vt,
            stride_gkt,
            stride_gvt,
            lse2,
            delta,
            Dlse,
            Beta,
            Psi,
            stat,
            offs_m,
            m_ok,
            lo,
            hi,
            k_len,
            diag,
            window,
            qk_scale,
            sm_scale,
            rescale,
            dropout_p,
            key,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_D,
            BLOCK_N,
            IS_CAUSAL,
            HAS_WINDOW,
            HAS_KPM,
            HAS_DROPOUT,
            ACC_DTYPE,
            INPUT_PRECISION,
        )
    elif PASS == 1:
        beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
        psi = tl.load(Psi + stat, mask=m_ok, other=0.0)
        _dbwd_grad_q(
            q,
            do,
            gq,
            K_base,
            V_base,
            gK_base,
            gV_base,
            Kpm_base,
            stride_kt,
            stride_vt,
            stride_gkt,
            stride_gvt,
            lse2,
            delta,
            beta,
            psi,
            head_base(GradQ, b, q_start, h, stride_oqb, stride_oqt, stride_oqh),
            stride_oqt,
            m0,
            q_len,
            offs_m,
            lo,
            hi,
            k_len,
            diag,
            window,
            qk_scale,
            sm_scale,
            rescale,
            dropout_p,
            key,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_D,
            BLOCK_N,
            IS_CAUSAL,
            HAS_WINDOW,
            HAS_KPM,
            HAS_DROPOUT,
            ACC_DTYPE,
            INPUT_PRECISION,
        )
    else:
        beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
        _dbwd_grad_dout(
            q,
            gq,
            K_base,
            V_base,
            gK_base,
            gV_base,
            Kpm_base,
            stride_kt,
            stride_vt,
            stride_gkt,
            stride_gvt,
            lse2,
            beta,
            head_base(GraddOut, b, q_start, h, stride_odb, stride_odt, stride_odh),
            stride_odt,
            m0,
            q_len,
            offs_m,
            lo,
            hi,
            k_len,
            diag,
            window,
            qk_scale,
            sm_scale,
            rescale,
            dropout_p,
            key,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_D,
            BLOCK_N,
            IS_CAUSAL,
            HAS_WINDOW,
            HAS_KPM,
            HAS_DROPOUT,
            ACC_DTYPE,
            INPUT_PRECISION,
        )


@triton.jit
def _dbwd_row_stats(
    q,
    do,
    gq,
    K_base,
    V_base,
    gK_base,
    gV_base,
    Kpm_base,
    stride_kt,
    stride_vt,
    stride_gkt,
    stride_gvt,
    lse2,
    delta,
    Dlse,
    Beta,
    Psi,
    stat,
    offs_m,
    m_ok,
    lo,
    hi,
    k_len,
    diag,
    window,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    key,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """PASS 0 of attn_dbwd_dq_kernel: stores Beta and Psi of one query block."""
    beta = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    phi = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, True, True)
        vT = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, True, True)
        gkT = load_rows(gK_base, start_n, k_len, stride_gkt, BLOCK_N, BLOCK_D, HEAD_DIM, True, True)
        gvT = load_rows(gV_base, start_n, k_len, stride_gvt, BLOCK_N, BLOCK_D, HEAD_DIM, True, True)
        kp_ok = key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)
        p, dpd, bb, cc, zr = _dbwd_row_tiles(
            q,
            do,
            gq,
            kT,
            vT,
            gkT,
            gvT,
            lse2,
            delta,
            offs_m,
            offs_n,
            k_len,
            diag,
            window,
            kp_ok,
            qk_scale,
            sm_scale,
            rescale,
            dropout_p,
            key,
            IS_CAUSAL,
            HAS_WINDOW,
            HAS_KPM,
            HAS_DROPOUT,
            ACC_DTYPE,
            INPUT_PRECISION,
        )
        beta += tl.sum(p * bb, 1)
        phi += tl.sum(p * (dpd * bb + cc), 1)
    dlse = tl.load(Dlse + stat, mask=m_ok, other=0.0)
    psi = phi - beta * dlse
    tl.store(Beta + stat, beta, mask=m_ok)
    tl.store(Psi + stat, psi, mask=m_ok)


@triton.jit
def _dbwd_grad_q(
    q,
    do,
    gq,
    K_base,
    V_base,
    gK_base,
    gV_base,
    Kpm_base,
    stride_kt,
    stride_vt,
    stride_gkt,
    stride_gvt,
    lse2,
    delta,
    beta,
    psi,
    Out_base,
    stride_ot,
    m0,
    q_len,
    offs_m,
    lo,
    hi,
    k_len,
    diag,
    window,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    key,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """PASS 1 of attn_dbwd_dq_kernel: stores GradQ of one query block."""
    acc_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # Row-major tiles here (transposed for the score products), transposed loads in the statistics
        # pass: each is the variant that compiles without spills for more tile shapes on sm_90.
        k = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        v = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        gk = load_rows(gK_base, start_n, k_len, stride_gkt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        gv = load_rows(gV_base, start_n, k_len, stride_gvt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        kp_ok = key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)
        p, dpd, bb, cc, zr = _dbwd_row_tiles(
            q,
            do,
            gq,
            tl.trans(k),
            tl.trans(v),
            tl.trans(gk),
            tl.trans(gv),
            lse2,
            delta,
            offs_m,
            offs_n,
            k_len,
            diag,
            window,
            kp_ok,
            qk_scale,
            sm_scale,
            rescale,
            dropout_p,
            key,
            IS_CAUSAL,
            HAS_WINDOW,
            HAS_KPM,
            HAS_DROPOUT,
            ACC_DTYPE,
            INPUT_PRECISION,
        )
        ds = p * dpd
        g = p * (dpd * (bb - beta[:, None]) + cc - psi[:, None])
        acc_q += tl.dot(ds.to(gk.dtype), gk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_q += tl.dot(g.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    acc_q = acc_q * sm_scale
    store_rows(Out_base, m0, q_len, stride_ot, acc_q, BLOCK_M, BLOCK_D, HEAD_DIM)


@triton.jit
def _dbwd_grad_dout(
    q,
    gq,
    K_base,
    V_base,
    gK_base,
    gV_base,
    Kpm_base,
    stride_kt,
    stride_vt,
    stride_gkt,
    stride_gvt,
    lse2,
    beta,
    Out_base,
    stride_ot,
    m0,
    q_len,
    offs_m,
    lo,
    hi,
    k_len,
    diag,
    window,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    key,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """PASS 2 of attn_dbwd_dq_kernel: stores GraddOut of one query block."""
    acc_do = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        gk = load_rows(gK_base, start_n, k_len, stride_gkt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            valid = valid & key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)[None, :]
        pd = tl.where(valid, p, 0.0)
        if HAS_DROPOUT:
            keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            pd = tl.where(keep, pd * rescale, 0.0)
        bb = (
            tl.dot(gq, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            + tl.dot(q, tl.trans(gk), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ) * sm_scale
        w = pd * (bb - beta[:, None])
        v = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        gv = load_rows(gV_base, start_n, k_len, stride_gvt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
        acc_do += tl.dot(w.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_do += tl.dot(pd.to(gv.dtype), gv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    store_rows(Out_base, m0, q_len, stride_ot, acc_do, BLOCK_M, BLOCK_D, HEAD_DIM)


@triton.jit
def attn_dbwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    gQ,
    gK,
    gV,
    Lse,
    Delta,
    Beta,
    Psi,
    GradK,
    GradV,
    CuQ,
    CuK,
    Kpm,
    Params,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_gqb,
    stride_gqt,
    stride_gqh,
    stride_gkb,
    stride_gkt,
    stride_gkh,
    stride_gvb,
    stride_gvt,
    stride_gvh,
    stride_okb,
    stride_okt,
    stride_okh,
    stride_ovb,
    stride_ovt,
    stride_ovh,
    stride_lb,
    stride_lh,
    stride_mb,
    seqlen_q,
    seqlen_k,
    num_heads,
    group,
    qk_scale,
    sm_scale,
    rescale,
    dropout_p,
    Seed,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PARAMS_FP64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Key-side gradients of the module formulas, for one key block of one KV head:

    GradK_j = scale sum_{h in group, i} (dS_ij gQ_i + G_ij q_i),  GradV_j = sum_{h in group, i} W_ij dO_i,

    with Beta and Psi from ``attn_dbwd_dq_kernel``. Grid: (key blocks of the longest sequence, KV heads,
    sequences); works in the transposed orientation [keys, queries] so both accumulate without transposes.
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    qk_scale, sm_scale, rescale, log2e, ln2 = load_scalars(qk_scale, sm_scale, rescale, Params, PARAMS_FP64)
    seed = load_seed(Seed, HAS_DROPOUT)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_head_rows(K, b, k_start, hk, stride_kb, stride_kt, stride_kh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
    v = load_head_rows(V, b, k_start, hk, stride_vb, stride_vt, stride_vh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
    gk = load_head_rows(gK, b, k_start, hk, stride_gkb, stride_gkt, stride_gkh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
    gv = load_head_rows(gV, b, k_start, hk, stride_gvb, stride_gvt, stride_gvh, n0, k_len, BLOCK_N, BLOCK_D, HEAD_DIM)
    kp_ok = key_keep(Kpm + b.to(tl.int64) * stride_mb + k_start, offs_n, offs_n < k_len, HAS_KPM)
    # Only the query blocks that see some key of this block are visited.
    diag, lo, n_blocks = query_range(n0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    # One flat loop over (query head of the group, query block), as in attn_bwd_dkdv_kernel.
    for it in range(0, group * n_blocks):
        g_idx = it // n_blocks
        h = hk * group + g_idx
        m0 = lo + (it - g_idx * n_blocks) * BLOCK_M
        q = load_head_rows(Q, b, q_start, h, stride_qb, stride_qt, stride_qh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        do = load_head_rows(
            dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
        )
        gq = load_head_rows(
            gQ, b, q_start, h, stride_gqb, stride_gqt, stride_gqh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
        )
        offs_m, m_ok, stat, lse2, delta = load_row_stats(
            Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
        )
        beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
        psi = tl.load(Psi + stat, mask=m_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        pT = tl.math.exp2(sT - lse2[None, :])
        valid = score_mask(offs_m[None, :], offs_n[:, None], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            valid = valid & kp_ok[:, None]
        pT = tl.where(valid, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ccT = tl.dot(gv, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        bbT = (
            tl.dot(k, tl.trans(gq), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            + tl.dot(gk, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ) * sm_scale
        if HAS_DROPOUT:
            keep = keep_mask(rng_key(seed, b, h, num_heads), offs_m[None, :], offs_n[:, None], k_len, dropout_p)
            zrT = tl.where(keep, rescale, 0.0)
            dpT = dpT * zrT
            ccT = ccT * zrT
            pdT = pT * zrT
        else:
            pdT = pT * rescale
        dpdT = dpT - delta[None, :]
        bbT = bbT - beta[None, :]
        dsT = pT * dpdT
        gT = pT * (dpdT * bbT + ccT - psi[None, :])
        wT = pdT * bbT
        acc_k += tl.dot(dsT.to(gq.dtype), gq, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_k += tl.dot(gT.to(q.dtype), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_v += tl.dot(wT.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    acc_k = acc_k * sm_scale
    store_rows(
        head_base(GradK, b, k_start, hk, stride_okb, stride_okt, stride_okh),
        n0,
        k_len,
        stride_okt,
        acc_k,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
    )
    store_rows(
        head_base(GradV, b, k_start, hk, stride_ovb, stride_ovt, stride_ovh),
        n0,
        k_len,
        stride_ovt,
        acc_v,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
    )
