"""Cross-entropy kernels over a bounded logits chunk (the Triton half of the fused linear cross-entropy).

The op ``gradmem_fast.ops.cross_entropy.linear_cross_entropy`` never builds the full ``[N, V]`` logits: it
walks the tokens in chunks of ``C`` rows and lets cuBLAS write one chunk's logits ``Z = H_c W^T (+ b)`` into a
reusable buffer ``[C, Vpad]`` (``Vpad`` = V rounded up to a multiple of 64; the op hands the kernels the view
``[:, :V]`` and ``n_load = Vpad``). All softmax math is fp32 (fp64 when the statistics buffers are fp64).

Per row i with target t_i, per-token scale g_i (``valid_i = t_i != ignore_index``):

    lse_i  = log sum_v exp(z_iv)                      (online: running max m and rescaled sum s)
    loss_i = valid_i * (lse_i - z_{i, t_i})
    G_iv   = valid_i * g_i * (exp(z_iv - lse_i) - [v == t_i])        (= d(g_i loss_i)/d z_iv)
    dH_i   = sum_v G_iv W_v          dW_v += sum_i G_iv h_i          db_v += sum_i G_iv

Soft-capping (``softcap=c``, the ``SOFTCAP`` constexpr; Gemma 2's ``final_logit_softcapping``): the kernels
read the chunk's logits y and use ``z = c tanh(y / c)`` in every formula above; G is the gradient with respect
to y, so it carries the tanh derivative:

    G_iv   = valid_i * g_i * (exp(z_iv - lse_i) - [v == t_i]) * (1 - (z_iv / c)^2)

A logit scale is not the kernels' business: the op folds it into the GEMM that writes the chunk (its alpha)
and into the per-token g_i of the backward. ``c`` arrives as two fp32 scalars (``softcap`` + ``softcap_lo``,
the rounding remainder), since a Python float reaches a kernel as fp32 and fp64 math needs c to 1e-15.

Kernels:
  ``ce_forward_kernel``  lse and loss (pass 2 over Z; optionally also G written over Z in place).
  ``ce_grad_kernel``     G written over Z in place from a saved lse (kept for callers that want G itself).
  ``ce_dh_kernel``       dH = G W with G formed tile by tile from Z in the matrix product's prologue: Z is read
                         once more and G is never written (pass 3). Split-K over V for short chunks.
  ``ce_dw_kernel``       dW += G^T H_c and db += colsum(G), same prologue (one more read of Z).

HBM passes over a chunk's logits (the ``≤ 3`` of issue 14): the GEMM writes Z (1), ``ce_forward_kernel``
reads it for the statistics (2), ``ce_dh_kernel`` reads it for dH (3); a trainable head adds one read by
``ce_dw_kernel`` (4). The previous design made 5 (GEMM write, statistics read, G read + written in place,
cuBLAS read of G), 6 with dW. ``benchmarks.census_count.ce_logits_passes`` counts them from recorded launches.

Vector loads: a masked load vectorises only when its mask is constant over 16-byte groups, so the column
mask of every load is ``col < n_load`` (``Vpad``, a multiple of 64, with a 16-divisible row stride), and the
vocabulary edge ``col < V`` is applied afterwards with ``tl.where``: the padding columns (uninitialised memory,
possibly NaN) are read but never reach a result. With ``n_load == V`` (an unpadded chunk) this is the plain
masked load. sm_90 PTX at GPT-2's V = 50257 (bf16): the statistics kernel's padded launch loads with
``ld.global.v4`` and ``ce_dh_kernel``'s with 16-byte ``cp.async``, where an unpadded odd-V chunk takes 16-bit
scalar loads (tests/test_cross_entropy.py::test_padded_rows_compile_to_vector_loads).

A target outside ``[0, V)`` that is not ``ignore_index`` matches no column: its target logit reads as 0 and
its one-hot term is absent (no out-of-bounds access; such targets are the caller's error, and the kernels do
not check them because checking would need a host synchronisation).
"""

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

from .runtime import CompileSpec, Variant, interpreting

# Elements of one [BLOCK_M, BLOCK_V] tile of the row kernels. 4096 fp32 values over 8 warps is 16 registers a
# thread per live tile, which leaves room for the exp/where temporaries without spilling.
_TILE_GPU = 4096
# The interpreter pays per operation, not per element: bigger tiles make the CPU tests much faster.
_TILE_INTERPRET = 1 << 17
# More rows a program made ptxas spill at short rows: each element of a multi-row tile carries its own 64-bit
# pointer. 8-row tiles (V <= 512) spilled 4-32 B in the n_load / odd-V specialisations on sm_90; 4-row tiles on
# 4 warps do not (compile check).
_MAX_ROWS = 4
_MAX_BLOCK_V = 4096
_GPU_TILES_IN_INTERPRETER = [False]  # set by ``interpret_gpu_tiles`` (tests of the GPU tiles)

# Matrix-product tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel and element size of the
# operands, with BLOCK_N the widest; narrower hidden sizes take BLOCK_N = next power of two >= d (>= 16, the
# smallest dot operand a GPU takes). ce_dw_kernel reads its tuple as (BLOCK_V, BLOCK_N, BLOCK_C). Every
# dimension >= 16: 16-bit dot operands need K >= 16 on a GPU. G is recomputed (one exp per logit) by every
# hidden tile, so wide BLOCK_N pays: ce_dh takes 256 for 16-bit operands (d = 768 in three tiles, not six; sm_90:
# 128 registers, 120 KB shared, no spills in every specialisation); ce_dw stays at 128, since at 256 its
# unaligned specialisation (odd d: scalar H loads and dW read-add-write) spills at 255 registers; its fp32 tile
# runs on 8 warps (at 4 the aligned dW-only specialisation spilled 4 B at 80 registers).
_DOT_TILES_GPU = {
    "dh": {2: (64, 256, 64, 8, 3), 4: (64, 64, 32, 4, 3), 8: (32, 32, 16, 4, 2)},
    "dw": {2: (64, 128, 64, 8, 3), 4: (64, 64, 32, 8, 3), 8: (32, 32, 16, 4, 2)},
}
# The interpreter pays per program and per operation: few programs with wide tiles (ce_dw_kernel's tile is
# (BLOCK_V, BLOCK_N, BLOCK_C)).
_DOT_TILES_INTERPRET = {"dh": (256, 64, 1024, 4, 1), "dw": (1024, 64, 256, 4, 1)}
# Soft-capping keeps tanh(z / c) live beside the gradient tile: the fp32 ce_dw tile at 3 stages spilled 8 B at 128
# registers (unaligned specialisation, sm_90); at 2 stages it does not (compile check). (kind, operand bytes): stages.
_SOFTCAP_STAGES = {("dw", 4): 2}
_MIN_SPLIT_COLS = 4096  # columns per split-K slice of ce_dh_kernel at least (amortises the partial sums)


@triton.jit
def _tanh(x):
    """``tanh(x) = 1 - 2 / (exp(2x) + 1)`` from one exp: an overflow to inf gives exactly 1 and an underflow -1
    (no NaN at any |x|); near 0 the error is absolute, about one ulp of 1, which is all a logit needs."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _softcap_of(softcap, softcap_lo, acc_ty: tl.constexpr):
    """(c, 1 / c) in the math dtype from the fp32 pair (value, rounding remainder)."""
    cap = tl.cast(softcap, acc_ty) + tl.cast(softcap_lo, acc_ty)
    return cap, 1.0 / cap


@triton.jit
def _grad_tile(z_ptr, stride_z, rows, rows_ok, cols, n_cols, n_load, t, lse, g, cap, inv_cap, SOFTCAP: tl.constexpr):
    """The tile ``G[rows, cols] = g (exp(z - lse) - [col == t])`` from the logits, in lse's dtype; columns at
    or past ``n_cols`` (the padding up to ``n_load``, and beyond) give 0. ``t`` as ``_row_scale`` returns it.
    With SOFTCAP, ``z = cap tanh(y inv_cap)`` of the stored logits y and G carries ``1 - (z / cap)^2``."""
    mask = rows_ok[:, None] & (cols < n_load)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    # Padding columns are uninitialised memory: replaced before any arithmetic, so even NaN cannot leak.
    in_vocab = (cols < n_cols)[None, :]
    z = z.to(lse.dtype)
    if SOFTCAP:
        th = _tanh(tl.where(in_vocab, z, 0.0) * inv_cap)
        z = cap * th
    p = tl.exp(tl.where(in_vocab, z, float("-inf")) - lse[:, None])
    p = tl.where(cols[None, :] == t[:, None], p - 1.0, p)
    if SOFTCAP:
        p = p * (1.0 - th * th)
    return p * g[:, None]


@triton.jit
def _row_scale(t_ptr, scale_ptr, lse_ptr, rows, rows_ok, n_cols, ignore_index, HAS_SCALE: tl.constexpr):
    """(t, lse, g) of the rows: g = valid * scale (or valid without a scale), 0 on rows past the end; t is -1
    (matches no column) where the target lies outside [0, n_cols)."""
    t = tl.load(t_ptr + rows, mask=rows_ok, other=ignore_index)
    valid = rows_ok & (t != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rows_ok, other=0.0)
    if HAS_SCALE:
        g = tl.where(valid, tl.load(scale_ptr + rows, mask=rows_ok, other=0.0).to(lse.dtype), 0.0)
    else:
        g = tl.where(valid, 1.0, 0.0).to(lse.dtype)
    return tl.where((t >= 0) & (t < n_cols), t, -1), lse, g


@triton.jit
def _grad_sweep(
    z_ptr,
    stride_z,
    rows,
    rows_ok,
    t,
    lse,
    g,
    n_cols,
    n_load,
    cap,
    inv_cap,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite the rows of Z with ``G`` in place (the padding columns with 0)."""
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + cols0
        p = _grad_tile(z_ptr, stride_z, rows, rows_ok, cols, n_cols, n_load, t, lse, g, cap, inv_cap, SOFTCAP)
        ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
        tl.store(ptrs, p.to(z_ptr.dtype.element_ty), mask=rows_ok[:, None] & (cols < n_load)[None, :])


@triton.jit
def ce_forward_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    n_load,
    ignore_index,
    softcap,
    softcap_lo,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: ``lse_i = logsumexp_v z_iv``, ``loss_i = valid_i (lse_i - z_{i,t_i})``; with WRITE_GRAD
    also ``z_iv <- valid_i (softmax(z_i)_v - [v == t_i])`` in place (the unit-scale logits gradient). With
    SOFTCAP, z is ``c tanh(y / c)`` of the stored logits y (module docstring) and the gradient is G of y.

    One program handles BLOCK_M rows; the sweep over V keeps a running max ``m`` and a sum ``s`` rescaled by
    ``exp(m_old - m_new)`` whenever the max grows (online log-sum-exp): one read of the row for the
    statistics whatever V is. ``lse``/``loss`` are stored in the dtype of ``lse_ptr``/``loss_ptr`` (fp32, or
    fp64 for fp64 inputs), which is also the math dtype. Columns ``n_cols <= v < n_load`` are loaded (vector
    loads) and replaced by -inf.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    t = tl.load(t_ptr + rows, mask=rows_ok, other=ignore_index)
    valid = rows_ok & (t != ignore_index)
    t = tl.where((t >= 0) & (t < n_cols), t, -1)  # an out-of-range target matches no column
    # int64 row offsets: a user-chosen chunk may exceed 2**31 logits.
    row_base = z_ptr + rows.to(tl.int64) * stride_z
    acc_ty = lse_ptr.dtype.element_ty
    cap, inv_cap = _softcap_of(softcap, softcap_lo, acc_ty)

    m = tl.full([BLOCK_M], float("-inf"), acc_ty)
    s = tl.zeros([BLOCK_M], acc_ty)
    zt = tl.zeros([BLOCK_M], acc_ty)
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + cols0
        mask = rows_ok[:, None] & (cols < n_load)[None, :]
        z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        ok = mask & (cols < n_cols)[None, :]
        if SOFTCAP:  # padding (possibly NaN) zeroed before the tanh, then dropped
            z = cap * _tanh(tl.where(ok, z, 0.0) * inv_cap)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        # Rows past n_rows see only -inf; shifting by 0 instead of -inf keeps them NaN-free.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
        m = m_new
    # Rows past n_rows have s == 0; give them lse 0 so the gradient sweep stays finite.
    lse = tl.where(rows_ok, m + tl.log(tl.where(rows_ok, s, 1.0)), 0.0)
    tl.store(lse_ptr + rows, lse, mask=rows_ok)
    tl.store(loss_ptr + rows, tl.where(valid, lse - zt, 0.0), mask=rows_ok)
    if WRITE_GRAD:
        g = tl.where(valid, 1.0, 0.0).to(acc_ty)
        _grad_sweep(z_ptr, stride_z, rows, rows_ok, t, lse, g, n_cols, n_load, cap, inv_cap, SOFTCAP, BLOCK_V)


@triton.jit
def ce_grad_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    n_load,
    ignore_index,
    softcap,
    softcap_lo,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """In place ``z_iv <- valid_i * scale_i * (exp(z_iv - lse_i) - [v == t_i])`` from a saved ``lse``
    (``scale`` in the dtype of ``lse_ptr``): ``d(sum_i scale_i loss_i)/dz`` for a caller's own matrix products
    (with SOFTCAP, G of the stored logits: module docstring)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    t, lse, g = _row_scale(t_ptr, scale_ptr, lse_ptr, rows, rows_ok, n_cols, ignore_index, True)
    cap, inv_cap = _softcap_of(softcap, softcap_lo, lse_ptr.dtype.element_ty)
    _grad_sweep(z_ptr, stride_z, rows, rows_ok, t, lse, g, n_cols, n_load, cap, inv_cap, SOFTCAP, BLOCK_V)


@triton.jit
def ce_dh_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    scale_ptr,
    w_ptr,
    stride_w,
    out_ptr,
    stride_out,
    stride_split,
    n_rows,
    n_cols,
    n_load,
    n_hidden,
    ignore_index,
    cols_per_split,
    softcap,
    softcap_lo,
    HAS_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[s, i, n] = sum_{v in slice s} G_iv W_vn`` with ``G`` formed in the prologue (module docstring).

    Grid (hidden tiles, row tiles, split-K slices); the hidden-tile index varies fastest, so the programs that
    read the same [BLOCK_M, V] strip of Z run side by side and share it through L2. Per K step: load a
    [BLOCK_M, BLOCK_K] tile of Z, form ``G`` in fp32 (fp64), round it to W's dtype (what a 16-bit G buffer
    would hold) and accumulate ``G W`` in fp32 (fp64) on tensor cores. ``g_i`` is ``scale_i`` when HAS_SCALE
    and 1 otherwise (times valid_i). Slice ``s`` covers columns ``[s * cols_per_split, (s + 1) *
    cols_per_split)``; with one slice ``out`` is dH itself (any float dtype), otherwise fp32 partial sums that
    the launcher adds. FLOPs: 2 rows d V, as the cuBLAS product it replaces, plus ~4 per logit for G.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    t, lse, g = _row_scale(t_ptr, scale_ptr, lse_ptr, rows, rows_ok, n_cols, ignore_index, HAS_SCALE)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < n_hidden
    acc_ty = lse_ptr.dtype.element_ty
    cap, inv_cap = _softcap_of(softcap, softcap_lo, acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    k0 = tl.arange(0, BLOCK_K)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_cols)
    for v0 in range(v_lo, v_hi, BLOCK_K):
        cols = v0 + k0
        p = _grad_tile(z_ptr, stride_z, rows, rows_ok, cols, n_cols, n_load, t, lse, g, cap, inv_cap, SOFTCAP)
        w = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * stride_w + ns[None, :],
            mask=(cols < n_cols)[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(p.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=acc_ty)
    out = out_ptr + pid_s * stride_split + rows.to(tl.int64)[:, None] * stride_out + ns[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & n_ok[None, :])


@triton.jit
def ce_dw_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    scale_ptr,
    h_ptr,
    stride_h,
    dw_ptr,
    stride_dw,
    db_ptr,
    n_rows,
    n_cols,
    n_load,
    n_hidden,
    ignore_index,
    softcap,
    softcap_lo,
    HAS_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dW[v, n] += sum_i G_iv h_in`` (HAS_DW) and ``db[v] += sum_i G_iv`` (HAS_DB), G from Z in the prologue.

    Grid (hidden tiles, vocabulary tiles); each program owns one [BLOCK_V, BLOCK_N] tile of the fp32 (fp64)
    accumulators and walks the chunk's rows in steps of BLOCK_C: G tile [BLOCK_C, BLOCK_V] (rounded to H's
    dtype for the product, fp32 for db), ``G^T H_c`` on tensor cores. No atomics: each output element has one
    owner, so the sums are deterministic; the read-add-write accumulates over the op's chunks. db is formed by
    the programs of the first hidden tile only.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_ok = cols < n_cols
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < n_hidden
    acc_ty = lse_ptr.dtype.element_ty
    cap, inv_cap = _softcap_of(softcap, softcap_lo, acc_ty)
    acc = tl.zeros([BLOCK_V, BLOCK_N], acc_ty)
    db = tl.zeros([BLOCK_V], acc_ty)
    r0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, n_rows, BLOCK_C):
        rows = c0 + r0
        rows_ok = rows < n_rows
        t, lse, g = _row_scale(t_ptr, scale_ptr, lse_ptr, rows, rows_ok, n_cols, ignore_index, HAS_SCALE)
        p = _grad_tile(z_ptr, stride_z, rows, rows_ok, cols, n_cols, n_load, t, lse, g, cap, inv_cap, SOFTCAP)
        if HAS_DW:
            h = tl.load(
                h_ptr + rows.to(tl.int64)[:, None] * stride_h + ns[None, :],
                mask=rows_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(p.to(h.dtype)), h, acc, input_precision=PRECISION, out_dtype=acc_ty)
        if HAS_DB:
            db += tl.sum(p, 0)
    if HAS_DW:
        ptrs = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + ns[None, :]
        mask = cols_ok[:, None] & n_ok[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)
    if HAS_DB:
        mask_b = cols_ok & (pid_n == 0)
        tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=mask_b, other=0.0) + db, mask=mask_b)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers


def pick_blocks(n_cols: int, interpret: bool | None = None) -> tuple:
    """(BLOCK_M, BLOCK_V, num_warps) of the row kernels for a row length ``n_cols``: a power-of-two tile of at
    most ``_TILE_GPU`` elements, wide along V first (coalesced loads), then stacking rows for short rows."""
    if interpret is None:
        interpret = interpreting() and not _GPU_TILES_IN_INTERPRETER[0]
    tile = _TILE_INTERPRET if interpret else _TILE_GPU
    block_v = max(16, min(_MAX_BLOCK_V if not interpret else tile, triton.next_power_of_2(n_cols)))
    block_m = max(1, min(_MAX_ROWS if not interpret else 256, tile // block_v))
    # 8 warps for full tiles of one or two rows; the 4-row x 1024 tile spilled 4-8 B at 8 warps (fp16 / bf16,
    # padded specialisation) and does not at 4 (compile check).
    num_warps = 8 if block_m * block_v >= 4096 and block_m < 4 else 4
    return block_m, block_v, num_warps


def pick_dot_blocks(
    n_hidden: int, elem_size: int, interpret: bool | None = None, kind: str = "dh", softcap: bool = False
) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of ``ce_dh_kernel`` / ``ce_dw_kernel`` for hidden
    size ``n_hidden`` and operands of ``elem_size`` bytes: the table's tile, BLOCK_N narrowed to the next
    power of two >= max(16, n_hidden) for small hidden sizes; ``softcap``: the SOFTCAP specialisation's
    stages (``_SOFTCAP_STAGES``)."""
    if interpret is None:
        interpret = interpreting() and not _GPU_TILES_IN_INTERPRETER[0]
    bm, bn, bk, warps, stages = _DOT_TILES_INTERPRET[kind] if interpret else _DOT_TILES_GPU[kind][elem_size]
    bn = max(16, min(bn, triton.next_power_of_2(n_hidden)))
    if softcap and not interpret:
        stages = _SOFTCAP_STAGES.get((kind, elem_size), stages)
    return bm, bn, bk, warps, stages


@contextlib.contextmanager
def interpret_gpu_tiles():
    """Under the interpreter, launch with the tiles a GPU would get (tests of those tiles)."""
    saved = _GPU_TILES_IN_INTERPRETER[0]
    _GPU_TILES_IN_INTERPRETER[0] = True
    try:
        yield
    finally:
        _GPU_TILES_IN_INTERPRETER[0] = saved


def _interpret(t) -> bool:
    """Interpreter tiles: under the interpreter on CPU tensors, unless ``interpret_gpu_tiles`` is active (a
    ``meta`` tensor, the step census, models the GPU)."""
    return interpreting() and t.device.type == "cpu" and not _GPU_TILES_IN_INTERPRETER[0]


def _fit(n: int) -> int:
    """The smallest power-of-two tile edge >= n (and >= 16, the smallest dot operand)."""
    return max(16, triton.next_power_of_2(n))


def _check_chunk(z, targets, n_load):
    """Validate a logits chunk and return how many columns of each row may be read (``n_load``)."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(
            f"logits must be a 2-D row-major [rows, V] tensor, got shape {tuple(z.shape)} with strides {z.stride()}"
        )
    if targets.shape != (z.shape[0],) or targets.stride(0) != 1:
        raise ValueError(f"targets must be a contiguous [{z.shape[0]}] tensor, got {tuple(targets.shape)}")
    rows, n_cols = z.shape
    n_load = n_cols if n_load is None else int(n_load)
    room = z.untyped_storage().nbytes() // z.element_size() - z.storage_offset()
    if (
        n_load < n_cols
        or (rows > 1 and n_load > z.stride(0))
        or (rows > 0 and (rows - 1) * z.stride(0) + n_load > room)
    ):
        raise ValueError(
            f"n_load must lie in [V={n_cols}, row stride {z.stride(0)}] and inside the logits' storage, got {n_load}"
        )
    return n_load


def _check_matrix(name, x, shape, dtypes):
    if tuple(x.shape) != tuple(shape) or x.dtype not in dtypes or (x.numel() and x.stride(-1) != 1):
        raise ValueError(
            f"{name} must be a row-major {tuple(shape)} tensor of dtype {' or '.join(map(str, dtypes))}, got "
            f"{tuple(x.shape)} {x.dtype} with strides {x.stride()}"
        )


def _softcap_args(softcap: float | None) -> tuple[float, float, bool]:
    """(value, fp32 rounding remainder, SOFTCAP) of the kernels' soft-capping arguments; (1, 0, False) when off."""
    if softcap is None:
        return 1.0, 0.0, False
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    hi = struct.unpack("f", struct.pack("f", float(softcap)))[0]  # rounded to fp32, as the kernel receives it
    return hi, float(softcap) - hi, True


def ce_forward(
    z, targets, lse, loss, ignore_index: int, write_grad: bool, n_load: int | None = None, softcap: float | None = None
) -> None:
    """Launch ``ce_forward_kernel`` on a logits chunk ``z`` [rows, V] (fp16/bf16/fp32/fp64).

    Fills ``lse`` and ``loss`` ([rows], fp32 or fp64) and, when ``write_grad``, overwrites ``z`` with the
    unit-scale gradient ``valid * (softmax(z) - onehot)``. ``n_load``: columns of each row that may be read
    (the padded row length, default V). ``softcap``: c > 0 to use ``c tanh(z / c)`` as the logits (None: off).
    Every output is a buffer the caller owns.
    """
    n_load = _check_chunk(z, targets, n_load)
    rows, n_cols = z.shape
    if rows == 0:
        return
    block_m, block_v, warps = pick_blocks(n_cols, _interpret(z))
    if _interpret(z):
        block_m = min(block_m, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m),)
    ce_forward_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        loss,
        rows,
        n_cols,
        n_load,
        ignore_index,
        *_softcap_args(softcap)[:2],
        WRITE_GRAD=write_grad,
        SOFTCAP=softcap is not None,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=warps,
    )


def ce_grad(z, targets, lse, scale, ignore_index: int, n_load: int | None = None, softcap: float | None = None) -> None:
    """Launch ``ce_grad_kernel``: overwrite ``z`` [rows, V] with ``scale_i * valid_i * (softmax - onehot)``
    using the saved ``lse`` [rows] and the per-token ``scale`` [rows] (both in the math dtype); ``softcap``
    as in ``ce_forward`` (G then carries the tanh derivative)."""
    n_load = _check_chunk(z, targets, n_load)
    rows, n_cols = z.shape
    if rows == 0:
        return
    block_m, block_v, warps = pick_blocks(n_cols, _interpret(z))
    if _interpret(z):
        block_m = min(block_m, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m),)
    ce_grad_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        scale,
        rows,
        n_cols,
        n_load,
        ignore_index,
        *_softcap_args(softcap)[:2],
        SOFTCAP=softcap is not None,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=warps,
    )


def _sm_count(device) -> int:
    """SMs of a CUDA device; 132 (H100 SXM / H200) for a ``meta`` tensor (the step census models that GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def pick_split(rows: int, n_cols: int, n_hidden: int, elem_size: int, device) -> int:
    """Split-K slices of ``ce_dh_kernel``: a chunk of few rows has few (row, hidden) tiles, so the vocabulary
    is cut into slices until there are about two programs per SM, each slice at least ``_MIN_SPLIT_COLS``
    wide (1 on the CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return 1
    bm, bn, _, _, _ = pick_dot_blocks(n_hidden, elem_size, interpret=False)
    tiles = triton.cdiv(rows, bm) * triton.cdiv(n_hidden, bn)
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), n_cols // _MIN_SPLIT_COLS))


def ce_dh(
    z,
    targets,
    lse,
    scale,
    weight,
    out,
    ignore_index: int,
    n_load: int | None = None,
    tf32: bool = False,
    split: int | None = None,
    softcap: float | None = None,
) -> None:
    """``out[i] = sum_v G_iv weight[v]`` (dH of the chunk) without writing ``G``: launch ``ce_dh_kernel``.

    ``z`` [rows, V] logits (read only), ``lse`` [rows] saved statistics (fp32/fp64: the math dtype),
    ``scale`` [rows] per-token g_i in that dtype or None (g_i = 1), ``weight`` [V, d] in z's dtype, ``out``
    [rows, d] row-major (any float dtype; written, never read). ``tf32`` lets fp32 products use TF32 (as
    ``torch.backends.cuda.matmul.allow_tf32`` does for cuBLAS). ``split`` slices of the vocabulary (default
    ``pick_split``); more than one sums fp32 partial products in a workspace (one extra small reduction).
    ``softcap`` as in ``ce_forward``.
    """
    n_load = _check_chunk(z, targets, n_load)
    rows, n_cols = z.shape
    _check_matrix("weight", weight, (n_cols, weight.shape[-1]), (z.dtype,))
    d = weight.shape[1]
    _check_matrix("out", out, (rows, d), (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if rows == 0 or d == 0:
        return
    bm, bn, bk, warps, stages = pick_dot_blocks(d, z.element_size(), _interpret(z), softcap=softcap is not None)
    if _interpret(z):  # no wider than the chunk: the interpreter's cost grows with the tile, masked or not
        bm, bk = min(bm, _fit(rows)), min(bk, _fit(n_cols))
    split = pick_split(rows, n_cols, d, z.element_size(), z.device) if split is None else max(1, int(split))
    per = triton.cdiv(triton.cdiv(n_cols, split), bk) * bk  # slice width, whole K steps
    split = triton.cdiv(n_cols, per)
    dst = out if split == 1 else torch.empty((split, rows, d), dtype=lse.dtype, device=z.device)
    grid = (triton.cdiv(d, bn), triton.cdiv(rows, bm), split)
    ce_dh_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        lse if scale is None else scale,
        weight,
        weight.stride(0),
        dst,
        dst.stride(-2),
        rows * d,
        rows,
        n_cols,
        n_load,
        d,
        ignore_index,
        per,
        *_softcap_args(softcap)[:2],
        HAS_SCALE=scale is not None,
        SOFTCAP=softcap is not None,
        PRECISION="tf32" if tf32 and z.dtype == torch.float32 else "ieee",
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    if split > 1:
        if out.dtype == dst.dtype and out.is_contiguous():
            torch.sum(dst, 0, out=out)
        else:
            out.copy_(dst.sum(0))


def ce_dw(
    z,
    targets,
    lse,
    scale,
    hidden,
    dw,
    db,
    ignore_index: int,
    n_load: int | None = None,
    tf32: bool = False,
    softcap: float | None = None,
) -> None:
    """``dw[v] += sum_i G_iv hidden[i]`` and ``db[v] += sum_i G_iv`` without writing ``G``: ``ce_dw_kernel``.

    ``hidden`` [rows, d] (z's dtype), ``dw`` [V, d] and ``db`` [V] accumulators in the math dtype (lse's),
    either may be None; ``scale`` and ``softcap`` as in ``ce_dh``.
    """
    n_load = _check_chunk(z, targets, n_load)
    rows, n_cols = z.shape
    d = hidden.shape[-1]
    _check_matrix("hidden", hidden, (rows, d), (z.dtype,))
    if dw is not None:
        _check_matrix("dw", dw, (n_cols, d), (lse.dtype,))
    if db is not None and (tuple(db.shape) != (n_cols,) or db.dtype != lse.dtype or db.stride(0) != 1):
        raise ValueError(f"db must be a contiguous [{n_cols}] {lse.dtype} tensor, got {tuple(db.shape)} {db.dtype}")
    has_dw = dw is not None and d > 0
    if rows == 0 or not (has_dw or db is not None):
        return
    bv, bn, bc, warps, stages = pick_dot_blocks(
        max(d, 1), z.element_size(), _interpret(z), kind="dw", softcap=softcap is not None
    )
    if _interpret(z):
        bv, bc = min(bv, _fit(n_cols)), min(bc, _fit(rows))
    grid = (triton.cdiv(d, bn) if has_dw else 1, triton.cdiv(n_cols, bv))
    ce_dw_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        lse if scale is None else scale,
        hidden,
        hidden.stride(0),
        dw if has_dw else lse,
        dw.stride(0) if has_dw else 0,
        lse if db is None else db,
        rows,
        n_cols,
        n_load,
        d,
        ignore_index,
        *_softcap_args(softcap)[:2],
        HAS_SCALE=scale is not None,
        SOFTCAP=softcap is not None,
        HAS_DW=has_dw,
        HAS_DB=db is not None,
        PRECISION="tf32" if tf32 and z.dtype == torch.float32 else "ieee",
        BLOCK_V=bv,
        BLOCK_N=bn,
        BLOCK_C=bc,
        num_warps=warps,
        num_stages=stages,
    )


def compile_specs() -> list:
    """Every launch configuration the launchers can choose on a GPU, in the specialisations the op produces.

    Row kernels: every tile ``pick_blocks`` picks over V = 16 .. 256k, every logits and target dtype, in the
    ``aligned`` specialisation (a vocabulary such as 50304 or 32000: every pointer, stride and length divisible
    by 16), ``padded`` (what the op launches for GPT-2's V = 50257: the row stride and ``n_load`` = 50304 are
    divisible, V itself is not; loads still vectorise since their mask uses ``n_load``) and ``unaligned`` (an
    unpadded odd-V chunk from another caller and targets at an odd offset: scalar loads).

    Soft-capping (``SOFTCAP``, Gemma 2's final logits): the statistics kernel's every tile without the in-place
    gradient (what the op launches), and every matrix-product tile with and without a per-token scale.

    Matrix-product kernels: every tile ``pick_dot_blocks`` picks (each BLOCK_N a hidden size can give), per
    operand dtype (fp32 with IEEE and TF32 products), with and without a per-token scale; ``ce_dw_kernel`` also
    for dW + db, dW only and db only. Variants ``aligned``, ``padded`` (odd V) and ``unaligned`` (an odd hidden
    size and offset slices: only the op's own logits buffer is hinted)."""

    def row_variants(stats):
        return (
            Variant("aligned", divisible={"z_ptr", "t_ptr", "lse_ptr", stats, "stride_z", "n_cols", "n_load"}),
            Variant("padded", divisible={"z_ptr", "t_ptr", "lse_ptr", stats, "stride_z", "n_load"}, archs=(90,)),
            Variant("unaligned", divisible={"z_ptr", "lse_ptr", stats}, archs=(90,)),
        )

    row_sig = {"z_ptr": None, "stride_z": "i32", "t_ptr": None, "lse_ptr": "*fp32"}
    specs = []
    seen = set()
    for n_cols in [2**k for k in range(4, 19)]:  # V = 16 .. 256k covers every tile shape
        cfg = pick_blocks(n_cols, interpret=False)
        if cfg in seen:
            continue
        seen.add(cfg)
        block_m, block_v, warps = cfg
        for zdt in ("fp32", "fp16", "bf16"):
            for tdt in ("i64", "i32"):
                head = dict(row_sig, z_ptr=f"*{zdt}", t_ptr=f"*{tdt}")
                tail = {"n_rows": "i32", "n_cols": "i32", "n_load": "i32", "ignore_index": "i32"}
                tail |= {"softcap": "fp32", "softcap_lo": "fp32"}
                for write_grad, softcap in ((False, False), (True, False), (False, True)):
                    cap = ",softcap" if softcap else ""
                    specs.append(
                        CompileSpec(
                            name=f"ce_forward[{zdt},{tdt},grad={int(write_grad)}{cap},M={block_m},V={block_v}]",
                            kernel=ce_forward_kernel,
                            signature={**head, "loss_ptr": "*fp32", **tail},
                            constexprs={
                                "WRITE_GRAD": write_grad,
                                "SOFTCAP": softcap,
                                "BLOCK_M": block_m,
                                "BLOCK_V": block_v,
                            },
                            num_warps=warps,
                            variants=row_variants("loss_ptr"),
                        )
                    )
                specs.append(
                    CompileSpec(
                        name=f"ce_grad[{zdt},{tdt},M={block_m},V={block_v}]",
                        kernel=ce_grad_kernel,
                        signature={**head, "scale_ptr": "*fp32", **tail},
                        constexprs={"SOFTCAP": False, "BLOCK_M": block_m, "BLOCK_V": block_v},
                        num_warps=warps,
                        variants=row_variants("scale_ptr"),
                    )
                )
    return specs + _dot_specs()


def _dot_specs() -> list:
    """The ``compile_specs`` of ``ce_dh_kernel`` and ``ce_dw_kernel`` (see there)."""
    stats = {"t_ptr", "lse_ptr", "scale_ptr"}
    every = {
        "dh": {"z_ptr", "stride_z", "w_ptr", "stride_w", "out_ptr", "stride_out", "stride_split", "n_load"}
        | {"n_hidden", "cols_per_split", "n_rows"}
        | stats,
        "dw": {"z_ptr", "stride_z", "h_ptr", "stride_h", "dw_ptr", "stride_dw", "db_ptr", "n_load", "n_hidden"}
        | {"n_rows"}
        | stats,
    }

    def variants(kind):
        # The op's own buffer is always aligned, and a split-K slice is a whole number of BLOCK_K steps.
        ours = {"z_ptr", "stride_z", "n_load", "lse_ptr", "cols_per_split"} & every[kind]
        return (
            Variant("aligned", divisible=every[kind] | {"n_cols"}),
            Variant("padded", divisible=every[kind], archs=(90,)),
            Variant("unaligned", divisible=ours, archs=(90,)),
        )

    def ints(*names):
        return {n: "i32" for n in names}

    dtypes = [("fp16", 2, "ieee"), ("bf16", 2, "ieee"), ("fp32", 4, "ieee"), ("fp32", 4, "tf32"), ("fp64", 8, "ieee")]
    specs = []
    for kind in ("dh", "dw"):
        for dt, size, prec in dtypes:
            acc = "fp64" if dt == "fp64" else "fp32"
            # fp64 (a reference dtype): the widest tile only.
            hidden_sizes = (4096,) if dt == "fp64" else (16, 32, 64, 128, 256, 4096)
            widths = sorted({pick_dot_blocks(d, size, interpret=False, kind=kind)[1] for d in hidden_sizes})
            for bn in widths:
                for has_scale, softcap in ((False, False), (True, False), (False, True), (True, True)):
                    bm, _, bk, warps, stages = pick_dot_blocks(bn, size, interpret=False, kind=kind, softcap=softcap)
                    for tdt in ("i64", "i32") if bn == widths[-1] and has_scale and not softcap else ("i64",):
                        head = {"z_ptr": f"*{dt}", "stride_z": "i32", "t_ptr": f"*{tdt}"}
                        head |= {"lse_ptr": f"*{acc}", "scale_ptr": f"*{acc}"}
                        cap = ",softcap" if softcap else ""
                        tiles = f"{dt},{prec},{tdt},scale={int(has_scale)}{cap},M={bm},N={bn},K={bk}"
                        caps = {"softcap": "fp32", "softcap_lo": "fp32"}
                        if kind == "dh":
                            # dH is fp32 (forward-time unit gradient, split-K partial sums) or the input dtype.
                            out = f"*{acc}" if bn != widths[-1] or not has_scale else f"*{dt}"
                            signature = head | {"w_ptr": f"*{dt}", "stride_w": "i32", "out_ptr": out}
                            signature |= ints("stride_out", "stride_split", "n_rows", "n_cols", "n_load", "n_hidden")
                            signature |= ints("ignore_index", "cols_per_split") | caps
                            flags = {"HAS_SCALE": has_scale, "SOFTCAP": softcap, "PRECISION": prec}
                            spec_tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                            named = [(f"ce_dh[{tiles}]", flags)]
                        else:
                            signature = head | {"h_ptr": f"*{dt}", "stride_h": "i32", "dw_ptr": f"*{acc}"}
                            signature |= {"stride_dw": "i32", "db_ptr": f"*{acc}"}
                            signature |= ints("n_rows", "n_cols", "n_load", "n_hidden", "ignore_index") | caps
                            spec_tiles = {"BLOCK_V": bm, "BLOCK_N": bn, "BLOCK_C": bk}
                            named = [
                                (
                                    f"ce_dw[{tiles},dw={int(dw)},db={int(db)}]",
                                    {"HAS_SCALE": has_scale, "SOFTCAP": softcap, "HAS_DW": dw, "HAS_DB": db}
                                    | {"PRECISION": prec},
                                )
                                for dw, db in ((True, True), (True, False), (False, True))
                                if dw or bn == widths[-1]  # db only: one hidden tile, BLOCK_N unused
                            ]
                        for name, flags in named:
                            specs.append(
                                CompileSpec(
                                    name=name,
                                    kernel=ce_dh_kernel if kind == "dh" else ce_dw_kernel,
                                    signature=signature,
                                    constexprs=flags | spec_tiles,
                                    num_warps=warps,
                                    num_stages=stages,
                                    variants=variants(kind),
                                )
                            )
    return specs
