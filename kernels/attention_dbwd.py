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

from .attention_common import keep_mask, load_scalars, rng_key, score_mask, seq_bounds


@triton.jit
def _dbwd_row_tiles(
    q, do, gq, kT, vT, gkT, gvT, lse2, delta, offs_m, offs_n, k_len, diag, window, kp_ok, qk_scale, sm_scale,
    rescale, dropout_p, key,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    bb = (tl.dot(gq, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
          + tl.dot(q, gkT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)) * sm_scale
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
    Q, K, V, dOut, gQ, gK, gV, Lse, Delta, Dlse, Beta, Psi, GradQ, GraddOut, CuQ, CuK, Kpm, Params,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_gqb, stride_gqt, stride_gqh,
    stride_gkb, stride_gkt, stride_gkh,
    stride_gvb, stride_gvt, stride_gvh,
    stride_oqb, stride_oqt, stride_oqh,
    stride_odb, stride_odt, stride_odh,
    stride_lb, stride_lh, stride_mb,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, sm_scale, rescale, dropout_p, seed, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PARAMS_FP64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PASS: tl.constexpr,
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
    hk = h // group
    b64 = b.to(tl.int64)
    qs64 = q_start.to(tl.int64)
    ks64 = k_start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    qd_mask = m_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None]
    q = tl.load(Q + b64 * stride_qb + qs64 * stride_qt + h * stride_qh + rows * stride_qt + offs_d[None, :],
                mask=qd_mask, other=0.0)
    if PASS < 2:
        do = tl.load(dOut + b64 * stride_dob + qs64 * stride_dot + h * stride_doh + rows * stride_dot
                     + offs_d[None, :], mask=qd_mask, other=0.0)
    else:
        do = q  # PASS 2 does not use dO
    gq = tl.load(gQ + b64 * stride_gqb + qs64 * stride_gqt + h * stride_gqh + rows * stride_gqt
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    stat = b64 * stride_lb + h * stride_lh + q_start + offs_m
    # Rows past the end and rows with no visible key (lse = -inf) read lse = +inf: their P is exactly 0.
    lse = tl.load(Lse + stat, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * log2e)
    delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
    K_base = K + b64 * stride_kb + ks64 * stride_kt + hk * stride_kh
    V_base = V + b64 * stride_vb + ks64 * stride_vt + hk * stride_vh
    gK_base = gK + b64 * stride_gkb + ks64 * stride_gkt + hk * stride_gkh
    gV_base = gV + b64 * stride_gvb + ks64 * stride_gvt + hk * stride_gvh
    Kpm_base = Kpm + b64 * stride_mb + k_start

    diag = k_len - q_len
    r_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1  # last real query row of the block
    lo = 0
    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, r_hi + diag + 1)
    if HAS_WINDOW:
        lo = tl.maximum(m0 + diag - window + 1, 0) // BLOCK_N * BLOCK_N
    key = rng_key(seed, b, h, num_heads)

    if PASS == 0:
        # The row statistics need every key of the row before any gradient can be formed.
        _dbwd_row_stats(q, do, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt,
                        stride_gvt, lse2, delta, Dlse, Beta, Psi, stat, offs_m, offs_d, m_ok, lo, hi, k_len, diag,
                        window, qk_scale, sm_scale, rescale, dropout_p, key, HEAD_DIM, BLOCK_M, BLOCK_N,
                        IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)
    elif PASS == 1:
        beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
        psi = tl.load(Psi + stat, mask=m_ok, other=0.0)
        _dbwd_grad_q(q, do, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt,
                     stride_gvt, lse2, delta, beta, psi,
                     GradQ + b64 * stride_oqb + qs64 * stride_oqt + h * stride_oqh + rows * stride_oqt
                     + offs_d[None, :], qd_mask, offs_m, offs_d, lo, hi, k_len, diag, window, qk_scale, sm_scale,
                     rescale, dropout_p, key, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
                     HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)
    else:
        beta = tl.load(Beta + stat, mask=m_ok, other=0.0)
        _dbwd_grad_dout(q, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt,
                        stride_gvt, lse2, beta,
                        GraddOut + b64 * stride_odb + qs64 * stride_odt + h * stride_odh + rows * stride_odt
                        + offs_d[None, :], qd_mask, offs_m, offs_d, lo, hi, k_len, diag, window, qk_scale,
                        sm_scale, rescale, dropout_p, key, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, IS_CAUSAL,
                        HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE, INPUT_PRECISION)


@triton.jit
def _dbwd_row_stats(
    q, do, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt, stride_gvt,
    lse2, delta, Dlse, Beta, Psi, stat, offs_m, offs_d, m_ok, lo, hi, k_len, diag, window, qk_scale, sm_scale,
    rescale, dropout_p, key,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """PASS 0 of attn_dbwd_dq_kernel: stores Beta and Psi of one query block."""
    d_ok = offs_d < HEAD_DIM
    beta = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    phi = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        kdT_mask = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(K_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kdT_mask, other=0.0)
        vT = tl.load(V_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kdT_mask, other=0.0)
        gkT = tl.load(gK_base + offs_n[None, :] * stride_gkt + offs_d[:, None], mask=kdT_mask, other=0.0)
        gvT = tl.load(gV_base + offs_n[None, :] * stride_gvt + offs_d[:, None], mask=kdT_mask, other=0.0)
        if HAS_KPM:
            kp_ok = tl.load(Kpm_base + offs_n, mask=n_ok, other=0) != 0
        else:
            kp_ok = n_ok
        p, dpd, bb, cc, zr = _dbwd_row_tiles(q, do, gq, kT, vT, gkT, gvT, lse2, delta, offs_m, offs_n, k_len, diag,
                                             window, kp_ok, qk_scale, sm_scale, rescale, dropout_p, key,
                                             IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT, ACC_DTYPE,
                                             INPUT_PRECISION)
        beta += tl.sum(p * bb, 1)
        phi += tl.sum(p * (dpd * bb + cc), 1)
    dlse = tl.load(Dlse + stat, mask=m_ok, other=0.0)
    psi = phi - beta * dlse
    tl.store(Beta + stat, beta, mask=m_ok)
    tl.store(Psi + stat, psi, mask=m_ok)


@triton.jit
def _dbwd_grad_q(
    q, do, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt, stride_gvt,
    lse2, delta, beta, psi, Out_ptrs, out_mask, offs_m, offs_d, lo, hi, k_len, diag, window, qk_scale, sm_scale,
    rescale, dropout_p, key,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """PASS 1 of attn_dbwd_dq_kernel: stores GradQ of one query block."""
    d_ok = offs_d < HEAD_DIM
    acc_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        # Row-major tiles here (transposed for the score products), transposed loads in the statistics
        # pass: each is the variant that compiles without spills for more tile shapes on sm_90.
        kd_mask = n_ok[:, None] & d_ok[None, :]
        cols = offs_n[:, None]
        k = tl.load(K_base + cols * stride_kt + offs_d[None, :], mask=kd_mask, other=0.0)
        v = tl.load(V_base + cols * stride_vt + offs_d[None, :], mask=kd_mask, other=0.0)
        gk = tl.load(gK_base + cols * stride_gkt + offs_d[None, :], mask=kd_mask, other=0.0)
        gv = tl.load(gV_base + cols * stride_gvt + offs_d[None, :], mask=kd_mask, other=0.0)
        if HAS_KPM:
            kp_ok = tl.load(Kpm_base + offs_n, mask=n_ok, other=0) != 0
        else:
            kp_ok = n_ok
        p, dpd, bb, cc, zr = _dbwd_row_tiles(q, do, gq, tl.trans(k), tl.trans(v), tl.trans(gk), tl.trans(gv), lse2,
                                             delta, offs_m, offs_n, k_len, diag, window, kp_ok, qk_scale, sm_scale,
                                             rescale, dropout_p, key, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT,
                                             ACC_DTYPE, INPUT_PRECISION)
        ds = p * dpd
        g = p * (dpd * (bb - beta[:, None]) + cc - psi[:, None])
        acc_q += tl.dot(ds.to(gk.dtype), gk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_q += tl.dot(g.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    acc_q = acc_q * sm_scale
    tl.store(Out_ptrs, acc_q.to(Out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _dbwd_grad_dout(
    q, gq, K_base, V_base, gK_base, gV_base, Kpm_base, stride_kt, stride_vt, stride_gkt, stride_gvt,
    lse2, beta, Out_ptrs, out_mask, offs_m, offs_d, lo, hi, k_len, diag, window, qk_scale, sm_scale,
    rescale, dropout_p, key,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """PASS 2 of attn_dbwd_dq_kernel: stores GraddOut of one query block."""
    d_ok = offs_d < HEAD_DIM
    acc_do = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        kd_mask = n_ok[:, None] & d_ok[None, :]
        cols = offs_n[:, None]
        k = tl.load(K_base + cols * stride_kt + offs_d[None, :], mask=kd_mask, other=0.0)
        gk = tl.load(gK_base + cols * stride_gkt + offs_d[None, :], mask=kd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            kp_ok = tl.load(Kpm_base + offs_n, mask=n_ok, other=0) != 0
            valid = valid & kp_ok[None, :]
        pd = tl.where(valid, p, 0.0)
        if HAS_DROPOUT:
            keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            pd = tl.where(keep, pd * rescale, 0.0)
        bb = (tl.dot(gq, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
              + tl.dot(q, tl.trans(gk), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)) * sm_scale
        w = pd * (bb - beta[:, None])
        v = tl.load(V_base + cols * stride_vt + offs_d[None, :], mask=kd_mask, other=0.0)
        gv = tl.load(gV_base + cols * stride_gvt + offs_d[None, :], mask=kd_mask, other=0.0)
        acc_do += tl.dot(w.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_do += tl.dot(pd.to(gv.dtype), gv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(Out_ptrs, acc_do.to(Out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def attn_dbwd_dkdv_kernel(
    Q, K, V, dOut, gQ, gK, gV, Lse, Delta, Beta, Psi, GradK, GradV, CuQ, CuK, Kpm, Params,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_gqb, stride_gqt, stride_gqh,
    stride_gkb, stride_gkt, stride_gkh,
    stride_gvb, stride_gvt, stride_gvh,
    stride_okb, stride_okt, stride_okh,
    stride_ovb, stride_ovt, stride_ovh,
    stride_lb, stride_lh, stride_mb,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, sm_scale, rescale, dropout_p, seed, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PARAMS_FP64: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
    b64 = b.to(tl.int64)
    qs64 = q_start.to(tl.int64)
    ks64 = k_start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    kd_mask = n_ok[:, None] & d_ok[None, :]
    cols = offs_n[:, None]
    k = tl.load(K + b64 * stride_kb + ks64 * stride_kt + hk * stride_kh + cols * stride_kt + offs_d[None, :],
                mask=kd_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + ks64 * stride_vt + hk * stride_vh + cols * stride_vt + offs_d[None, :],
                mask=kd_mask, other=0.0)
    gk = tl.load(gK + b64 * stride_gkb + ks64 * stride_gkt + hk * stride_gkh + cols * stride_gkt
                 + offs_d[None, :], mask=kd_mask, other=0.0)
    gv = tl.load(gV + b64 * stride_gvb + ks64 * stride_gvt + hk * stride_gvh + cols * stride_gvt
                 + offs_d[None, :], mask=kd_mask, other=0.0)
    if HAS_KPM:
        kp_ok = tl.load(Kpm + b64 * stride_mb + k_start + offs_n, mask=n_ok, other=0) != 0
    else:
        kp_ok = n_ok

    diag = k_len - q_len
    # Only the query blocks that see some key of this block are visited.
    lo = 0
    hi = q_len
    if IS_CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(q_len, tl.minimum(n0 + BLOCK_N, k_len) - 1 - diag + window)
    n_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 0)

    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    # One flat loop over (query head of the group, query block), as in attn_bwd_dkdv_kernel.
    for it in range(0, group * n_blocks):
        g_idx = it // n_blocks
        h = hk * group + g_idx
        offs_m = lo + (it - g_idx * n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        qd_mask = m_ok[:, None] & d_ok[None, :]
        rows = offs_m[:, None]
        q = tl.load(Q + b64 * stride_qb + qs64 * stride_qt + h * stride_qh + rows * stride_qt + offs_d[None, :],
                    mask=qd_mask, other=0.0)
        do = tl.load(dOut + b64 * stride_dob + qs64 * stride_dot + h * stride_doh + rows * stride_dot
                     + offs_d[None, :], mask=qd_mask, other=0.0)
        gq = tl.load(gQ + b64 * stride_gqb + qs64 * stride_gqt + h * stride_gqh + rows * stride_gqt
                     + offs_d[None, :], mask=qd_mask, other=0.0)
        stat = b64 * stride_lb + h * stride_lh + q_start + offs_m
        lse = tl.load(Lse + stat, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * log2e)
        delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
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
        bbT = (tl.dot(k, tl.trans(gq), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
               + tl.dot(gk, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)) * sm_scale
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
    tl.store(GradK + b64 * stride_okb + ks64 * stride_okt + hk * stride_okh + cols * stride_okt + offs_d[None, :],
             acc_k.to(GradK.dtype.element_ty), mask=kd_mask)
    tl.store(GradV + b64 * stride_ovb + ks64 * stride_ovt + hk * stride_ovh + cols * stride_ovt + offs_d[None, :],
             acc_v.to(GradV.dtype.element_ty), mask=kd_mask)
