"""Forward kernel of prefix attention (FlashAttention-2 style, online softmax in base 2).

For one sequence, head ``h`` (KV head ``h // group``) and a block of queries::

    s_ij = scale * q_i . k_j                    for visible (i, j), -inf otherwise
    lse_i = log sum_j exp(s_ij)                 (-inf for a row with no visible key)
    o_i  = sum_j exp(s_ij - lse_i) * z_ij / (1 - p) * v_j      (0 for a row with no visible key)

with ``z_ij`` the dropout keep mask (all ones when p = 0). Keys are visited in blocks; a running maximum
``m`` and running sum ``l`` rescale the accumulator so no [Lq, Lk] tensor exists.
"""
import triton
import triton.language as tl

from .attention_common import aligned_ranges, keep_mask, load_scalars, rng_key, score_mask, seq_bounds


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, K_base, V_base, stride_kt, stride_vt, Kpm_base,
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
            n_ok = offs_n >= 0  # a full block: every key exists
        kT = tl.load(K_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        if MASKED:
            valid = score_mask(offs_m[:, None], offs_n[None, :], k_len, diag, window, IS_CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                kp = tl.load(Kpm_base + offs_n, mask=n_ok, other=0)
                valid = valid & (kp != 0)[None, :]
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
        v = tl.load(V_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION,
                                            out_dtype=ACC_DTYPE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, Kpm, Params,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_mb,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, sm_scale, rescale, dropout_p, seed, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PARAMS_FP64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
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
    hk = h // group
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM

    Q_base = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h * stride_qh
    K_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    Kpm_base = Kpm + b64 * stride_mb + k_start
    q = tl.load(Q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)

    diag = k_len - q_len
    r_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1  # last real query row of the block
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
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                               lo, a, k_len, diag, window, qk_scale, rescale, dropout_p, key,
                               HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT,
                               ACC_DTYPE, INPUT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                               a, c, k_len, diag, window, qk_scale, rescale, dropout_p, key,
                               HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT,
                               ACC_DTYPE, INPUT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_base, V_base, stride_kt, stride_vt, Kpm_base, offs_m, offs_d,
                               c, hi, k_len, diag, window, qk_scale, rescale, dropout_p, key,
                               HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DROPOUT,
                               ACC_DTYPE, INPUT_PRECISION)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * ln2, float("-inf"))
    O_base = Out + b64 * stride_ob + q_start.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(O_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    L_base = Lse + b64 * stride_lb + h * stride_lh + q_start
    tl.store(L_base + offs_m, lse, mask=m_ok)
