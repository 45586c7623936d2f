"""Row-wise cross-entropy kernels over a bounded logits chunk (the Triton half of the fused linear CE).

The op ``gradmem_fast.ops.cross_entropy.linear_cross_entropy`` never builds the full ``[N, V]`` logits:
it walks the tokens in chunks of ``C`` rows, lets cuBLAS write one chunk's logits ``Z = H_c W^T (+ b)``
into a reusable ``[C, V]`` buffer, and calls the kernels below on that buffer. The kernels read a row
of ``Z`` in tiles of ``BLOCK_V`` columns (any ``V``; no block size needs to divide it), do all math in
fp32 (fp64 when the statistics buffers are fp64), and overwrite ``Z`` in place with the gradient of the
per-token loss with respect to the logits, which the op then feeds to cuBLAS again (``dH = G W``,
``dW += G^T H``). Keeping the matrix products in cuBLAS and only the memory-bound softmax in Triton
gives the speed of ``F.linear`` + ``F.cross_entropy`` while the live logits stay bounded by ``C x V``.

Per row i with target t_i (``valid_i = t_i != ignore_index``):

    lse_i  = log sum_v exp(z_iv)                      (online: running max m and rescaled sum s)
    loss_i = valid_i * (lse_i - z_{i, t_i})
    g_iv   = valid_i * scale_i * (exp(z_iv - lse_i) - [v == t_i])      (d loss_i / d z_iv, times scale_i)

A target outside ``[0, V)`` that is not ``ignore_index`` matches no column: its target logit reads as 0
and its one-hot term is absent (no out-of-bounds access; such targets are the caller's error, and the
kernels do not check them because checking would need a host synchronisation).

Kernels:
  ``ce_forward_kernel``  lse, loss, and optionally the unit-scale gradient (scale_i = 1) in place.
  ``ce_grad_kernel``     the gradient from a saved lse with a per-token scale (the recomputing backward).
"""

import contextlib

import triton
import triton.language as tl

from .runtime import CompileSpec, Variant, interpreting

# Elements of one [BLOCK_M, BLOCK_V] tile. 4096 fp32 values over 8 warps is 16 registers a thread per
# live tile, which leaves room for the exp/where temporaries without spilling.
_TILE_GPU = 4096
# The interpreter pays per operation, not per element: bigger tiles make the CPU tests much faster.
_TILE_INTERPRET = 1 << 15
_MAX_ROWS = 8  # more rows a program made ptxas spill at short rows (V <= 128)
_MAX_BLOCK_V = 4096
_GPU_TILES_IN_INTERPRETER = [False]  # set by ``interpret_gpu_tiles`` (tests of the GPU tiles)


@triton.jit
def _grad_sweep(row_base, rows_ok, t, lse, g, n_cols, BLOCK_V: tl.constexpr):
    """Overwrite the tile rows at ``row_base`` with ``g * (exp(z - lse) - onehot(t))``, in place."""
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + cols0
        mask = rows_ok[:, None] & (cols < n_cols)[None, :]
        ptrs = row_base[:, None] + cols[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0).to(lse.dtype)
        p = tl.exp(z - lse[:, None])
        p = tl.where(cols[None, :] == t[:, None], p - 1.0, p)
        tl.store(ptrs, (p * g[:, None]).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def ce_forward_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: ``lse_i = logsumexp_v z_iv``, ``loss_i = valid_i (lse_i - z_{i,t_i})``; with WRITE_GRAD
    also ``z_iv <- valid_i (softmax(z_i)_v - [v == t_i])`` in place (the unit-scale logits gradient).

    One program handles BLOCK_M rows; the first sweep over V keeps a running max ``m`` and a sum ``s``
    rescaled by ``exp(m_old - m_new)`` whenever the max grows (online log-sum-exp), so a row is read once
    for the statistics and once more for the gradient, whatever V is. ``lse``/``loss`` are stored in the
    dtype of ``lse_ptr``/``loss_ptr`` (fp32, or fp64 for fp64 inputs), which is also the math dtype.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    t = tl.load(t_ptr + rows, mask=rows_ok, other=ignore_index)
    valid = rows_ok & (t != ignore_index)
    # int64 row offsets: a user-chosen chunk may exceed 2**31 logits.
    row_base = z_ptr + rows.to(tl.int64) * stride_z
    acc_ty = lse_ptr.dtype.element_ty

    m = tl.full([BLOCK_M], float("-inf"), acc_ty)
    s = tl.zeros([BLOCK_M], acc_ty)
    zt = tl.zeros([BLOCK_M], acc_ty)
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + cols0
        mask = rows_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc_ty)
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
        _grad_sweep(row_base, rows_ok, t, lse, g, n_cols, BLOCK_V)


@triton.jit
def ce_grad_kernel(
    z_ptr,
    stride_z,
    t_ptr,
    lse_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """In place ``z_iv <- valid_i * scale_i * (exp(z_iv - lse_i) - [v == t_i])`` from a saved ``lse``.

    This is the backward of the recomputing path: the logits chunk was recomputed by cuBLAS and the
    per-token upstream gradient ``scale_i`` (dtype of ``lse_ptr``) is folded in, so a single sweep
    leaves exactly ``d(sum_i scale_i loss_i)/dz`` for the following matrix products.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    t = tl.load(t_ptr + rows, mask=rows_ok, other=ignore_index)
    valid = rows_ok & (t != ignore_index)
    row_base = z_ptr + rows.to(tl.int64) * stride_z
    lse = tl.load(lse_ptr + rows, mask=rows_ok, other=0.0)
    g = tl.load(scale_ptr + rows, mask=rows_ok, other=0.0).to(lse.dtype)
    g = tl.where(valid, g, 0.0)
    _grad_sweep(row_base, rows_ok, t, lse, g, n_cols, BLOCK_V)


def pick_blocks(n_cols: int, interpret: bool | None = None) -> tuple:
    """(BLOCK_M, BLOCK_V, num_warps) for a row length ``n_cols``: a power-of-two tile of at most
    ``_TILE_GPU`` elements, wide along V first (coalesced loads), then stacking rows for short rows."""
    if interpret is None:
        interpret = interpreting() and not _GPU_TILES_IN_INTERPRETER[0]
    tile = _TILE_INTERPRET if interpret else _TILE_GPU
    block_v = max(16, min(_MAX_BLOCK_V if not interpret else tile, triton.next_power_of_2(n_cols)))
    block_m = max(1, min(_MAX_ROWS if not interpret else 256, tile // block_v))
    # 8 warps for full tiles, except the 8-row x 512 tile: its fp32/int64 gradient-writing forward spills 8 B
    # at 8 warps for sm_90 (80 registers either way; 4 warps do not spill, compile check).
    num_warps = 8 if block_m * block_v >= 4096 and block_m < 8 else 4
    return block_m, block_v, num_warps


@contextlib.contextmanager
def interpret_gpu_tiles():
    """Under the interpreter, launch with the tiles ``pick_blocks`` chooses on a GPU (tests of those tiles)."""
    saved = _GPU_TILES_IN_INTERPRETER[0]
    _GPU_TILES_IN_INTERPRETER[0] = True
    try:
        yield
    finally:
        _GPU_TILES_IN_INTERPRETER[0] = saved


def _check_chunk(z, targets, name="logits"):
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(
            f"{name} must be a 2-D row-major [rows, V] tensor, got shape {tuple(z.shape)} with strides {z.stride()}"
        )
    if targets.shape != (z.shape[0],) or targets.stride(0) != 1:
        raise ValueError(f"targets must be a contiguous [{z.shape[0]}] tensor, got {tuple(targets.shape)}")


def ce_forward(z, targets, lse, loss, ignore_index: int, write_grad: bool) -> None:
    """Launch ``ce_forward_kernel`` on a logits chunk ``z`` [rows, V] (fp16/bf16/fp32/fp64).

    Fills ``lse`` and ``loss`` ([rows], fp32 or fp64) and, when ``write_grad``, overwrites ``z`` with the
    unit-scale gradient ``valid * (softmax(z) - onehot)``. Nothing is returned; every output is a buffer
    the caller owns, so the op can reuse one logits buffer for all chunks.
    """
    _check_chunk(z, targets)
    rows, n_cols = z.shape
    if rows == 0:
        return
    block_m, block_v, warps = pick_blocks(n_cols)
    grid = (triton.cdiv(rows, block_m),)
    ce_forward_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        loss,
        rows,
        n_cols,
        ignore_index,
        WRITE_GRAD=write_grad,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=warps,
    )


def ce_grad(z, targets, lse, scale, ignore_index: int) -> None:
    """Launch ``ce_grad_kernel``: overwrite ``z`` [rows, V] with ``scale_i * valid_i * (softmax - onehot)``
    using the saved ``lse`` [rows] and the per-token ``scale`` [rows] (both in the math dtype)."""
    _check_chunk(z, targets)
    rows, n_cols = z.shape
    if rows == 0:
        return
    block_m, block_v, warps = pick_blocks(n_cols)
    grid = (triton.cdiv(rows, block_m),)
    ce_grad_kernel[grid](
        z,
        z.stride(0),
        targets,
        lse,
        scale,
        rows,
        n_cols,
        ignore_index,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=warps,
    )


def compile_specs() -> list:
    """Every launch configuration ``pick_blocks`` can choose on a GPU, for both kernels and every logits
    dtype and target dtype. The hidden size d does not enter these kernels (the matrix products are
    cuBLAS), so the configurations depend only on V (through the tile shape) and the dtypes.

    Two specialisations each: ``aligned`` (V and the row stride multiples of 16, e.g. a padded vocabulary of
    50304 or Llama's 32000: 16-byte vector loads along V) and ``unaligned`` (GPT-2's V = 50257 as length and
    row stride of the logits chunk, a targets slice at an odd offset: scalar loads; only the buffers the op
    allocates are hinted)."""

    def variants(stats):
        return (
            Variant("aligned", divisible={"z_ptr", "t_ptr", "lse_ptr", stats, "stride_z", "n_cols"}),
            Variant("unaligned", divisible={"z_ptr", "lse_ptr", stats}, archs=(90,)),
        )

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
                for write_grad in (False, True):
                    specs.append(
                        CompileSpec(
                            name=f"ce_forward[{zdt},{tdt},grad={int(write_grad)},M={block_m},V={block_v}]",
                            kernel=ce_forward_kernel,
                            signature={
                                "z_ptr": f"*{zdt}",
                                "stride_z": "i32",
                                "t_ptr": f"*{tdt}",
                                "lse_ptr": "*fp32",
                                "loss_ptr": "*fp32",
                                "n_rows": "i32",
                                "n_cols": "i32",
                                "ignore_index": "i32",
                            },
                            constexprs={"WRITE_GRAD": write_grad, "BLOCK_M": block_m, "BLOCK_V": block_v},
                            num_warps=warps,
                            variants=variants("loss_ptr"),
                        )
                    )
                specs.append(
                    CompileSpec(
                        name=f"ce_grad[{zdt},{tdt},M={block_m},V={block_v}]",
                        kernel=ce_grad_kernel,
                        signature={
                            "z_ptr": f"*{zdt}",
                            "stride_z": "i32",
                            "t_ptr": f"*{tdt}",
                            "lse_ptr": "*fp32",
                            "scale_ptr": "*fp32",
                            "n_rows": "i32",
                            "n_cols": "i32",
                            "ignore_index": "i32",
                        },
                        constexprs={"BLOCK_M": block_m, "BLOCK_V": block_v},
                        num_warps=warps,
                        variants=variants("scale_ptr"),
                    )
                )
    return specs
