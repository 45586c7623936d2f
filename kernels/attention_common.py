"""Pieces shared by the prefix-attention kernels: sequence geometry, masks, dropout, scalars.

Notation used by every attention kernel (one program works on one sequence ``b`` and one head):

* a sequence has ``Lq`` queries and ``Lk`` keys; ``diag = Lk - Lq`` aligns the causal diagonal to the
  bottom-right corner, so query ``i`` sees key ``j`` iff ``j <= i + diag`` (and, with a sliding window
  ``W``, also ``j > i + diag - W``), and the key is not padding (key padding mask, 1 = keep);
* scores are kept in base 2: ``s2 = (q . k) * scale * log2(e)``, so ``exp(scale * q.k - lse) =
  exp2(s2 - lse * log2(e))``; the saved log-sum-exp ``lse`` is in natural-log units;
* dropout keeps score ``(i, j)`` of head ``(b, h)`` iff ``philox(seed_lo + 2^32 (b H + h), i Lk + j) >= p``
  (``tl.rand``), where ``seed_lo`` is the low 32 bits of the int64 the kernels load from ``Seed`` (a device
  tensor, so a new seed neither recompiles a kernel nor stays frozen in a captured CUDA graph): a pure
  function of the seed value and the indices, so forward and backward regenerate the same mask;
* soft-capping (``SOFTCAP`` constexpr, 0 = off, so the default specialisation has none of its code): the
  natural score ``r = scale q.k`` becomes ``s = c tanh(r / c)`` before any mask (``cap_scores``), and every
  gradient with respect to ``s`` is multiplied by ``ds/dr = 1 - (s/c)^2`` (``cap_slope``) on its way to
  q and k;
* addresses: every product of a token or head index with a stride is formed in 64 bits: the scalar bases
  (``head_base``, ``stat_offset``) and the row offsets of each tile (``load_rows``/``store_rows``). A
  fused-QKV token stride times 131k tokens already passes 2^31.
"""

import triton
import triton.language as tl

from . import runtime  # noqa: F401  (under the interpreter: runtime loop bounds work, see runtime.py)


@triton.jit
def seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query token, query count, first key token, key count) of sequence ``b``.

    Packed varlen layout: token offsets from ``cu_seqlens`` (FlashAttention convention). Padded layout:
    every sequence starts at token 0 of its own batch row and has the padded lengths.
    """
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        k_len = tl.load(CuK + b + 1) - k_start
    else:
        q_start = b * 0
        q_len = seqlen_q + b * 0
        k_start = b * 0
        k_len = seqlen_k + b * 0
    return q_start, q_len, k_start, k_len


@triton.jit
def head_base(ptr, b, start, h, stride_b, stride_t, stride_h):
    """Address of token ``start`` of head ``h`` of sequence ``b`` in a [B, T, H, D] or [T, H, D] tensor."""
    return ptr + b.to(tl.int64) * stride_b + start.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h


@triton.jit
def stat_offset(b, h, start, stride_lb, stride_lh):
    """Element offset of token ``start``, head ``h``, sequence ``b`` in the log-sum-exp layout ([B, H, S] or
    [H, T]), shared by every per-row statistic (lse, delta, beta, psi, dlse). ``h * stride_lh`` is
    ``h * total_tokens`` in the packed layout: 64 bits."""
    return b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + start


@triton.jit
def load_rows(
    base,
    start,
    n_rows,
    stride_t,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    TRANS: tl.constexpr,
):
    """Rows ``start .. start + BLOCK`` of the [tokens, HEAD_DIM] matrix at ``base`` (row stride ``stride_t``,
    unit column stride) as a [BLOCK, BLOCK_D] tile, or [BLOCK_D, BLOCK] with TRANS. Columns >= HEAD_DIM and,
    with MASK_ROWS, rows >= ``n_rows`` read 0 (without MASK_ROWS the caller knows every row exists).

    Row offsets are 64-bit, formed on the [BLOCK] row vector before it is broadcast over the columns (cheap,
    and not loop-invariant, so the compiler does not keep a whole tile of offsets live across a key loop)."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64) * stride_t
    if TRANS:
        mask = (cols < HEAD_DIM)[:, None]
        if MASK_ROWS:
            mask = mask & (rows < n_rows)[None, :]
        tile = tl.load(base + offs[None, :] + cols[:, None], mask=mask, other=0.0)
    else:
        mask = (cols < HEAD_DIM)[None, :]
        if MASK_ROWS:
            mask = mask & (rows < n_rows)[:, None]
        tile = tl.load(base + offs[:, None] + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def store_rows(
    base, start, n_rows, stride_t, value, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """Store the [BLOCK, BLOCK_D] tile ``value`` (cast to the buffer's dtype) into rows ``start ..`` of the
    matrix at ``base``; rows >= ``n_rows`` and columns >= HEAD_DIM are not written."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_head_rows(
    ptr,
    b,
    seq_start,
    h,
    stride_b,
    stride_t,
    stride_h,
    start,
    n_rows,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """``load_rows`` of rows ``start ..`` of head ``h`` of sequence ``b`` (first token ``seq_start``)."""
    return load_rows(
        head_base(ptr, b, seq_start, h, stride_b, stride_t, stride_h),
        start,
        n_rows,
        stride_t,
        BLOCK,
        BLOCK_D,
        HEAD_DIM,
        True,
        False,
    )


@triton.jit
def load_row_stats(Lse, Delta, b, h, q_start, m0, q_len, stride_lb, stride_lh, log2e, BLOCK_M: tl.constexpr):
    """Saved statistics of the query rows ``m0 .. m0 + BLOCK_M`` of head ``h``: ``(offs_m, m_ok, stat, lse2,
    delta)``, ``stat`` their offsets in the log-sum-exp layout, ``lse2`` as in ``load_lse2``, delta 0 past
    the end."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    stat = stat_offset(b, h, q_start, stride_lb, stride_lh) + offs_m
    lse2 = load_lse2(Lse, stat, m_ok, log2e)
    delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
    return offs_m, m_ok, stat, lse2, delta


@triton.jit
def load_lse2(Lse, rows, rows_ok, log2e):
    """The saved log-sum-exp at ``Lse + rows`` in base-2 units. Rows past the end and rows with no visible key
    (lse = -inf, output 0) read +inf, so their recomputed P = exp2(s - lse2) is exactly 0 (no NaN)."""
    lse = tl.load(Lse + rows, mask=rows_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * log2e)


@triton.jit
def cap_scores(s2, SOFTCAP: tl.constexpr):
    """Soft-capped base-2 scores: with ``c2 = SOFTCAP log2 e``, ``c2 tanh(s2 / c2)`` is ``log2 e`` times
    ``c tanh(r / c)`` of the natural score ``r = s2 / log2 e`` (Gemma 2's cap). ``SOFTCAP == 0``: ``s2``.

    tanh(x) = 1 - 2 / (exp(2x) + 1): exp2 overflows to inf for large x (t -> 1) and underflows to 0 for very
    negative x (t -> -1), never NaN; the absolute error near 0 is one rounding of 1, small beside c."""
    if SOFTCAP > 0:
        e = tl.math.exp2(s2 * (2.0 / SOFTCAP))  # exp(2 r / c) = 2^(2 r log2 e / c) = 2^(2 s2 / c)
        s2 = (SOFTCAP * 1.4426950408889634) * (1.0 - 2.0 / (e + 1.0))
    return s2


@triton.jit
def cap_slope(s2, SOFTCAP: tl.constexpr):
    """d s / d r = 1 - tanh^2(r / c) from the capped base-2 score ``s2`` (``cap_scores``); SOFTCAP > 0 only."""
    t = s2 * (1.0 / (SOFTCAP * 1.4426950408889634))
    return 1.0 - t * t


@triton.jit
def key_keep(Kpm_base, offs_n, n_ok, HAS_KPM: tl.constexpr):
    """Keys ``offs_n`` that exist and are not padding (key padding mask, nonzero = keep)."""
    if HAS_KPM:
        keep = tl.load(Kpm_base + offs_n, mask=n_ok, other=0) != 0
    else:
        keep = n_ok
    return keep


@triton.jit
def key_range(
    m0,
    q_len,
    k_len,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Keys a query block ``m0 .. m0 + BLOCK_M`` visits: ``(diag, lo, hi, full_lo, full_hi)``.

    ``[lo, hi)`` holds every key some row of the block sees (``lo`` on the BLOCK_N grid); ``[full_lo,
    full_hi)`` the keys every row of the block sees (input of ``aligned_ranges``).
    """
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
    return diag, lo, hi, full_lo, full_hi


@triton.jit
def query_range(
    n0,
    q_len,
    k_len,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Query blocks that see some key of the key block ``n0 .. n0 + BLOCK_N``: ``(diag, lo, n_blocks)``,
    the blocks starting at ``lo + i * BLOCK_M`` for ``i < n_blocks``."""
    diag = k_len - q_len
    lo = 0
    hi = q_len
    if IS_CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(q_len, tl.minimum(n0 + BLOCK_N, k_len) - 1 - diag + window)
    n_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 0)
    return diag, lo, n_blocks


@triton.jit
def load_scalars(qk_scale, sm_scale, rescale, Params, PARAMS_FP64: tl.constexpr):
    """(scale*log2 e, scale, 1/(1-p), log2 e, ln 2) in the accumulator precision.

    Triton passes Python floats as fp32; fp64 runs (gradient checks) read the exact values from a small
    fp64 tensor instead, so no fp32 rounding of the scale leaks into an fp64 result.
    """
    if PARAMS_FP64:
        qk_scale = tl.load(Params + 0)
        sm_scale = tl.load(Params + 1)
        rescale = tl.load(Params + 2)
        log2e = tl.load(Params + 3)
        ln2 = tl.load(Params + 4)
    else:
        log2e = tl.full([], 1.4426950408889634, tl.float32)
        ln2 = tl.full([], 0.6931471805599453, tl.float32)
    return qk_scale, sm_scale, rescale, log2e, ln2


@triton.jit
def load_seed(Seed, HAS_DROPOUT: tl.constexpr):
    """The dropout seed: the low 32 bits of the int64 at ``Seed`` (0 without dropout, when ``Seed`` is a
    placeholder pointer that is never read)."""
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        # the high word belongs to the head index in rng_key; a counter past 2^32 wraps instead of leaking
        # into it (arithmetic shifts: exact for negative values too)
        seed = seed - ((seed >> 32) << 32)
    else:
        seed = tl.zeros([], dtype=tl.int64)
    return seed


@triton.jit
def rng_key(seed, b, h, num_heads):
    """Philox key of head ``h`` of sequence ``b``: low word the seed (``load_seed``), high word the head index."""
    return (b * num_heads + h).to(tl.int64) * 4294967296 + seed


@triton.jit
def keep_mask(key, rows, cols, k_len, dropout_p):
    """Dropout keep mask for query indices ``rows`` and key indices ``cols`` (broadcastable 2-D blocks)."""
    offsets = rows.to(tl.int64) * k_len + cols
    return tl.rand(key, offsets) >= dropout_p


@triton.jit
def score_mask(rows, cols, k_len, diag, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs are visible, before key padding (``rows``/``cols`` broadcastable)."""
    valid = cols < k_len
    if IS_CAUSAL:
        valid = valid & (cols <= rows + diag)
    if HAS_WINDOW:
        valid = valid & (cols > rows + diag - window)
    return valid


@triton.jit
def aligned_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into masked [lo, a) + unmasked [a, c) + masked [c, hi) on the block grid from ``lo``.

    ``[full_lo, full_hi)`` is where every (row, column) pair of a block is visible; ``lo`` is a multiple of
    BLOCK. Only the boundary blocks then pay for the causal/window mask.
    """
    a = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK
    a = tl.minimum(tl.maximum(a, lo), tl.maximum(hi, lo))
    c = lo + tl.maximum(full_hi - lo, 0) // BLOCK * BLOCK
    c = tl.minimum(tl.maximum(c, a), tl.maximum(hi, a))
    return a, c


@triton.jit
def _dropout_mask_kernel(
    Keep,
    CuQ,
    CuK,
    Seed,
    dropout_p,
    num_heads,
    seqlen_q,
    seqlen_k,
    stride_b,
    stride_h,
    stride_m,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Writes the dropout keep mask ``Keep[b, h, i, j]`` (uint8) that the attention kernels use.

    Only for tests and debugging: it materialises a [B, H, Lq, Lk] tensor.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    key = rng_key(load_seed(Seed, True), b, h, num_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Keep + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + offs_m[:, None].to(tl.int64) * stride_m
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
        ptrs = base + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
