"""Per-sample memory update op: ``memory_update`` (SGD, Adam or AdamW, value and per-sample norm clipping).

For memories ``M`` and their gradient ``g``, both ``[B, m, d]`` (DESIGN.md, semantics contract item 4)::

    r_b  = ||g_b||                                   raw norm over [m, d], reported before any clip
    g    = clamp(g, -clip_value, clip_value)         if clip_value is set (Adam: 10 when unset)
    n_b  = ||g_b||;  g_b = g_b * clip_norm / (n_b + 1e-6)  where n_b > clip_norm      if clip_norm is set
    SGD:   M_b = M_b - lr_b * g_b
    Adam:  m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2                (betas = (0.9, 0.999))
           m_hat = m / (1 - b1^step_b);   v_hat = max(v / (1 - b2^step_b), 1e-8)
           M_b = M_b - lr_b * m_hat / (sqrt(v_hat) + 1e-8)
    AdamW: Adam with decoupled weight decay wd, applied to the memory before the Adam step, as
           torch.optim.AdamW does (``param.mul_(1 - lr * weight_decay)`` then the Adam step):
           M_b = M_b (1 - lr_b wd) - lr_b * m_hat / (sqrt(v_hat) + 1e-8)
           The decay is decoupled: it never enters g, the clips or the moments. With wd = 0 it is Adam.

``lr`` and ``step`` are shared (a number or a 1-element tensor: ``lr_b = lr``, ``step_b = step``) or per sample
(a 1-D ``[B]`` tensor: continuous batching keeps documents of different ages in one batch, each with its own
schedule position and Adam step). ``lr_b = 0`` leaves ``M_b`` unchanged for a finite gradient (a frozen slot).

Backends (``gradmem_fast.backend.resolve_backend``): ``torch`` runs the formula above as plain
differentiable torch code; ``triton`` runs one fused kernel (``gradmem_fast.kernels.update``: fp32 math,
squared norms accumulated in fp64, result cast to the memory dtype) with no host synchronisation. The
kernel takes fp32/fp16/bf16; fp64 tensors (the reference precision) get their values from the torch
formula on either backend (on the triton backend inside the same autograd.Function, so its backward is
what fp64 gradcheck verifies).

Autograd:

* SGD is twice differentiable in ``memory``, ``grad`` and a tensor ``lr`` (shared or ``[B]``; grad_mode
  ``first`` and ``second``). On the triton backend the forward is the kernel and the backward is the analytic
  vector-Jacobian product of the formula, written in torch ops, so it is itself differentiable: a
  second-order meta-gradient through the update (the ``torch.where`` norm clip included) equals torch
  autograd of the formula.
* Adam is first-order only: the update direction ``m_hat / (sqrt(v_hat) + 1e-8)`` is a constant of the
  graph, so the new memory is differentiable in ``memory`` (identity; ``(1 - lr_b wd) I`` for AdamW) and in
  a tensor ``lr``, never in ``grad``. Rather than silently detaching it, a ``grad`` that requires grad (with
  autograd enabled) raises a ValueError: pass ``grad.detach()`` (grad_mode ``first``).
* The reported norms and the Adam state are statistics and carry no gradient.

NaN: a NaN in ``g_b`` gives NaN in ``r_b`` and in ``M_b`` at that element (and in the Adam moments);
clamps keep NaN, and a NaN norm leaves the sample unscaled, so nothing is clipped into a finite number.
Other samples are unaffected.
"""

import math
from numbers import Real
from types import ModuleType
from typing import Any, NamedTuple

import torch

from gradmem_fast.backend import resolve_backend

OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_OPTIMIZERS = ("adam", "adamw")  # the ones with moments and a step index
ADAM_DEFAULT_CLIP_VALUE = 10.0
ADAM_BETAS = (0.9, 0.999)
NORM_EPS = 1e-6
ADAM_EPS = 1e-8
ADAM_V_FLOOR = 1e-8
# The kernel's dtypes; kept here too so the torch backend never imports Triton.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_STEP = 2**31 - 1  # a Python step is an i32 kernel argument

# A learning rate or step is a Python number, a 1-element tensor (shared) or a [B] tensor (one per sample);
# a tensor lr may require grad.
LR = float | torch.Tensor
Step = int | torch.Tensor


class AdamState(NamedTuple):
    """Adam moments of every memory, each ``[B, m, d]``: fp32 (fp64 for fp64 memories)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class UpdateResult(NamedTuple):
    """What ``memory_update`` returns.

    ``memory``: the updated memories ``[B, m, d]`` in the input memory's dtype.
    ``grad_norm``: raw (pre-clip) per-sample gradient norms ``||g_b||`` ``[B]``, fp32 (fp64 for fp64
    memories), detached, computed on the device without host synchronisation.
    ``state``: the new ``AdamState`` (Adam), ``None`` (SGD). Pass it back with ``step + 1``.
    """

    memory: torch.Tensor
    grad_norm: torch.Tensor
    state: AdamState | None


def memory_update(
    memory: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: LR,
    optimizer: str = "sgd",
    clip_value: float | None = None,
    clip_norm: float | None = None,
    state: AdamState | tuple[torch.Tensor, torch.Tensor] | None = None,
    step: Step = 1,
    betas: tuple[float, float] = ADAM_BETAS,
    weight_decay: float = 0.0,
    backend: str = "auto",
) -> UpdateResult:
    """Update every memory ``M_b`` with its own gradient ``g_b`` (formula in the module docstring).

    Args:
        memory: ``[B, m, d]`` floating tensor.
        grad: gradient of the same shape, dtype and device as ``memory``.
        lr: learning rate >= 0, a Python number, a 1-element tensor (shared by the batch) or a 1-D ``[B]``
            floating tensor on the memory's device (``lr[b]`` for sample ``b``). A tensor is read on the
            device, so a captured CUDA graph replays with new values; its sign cannot be checked without a sync.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        clip_value: element-wise clamp to ``±clip_value`` (>= 0); ``None``: off for SGD, 10 for Adam
            (pass ``float("inf")`` for an Adam without clamp).
        clip_norm: per-sample L2 norm clip (>= 0) applied after the clamp; ``None``: off.
        state: Adam only: ``AdamState`` (or a pair ``(exp_avg, exp_avg_sq)``) from the previous step;
            ``None`` means zero moments.
        step: Adam only: the 1-based step index ``k`` of the bias correction, an int, a 1-element tensor, or a
            1-D ``[B]`` integer tensor on the memory's device (``step[b]`` >= 1 for sample ``b``, unchecked).
        betas: Adam only: ``(beta1, beta2)`` in [0, 1).
        weight_decay: AdamW only: the decoupled decay wd >= 0 (a number); must be 0 for SGD and Adam
            (torch.optim.Adam's coupled decay is not offered: it would silently differ from AdamW's).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``UpdateResult(memory, grad_norm, state)``.
    """
    _check_inputs(memory, grad)
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    adam = optimizer in ADAM_OPTIMIZERS
    weight_decay = _check_weight_decay(weight_decay, optimizer)
    _check_lr(lr, memory)
    _check_per_sample("lr", lr, memory)
    clip_value = _check_clip("clip_value", clip_value)
    clip_norm = _check_clip("clip_norm", clip_norm)
    if adam:
        _check_step(step)
        _check_per_sample("step", step, memory)
        betas = _check_betas(betas)
        state = _check_state(state, memory)
        if clip_value is None:
            clip_value = ADAM_DEFAULT_CLIP_VALUE
    elif state is not None:
        raise ValueError("state: only optimizer='adam' keeps a state; got a state with optimizer='sgd'")
    backend = resolve_backend(backend, memory.device)

    grad_on = torch.is_grad_enabled()
    lr_needs_grad = grad_on and isinstance(lr, torch.Tensor) and lr.requires_grad
    if adam and grad_on and grad.requires_grad:
        raise ValueError(
            "grad: Adam is first-order only and cannot be differentiated with respect to the gradient; "
            "pass grad.detach() (grad_mode='first') or use optimizer='sgd'"
        )
    needs_graph = grad_on and (memory.requires_grad or grad.requires_grad or lr_needs_grad)
    kernel = backend == "triton" and memory.dtype in _KERNEL_DTYPES

    if not adam:
        if kernel and needs_graph:
            new, norm = _SGDUpdate.apply(memory, grad, lr, clip_value, clip_norm)
        elif kernel:
            new, norm = _sgd_values(memory, grad, lr, clip_value, clip_norm, use_kernel=True)
        else:
            new, norm = sgd_torch(memory, grad, lr, clip_value, clip_norm)
        return UpdateResult(new, norm, None)

    if kernel and not lr_needs_grad:
        exp_avg, exp_avg_sq = (None, None) if state is None else state
        args = (memory, grad, exp_avg, exp_avg_sq, lr, step, clip_value, clip_norm, betas, weight_decay)
        new, norm, m1, m2 = _AdamUpdate.apply(*args) if needs_graph else _adam_kernel(*args)
        return UpdateResult(new, norm, AdamState(m1, m2))
    # The kernel does not expose the update direction that d(new)/d(lr) needs: a tensor lr that
    # requires grad takes the torch formula.
    new, norm, new_state = adam_torch(memory, grad, lr, clip_value, clip_norm, state, step, betas, weight_decay)
    return UpdateResult(new, norm, new_state)


# ----------------------------------------------------------------------------------------- validation


def _check_inputs(memory: torch.Tensor, grad: torch.Tensor) -> None:
    for name, t in (("memory", memory), ("grad", grad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if memory.dim() != 3:
        raise ValueError(f"memory: expected a 3-D tensor [B, m, d], got shape {tuple(memory.shape)}")
    if grad.shape != memory.shape:
        raise ValueError(f"grad: expected the shape of memory {tuple(memory.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != memory.dtype:
        raise TypeError(f"grad: expected the dtype of memory ({memory.dtype}), got {grad.dtype}")
    if grad.device != memory.device:
        raise ValueError(f"grad: expected the device of memory ({memory.device}), got {grad.device}")


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_per_sample(name: str, value: Any, memory: torch.Tensor) -> None:
    """A tensor that is not 1-element must be one value per sample: 1-D ``[B]`` on the memory's device (a host
    tensor would need a synchronous copy each step)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return
    B = memory.shape[0]
    if value.shape != (B,):
        raise ValueError(
            f"{name}: expected a number, a 1-element tensor or a 1-D tensor of shape [B] = [{B}], "
            f"got shape {tuple(value.shape)}"
        )
    if value.device != memory.device:
        raise ValueError(
            f"{name}: expected the [B] tensor on the device of memory ({memory.device}), got {value.device}"
        )


def _check_lr(lr: Any, memory: torch.Tensor) -> None:
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"lr: expected a floating-point tensor, got dtype {lr.dtype}")
        return
    if not _is_number(lr):
        raise TypeError(f"lr: expected a number or a tensor, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")


def _check_clip(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{name}: expected None or a number >= 0, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name}: expected None or a number >= 0, got {value!r}")
    return float(value)


def _check_step(step: object) -> None:
    if isinstance(step, torch.Tensor):
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"step: expected an integer or floating tensor, got dtype {step.dtype}")
        return
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step: expected an int >= 1 or a tensor, got {type(step).__name__}")
    if not 1 <= step <= _MAX_STEP:
        raise ValueError(f"step: expected 1 <= step <= {_MAX_STEP} (Adam's 1-based step index), got {step}")


def _check_weight_decay(weight_decay: Any, optimizer: str) -> float:
    if not _is_number(weight_decay):
        raise TypeError(f"weight_decay: expected a number >= 0, got {type(weight_decay).__name__}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
    if weight_decay and optimizer != "adamw":
        raise ValueError(f"weight_decay: only optimizer='adamw' decays the memory; got optimizer={optimizer!r}")
    return float(weight_decay)


def _check_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas: expected a pair of numbers (beta1, beta2), got {betas!r}") from None
    for name, b in (("beta1", b1), ("beta2", b2)):
        if not _is_number(b):
            raise TypeError(f"betas: {name} must be a number, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {b!r}")
    return float(b1), float(b2)


def _check_state(state: Any, memory: torch.Tensor) -> AdamState | None:
    if state is None:
        return None
    if isinstance(state, torch.Tensor) or not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("state: expected None or an AdamState / pair (exp_avg, exp_avg_sq) of tensors")
    for name, t in zip(AdamState._fields, state):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(
                f"state.{name}: expected a floating-point tensor, got "
                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.shape != memory.shape:
            raise ValueError(f"state.{name}: expected the shape of memory {tuple(memory.shape)}, got {tuple(t.shape)}")
        if t.device != memory.device:
            raise ValueError(f"state.{name}: expected the device of memory ({memory.device}), got {t.device}")
    dt = _math_dtype(memory.dtype)
    # Moments are statistics, never differentiated.
    return AdamState(*(t.detach().to(dt) for t in state))


# ------------------------------------------------------------------------------------- torch formula


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for 16-bit memories, fp64 for fp64 (the statistics and moments use it too)."""
    return torch.promote_types(dtype, torch.float32)


def _per_sample_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-element tensor as a 0-d one, a ``[B]`` tensor as ``[B, 1, 1]``: broadcasts against ``[B, m, d]``."""
    return t.reshape(()) if t.numel() == 1 else t.reshape(-1, 1, 1)


def _lr_value(lr: LR, dtype: torch.dtype, device: torch.device) -> LR:
    if isinstance(lr, torch.Tensor):
        return _per_sample_view(lr).to(device=device, dtype=dtype)
    return lr


def _raw_norm(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # fp64 accumulation: fp32 squares of 1e-30 underflow and of 1e30 overflow.
    return torch.linalg.vector_norm(grad.detach(), dim=(1, 2), dtype=torch.float64).to(dtype)


def clip_torch(g: torch.Tensor, clip_value: float | None, clip_norm: float | None) -> torch.Tensor:
    """``g`` clamped to ``±clip_value``, then each sample scaled by ``clip_norm / (n_b + 1e-6)`` where
    ``n_b = ||g_b|| > clip_norm`` (differentiable; keeps NaN: torch.clamp propagates it and a NaN norm
    compares false)."""
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    if clip_norm is not None:
        n = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True, dtype=torch.float64)
        scale = torch.where(n > clip_norm, clip_norm / (n + NORM_EPS), torch.ones_like(n))
        g = g * scale.to(g.dtype)
    return g


def sgd_torch(
    memory: torch.Tensor,
    grad: torch.Tensor,
    lr: LR,
    clip_value: float | None = None,
    clip_norm: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch backend of SGD: ``(M - lr * clip(g), ||g_b||)``, math in ``_math_dtype``, differentiable."""
    dt = _math_dtype(memory.dtype)
    g = clip_torch(grad.to(dt), clip_value, clip_norm)
    new = memory.to(dt) - _lr_value(lr, dt, memory.device) * g
    return new.to(memory.dtype), _raw_norm(grad, dt)


def _bias_correction(beta: float, step: Step, dt: torch.dtype, device: torch.device) -> torch.Tensor | float:
    if isinstance(step, torch.Tensor):
        t = _per_sample_view(step).to(device=device, dtype=torch.float64)
        # A Python base: no tensor made from host data (a synchronising host-to-device copy on a GPU, and
        # illegal inside a CUDA graph capture).
        return (1.0 - torch.pow(beta, t)).to(dt)
    return 1.0 - beta**step


def adam_torch(
    memory: torch.Tensor,
    grad: torch.Tensor,
    lr: LR,
    clip_value: float | None,
    clip_norm: float | None,
    state: AdamState | tuple[torch.Tensor, torch.Tensor] | None,
    step: Step,
    betas: tuple[float, float] = ADAM_BETAS,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, AdamState]:
    """Torch backend of Adam (AdamW with ``weight_decay`` > 0): ``(new memory, ||g_b||, AdamState)``;
    first-order (``grad`` detached)."""
    dt = _math_dtype(memory.dtype)
    g = clip_torch(grad.detach().to(dt), clip_value, clip_norm)
    if state is None:
        exp_avg, exp_avg_sq = torch.zeros_like(g), torch.zeros_like(g)
    else:
        exp_avg, exp_avg_sq = (s.detach().to(dt) for s in state)
    b1, b2 = betas
    exp_avg = b1 * exp_avg + (1.0 - b1) * g
    exp_avg_sq = b2 * exp_avg_sq + (1.0 - b2) * (g * g)
    m_hat = exp_avg / _bias_correction(b1, step, dt, memory.device)
    # clamp_min keeps NaN (torch.clamp propagates it), so a NaN moment is not floored to 1e-8.
    v_hat = (exp_avg_sq / _bias_correction(b2, step, dt, memory.device)).clamp_min(ADAM_V_FLOOR)
    lr_v = _lr_value(lr, dt, memory.device)
    start = memory.to(dt)
    if weight_decay:
        start = start * (1.0 - lr_v * weight_decay)  # decoupled: before the step, outside g and the moments
    new = start - lr_v * (m_hat / (v_hat.sqrt() + ADAM_EPS))
    return new.to(memory.dtype), _raw_norm(grad, dt), AdamState(exp_avg, exp_avg_sq)


# -------------------------------------------------------------------------------------- triton paths


def _kernels() -> ModuleType:
    # Imported on first use: importing Triton must wait until the interpreter choice is made.
    from gradmem_fast.kernels import update

    return update


def _sgd_values(
    memory: torch.Tensor,
    grad: torch.Tensor,
    lr: LR,
    clip_value: float | None,
    clip_norm: float | None,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_kernel:
        with torch.no_grad():
            return sgd_torch(memory, grad, lr, clip_value, clip_norm)
    new, norm, _, _ = _kernels().launch_update(
        memory.detach(), grad.detach(), lr=_detached(lr), clip_value=clip_value, clip_norm=clip_norm
    )
    return new, norm


def _detached(x: LR) -> LR:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _adam_kernel(
    memory: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    lr: LR,
    step: Step,
    clip_value: float | None,
    clip_norm: float | None,
    betas: tuple[float, float],
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().launch_update(
        memory.detach(),
        grad.detach(),
        lr=_detached(lr),
        adam=True,
        step=step,
        clip_value=clip_value,
        clip_norm=clip_norm,
        weight_decay=weight_decay,
        betas=betas,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
    )


class _SGDUpdate(torch.autograd.Function):
    """SGD step with the kernel (or, for fp64, the torch formula) forward and a differentiable backward.

    With ``h = clamp(g, ±c)``, ``u = h * s``, ``s = C / (n + 1e-6)`` where ``n = ||h_b|| > C`` (else 1)
    and ``new = M - lr * u``, for a cotangent ``w`` of ``new``:

        dM  = w
        dlr = -sum(w * u)          (a [B] lr: dlr_b = -sum(w_b * u_b), one sum per sample)
        du  = -lr_b * w
        dh  = s * du - [n > C] * C (h . du) / ((n + 1e-6)^2 n) * h     (Jacobian of the norm clip)
        dg  = dh where -c <= g <= c, else 0                              (Jacobian of the clamp)

    written in torch ops on the saved ``g`` so that double backward (grad_mode ``second``) works.
    """

    @staticmethod
    def forward(
        ctx: Any,
        memory: torch.Tensor,
        grad: torch.Tensor,
        lr: LR,
        clip_value: float | None,
        clip_norm: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new, norm = _sgd_values(memory, grad, lr, clip_value, clip_norm, use_kernel=memory.dtype in _KERNEL_DTYPES)
        ctx.mark_non_differentiable(norm)
        ctx.clip = (clip_value, clip_norm)
        ctx.lr = None if isinstance(lr, torch.Tensor) else lr
        ctx.save_for_backward(grad, lr if isinstance(lr, torch.Tensor) else None)
        return new, norm

    @staticmethod
    def backward(ctx: Any, d_new: torch.Tensor, d_norm: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, lr_t = ctx.saved_tensors
        need_mem, need_grad, need_lr = ctx.needs_input_grad[:3]
        d_mem = d_new if need_mem else None
        d_grad = d_lr = None
        if need_grad or need_lr:
            dt = _math_dtype(grad.dtype)
            clip_value, clip_norm = ctx.clip
            g = grad.to(dt)
            w = d_new.to(dt)
            h = g.clamp(-clip_value, clip_value) if clip_value is not None else g
            if clip_norm is not None:
                n = torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True, dtype=torch.float64)
                clipped = n > clip_norm
                # Unclipped samples get n := 1 in the unused branch: with n = 0 it would divide by zero,
                # and where() passes a NaN derivative of the unused branch on to the double backward.
                n_safe = torch.where(clipped, n, torch.ones_like(n))
                scale = torch.where(clipped, clip_norm / (n_safe + NORM_EPS), torch.ones_like(n)).to(dt)
                u = h * scale
            else:
                u = h
            if need_lr:
                # Shared lr: summed over the whole batch; per-sample lr[b]: over sample b only.
                wu = (w * u).sum() if lr_t.numel() == 1 else (w * u).sum(dim=(1, 2))
                d_lr = -wu.reshape(lr_t.shape).to(device=lr_t.device, dtype=lr_t.dtype)
            if need_grad:
                lr = ctx.lr if lr_t is None else _per_sample_view(lr_t).to(device=grad.device, dtype=dt)
                du = -lr * w
                if clip_norm is not None:
                    hdu = (h * du).sum(dim=(1, 2), keepdim=True, dtype=torch.float64)
                    coef = torch.where(
                        clipped, clip_norm * hdu / ((n_safe + NORM_EPS) ** 2 * n_safe), torch.zeros_like(n)
                    )
                    dh = du * scale - coef.to(dt) * h
                else:
                    dh = du
                if clip_value is not None:
                    inside = (g >= -clip_value) & (g <= clip_value)
                    dh = torch.where(inside, dh, torch.zeros_like(dh))
                d_grad = dh.to(grad.dtype)
        return d_mem, d_grad, d_lr, None, None


class _AdamUpdate(torch.autograd.Function):
    """Adam step with the kernel; first-order: ``d new / d memory = I`` (AdamW: ``(1 - lr_b wd) I``),
    nothing flows to ``grad``."""

    @staticmethod
    def forward(
        ctx: Any,
        memory: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor | None,
        exp_avg_sq: torch.Tensor | None,
        lr: LR,
        step: Step,
        clip_value: float | None,
        clip_norm: float | None,
        betas: tuple[float, float],
        weight_decay: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        new, norm, m1, m2 = _adam_kernel(
            memory, grad, exp_avg, exp_avg_sq, lr, step, clip_value, clip_norm, betas, weight_decay
        )
        ctx.mark_non_differentiable(norm, m1, m2)
        ctx.weight_decay = weight_decay
        ctx.lr = lr.detach() if isinstance(lr, torch.Tensor) else lr
        return new, norm, m1, m2

    @staticmethod
    def backward(
        ctx: Any, d_new: torch.Tensor, d_norm: torch.Tensor, d_m1: torch.Tensor, d_m2: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        d_mem = d_new
        if ctx.weight_decay:
            lr = ctx.lr
            if isinstance(lr, torch.Tensor):
                lr = _per_sample_view(lr).to(device=d_new.device, dtype=_math_dtype(d_new.dtype))
            d_mem = (d_new.to(_math_dtype(d_new.dtype)) * (1.0 - lr * ctx.weight_decay)).to(d_new.dtype)
        return d_mem, None, None, None, None, None, None, None, None, None
