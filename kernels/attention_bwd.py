"""Backward kernels of prefix attention, by recomputation from the saved log-sum-exp.

With ``P_ij = exp(s_ij - lse_i)`` (0 where not visible), keep mask ``z`` and ``r = 1/(1-p)``::

    delta_i = sum_d dO_id O_id                          (attn_bwd_preprocess_kernel)
    dV_j   = sum_i P_ij z_ij r dO_i                     (attn_bwd_dkdv_kernel)
    dP_ij  = z_ij r (dO_i . v_j)
    dS_ij  = P_ij (dP_ij - delta_i)
    (with SOFTCAP = c > 0: s_ij = c tanh(scale q_i.k_j / c), and dS_ij is multiplied by 1 - (s_ij / c)^2
    before the two products below)
    dK_j   = scale sum_i dS_ij q_i                      (attn_bwd_dkdv_kernel)
    dQ_i   = scale sum_j dS_ij k_j                      (ATOMIC_DQ: attn_bwd_dkdv_kernel; else attn_bwd_dq_kernel)

``delta_i = sum_j P_ij dP_ij`` holds with dropout too, because O_i = sum_j P_ij z_ij r v_j. No [Lq, Lk]
tensor exists: P and dS live in registers. With GQA a dK/dV program loops over the query heads of its KV
head (and, with ATOMIC_DQ, adds into each of their dQ rows).

Two ways to form dQ (the launcher's ``deterministic`` switch picks one):

* atomic (``ATOMIC_DQ``, the default of the op layer): the dK/dV program, which already holds dS_ij for its
  key block and each query block it visits, also forms ``scale dS k`` for those query rows and adds it into
  a zero-initialised fp32 (fp64 for fp64 inputs) buffer with ``tl.atomic_add``; the launcher casts the
  buffer into dq (or it is dq when dq has that dtype). Work, in units of one Lq x Lk x D product over the
  visible pairs: S, dP, dV, dK, dQ = **5 units** (FlashAttention-2's count). The order in which key blocks
  add is up to the GPU scheduler, so dQ may differ in the last bits between runs.
* deterministic (split kernels): the dK/dV kernel (S, dP, dV, dK: 4 units) and a dQ kernel per query block
  that recomputes S and dP before dQ = dS K (3 units): **7 units**, no atomics, bitwise reproducible.
"""

import triton
import triton.language as tl

from .attention_common import (
    aligned_ranges,
    cap_scores,
    cap_slope,
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
    stat_offset,
    store_rows,
)


@triton.jit
def attn_bwd_preprocess_kernel(
    Out,
    dOut,
    Delta,
    CuQ,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_lb,
    stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Delta[i] = sum_d dOut[i, d] * Out[i, d], accumulated in ACC_DTYPE. Grid: (query blocks, heads, seqs)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, _, _ = seq_bounds(CuQ, CuQ, b, seqlen_q, seqlen_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    o = load_head_rows(Out, b, q_start, h, stride_ob, stride_ot, stride_oh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    do = load_head_rows(dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(Delta + stat_offset(b, h, q_start, stride_lb, stride_lh) + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def atomic_add_rows(
    base, start, n_rows, stride_t, value, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """Add the [BLOCK, BLOCK_D] tile ``value`` atomically into rows ``start ..`` of the matrix at ``base``
    (the accumulator's dtype); rows >= ``n_rows`` and columns >= HEAD_DIM are untouched. Relaxed ordering:
    the adds only need to be atomic, nothing reads the buffer before the kernel ends."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    tl.atomic_add(ptrs, value.to(base.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    dQacc,
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
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
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
    SOFTCAP: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """dK_j = scale sum_{h in group, i} dS_ij q_i and dV_j = sum_{h in group, i} P_ij z_ij r dO_i; with
    ATOMIC_DQ also dQacc_i += scale sum_{j in block} dS_ij k_j for every query head h of the group.

    Grid: (key blocks of the longest sequence, KV heads, sequences); each program owns its dK/dV rows. With
    ATOMIC_DQ the key blocks of one sequence and KV head share the query rows, so their dQ parts meet in the
    zero-initialised ACC_DTYPE buffer ``dQacc`` through atomic adds (without it ``dQacc`` is never touched).
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
    K_base = head_base(K, b, k_start, hk, stride_kb, stride_kt, stride_kh)
    V_base = head_base(V, b, k_start, hk, stride_vb, stride_vt, stride_vh)
    k = load_rows(K_base, n0, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
    v = load_rows(V_base, n0, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
    Kpm_ok = key_keep(Kpm + b.to(tl.int64) * stride_mb + k_start, offs_n, offs_n < k_len, HAS_KPM)
    # Only the query blocks that see some key of this block are visited.
    diag, lo, n_blocks = query_range(n0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    # One flat loop over (query head of the group, query block): a nested head loop around the block loop
    # keeps more state live across loops and spills on sm_90. Works in the transposed orientation
    # [keys, queries] so dK and dV accumulate without transposes. The mask is applied on every block;
    # splitting off unmasked blocks here also costs registers, and the dots dominate anyway.
    for it in range(0, group * n_blocks):
        g = it // n_blocks
        h = hk * group + g
        m0 = lo + (it - g * n_blocks) * BLOCK_M
        q = load_head_rows(Q, b, q_start, h, stride_qb, stride_qt, stride_qh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        do = load_head_rows(
            dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM
        )
        offs_m, m_ok, stat, lse2, delta = load_row_stats(
            Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
        )
        sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        sT = cap_scores(sT, SOFTCAP)
        pT = tl.math.exp2(sT - lse2[None, :])
        valid = score_mask(offs_m[None, :], offs_n[:, None], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            valid = valid & Kpm_ok[:, None]
        pT = tl.where(valid, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DROPOUT:
            keep = keep_mask(rng_key(seed, b, h, num_heads), offs_m[None, :], offs_n[:, None], k_len, dropout_p)
            pdT = tl.where(keep, pT * rescale, 0.0)
            dpT = tl.where(keep, dpT * rescale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if SOFTCAP > 0:  # the scores' gradient, carried back through the cap to q.k
            dsT = (pT * (dpT - delta[None, :]) * cap_slope(sT, SOFTCAP)).to(q.dtype)
        else:
            dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if ATOMIC_DQ:
            # this key block's share of dQ for the block's query rows, scaled here (the buffer may be dq itself)
            dq = tl.dot(tl.trans(dsT), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * sm_scale
            atomic_add_rows(
                head_base(dQacc, b, q_start, h, stride_dqb, stride_dqt, stride_dqh),
                m0,
                q_len,
                stride_dqt,
                dq,
                BLOCK_M,
                BLOCK_D,
                HEAD_DIM,
            )
    dk = dk * sm_scale
    store_rows(
        head_base(dK, b, k_start, hk, stride_dkb, stride_dkt, stride_dkh),
        n0,
        k_len,
        stride_dkt,
        dk,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
    )
    store_rows(
        head_base(dV, b, k_start, hk, stride_dvb, stride_dvt, stride_dvh),
        n0,
        k_len,
        stride_dvt,
        dv,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
    )


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    K_base,
    V_base,
    stride_kt,
    stride_vt,
    Kpm_base,
    offs_m,
    lo,
    hi,
    k_len,
    diag,
    window,
    qk_scale,
    rescale,
    dropout_p,
    key,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, True)
        vT = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, True)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        s = cap_scores(s, SOFTCAP)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                valid = valid & key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)[None, :]
            p = tl.where(valid, p, 0.0)
        elif HAS_KPM:
            kp = tl.load(Kpm_base + offs_n)
            p = tl.where((kp != 0)[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DROPOUT:
            keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            dp = tl.where(keep, dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP > 0:
            ds = ds * cap_slope(s, SOFTCAP)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dQ,
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
    stride_dqb,
    stride_dqt,
    stride_dqh,
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
    SOFTCAP: tl.constexpr,
):
    """dQ_i = scale sum_j P_ij (z_ij r dO_i.v_j - delta_i) k_j. Grid: (query blocks, query heads, seqs)."""
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
    do = load_head_rows(dOut, b, q_start, h, stride_dob, stride_dot, stride_doh, m0, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    offs_m, m_ok, stat, lse2, delta = load_row_stats(
        Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M
    )
    K_base = head_base(K, b, k_start, hk, stride_kb, stride_kt, stride_kh)
    V_base = head_base(V, b, k_start, hk, stride_vb, stride_vt, stride_vh)
    Kpm_base = Kpm + b.to(tl.int64) * stride_mb + k_start

    diag, lo, hi, full_lo, full_hi = key_range(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    a, c = aligned_ranges(lo, hi, full_lo, full_hi, BLOCK_N)

    key = rng_key(seed, b, h, num_heads)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        Kpm_base,
        offs_m,
        lo,
        a,
        k_len,
        diag,
        window,
        qk_scale,
        rescale,
        dropout_p,
        key,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        HAS_KPM,
        HAS_DROPOUT,
        ACC_DTYPE,
        INPUT_PRECISION,
        SOFTCAP,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        Kpm_base,
        offs_m,
        a,
        c,
        k_len,
        diag,
        window,
        qk_scale,
        rescale,
        dropout_p,
        key,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        IS_CAUSAL,
        HAS_WINDOW,
        HAS_KPM,
        HAS_DROPOUT,
        ACC_DTYPE,
        INPUT_PRECISION,
        SOFTCAP,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        Kpm_base,
        offs_m,
        c,
        hi,
        k_len,
        diag,
        window,
        qk_scale,
        rescale,
        dropout_p,
        key,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        HAS_KPM,
        HAS_DROPOUT,
        ACC_DTYPE,
        INPUT_PRECISION,
        SOFTCAP,
    )
    dq = dq * sm_scale
    store_rows(
        head_base(dQ, b, q_start, h, stride_dqb, stride_dqt, stride_dqh),
        m0,
        q_len,
        stride_dqt,
        dq,
        BLOCK_M,
        BLOCK_D,
        HEAD_DIM,
    )
