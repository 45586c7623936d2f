"""Fused per-sample memory update (SGD / Adam with value and per-sample norm clipping).

For every sample ``b`` of a batch of memories ``M`` of shape ``[B, m, d]`` with gradient ``g``
(DESIGN.md, semantics contract item 4)::

    r_b = ||g_b||                                            (raw norm, reported, before any clip)
    g   = clamp(g, -clip_value, clip_value)                  (clip_value = +inf: no clamp)
    n_b = ||g_b||;  g_b = g_b * clip_norm / (n_b + 1e-6)  where n_b > clip_norm   (if HAS_CLIP_NORM)
    SGD:  M_b = M_b - lr_b * g_b
    Adam: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2            (betas default (0.9, 0.999))
          m_hat = m / (1 - b1^step_b);  v_hat = max(v / (1 - b2^step_b), 1e-8)
          M_b = M_b (1 - lr_b wd) - lr_b * m_hat / (sqrt(v_hat) + 1e-8)
          (wd: AdamW's decoupled weight decay, applied to the memory before the step as torch.optim.AdamW
          does; 0 for Adam, where the factor is exactly 1)

``lr_b = lr`` and ``step_b = step`` when one value is shared by the batch; with per-sample values
(``[B]`` tensors, ``PER_SAMPLE``) each sample reads its own.

Math is fp32 (inputs fp32/fp16/bf16, outputs cast to the memory dtype, Adam moments fp32); the squared
norms are accumulated in fp64 so that tiny (1e-30) and huge (1e30) fp32 gradients neither underflow to a
zero norm nor overflow to an infinite one. NaN propagates: clamps are written with ``where`` so that a
NaN element stays NaN, and a NaN norm reports NaN and leaves the sample unscaled (as the ``torch.where``
form of the formula does).

Two launch shapes:

* one program per sample (``num_splits == 1``): one kernel; it reads ``g`` twice when a norm clip needs
  the norm before the update, once otherwise;
* a split reduction (``num_splits > 1``, few samples with large ``m*d``): ``_grad_sumsq_kernel`` writes
  per-chunk partial sums of squares, then ``_memory_update_kernel`` (grid ``[B, num_splits]``) reduces
  its sample's partials and updates its chunk. Deterministic (no atomics).

``lr`` and ``step`` are runtime values: Python numbers (scalar kernel arguments), 1-element device tensors
(loaded in the kernel, so a captured CUDA graph replays with new values), or ``[B]`` device tensors, one
value per sample (program ``b`` loads ``ptr[b]``; continuous batching gives every slot its own schedule
position and Adam step). Neither is ever a ``tl.constexpr``, so a new value never recompiles.

Nothing here knows about autograd; see ``gradmem_fast.ops.update`` for the op.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from .runtime import CompileSpec, Variant

BLOCK = 1024  # elements per loop iteration; 8 per thread at 4 warps (16-byte fp16 vector loads)
NUM_WARPS = 4
MAX_SPLITS = 64  # partial sums of one sample are reduced in a single masked load of this width
_MIN_CHUNK = 4 * BLOCK  # smallest split chunk
# Below this many elements per sample one program streams its sample in about the time of a kernel
# launch, so the second launch of a split reduction would cost more than it saves.
_MIN_SPLIT_NUMEL = 8 * _MIN_CHUNK

BETAS = (0.9, 0.999)


@triton.jit
def _clamp_keep_nan(x, c):
    """clamp(x, -c, c) that keeps NaN (comparisons with NaN are false, so NaN is never replaced)."""
    x = tl.where(x > c, c, x)
    return tl.where(x < -c, -c, x)


@triton.jit
def _sumsq_range(g_ptr, start, end, iters, clip_value, BLOCK: tl.constexpr):
    """(sum g^2, sum clamp(g, -clip_value, clip_value)^2) over ``g_ptr[start:end]``, fp64 accumulation,
    in ``iters`` blocks."""
    raw = tl.zeros([BLOCK], dtype=tl.float64)
    clp = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, iters):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gc = _clamp_keep_nan(g, clip_value).to(tl.float64)
        g = g.to(tl.float64)
        raw += g * g
        clp += gc * gc
    return tl.sum(raw, axis=0), tl.sum(clp, axis=0)


@triton.jit
def _grad_sumsq_kernel(grad_ptr, part_ptr, clip_value, N, ITERS, BLOCK: tl.constexpr):
    """Split-reduction phase 1. With ``CHUNK = ITERS * BLOCK``, program ``(b, s)`` writes, for elements
    ``[s*CHUNK, (s+1)*CHUNK)`` of sample ``b``, ``part[b, s, 0] = sum g^2`` and
    ``part[b, s, 1] = sum clamp(g, ±clip_value)^2`` (fp64)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    ns = tl.num_programs(1)
    start = s * ITERS * BLOCK
    end = tl.minimum(start + ITERS * BLOCK, N)
    raw, clp = _sumsq_range(grad_ptr + b * N, start, end, ITERS, clip_value, BLOCK)
    slot = part_ptr + (b * ns + s) * 2
    tl.store(slot, raw)
    tl.store(slot + 1, clp)


@triton.jit(do_not_specialize=["step"])
def _memory_update_kernel(
    mem_ptr,
    grad_ptr,
    out_ptr,
    norm_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    exp_avg_out_ptr,
    exp_avg_sq_out_ptr,
    part_ptr,
    lr,
    step,
    clip_value,
    clip_norm,
    weight_decay,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    N,
    ITERS,
    N_ITERS,
    ADAM: tl.constexpr,
    HAS_CLIP_NORM: tl.constexpr,
    SCALAR_PTRS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """Program ``(b, s)`` updates elements ``[s*CHUNK, (s+1)*CHUNK)``, ``CHUNK = ITERS * BLOCK``, of
    sample ``b`` (formula in the module docstring). ``N_ITERS = cdiv(N, BLOCK)`` blocks cover a sample.

    ``lr``/``step`` are scalars, or pointers to 1-element tensors when ``SCALAR_PTRS``, or pointers to ``[B]``
    tensors when ``SCALAR_PTRS`` and ``PER_SAMPLE`` (sample ``b`` uses ``lr[b]``, ``step[b]``). With ``SPLIT`` the
    sample's squared norms come from ``part_ptr`` (``_grad_sumsq_kernel``); otherwise the program owns the
    whole sample and computes them. ``norm_ptr[b]`` receives the raw norm ``||g_b||`` (fp32).
    Adam moments are read from ``exp_avg*_ptr`` and written to ``exp_avg*_out_ptr`` (may alias).
    ``1 - beta`` and ``ln(beta)`` come from the host in fp64 precision: in fp32, ``1 - 0.999`` loses 1e-5
    relative accuracy to cancellation, and so would ``1 - 0.999^step``, which is therefore taken as
    ``1 - exp(step * ln(beta))`` in fp64.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    base = b * N
    start = s * ITERS * BLOCK
    end = tl.minimum(start + ITERS * BLOCK, N)

    if SPLIT:
        ns = tl.num_programs(1)
        k = tl.arange(0, MAX_SPLITS)
        kmask = k < ns
        slots = part_ptr + (b * ns + k) * 2
        raw_sq = tl.sum(tl.load(slots, mask=kmask, other=0.0), axis=0)
        clp_sq = tl.sum(tl.load(slots + 1, mask=kmask, other=0.0), axis=0)
    elif HAS_CLIP_NORM:
        # The norm clip needs the whole sample's norm before any element is updated: one extra read of g.
        raw_sq, clp_sq = _sumsq_range(grad_ptr + base, 0, N, N_ITERS, clip_value, BLOCK)

    if HAS_CLIP_NORM:
        n = tl.sqrt(clp_sq)
        # where-form of DESIGN.md: a NaN norm compares false and leaves g unscaled, so the NaN elements
        # still reach the memory (a min()-based scale could turn them into a finite number).
        scale = tl.where(n > clip_norm, clip_norm / (n + 1e-6), 1.0).to(tl.float32)

    if PER_SAMPLE:
        # Every chunk program (b, s) of a split sample reads the same lr[b], step[b].
        lr_v = tl.load(lr + b).to(tl.float32)
    elif SCALAR_PTRS:
        lr_v = tl.load(lr).to(tl.float32)
    else:
        lr_v = lr
    if ADAM:
        if PER_SAMPLE:
            t = tl.load(step + b).to(tl.float64)
        elif SCALAR_PTRS:
            t = tl.load(step).to(tl.float64)
        else:
            t = step.to(tl.float64)
        inv_bc1 = (1.0 / (1.0 - tl.exp(t * log_beta1))).to(tl.float32)
        inv_bc2 = (1.0 / (1.0 - tl.exp(t * log_beta2))).to(tl.float32)

    raw_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(grad_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if not SPLIT and not HAS_CLIP_NORM:
            g64 = g.to(tl.float64)
            raw_acc += g64 * g64
        g = _clamp_keep_nan(g, clip_value)
        if HAS_CLIP_NORM:
            g = g * scale
        mem = tl.load(mem_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if ADAM:
            mem = mem * (1.0 - lr_v * weight_decay)
            m1 = tl.load(exp_avg_ptr + base + offs, mask=mask, other=0.0)
            m2 = tl.load(exp_avg_sq_ptr + base + offs, mask=mask, other=0.0)
            m1 = beta1 * m1 + one_minus_beta1 * g
            m2 = beta2 * m2 + one_minus_beta2 * (g * g)
            tl.store(exp_avg_out_ptr + base + offs, m1, mask=mask)
            tl.store(exp_avg_sq_out_ptr + base + offs, m2, mask=mask)
            v_hat = m2 * inv_bc2
            v_hat = tl.where(v_hat < 1e-8, 1e-8, v_hat)  # keeps NaN, unlike maximum()
            upd = (m1 * inv_bc1) / (tl.sqrt(v_hat) + 1e-8)
        else:
            upd = g
        new = mem - lr_v * upd
        tl.store(out_ptr + base + offs, new.to(out_ptr.dtype.element_ty), mask=mask)

    if not SPLIT and not HAS_CLIP_NORM:
        raw_sq = tl.sum(raw_acc, axis=0)
    if s == 0:
        tl.store(norm_ptr + b, tl.sqrt(raw_sq).to(tl.float32))


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _log(beta: float) -> float:
    # beta = 0 (no momentum): beta^step = exp(step * -inf) = 0, so the bias correction is 1.
    return math.log(beta) if beta > 0 else float("-inf")


def pick_num_splits(batch: int, numel: int, device) -> int:
    """Chunks per sample: 1 unless few samples with many elements would leave most SMs idle; then
    enough chunks of at least ``_MIN_CHUNK`` elements for about two programs per SM."""
    device = torch.device(device)
    if device.type != "cuda" or numel < _MIN_SPLIT_NUMEL:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if batch >= sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, batch), triton.cdiv(numel, _MIN_CHUNK)))


def _check_buffer(name, buf, shape, dtype, device):
    if buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
            f"{buf.dtype} {tuple(buf.shape)} on {buf.device} (contiguous={buf.is_contiguous()})"
        )


def _scalar_tensor(value, dtype, device):
    """A 1-element tensor as a 0-d ``dtype`` tensor on ``device`` (no copy when it already is one)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)


def _is_per_sample(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() != 1


def _check_per_sample(name, value, batch):
    """A tensor ``lr``/``step`` holds one shared value or one value per sample: nothing else may reach the
    kernel, which would read ``value[b]`` out of bounds."""
    if _is_per_sample(value) and value.shape != (batch,):
        raise ValueError(
            f"{name}: expected a number, a 1-element tensor or a 1-D tensor of shape [B] = [{batch}], "
            f"got shape {tuple(value.shape)}"
        )


def _sample_tensor(value, batch, dtype, device):
    """``value`` (number, 1-element or ``[B]`` tensor) as a contiguous ``[B]`` ``dtype`` tensor on ``device``,
    one entry per program row; a shared value is broadcast on the device (no host synchronisation)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), value, dtype=dtype, device=device)
    return value.reshape(-1).to(device=device, dtype=dtype).expand(batch).contiguous()


def launch_update(
    memory,
    grad,
    *,
    lr,
    adam=False,
    step=1,
    clip_value=None,
    clip_norm=None,
    weight_decay=0.0,
    betas=BETAS,
    exp_avg=None,
    exp_avg_sq=None,
    out=None,
    norm_out=None,
    exp_avg_out=None,
    exp_avg_sq_out=None,
    num_splits=None,
):
    """Run the fused update; returns ``(new_memory, raw_norms[B] fp32, exp_avg, exp_avg_sq)``.

    ``memory``/``grad``: ``[B, m, d]`` of one dtype in ``KERNEL_DTYPES`` (made contiguous here).
    ``lr``: float, 1-element tensor or ``[B]`` tensor (per sample); ``step`` (Adam): int, 1-element tensor or
    ``[B]`` integer tensor, each >= 1 (not checked: that would need a host synchronisation).
    ``clip_value``: None means no clamp (callers apply Adam's default of 10 themselves).
    ``betas``: Adam's (beta1, beta2), Python floats in [0, 1) (runtime values, no recompile).
    ``weight_decay``: Adam only, AdamW's decoupled decay wd >= 0 (a runtime float; 0: plain Adam).
    ``exp_avg``/``exp_avg_sq``: fp32 ``[B, m, d]`` moments for Adam (None: zeros).
    ``out``/``norm_out``/``exp_avg_out``/``exp_avg_sq_out``: optional preallocated contiguous outputs;
    the update is element-local, so ``out`` may be ``memory`` and ``exp_avg_out`` may be ``exp_avg``
    (in place). ``num_splits``: chunks per sample (None: ``pick_num_splits``). No host synchronisation.
    Arguments are assumed validated by the op (``gradmem_fast.ops.update``); buffers are checked here.
    """
    if memory.dim() != 3 or grad.shape != memory.shape or grad.dtype != memory.dtype:
        raise ValueError(
            f"memory/grad: expected equal [B, m, d] shapes and dtypes, got "
            f"{tuple(memory.shape)} {memory.dtype} and {tuple(grad.shape)} {grad.dtype}"
        )
    if memory.dtype not in KERNEL_DTYPES:
        raise TypeError(f"memory: the update kernel takes {KERNEL_DTYPES}, got {memory.dtype}")
    device = memory.device
    B, m, d = memory.shape
    N = m * d
    _check_per_sample("lr", lr, B)
    if adam:
        _check_per_sample("step", step, B)
    memory = memory.contiguous()
    grad = grad.contiguous()
    if out is None:
        out = torch.empty_like(memory)
    _check_buffer("out", out, memory.shape, memory.dtype, device)
    if norm_out is None:
        norm_out = torch.empty(B, dtype=torch.float32, device=device)
    _check_buffer("norm_out", norm_out, (B,), torch.float32, device)
    if adam:
        if exp_avg is None:
            exp_avg = torch.zeros(memory.shape, dtype=torch.float32, device=device)
        if exp_avg_sq is None:
            exp_avg_sq = torch.zeros(memory.shape, dtype=torch.float32, device=device)
        exp_avg = exp_avg.contiguous()
        exp_avg_sq = exp_avg_sq.contiguous()
        _check_buffer("exp_avg", exp_avg, memory.shape, torch.float32, device)
        _check_buffer("exp_avg_sq", exp_avg_sq, memory.shape, torch.float32, device)
        if exp_avg_out is None:
            exp_avg_out = torch.empty_like(exp_avg)
        if exp_avg_sq_out is None:
            exp_avg_sq_out = torch.empty_like(exp_avg_sq)
        _check_buffer("exp_avg_out", exp_avg_out, memory.shape, torch.float32, device)
        _check_buffer("exp_avg_sq_out", exp_avg_sq_out, memory.shape, torch.float32, device)
    if B == 0 or N == 0:
        out.copy_(memory)
        norm_out.zero_()
        if adam:
            exp_avg_out.copy_(exp_avg)
            exp_avg_sq_out.copy_(exp_avg_sq)
        return out, norm_out, exp_avg_out, exp_avg_sq_out

    splits = pick_num_splits(B, N, device) if num_splits is None else int(num_splits)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1..{MAX_SPLITS}, got {splits}")
    chunk = triton.cdiv(triton.cdiv(N, splits), BLOCK) * BLOCK
    splits = triton.cdiv(N, chunk)  # drop empty trailing chunks

    # Per-sample mode when lr or (Adam) step has one value per sample; the other one is then broadcast to
    # [B] too, so a single flag covers both (B = 1 is always shared: one value either way).
    per_sample = _is_per_sample(lr) or (adam and _is_per_sample(step))
    scalar_ptrs = per_sample or isinstance(lr, torch.Tensor) or (adam and isinstance(step, torch.Tensor))
    if per_sample:
        lr_arg = _sample_tensor(lr, B, torch.float32, device)
        step_arg = _sample_tensor(step, B, torch.int64, device) if adam else 1
    elif scalar_ptrs:
        lr_arg = _scalar_tensor(lr, torch.float32, device)
        step_arg = _scalar_tensor(step, torch.int64, device) if adam else 1
    else:
        lr_arg = float(lr)
        step_arg = int(step) if adam else 1
    cv = float("inf") if clip_value is None else float(clip_value)
    cn = float("inf") if clip_norm is None else float(clip_norm)
    b1, b2 = (float(b) for b in betas)
    beta_args = (b1, b2, 1.0 - b1, 1.0 - b2, _log(b1), _log(b2))

    iters = chunk // BLOCK
    n_iters = triton.cdiv(N, BLOCK)
    part = torch.empty((B, splits, 2), dtype=torch.float64, device=device)
    if splits > 1:
        _grad_sumsq_kernel[(B, splits)](grad, part, cv, N, iters, BLOCK=BLOCK, num_warps=NUM_WARPS)
    # Unused moment pointers get fp32 stand-ins so SGD launches match the signatures in compile_specs().
    m_in, v_in, m_out, v_out = (exp_avg, exp_avg_sq, exp_avg_out, exp_avg_sq_out) if adam else (norm_out,) * 4
    _memory_update_kernel[(B, splits)](
        memory,
        grad,
        out,
        norm_out,
        m_in,
        v_in,
        m_out,
        v_out,
        part,
        lr_arg,
        step_arg,
        cv,
        cn,
        float(weight_decay) if adam else 0.0,
        *beta_args,
        N,
        iters,
        n_iters,
        ADAM=bool(adam),
        HAS_CLIP_NORM=clip_norm is not None,
        SCALAR_PTRS=scalar_ptrs,
        PER_SAMPLE=per_sample,
        SPLIT=splits > 1,
        BLOCK=BLOCK,
        MAX_SPLITS=MAX_SPLITS,
        num_warps=NUM_WARPS,
    )
    return out, norm_out, exp_avg_out if adam else None, exp_avg_sq_out if adam else None


def compile_specs():
    """Every launch configuration ``launch_update`` can pick (for ``gradmem_fast.tools.compile_check``), each
    in two specialisations: ``aligned`` (every buffer 16-byte aligned, m*d a multiple of 16: GPT-2's 8 x 768)
    and ``unaligned`` (memory and gradient views at odd offsets, odd m*d; only the outputs the launcher
    allocates hinted). ``step`` is never specialised (``do_not_specialize``). ``ptrs`` names how ``lr`` and
    ``step`` arrive: ``0`` scalar arguments, ``1`` 1-element tensors, ``B`` ``[B]`` tensors (``PER_SAMPLE``)."""

    def variants(sig, own):
        pointers = {n for n, t in sig.items() if t.startswith("*")} - {"step"}  # do_not_specialize
        return (
            Variant("aligned", divisible=pointers | {"N"}),
            Variant("unaligned", divisible=pointers & own, archs=(90,)),
        )

    specs = []
    for tname in ("fp32", "fp16", "bf16"):
        ptr = f"*{tname}"
        specs.append(
            CompileSpec(
                f"update.grad_sumsq[{tname}]",
                _grad_sumsq_kernel,
                {"grad_ptr": ptr, "part_ptr": "*fp64", "clip_value": "fp32", "N": "i32", "ITERS": "i32"},
                {"BLOCK": BLOCK},
                num_warps=NUM_WARPS,
                variants=variants({"grad_ptr": ptr, "part_ptr": "*fp64"}, {"part_ptr"}),
            )
        )
        for adam in (False, True):
            for clip_norm in (False, True):
                for ptrs in ("0", "1", "B"):
                    scalar_ptrs, per_sample = ptrs != "0", ptrs == "B"
                    for split in (False, True):
                        if adam:
                            step_t = "*i64" if scalar_ptrs else "i32"
                        else:
                            step_t = "i32"
                        sig = {
                            "mem_ptr": ptr,
                            "grad_ptr": ptr,
                            "out_ptr": ptr,
                            "norm_ptr": "*fp32",
                            "exp_avg_ptr": "*fp32",
                            "exp_avg_sq_ptr": "*fp32",
                            "exp_avg_out_ptr": "*fp32",
                            "exp_avg_sq_out_ptr": "*fp32",
                            "part_ptr": "*fp64",
                            "lr": "*fp32" if scalar_ptrs else "fp32",
                            "step": step_t,
                            "clip_value": "fp32",
                            "clip_norm": "fp32",
                            "weight_decay": "fp32",
                            "beta1": "fp32",
                            "beta2": "fp32",
                            "one_minus_beta1": "fp32",
                            "one_minus_beta2": "fp32",
                            "log_beta1": "fp32",
                            "log_beta2": "fp32",
                            "N": "i32",
                            "ITERS": "i32",
                            "N_ITERS": "i32",
                        }
                        const = {
                            "ADAM": adam,
                            "HAS_CLIP_NORM": clip_norm,
                            "SCALAR_PTRS": scalar_ptrs,
                            "PER_SAMPLE": per_sample,
                            "SPLIT": split,
                            "BLOCK": BLOCK,
                            "MAX_SPLITS": MAX_SPLITS,
                        }
                        name = (
                            f"update.memory_update[{tname},{'adam' if adam else 'sgd'},"
                            f"clip_norm={int(clip_norm)},ptrs={ptrs},split={int(split)}]"
                        )
                        own = {"out_ptr", "norm_ptr", "exp_avg_out_ptr", "exp_avg_sq_out_ptr", "part_ptr"}
                        specs.append(
                            CompileSpec(
                                name,
                                _memory_update_kernel,
                                sig,
                                const,
                                num_warps=NUM_WARPS,
                                variants=variants(sig, own),
                            )
                        )
    return specs
