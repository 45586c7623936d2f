"""Pieces shared by the prefix-attention kernels: sequence geometry, masks, dropout, scalars.

Notation used by every attention kernel (one program works on one sequence ``b`` and one head):

* a sequence has ``Lq`` queries and ``Lk`` keys; ``diag = Lk - Lq`` aligns the causal diagonal to the
  bottom-right corner, so query ``i`` sees key ``j`` iff ``j <= i + diag`` (and, with a sliding window
  ``W``, also ``j > i + diag - W``), and the key is not padding (key padding mask, 1 = keep);
* scores are kept in base 2: ``s2 = (q . k) * scale * log2(e)``, so ``exp(scale * q.k - lse) =
  exp2(s2 - lse * log2(e))``; the saved log-sum-exp ``lse`` is in natural-log units;
* dropout keeps score ``(i, j)`` of head ``(b, h)`` iff ``philox(seed + 2^32 (b H + h), i Lk + j) >= p``
  (``tl.rand``), a pure function of the indices, so forward and backward regenerate the same mask.
"""
import os

import triton
import triton.language as tl


def _interpreter_index_compat():
    """Let the Triton interpreter use tensor loop bounds (``range(lo, hi)``) under NumPy >= 2.

    The interpreter holds scalars as 1-element arrays and converts loop bounds with ``int(array)``, which
    NumPy 2 rejects for arrays of rank > 0; ``.item()`` accepts them. Only the interpreter is touched,
    only for the duration of each kernel call (its own patch scope restores the attribute), and only when
    TRITON_INTERPRET=1. Belongs in gradmem_fast.backend once other kernels need it.
    """
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_index_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._index_compat = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter_index_compat()


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
def rng_key(seed, b, h, num_heads):
    """Philox key of head ``h`` of sequence ``b``: low word the user seed, high word the head index."""
    # no .to() on seed: Triton passes an integer argument equal to 1 as a constant
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
    Keep, CuQ, CuK, seed, dropout_p, num_heads, seqlen_q, seqlen_k,
    stride_b, stride_h, stride_m,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the dropout keep mask ``Keep[b, h, i, j]`` (uint8) that the attention kernels use.

    Only for tests and debugging: it materialises a [B, H, Lq, Lk] tensor.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    key = rng_key(seed, b, h, num_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Keep + b.to(tl.int64) * stride_b + h * stride_h
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = keep_mask(key, offs_m[:, None], offs_n[None, :], k_len, dropout_p)
        ptrs = base + offs_m[:, None] * stride_m + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
