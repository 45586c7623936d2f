"""Forward kernel of prefix attention (FlashAttention-2 style, online softmax in base 2).

For one sequence, head ``h`` (KV head ``h // group``) and a block of queries::

    s_ij = scale * q_i . k_j                    for visible (i, j), -inf otherwise
                                                (c tanh(scale q_i . k_j / c) with SOFTCAP = c > 0)
    lse_i = log sum_j exp(s_ij)                 (-inf for a row with no visible key)
    o_i  = sum_j exp(s_ij - lse_i) * z_ij / (1 - p) * v_j      (0 for a row with no visible key)

with ``z_ij`` the dropout keep mask (all ones when p = 0). Keys are visited in blocks; a running maximum
``m`` and running sum ``l`` rescale the accumulator so no [Lq, Lk] tensor exists.
"""

import triton
import triton.language as tl

from .attention_common import (
    aligned_ranges,
    cap_scores,
    head_base,
    keep_mask,
    key_keep,
    key_range,
    load_rows,
    load_scalars,
    load_seed,
    rng_key,
    score_mask,
    seq_bounds,
    stat_offset,
    store_rows,
)


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
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
        # unmasked blocks (MASKED False): every key exists and every pair is visible
        kT = load_rows(K_base, start_n, k_len, stride_kt, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, True)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        s = cap_scores(s, SOFTCAP)  # before the mask, whose -inf it must not see
        if MASKED:
            valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                valid = valid & key_keep(Kpm_base, offs_n, offs_n < k_len, HAS_KPM)[None, :]
            s = tl.where(valid, s, float("-inf"))
        elif HAS_KPM:
            kp = tl.load(Kpm_base + offs_n)
            s = tl.where((kp != 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
            p = tl.where(keep, p * rescale, 0.0)
        v = load_rows(V_base, start_n, k_len, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
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
    stride_ob,
    stride_ot,
    stride_oh,
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
    """Out[i] = softmax_j(scale q_i.k_j | visible) (dropout-masked, / (1-p)) @ V, Lse[i] = logsumexp_j.

    Grid: (query blocks of the longest sequence, query heads, sequences). Rows with no visible key get
    Out = 0 and Lse = -inf.
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
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    Q_base = head_base(Q, b, q_start, h, stride_qb, stride_qt, stride_qh)
    K_base = head_base(K, b, k_start, hk, stride_kb, stride_kt, stride_kh)
    V_base = head_base(V, b, k_start, hk, stride_vb, stride_vt, stride_vh)
    Kpm_base = Kpm + b.to(tl.int64) * stride_mb + k_start
    q = load_rows(Q_base, m0, q_len, stride_qt, BLOCK_M, BLOCK_D, HEAD_DIM, True, False)

    diag, lo, hi, full_lo, full_hi = key_range(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    a, c = aligned_ranges(lo, hi, full_lo, full_hi, BLOCK_N)

    key = rng_key(seed, b, h, num_heads)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
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
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
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
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
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

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * ln2, float("-inf"))
    store_rows(
        head_base(Out, b, q_start, h, stride_ob, stride_ot, stride_oh),
        m0,
        q_len,
        stride_ot,
        out,
        BLOCK_M,
        BLOCK_D,
        HEAD_DIM,
    )
    tl.store(Lse + stat_offset(b, h, q_start, stride_lb, stride_lh) + offs_m, lse, mask=m_ok)
