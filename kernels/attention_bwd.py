"""Backward kernels of prefix attention, by recomputation from the saved log-sum-exp.

With ``P_ij = exp(s_ij - lse_i)`` (0 where not visible), keep mask ``z`` and ``r = 1/(1-p)``::

    delta_i = sum_d dO_id O_id                          (attn_bwd_preprocess_kernel)
    dV_j   = sum_i P_ij z_ij r dO_i                     (attn_bwd_dkdv_kernel)
    dP_ij  = z_ij r (dO_i . v_j)
    dS_ij  = P_ij (dP_ij - delta_i)
    dK_j   = scale sum_i dS_ij q_i                      (attn_bwd_dkdv_kernel)
    dQ_i   = scale sum_j dS_ij k_j                      (attn_bwd_dq_kernel)

``delta_i = sum_j P_ij dP_ij`` holds with dropout too, because O_i = sum_j P_ij z_ij r v_j. dK/dV and dQ are
separate passes, so there are no atomics and the result is deterministic; with GQA a dK/dV program
loops over the query heads of its KV head. No [Lq, Lk] tensor exists: P and dS live in registers.
"""
import triton
import triton.language as tl

from .attention_common import aligned_ranges, keep_mask, load_scalars, rng_key, score_mask, seq_bounds


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, dOut, Delta, CuQ,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
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
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b64 * stride_ob + q_start.to(tl.int64) * stride_ot + h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + b64 * stride_dob + q_start.to(tl.int64) * stride_dot + h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(Delta + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, CuQ, CuK, Kpm, Params,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_mb,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, sm_scale, rescale, dropout_p, seed, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PARAMS_FP64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dK_j = scale sum_{h in group, i} dS_ij q_i and dV_j = sum_{h in group, i} P_ij z_ij r dO_i.

    Grid: (key blocks of the longest sequence, KV heads, sequences); each program owns its dK/dV rows.
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    qk_scale, sm_scale, rescale, log2e, ln2 = load_scalars(qk_scale, sm_scale, rescale, Params, PARAMS_FP64)
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_KPM:
        Kpm_ok = tl.load(Kpm + b64 * stride_mb + k_start + offs_n, mask=n_ok, other=0) != 0
    else:
        Kpm_ok = n_ok

    diag = k_len - q_len
    # Only the query blocks that see some key of this block are visited.
    lo = 0
    hi = q_len
    if IS_CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(q_len, tl.minimum(n0 + BLOCK_N, k_len) - 1 - diag + window)
    n_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    # One flat loop over (query head of the group, query block): a nested head loop around the block loop
    # keeps more state live across loops and spills on sm_90. Works in the transposed orientation
    # [keys, queries] so dK and dV accumulate without transposes. The mask is applied on every block;
    # splitting off unmasked blocks here also costs registers, and the dots dominate anyway.
    for it in range(0, group * n_blocks):
        g = it // n_blocks
        h = hk * group + g
        offs_m = lo + (it - g * n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        qd_mask = m_ok[:, None] & d_ok[None, :]
        row0 = b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h * stride_qh
        q = tl.load(Q + row0 + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(dOut + b64 * stride_dob + q_start.to(tl.int64) * stride_dot + h * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
        # Rows past the end read lse = +inf so their P is exactly 0 (no NaN); -inf (rows with no visible
        # key, whose output is 0) is mapped to +inf for the same reason.
        stat = b64 * stride_lb + h * stride_lh + q_start + offs_m
        lse = tl.load(Lse + stat, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * log2e)
        delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
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
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dk = dk * sm_scale
    tl.store(dK + b64 * stride_dkb + k_start.to(tl.int64) * stride_dkt + hk * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + b64 * stride_dvb + k_start.to(tl.int64) * stride_dvt + hk * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, K_base, V_base, stride_kt, stride_vt, Kpm_base,
    offs_m, offs_d, lo, hi, k_len, diag, window, qk_scale, rescale, dropout_p, key,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < k_len
        else:
            n_ok = offs_n >= 0
        kT = tl.load(K_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vT = tl.load(V_base + offs_n[None, :] * stride_vt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                kp = tl.load(Kpm_base + offs_n, mask=n_ok, other=0)
                valid = valid & (kp != 0)[None, :]
            p = tl.where(valid, p, 0.0)
        elif HAS_KPM:
            kp = tl.load(Kpm_base + offs_n)
            p = tl.where((kp != 0)[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DROPOUT:
            keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            dp = tl.where(keep, dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, CuQ, CuK, Kpm, Params,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_mb,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, sm_scale, rescale, dropout_p, seed, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PARAMS_FP64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
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
    hk = h // group
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    qd_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(dOut + b64 * stride_dob + q_start.to(tl.int64) * stride_dot + h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(Lse + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * log2e)
    delta = tl.load(Delta + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    K_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    Kpm_base = Kpm + b64 * stride_mb + k_start

    diag = k_len - q_len
    r_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo = 0
    hi = k_len
    full_lo = 0
    full_hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, r_hi + diag + 1)
        full_hi = tl.minimum(k_len, m0 + diag + 1)
    if HAS_WINDOW:
        lo = tl.maximum(m0 + diag - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = r_hi + diag - window + 1
    a, c = aligned_ranges(lo, hi, full_lo, full_hi, BLOCK_N)

    key = rng_key(seed, b, h, num_heads)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                   lo, a, k_len, diag, window, qk_scale, rescale, dropout_p, key, HEAD_DIM, BLOCK_N, True,
                   IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                   a, c, k_len, diag, window, qk_scale, rescale, dropout_p, key, HEAD_DIM, BLOCK_N, False,
                   IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                   c, hi, k_len, diag, window, qk_scale, rescale, dropout_p, key, HEAD_DIM, BLOCK_N, True,
                   IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(dQ + b64 * stride_dqb + q_start.to(tl.int64) * stride_dqt + h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=qd_mask)
