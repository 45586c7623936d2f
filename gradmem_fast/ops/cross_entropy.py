"""Fused linear cross-entropy: ``CE(hidden @ weight^T + bias, targets)`` without the ``[N, V]`` logits.

Math (per token i, logits ``z_i = W h_i + b`` over a vocabulary of V, target ``t_i``, ``valid_i =
t_i != ignore_index``):

    loss_i = valid_i * (logsumexp(z_i) - z_{i, t_i})
    d loss_i / d z_i = valid_i * (softmax(z_i) - onehot(t_i))  =: q_i
    dL/dh_i = g_i * W^T q_i,     dL/dW = sum_i g_i q_i h_i^T,     dL/db = sum_i g_i q_i

Logit post-processing (what some causal LMs do after their head; ``gradmem_fast.hf.logit_postprocessing``):
with ``logit_scale = s`` and ``softcap = c`` the logits are ``z_i = phi(s (W h_i + b))``, ``phi(x) = c tanh(x / c)``
(identity without ``softcap``), and q_i above becomes the gradient with respect to the head's output:

    q_i = valid_i * (softmax(z_i) - onehot(t_i)) * s * phi'      phi' = 1 - (z_i / c)^2

The scale costs nothing: the GEMM that writes a chunk's logits applies it (``addmm``'s alpha and beta, one
rounding, as exact as the model's own two), and the backward folds it into the per-token ``g_i``. The
soft-capping is a ``SOFTCAP`` constexpr of the kernels (a tanh per logit read, absent when off).

where ``g_i = dL/dloss_i`` is what the reduction sends back to token i:

    "none"         loss_i itself (shape of ``targets``), g_i = upstream gradient of that entry
    "sum"          sum_i loss_i,                         g_i = g
    "mean"         sum_i loss_i / max(1, n_valid),       g_i = g / max(1, n_valid)   (0, not NaN, if none valid)
    "sample_mean"  [B]: L_b = sum_{i in b} loss_i / max(1, n_b) (GradMem's per-document loss),
                   g_i = g_b / max(1, n_b); a row without valid tokens gives 0 loss and zero gradient.

Design (chunked; cuBLAS writes the logits, Triton reads them; option (a) of issue 14, item 3):
  * Tokens are processed in chunks of C rows. For each chunk cuBLAS writes ``Z = H_c W^T (+ b)`` into one
    reusable buffer ``[C, Vpad]`` (the input dtype, as ``F.linear`` would; ``Vpad`` = V rounded up to a
    multiple of ``ROW_ALIGN`` = 64, the view ``[:, :V]`` is what the GEMM writes, so every row starts 128-byte
    aligned and the kernels' loads vectorise even at GPT-2's odd V = 50257). The kernels of
    ``gradmem_fast.kernels.cross_entropy`` then read Z, never write it: ``ce_forward`` the online
    log-sum-exp and the loss, ``ce_dh`` the product ``dH = q W`` with ``q`` formed tile by tile from Z and the
    row's lse in the product's prologue (fp32 math), ``ce_dw`` likewise ``dW += q^T H_c`` and ``db += sum q``
    (fp32 accumulators, deterministic: no atomics). The gradient ``q`` is never stored. Option (b), never
    writing Z and recomputing it inside the kernels (as Cut Cross-Entropy does), would need Triton GEMMs for
    the forward too and one more logits GEMM of FLOPs in the backward; (a) keeps the forward GEMM in cuBLAS.
  * HBM passes over a chunk's logits (counted per chunk by ``benchmarks.census_count.ce_logits_passes``):
    loss only (no gradient) 2 = GEMM write + statistics read; the WRITE loop's frozen head (hidden needs a
    gradient, formed in the forward) 3 = + dH read; a trainable head adds the dW/db read: 4 with forward-time
    gradients ("sum"/"mean"), and for "none"/"sample_mean" 2 in the forward + 3 in the backward (GEMM
    recompute write, dH read, dW read). Before this design: 5 (statistics read, q read + written in place,
    cuBLAS read of q), 6 with dW. The second-order backward (``_LinearCEGrad.backward``) is plain torch and
    materialises fp32 ``p``, ``q`` and the cotangent ``a`` per chunk: about 10 passes, counted by the census
    like any other aten op; it is not part of the 3-pass target.
  * The ``torch`` backend runs the same chunked algorithm with plain torch ops (it forms ``q`` per chunk),
    so it never builds ``[N, V]`` either.
  * Chunk rule (``chunk_rows``): with ``big = min(max(16, 2**26 // V), max(128, ceil(N / 4)))`` (at most
    2**26 logits, at most a quarter of ``N x V`` once N >= 512; a multiple of 128 when >= 128) and ``small``
    = the rows whose padded logits fit in half the L2 cache (``l2_bytes``: the device's L2 size, 50 MiB where
    none can be queried, so about 25 MiB on H100; a multiple of 16, >= 16), C is ``small`` when ``small >=
    big`` or when its modelled HBM bytes per token are not larger: ``(1 if the chunk fits else 3) * Vpad *
    e + (2 V d e / C if the head V x d does not fit in the other half of L2 else 0)``. The second term is the
    head re-read by the two GEMMs of every chunk. For GPT-2 (V = 50257, d = 768, bf16, 28,672 tokens) the
    L2-resident chunk of 256 rows would read the 77 MB head 2 x 112 times (17.3 GB) and write the logits
    once (2.9 GB): 20.2 GB, against 3.6 GB of head and 3 x 2.9 GB of logits with 1280-row chunks (12.2 GB).
    So the rule keeps 1280-row chunks for GPT-2-sized heads and picks the L2 chunk where the head is small
    (it stays in L2) or the hidden size small next to the chunk (the paper's 4-layer model).
  * Precision: matrix products run in the input dtype with fp32 accumulation (cuBLAS); for fp32 inputs
    they follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default, i.e. IEEE fp32), in cuBLAS and in
    the kernels' products alike. ``q`` enters a product rounded to the input dtype (what a 16-bit ``q``
    buffer would hold). The softmax math is fp32 (fp64 for fp64 inputs) and the loss is returned in that
    dtype.
  * Forward-time gradients: because every token's loss depends only on its own row, ``q_i`` can be formed
    in the forward sweep and the upstream ``g_i`` applied afterwards. When the graph needs a gradient
    (``precompute_grad=None`` means: grad mode is on and an input requires grad), the forward also stores
    ``W^T q_i`` ([N, d], fp32) for ``hidden`` (the frozen-head WRITE loop: one sweep, no recomputation),
    and, for the scalar reductions "sum"/"mean" whose ``g_i`` is the same for every token, the unit
    ``dW``/``db`` as well. For "none"/"sample_mean" with a trainable head the backward recomputes each
    chunk's logits and forms ``g_i q_i`` from the saved log-sum-exp instead (``g_i`` differs per token, so
    ``dW`` cannot be formed before it is known). Nothing reads tensor values on the host, so the op can be
    captured in a CUDA graph (cu_seqlens are validated against N only when they live on the CPU).
  * Second order (``grad_mode="second"``): when the backward runs with grad mode on (``create_graph=True``)
    it calls ``_LinearCEGrad``, an autograd.Function whose forward recomputes ``(dh, dW, db)`` chunk by
    chunk and whose backward is the explicit, chunked double-backward formula (plain torch ops, both
    backends; see ``_LinearCEGrad.backward``). It never builds ``[N, V]`` and gives gradients with respect
    to hidden, weight, bias and the upstream gradient. Third-order derivatives are not supported
    (``once_differentiable``). Pass ``precompute_grad=False`` when you will call the backward with
    ``create_graph=True``: the forward-time gradients would be computed and then not used.
"""

import math
from typing import Any

import torch
from torch import Tensor

from gradmem_fast.backend import resolve_backend

REDUCTIONS = ("none", "sum", "mean", "sample_mean")
ROW_ALIGN = 64  # logits rows padded to a multiple of 64 elements (128 B in 16-bit): aligned vector loads
_LOGITS_BUDGET = 1 << 26  # elements of a chunk's logits at most
_L2_DEFAULT = 50 << 20  # bytes of L2 assumed where none can be queried (CPU, meta): H100 SXM / H200
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def padded_vocab(vocab: int) -> int:
    """Row stride of the logits buffer: ``vocab`` rounded up to a multiple of ``ROW_ALIGN``."""
    return -(-vocab // ROW_ALIGN) * ROW_ALIGN


def l2_bytes(device: torch.device | str | None = None) -> int:
    """L2 cache size of a CUDA device (``torch.cuda.get_device_properties``), else ``_L2_DEFAULT``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return _L2_DEFAULT


def chunk_rows(
    n_rows: int,
    vocab: int,
    chunk_size: int | None = None,
    *,
    hidden_size: int = 0,
    elem_size: int = 2,
    l2: int | None = None,
) -> int:
    """Rows per chunk (``chunk_size`` overrides): the L2-resident chunk unless the weight re-reads it costs
    outweigh what it saves (module docstring, "Chunk rule")."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n_rows))
    big = min(max(16, _LOGITS_BUDGET // max(1, vocab)), max(128, -(-n_rows // 4)))
    if big >= 128:
        big = big // 128 * 128
    l2 = _L2_DEFAULT if l2 is None else l2
    budget = l2 // 2
    row = padded_vocab(vocab) * elem_size
    small = max(16, budget // row // 16 * 16)
    if small < big:
        weight = vocab * hidden_size * elem_size
        streamed = weight > l2 - budget  # the head does not stay in L2 beside the chunk: read once per chunk

        def cost(rows: int) -> float:  # modelled HBM bytes per token: logits passes + weight reads (2 GEMMs)
            return (1 if rows * row <= budget else 3) * row + (2 * weight / rows if streamed else 0)

        if cost(small) <= cost(big):
            big = small
    return max(1, min(big, n_rows))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Whether torch.mm(..., out_dtype=torch.float32) works here; found on first use.
_FP32_OUT_GEMM: list[bool | None] = [None]


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with fp32 output for 16-bit inputs (so dW/db/dh accumulate without 16-bit rounding)."""
    if a.dtype not in _HALF:
        return torch.mm(a, b)
    if not a.is_cuda:
        return torch.mm(a.float(), b.float())
    if _FP32_OUT_GEMM[0] is None:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _FP32_OUT_GEMM[0] = True
            return out
        except (RuntimeError, TypeError):  # torch builds without the fp32-output GEMM
            _FP32_OUT_GEMM[0] = False
    if _FP32_OUT_GEMM[0]:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _logits_into(z: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, scale: float = 1.0) -> None:
    """``z = scale (h W^T + bias)``: the scale rides on the GEMM's alpha/beta (no extra pass over z)."""
    if scale == 1.0:
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias, h, weight.t(), out=z)
    elif bias is None:  # beta = 0: z's old contents (uninitialised, maybe NaN) are not read
        torch.addmm(z, h, weight.t(), beta=0, alpha=scale, out=z)
    else:
        torch.addmm(bias, h, weight.t(), beta=scale, alpha=scale, out=z)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """A new ``scale (h W^T + bias)`` (the second-order backward's recomputation)."""
    if bias is None:
        return (
            torch.mm(h, weight.t())
            if scale == 1.0
            else torch.addmm(h.new_empty(()), h, weight.t(), beta=0, alpha=scale)
        )
    return torch.addmm(bias, h, weight.t(), beta=scale, alpha=scale)


def postprocess_logits(logits: Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> Tensor:
    """``phi(logit_scale * logits)`` with ``phi(x) = softcap * tanh(x / softcap)`` (identity when ``softcap`` is
    None): the dense torch formula of the op's logits, for callers that form full logits (reference, READ)."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


# ---------------------------------------------------------------------------------------------------
# Per-chunk statistics and products: Triton kernels or plain torch, same contract (Z read, never written)
# ---------------------------------------------------------------------------------------------------


def _onehot_index(t: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(column index, in-range mask): out-of-range targets match no column, as in the kernels."""
    in_range = (t >= 0) & (t < vocab)
    return torch.where(in_range, t, torch.zeros_like(t)).long(), in_range


def _softcapped(z: Tensor, dtype: torch.dtype, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """(``c tanh(z / c)`` in ``dtype``, ``tanh(z / c)``), or (z in ``dtype``, None) without soft-capping."""
    zf = z.to(dtype)
    if softcap is None:
        return zf, None
    th = torch.tanh(zf / softcap)
    return th * softcap, th


def _torch_stats(z: Tensor, t: Tensor, lse: Tensor, loss: Tensor, ignore_index: int, softcap: float | None) -> None:
    zf, _ = _softcapped(z, lse.dtype, softcap)
    chunk_lse = torch.logsumexp(zf, dim=1)
    idx, in_range = _onehot_index(t, z.shape[1])
    zt = zf.gather(1, idx[:, None]).squeeze(1) * in_range
    lse.copy_(chunk_lse)
    loss.copy_(torch.where(t != ignore_index, chunk_lse - zt, torch.zeros_like(zt)))


def _torch_grad(
    z: Tensor, t: Tensor, lse: Tensor, scale: Tensor | None, ignore_index: int, softcap: float | None
) -> Tensor:
    """G = valid * scale * (softmax - onehot) (* (1 - tanh^2) with soft-capping) of a chunk, a new tensor in the
    math dtype: the gradient with respect to the stored logits."""
    idx, in_range = _onehot_index(t, z.shape[1])
    g = (t != ignore_index).to(lse.dtype)
    if scale is not None:
        g = g * scale
    zf, th = _softcapped(z, lse.dtype, softcap)
    p = torch.exp(zf - lse[:, None])
    p.scatter_add_(1, idx[:, None], -in_range.to(p.dtype)[:, None])
    if th is not None:
        p.mul_(1.0 - th * th)
    return p.mul_(g[:, None])


class _Chunk:
    """One logits chunk ``z`` [rows, V] (a view of the padded buffer; ``n_load`` columns readable per row) with
    its targets and saved statistics, and the per-chunk steps on the chosen backend."""

    def __init__(
        self, backend: str, z: Tensor, t: Tensor, lse: Tensor, ignore_index: int, n_load: int, softcap: float | None
    ):
        self.backend, self.z, self.t, self.lse, self.ignore, self.n_load = backend, z, t, lse, ignore_index, n_load
        self.softcap = softcap
        # fp32 products follow torch's TF32 switch for cuBLAS, as the GEMMs they replace would.
        self.tf32 = z.dtype == torch.float32 and z.is_cuda and torch.backends.cuda.matmul.allow_tf32

    def stats(self, loss: Tensor) -> None:
        """lse and loss of every row (a read of Z)."""
        if self.backend == "triton":
            from gradmem_fast.kernels import cross_entropy as kernels

            kernels.ce_forward(self.z, self.t, self.lse, loss, self.ignore, False, self.n_load, self.softcap)
        else:
            _torch_stats(self.z, self.t, self.lse, loss, self.ignore, self.softcap)

    def dh(self, scale: Tensor | None, weight: Tensor, out: Tensor) -> None:
        """``out = G W`` (a read of Z; G rounded to W's dtype, fp32 accumulation)."""
        if self.backend == "triton":
            from gradmem_fast.kernels import cross_entropy as kernels

            kernels.ce_dh(
                self.z, self.t, self.lse, scale, weight, out, self.ignore, self.n_load, self.tf32, softcap=self.softcap
            )
        else:
            g = _torch_grad(self.z, self.t, self.lse, scale, self.ignore, self.softcap).to(weight.dtype)
            out.copy_(_mm_acc(g, weight))

    def dw(self, scale: Tensor | None, h_c: Tensor, dw: Tensor | None, db: Tensor | None) -> None:
        """``dw += G^T H_c``, ``db += colsum(G)`` (a read of Z)."""
        if dw is None and db is None:
            return
        if self.backend == "triton":
            from gradmem_fast.kernels import cross_entropy as kernels

            kernels.ce_dw(
                self.z, self.t, self.lse, scale, h_c, dw, db, self.ignore, self.n_load, self.tf32, self.softcap
            )
            return
        g = _torch_grad(self.z, self.t, self.lse, scale, self.ignore, self.softcap)
        if db is not None:
            db += g.sum(0)
        if dw is not None:
            dw += _mm_acc(g.to(h_c.dtype).t(), h_c)


# ---------------------------------------------------------------------------------------------------
# Chunked sweeps
# ---------------------------------------------------------------------------------------------------


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The reusable ``[rows, Vpad]`` logits buffer, ``Vpad`` = V rounded up to ``ROW_ALIGN`` (module docstring)."""
    return torch.empty((rows, padded_vocab(vocab)), dtype=dtype, device=device)


def _forward_sweep(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    chunk: int,
    backend: str,
    want_h: bool,
    want_wb: bool,
    transform: tuple[float, float | None],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """lse, loss ([N], math dtype) and optionally the unit-scale gradients W^T q ([N, d]) and
    sum_i q_i h_i^T, sum_i q_i (fp32/fp64), in one pass over the token chunks: per chunk the GEMM writes Z,
    the statistics read it, dH reads it (want_h) and dW/db read it (want_wb). ``transform`` = (logit scale,
    softcap); the unit gradients leave the scale out (the backward's g_i carries it)."""
    scale, softcap = transform
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    lse = torch.empty(n, dtype=acc, device=dev)
    loss = torch.empty(n, dtype=acc, device=dev)
    dh_unit = torch.empty((n, d), dtype=acc, device=dev) if want_h else None
    dw_unit = torch.zeros((vocab, d), dtype=acc, device=dev) if want_wb else None
    db_unit = torch.zeros(vocab, dtype=acc, device=dev) if (want_wb and bias is not None) else None
    buf = _logits_buffer(min(chunk, n), vocab, hidden.dtype, dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h_c = hidden[s:e]
        z = buf[: e - s, :vocab]
        _logits_into(z, h_c, weight, bias, scale)
        c = _Chunk(backend, z, targets[s:e], lse[s:e], ignore_index, buf.shape[1], softcap)
        c.stats(loss[s:e])
        if dh_unit is not None:  # want_h
            c.dh(None, weight, dh_unit[s:e])
        c.dw(None, h_c, dw_unit, db_unit)
    return lse, loss, dh_unit, dw_unit, db_unit


def _grad_sweep(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    ignore_index: int,
    chunk: int,
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    transform: tuple[float, float | None],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dh, dW, db) of sum_i g_i loss_i by recomputing each chunk's logits from the saved lse (the GEMM
    writes Z, dH reads it, dW/db read it). ``g`` already carries the logit scale (``transform[0]``), which
    only the logits' recomputation uses here.

    ``dh`` is in hidden's dtype; ``dW``/``db`` are accumulated in fp32 (fp64 for fp64) and returned in
    the math dtype; entries not needed are None."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = lse.dtype
    dev = hidden.device
    scale, softcap = transform
    g = g.to(acc).contiguous()
    dh = torch.empty((n, d), dtype=hidden.dtype, device=dev) if need_h else None
    dw = torch.zeros((vocab, d), dtype=acc, device=dev) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=dev) if (need_b and bias is not None) else None
    if not (need_h or need_w or db is not None):
        return dh, dw, db
    buf = _logits_buffer(min(chunk, n), vocab, hidden.dtype, dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h_c = hidden[s:e]
        z = buf[: e - s, :vocab]
        _logits_into(z, h_c, weight, bias, scale)
        c = _Chunk(backend, z, targets[s:e], lse[s:e], ignore_index, buf.shape[1], softcap)
        if dh is not None:  # need_h
            c.dh(g[s:e], weight, dh[s:e])
        c.dw(g[s:e], h_c, dw, db)
    return dh, dw, db


def _cast(x: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if x is None or like is None else x.to(like.dtype)


class _LinearCE(torch.autograd.Function):
    """Per-token losses ``loss_i`` ([N], fp32 or fp64) of ``CE(hidden @ weight^T + bias, targets)``.

    Forward: one chunked sweep (and the forward-time gradients described in the module docstring).
    Backward: ``g_i`` is the incoming gradient of ``loss_i``. First order (grad mode off): scale the
    stored unit gradients, or recompute per chunk from the saved lse. With ``create_graph=True``:
    ``_LinearCEGrad``, which is differentiable once more.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        chunk: int,
        backend: str,
        precompute: bool,
        uniform: bool,
        transform: tuple[float, float | None],
    ) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # A per-token g_i (reductions "none"/"sample_mean") cannot be folded into dW before it is known.
        want_wb = precompute and (need_w or need_b) and uniform
        want_h = precompute and need_h and (uniform or not (need_w or need_b))
        lse, loss, dh_unit, dw_unit, db_unit = _forward_sweep(
            hidden, weight, bias, targets, ignore_index, chunk, backend, want_h, want_wb, transform
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.unit = (dh_unit, dw_unit, db_unit)
        ctx.want = (want_h, want_wb)
        ctx.cfg = (ignore_index, chunk, backend, transform)
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, chunk, backend, transform = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        tail = (None,) * 7
        if transform[0] != 1.0:  # d z / d(head output) = s: every g_i carries it (on the graph when create_graph)
            g = g * transform[0]
        if torch.is_grad_enabled():
            dh, dw, db = _LinearCEGrad.apply(
                hidden, weight, bias, g, targets, lse, ignore_index, chunk, backend, (need_h, need_w, need_b), transform
            )
            return (dh if need_h else None, dw if need_w else None, db if need_b else None) + tail
        if hidden.shape[0] == 0:
            return (
                torch.zeros_like(hidden) if need_h else None,
                torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None,
            ) + tail
        want_h, want_wb = ctx.want
        dh_unit, dw_unit, db_unit = ctx.unit
        g = g.to(lse.dtype)
        dh = dw = db = None
        if want_h:
            dh = (dh_unit * g[:, None]).to(hidden.dtype)
        if want_wb:
            g0 = g[0]  # "sum"/"mean" send the same g_i to every token
            dw = (dw_unit * g0).to(weight.dtype) if need_w else None
            db = (db_unit * g0).to(bias.dtype) if need_b else None
        rest_h = need_h and not want_h
        rest_w = need_w and not want_wb
        rest_b = need_b and not want_wb
        if rest_h or rest_w or rest_b:
            rh, rw, rb = _grad_sweep(
                hidden, weight, bias, targets, lse, g, ignore_index, chunk, backend, rest_h, rest_w, rest_b, transform
            )
            dh = rh if rest_h else dh
            dw = _cast(rw, weight) if rest_w else dw
            db = _cast(rb, bias) if rest_b else db
        return (dh, dw, db) + tail


class _LinearCEGrad(torch.autograd.Function):
    """``(dh, dW, db)`` of ``sum_i g_i loss_i`` as a differentiable function of (hidden, weight, bias, g).

    Forward: the chunked recomputing gradient sweep. Backward (the double backward of the linear CE),
    for cotangents ``u`` of dh ([N, d]), ``U`` of dW ([V, d]), ``u_b`` of db ([V]); per token, with the head
    output ``y = W h + b``, logits ``z = phi(s y)`` (``phi(x) = c tanh(x / c)``, or the identity),
    ``phi' = 1 - (z / c)^2``, ``phi'' = -2 (z / c) phi' / c`` (0 and 1 without soft-capping), ``p = softmax(z)``,
    ``q = valid (p - onehot(t))`` and ``g`` the upstream gradient times s, ``gl = g phi' q`` (so dh = W^T gl,
    dW = gl h^T, db = gl):

        a     = W u + U h + u_b                       (cotangent reaching gl)        [V]
        b     = a phi'
        dg    = b . q
        gz    = g s (valid phi' p (b - p . b) + a phi'' q)   (softmax Jacobian; the tanh's own curvature)
        dh'   = W^T gz + U^T gl
        dW'   = sum_i gz h^T + gl u^T
        db'   = sum_i gz

    computed chunk by chunk (fp32 math; matrix products in the input dtype, dW'/db' accumulated in fp32).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        g: Tensor,
        targets: Tensor,
        lse: Tensor,
        ignore_index: int,
        chunk: int,
        backend: str,
        needs: tuple[bool, bool, bool],
        transform: tuple[float, float | None],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # typed by _grad_sweep; never None in fact
        need_h, need_w, need_b = needs
        dh, dw, db = _grad_sweep(
            hidden, weight, bias, targets, lse, g, ignore_index, chunk, backend, need_h, need_w, need_b, transform
        )
        ctx.save_for_backward(hidden, weight, bias, g, targets, lse)
        ctx.cfg = (ignore_index, chunk, transform)
        outs = (
            dh if need_h else hidden.new_empty(0),
            _cast(dw, weight) if need_w else hidden.new_empty(0),
            _cast(db, bias) if need_b else hidden.new_empty(0),
        )
        for o, needed in zip(outs, needs):
            if not needed:
                ctx.mark_non_differentiable(o)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, u: Tensor | None, uw: Tensor | None, ub: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, g, targets, lse = ctx.saved_tensors
        ignore_index, chunk, (scale, softcap) = ctx.cfg
        need_h, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        # Cotangents of unused outputs arrive as None or as size-0 placeholders.
        u = u if (u is not None and u.numel() > 0) else None
        uw = uw if (uw is not None and uw.numel() > 0) else None
        ub = ub if (ub is not None and ub.numel() > 0) else None
        tail = (None,) * 7
        if u is None and uw is None and ub is None:
            return (None, None, None, None) + tail
        n, d = hidden.shape
        vocab = weight.shape[0]
        acc = lse.dtype
        dt = hidden.dtype
        dev = hidden.device
        gv = g.to(acc) * (targets != ignore_index).to(acc)
        d_h = torch.empty((n, d), dtype=dt, device=dev) if need_h else None
        d_w = torch.zeros((vocab, d), dtype=acc, device=dev) if need_w else None
        d_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
        d_g = torch.empty(n, dtype=acc, device=dev) if need_g else None
        ub_acc = ub.to(acc) if ub is not None else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h_c = hidden[s:e]
            z, th = _softcapped(_logits(h_c, weight, bias, scale), acc, softcap)
            p = z.sub_(lse[s:e, None]).exp_()  # in place on the fresh logits when already in the math dtype
            del z
            dphi = None if th is None else 1.0 - th * th
            idx, in_range = _onehot_index(targets[s:e], vocab)
            a = torch.zeros_like(p)
            if u is not None:
                a += torch.mm(u[s:e], weight.t()).to(acc)
            if uw is not None:
                a += torch.mm(h_c, uw.t()).to(acc)
            if ub_acc is not None:
                a += ub_acc
            g_c = gv[s:e, None]
            b = a if dphi is None else a * dphi
            curv = None
            if need_g or uw is not None or u is not None or dphi is not None:
                # gl = g phi' q; only its products with a, U and u are needed.
                q = p.clone()
                q.scatter_add_(1, idx[:, None], -in_range.to(acc)[:, None])
                if d_g is not None:  # need_g
                    d_g[s:e] = (b * q).sum(1) * (targets[s:e] != ignore_index).to(acc)
                gl = (q * g_c if dphi is None else q * dphi * g_c).to(dt)
                if th is not None and dphi is not None and softcap is not None:
                    # a phi'' q with phi'' = -2 tanh phi' / c: the tanh's curvature (valid rides on g_c)
                    curv = a * q * th * dphi * (-2.0 / softcap)
                del q
            pb = (p * b).sum(1, keepdim=True)
            gz_acc = b.sub_(pb).mul_(p)  # b is a itself without soft-capping: a is not needed any more
            if dphi is not None:
                gz_acc.mul_(dphi)
            if curv is not None:
                gz_acc.add_(curv)
            gz_acc.mul_(g_c if scale == 1.0 else g_c * scale)
            gz = gz_acc.to(dt)
            del a, b, p, gz_acc, curv
            if d_h is not None:  # need_h
                dh_c = torch.mm(gz, weight)
                if uw is not None:
                    dh_c = dh_c + torch.mm(gl, uw.to(dt))
                d_h[s:e] = dh_c
            if d_w is not None:  # need_w
                d_w += _mm_acc(gz.t(), h_c)
                if u is not None:
                    d_w += _mm_acc(gl.t(), u[s:e].to(dt))
            if d_b is not None:  # need_b
                d_b += gz.sum(0, dtype=acc)
        return (d_h, _cast(d_w, weight), _cast(d_b, bias), _cast(d_g, g)) + tail


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------


def _segments(cu_seqlens: Tensor, n: int) -> Tensor:
    """Row index of every packed token; tokens outside [cu[0], cu[-1]) get the dump row B."""
    b = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(n, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(cu, pos, right=True) - 1
    return torch.where((seg < 0) | (seg >= b), torch.full_like(seg, b), seg)


def _validate(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    cu_seqlens: Tensor | None,
    chunk_size: int | None,
) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, d] or [B, S, d], got shape {tuple(hidden.shape)}")
    d = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [V, d={d}] tensor, got {shape}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a [V={weight.shape[0]}] tensor, got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int32 or int64 tensor, got {what}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not (-(2**31) <= ignore_index < 2**31):
        raise TypeError(f"ignore_index must be a 32-bit int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if cu_seqlens is not None:
        if reduction != "sample_mean":
            raise ValueError(f"cu_seqlens is only used with reduction='sample_mean', got {reduction!r}")
        if hidden.dim() != 2:
            raise ValueError("cu_seqlens needs packed hidden of shape [N, d]; [B, S, d] input already defines its rows")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must be a 1-D tensor of length B + 1 (row offsets, starting at 0)")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 (FlashAttention convention) or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != hidden.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
        if cu_seqlens.device.type == "cpu":  # a free check here; on a GPU it would synchronise
            n = hidden.shape[0]
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
                raise ValueError(
                    f"cu_seqlens must be non-decreasing from 0 to N={n}, got "
                    f"{cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}"
                )
    elif reduction == "sample_mean" and hidden.dim() != 3:
        raise ValueError("reduction='sample_mean' needs hidden of shape [B, S, d], or packed [N, d] with cu_seqlens")


def _check_transform(logit_scale: Any, softcap: Any) -> tuple[float, float | None]:
    """(logit_scale, softcap) as Python floats, or a TypeError/ValueError naming the argument."""
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if name == "softcap" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "None or a float" if name == "softcap" else "a float"
            raise TypeError(f"{name} must be {what} (a Python number, not a tensor), got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be None (off) or > 0, got {softcap!r}")
    return float(logit_scale), None if softcap is None else float(softcap)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    precompute_grad: bool | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``phi(logit_scale * (hidden @ weight.T + bias))`` against ``targets``, never building
    the logits; ``phi(x) = softcap * tanh(x / softcap)``, or the identity when ``softcap`` is None.

    Args:
        hidden: [N, d] or [B, S, d], float16/bfloat16/float32/float64.
        weight: [V, d] output head (same dtype and device). bias: optional [V].
        targets: int32/int64, shape ``hidden.shape[:-1]``; entries equal to ``ignore_index`` are skipped.
            Targets outside [0, V) other than ``ignore_index`` are not checked (no host sync) and give
            unspecified losses.
        reduction: "none" (shape of targets), "sum", "mean" (over valid tokens; 0 if none),
            "sample_mean" ([B]: each row's mean over its valid tokens, 0 for a row without any;
            rows are the B of [B, S, d] input, or given by ``cu_seqlens`` for packed [N, d] input).
        cu_seqlens: int32 [B + 1] row offsets (FlashAttention convention), only with "sample_mean".
        backend: "auto" | "triton" | "torch" (see ``gradmem_fast.backend.resolve_backend``).
        chunk_size: rows per chunk (default: the rule in the module docstring).
        precompute_grad: form the gradients during the forward (default: when grad mode is on and an
            input requires grad). Pass False if the backward will run with ``create_graph=True``.
        logit_scale: a finite float multiplying the head's output (Cohere's ``logit_scale``, 1 / Granite's
            ``logits_scaling``); 1.0 is off and costs nothing.
        softcap: None (off, free) or a finite float c > 0: logits soft-capped to (-c, c) (Gemma 2's
            ``final_logit_softcapping``). ``gradmem_fast.hf.logit_postprocessing(model)`` gives both for a model.

    Returns the loss in fp32 (fp64 for fp64 inputs): ``sum_i loss_i``-style math as in the module
    docstring. Gradients flow to hidden, weight and bias (and, through a second backward, again).
    """
    _validate(hidden, weight, targets, bias, ignore_index, reduction, cu_seqlens, chunk_size)
    transform = _check_transform(logit_scale, softcap)
    backend = resolve_backend(backend, hidden.device)
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    t1 = targets.reshape(-1).contiguous()
    n = h2.shape[0]
    chunk = chunk_rows(
        n, weight.shape[0], chunk_size, hidden_size=d, elem_size=hidden.element_size(), l2=l2_bytes(hidden.device)
    )
    if precompute_grad is None:
        precompute_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (hidden, weight, bias)
        )
    uniform = reduction in ("sum", "mean")
    loss = _LinearCE.apply(
        h2, weight, bias, t1, ignore_index, chunk, backend, bool(precompute_grad), uniform, transform
    )
    if reduction == "none":
        return loss.reshape(targets.shape)
    if reduction == "sum":
        return loss.sum()
    valid = (t1 != ignore_index).to(loss.dtype)
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1.0)
    if hidden.dim() == 3:
        b, s = targets.shape
        return loss.reshape(b, s).sum(1) / valid.reshape(b, s).sum(1).clamp(min=1.0)
    assert cu_seqlens is not None  # _validate: packed sample_mean input comes with cu_seqlens
    b = cu_seqlens.shape[0] - 1
    seg = _segments(cu_seqlens, n)
    sums = loss.new_zeros(b + 1).index_add(0, seg, loss)[:b]
    counts = loss.new_zeros(b + 1).index_add(0, seg, valid)[:b]
    return sums / counts.clamp(min=1.0)
