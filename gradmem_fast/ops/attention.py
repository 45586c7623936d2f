"""Prefix-memory attention: causal (bottom-right aligned) or full softmax attention over packed or padded
sequences, with GQA, key padding, optional sliding window and dropout.

For a sequence with ``Lq`` queries and ``Lk`` keys (``diag = Lk - Lq``), query head ``h`` and its KV head
``h // (Hq / Hkv)``::

    visible(i, j) = [not causal or j <= i + diag] and [window is None or j > i + diag - window]
                    and key_padding_mask[j]
    s_ij  = scale * q_i . k_j                       (scale defaults to 1 / sqrt(D))
    lse_i = log sum_{j visible} exp(s_ij)           (-inf when no key is visible)
    out_i = sum_{j visible} exp(s_ij - lse_i) * z_ij / (1 - p) * v_j     (0 when no key is visible)

Soft-capping and sink logits (both optional, both with every other option, on both backends, to second
order)::

    r_ij  = scale * q_i . k_j,   s_ij = c * tanh(r_ij / c)            (softcap = c > 0; s = r when off)
    lse_i = log(sum_{j visible} exp(s_ij) + exp(sinks[h]))            (with sinks: finite for every row)
    out_i = sum_{j visible} exp(s_ij - lse_i) * z_ij / (1 - p) * v_j  (a row with no visible key: lse = sink, 0)

The cap comes after the scaling and before any mask (masked pairs are -inf after capping), as Gemma 2's
eager attention orders them; the sink column has no value and the dropout mask applies to the visible
probabilities only, as GPT-OSS's eager attention does (it subtracts a row maximum that includes the sink
first, which changes nothing mathematically). Gradients: ``dL/ds_ij`` reaches ``r_ij`` times
``1 - tanh^2(r_ij / c) = 1 - (s_ij / c)^2``, and ``d sinks[h] = -sum_i exp(sinks[h] - lse_i) delta_i`` over
the rows of head h, with ``delta_i = dout_i . out_i - dlse_i``. On the Triton backend the cap is a kernel
constexpr (``SOFTCAP``; 0 compiles today's code) and the sink is composed on the kernels' sink-free
outputs in torch (``_add_sinks``), so autograd gets its first and second order from the kernels'
backward and double backward. The value head dim may differ from the query/key one (MLA) on the torch
backend only; the Triton backend refuses it with a ValueError.

``z`` is the dropout keep mask (keep with probability 1 - p), a pure function of the seed's value and the
indices on the Triton backend, so the backward regenerates it. With more keys than queries the last query
sees all keys: queries attend to a cached prefix (memory) plus themselves, as in GradMem's READ.

Dropout seeds live on the device. The ops take the seed as an int64 tensor that the kernels read when they
run, never as a Python number: a call without an explicit seed takes the current value of its device's
dropout generator (``dropout_generator``, an int64 counter tensor) and advances the counter in place by one,
so consecutive calls, a compiled step (``torch.compile``) and every replay of a captured CUDA graph draw new
masks without a host synchronisation or a recompile. The seed each forward used is copied (the counter moves
on) and saved: backward and double backward regenerate exactly the forward's mask.

Three ops are registered with ``torch.library`` so a compiled graph can hold them:
``gradmem_fast::attention_fwd`` -> (out, lse), ``gradmem_fast::attention_bwd`` -> (dq, dk, dv) and
``gradmem_fast::attention_dbwd`` (the double backward). The forward's autograd calls the backward op, and
the backward op's autograd calls the double-backward op, so second-order gradients (``create_graph=True``,
GradMem's meta-training) run on the kernels in O(S) memory with every second-order term. The double
backward itself is not differentiable (no third order).
"""

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from gradmem_fast.backend import resolve_backend

__all__ = ["prefix_attention", "attention_reference", "dropout_generator", "set_dropout_seed"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------
# Argument checks (shared by both backends)


def _check_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    window: int | None,
    fp32_precision: str | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"prefix_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"prefix_attention: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"prefix_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"prefix_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("prefix_attention: give both cu_seqlens_q and cu_seqlens_k (packed layout) or neither")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError(
                "prefix_attention: with cu_seqlens, q/k/v must be packed [total_tokens, heads, "
                f"head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
                raise TypeError(
                    f"prefix_attention: {name} must be a 1-D int32 tensor [batch + 1], got "
                    f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}"
                )
            if cu.device != q.device:
                raise ValueError(f"prefix_attention: {name} is on {cu.device}, q on {q.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                "prefix_attention: cu_seqlens_q and cu_seqlens_k describe different batch sizes "
                f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})"
            )
        # Value checks need the data on the host: free on CPU, a sync on a GPU, a graph break when compiled.
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            for name, cu, total in (
                ("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                ("cu_seqlens_k", cu_seqlens_k, k.shape[0]),
            ):
                if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total:
                    raise ValueError(
                        f"prefix_attention: {name} must start at 0, be non-decreasing and end at "
                        f"the {total} packed tokens; got {cu.tolist()}"
                    )
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"prefix_attention: k and v must have the same tokens, got {k.shape[0]} and {v.shape[0]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0],):
            raise ValueError(
                "prefix_attention: in the packed layout key_padding_mask must be [total_k] = "
                f"({k.shape[0]},), got {tuple(key_padding_mask.shape)}"
            )
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("prefix_attention: max_seqlen_q/k belong to the packed layout (with cu_seqlens)")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                "prefix_attention: q/k/v must be padded [batch, seq, heads, head_dim] (or packed "
                f"3-D with cu_seqlens); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(f"prefix_attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"prefix_attention: k and v lengths differ: {k.shape[1]} vs {v.shape[1]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                "prefix_attention: key_padding_mask must be [batch, seq_k] = "
                f"({k.shape[0]}, {k.shape[1]}), got {tuple(key_padding_mask.shape)}"
            )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError("prefix_attention: key_padding_mask must be a tensor (1 = keep)")
        if key_padding_mask.device != q.device:
            raise ValueError(f"prefix_attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"prefix_attention: k has {k.shape[-2]} heads but v has {v.shape[-2]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"prefix_attention: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if k.shape[-1] != d:
        raise ValueError(f"prefix_attention: q and k head dims must match, got {d} and {k.shape[-1]}")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"prefix_attention: head_dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
    if not 1 <= v.shape[-1] <= _MAX_HEAD_DIM:
        raise ValueError(f"prefix_attention: v's head_dim must be in [1, {_MAX_HEAD_DIM}], got {v.shape[-1]}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0
    ):
        raise ValueError(f"prefix_attention: softcap must be None, 0 (off) or a finite float > 0, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"prefix_attention: sinks must be a tensor [Hq] or None, got {type(sinks).__name__}")
        if sinks.dim() != 1 or sinks.shape[0] != hq:
            raise ValueError(
                f"prefix_attention: sinks must be [Hq] = ({hq},), one logit per query head, got {tuple(sinks.shape)}"
            )
        if sinks.dtype not in _DTYPES:
            raise TypeError(f"prefix_attention: sinks has dtype {sinks.dtype}; expected a floating dtype")
        if sinks.device != q.device:
            raise ValueError(f"prefix_attention: sinks is on {sinks.device}, q on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"prefix_attention: causal must be a bool, got {type(causal).__name__}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise TypeError(f"prefix_attention: scale must be a finite float or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"prefix_attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"prefix_attention: window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("prefix_attention: a sliding window needs causal=True")
    if fp32_precision not in (None, "ieee", "tf32"):
        raise ValueError(f"prefix_attention: fp32_precision must be None, 'ieee' or 'tf32', got {fp32_precision!r}")


# ----------------------------------------------------------------------------------------------------
# Dropout seeds on the device

_GENERATORS: dict[str, Tensor] = {}  # device -> int64 [1] counter: the seed of the next unseeded call


def dropout_generator(device: torch.device | str) -> Tensor:
    """The dropout generator of ``device``: an int64 ``[1]`` tensor on it holding the seed of the next
    ``prefix_attention`` call without an explicit seed; each such call advances it by one, in place.

    Created on first use with a value drawn from torch's generator of that device (so ``torch.manual_seed``
    before the first dropout call makes a run reproducible); ``set_dropout_seed`` sets it later. The tensor
    is never replaced, so compiled graphs and captured CUDA graphs that read it keep seeing its current value.
    Seeds ``s`` and ``s + 1`` are different Philox keys (independent masks), and the kernels use the low
    32 bits, so the counter wraps after 2^32 calls.
    """
    device = torch.device(device)
    key = str(device)
    state = _GENERATORS.get(key)
    if state is None:
        if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            # Inside a capture the fill would only run at replay, resetting the counter on every replay.
            raise RuntimeError(
                f"prefix_attention: the dropout generator of {key} does not exist yet and cannot be created "
                "inside a CUDA graph capture; run one call before capturing (a warm-up) or call "
                f"gradmem_fast.ops.attention.dropout_generator({key!r}) first"
            )
        # drawn on the device itself: no host-to-device copy, so it also traces under torch.compile
        state = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
        _GENERATORS[key] = state
    return state


def set_dropout_seed(seed: int, device: torch.device | str) -> None:
    """Set ``device``'s dropout generator to ``seed`` (an int), in place: the next unseeded call on that device
    uses ``seed``, the one after it ``seed + 1``, and so on, inside compiled and graph-replayed steps too."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"set_dropout_seed: seed must be a non-negative int, got {seed!r}")
    dropout_generator(device).fill_(seed)


@torch.library.custom_op("gradmem_fast::dropout_seed", mutates_args=())
def dropout_seed_op(seed: Tensor) -> Tensor:
    """A copy of ``seed`` (int64, one element) as ``[1]``: the value one attention call uses.

    An opaque op on purpose. The attention's backward must read the value the forward used, while the
    generator it came from moves on in place. AOTAutograd's partitioner may recompute a plain ``clone`` in
    the compiled backward from the generator tensor, by then advanced (a different mask; it does so when the
    copy feeds a pointwise op, seen with aot_eager and inductor); a custom op is outside its recomputable
    allowlist, so its output is saved. Limit: with ``torch._functorch.config.activation_memory_budget < 1``
    the partitioner recomputes custom ops too, from the advanced generator; keep the default budget (1.0)
    for compiled steps with attention dropout.
    """
    return seed.reshape(1).clone()


@dropout_seed_op.register_fake
def _dropout_seed_fake(seed: Tensor) -> Tensor:
    return seed.new_empty((1,))


def _call_seed(seed: Any, dropout_p: float, device: torch.device) -> Tensor | None:
    """The seed tensor of one call (None without dropout): a fresh copy of the explicit seed, or the
    generator's current value, after which the generator advances (on the device, no host read)."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"prefix_attention: a tensor seed must be int64 with one element, got {seed.dtype} {tuple(seed.shape)}"
            )
        if seed.device != device:
            raise ValueError(f"prefix_attention: the seed tensor is on {seed.device}, q on {device}")
        return dropout_seed_op(seed) if dropout_p > 0 else None
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
        raise ValueError(f"prefix_attention: seed must be an int in [0, 2**31), an int64 tensor or None, got {seed!r}")
    if not dropout_p > 0:
        return None
    if seed is not None:
        return torch.full((1,), seed, dtype=torch.int64, device=device)
    state = dropout_generator(device)
    value = dropout_seed_op(state)
    state.add_(1)
    return value


# ----------------------------------------------------------------------------------------------------
# Triton backend: custom ops


def deterministic_kernels() -> bool:
    """Whether the backward and double backward must run their deterministic (atomic-free) kernels.

    Follows torch's switch: ``torch.use_deterministic_algorithms(True)`` selects the split kernels that
    recompute the query side in a pass of its own; otherwise the kernels may accumulate the query-side
    gradients with fp32/fp64 atomics (fewer FLOPs, run-to-run bit differences on a GPU). The interpreter
    runs programs one after another, so on CPU both paths are deterministic and both are tested.
    """
    return torch.are_deterministic_algorithms_enabled()


def _lse_shape(q: Tensor, cu_seqlens_q: Tensor | None) -> tuple[int, ...]:
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("gradmem_fast::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the module docstring's formula; ``window = 0`` means none, ``max_seqlen < 0`` derive."""
    from gradmem_fast.kernels import attention as kernels

    return kernels.attention_fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        seed=seed,
        window=window or None,
        fp32_precision=fp32_precision,
        softcap=softcap,
    )


@attention_fwd_op.register_fake
def _attention_fwd_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("gradmem_fast::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``<dout, out> + <dlse, lse>``.

    With ``delta_i = dout_i . out_i - dlse_i`` the formulas of kernels/attention_bwd.py apply unchanged,
    because d lse_i / d s_ij = P_ij (with ``softcap`` dS is taken times ``1 - (s/c)^2`` before dq and dk).
    dq comes from fp32 atomics inside the dK/dV kernel (5 GEMM units)
    unless ``torch.use_deterministic_algorithms(True)`` asks for the split kernels (7 units, reproducible
    bit for bit): ``deterministic_kernels``.
    """
    from gradmem_fast.kernels import attention as kernels

    delta = kernels.attention_bwd_preprocess(out, dout, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    return kernels.attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        seed=seed,
        window=window or None,
        fp32_precision=fp32_precision,
        softcap=softcap,
        delta=delta,
        deterministic=deterministic_kernels(),
    )


@attention_bwd_op.register_fake
def _attention_bwd_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("gradmem_fast::attention_dbwd", mutates_args=())
def attention_dbwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    grad_dq: Tensor,
    grad_dk: Tensor,
    grad_dv: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Double backward: the gradients of ``<grad_dq, dq> + <grad_dk, dk> + <grad_dv, dv>``, where
    ``(dq, dk, dv) = attention_bwd(dout, q, k, v, out, lse, dlse)``, with respect to
    ``(q, k, v, dout, dlse)``, the dependence of ``out = O(q, k, v)`` and ``lse`` on ``q, k, v`` included.

    Per pair ``(i, j)`` with ``P`` the softmax, ``z r`` the dropout keep mask over ``1 - p``,
    ``delta_i = dout_i . out_i - dlse_i``::

        dP_ij = z_ij r dout_i . v_j,       dS_ij = P_ij (dP_ij - delta_i)
        B_ij  = scale (grad_dq_i . k_j + q_i . grad_dk_j),   C_ij = z_ij r dout_i . grad_dv_j
        beta_i = sum_j P_ij B_ij,          psi_i = sum_j P_ij ((dP_ij - delta_i) B_ij + C_ij) - beta_i dlse_i
        G_ij  = P_ij ((dP_ij - delta_i)(B_ij - beta_i) + C_ij - psi_i),   W_ij = z_ij r P_ij (B_ij - beta_i)
        grad q_i    = scale sum_j (dS_ij grad_dk_j + G_ij k_j)
        grad k_j    = scale sum_i (dS_ij grad_dq_i + G_ij q_i)
        grad v_j    = sum_i W_ij dout_i
        grad dout_i = sum_j (W_ij v_j + z_ij r P_ij grad_dv_j)
        grad dlse_i = beta_i

    (derivation in kernels/attention_dbwd.py; with ``softcap`` B is taken times the cap's slope and the q/k
    gradients carry the cap's chain rule and curvature term, as its soft-capping paragraph derives). Triton
    kernels, recomputing every score tile from q, k and
    ``lse``; memory O(S). Returns ``(grad_q, grad_k, grad_v, grad_dout, grad_dlse)``. Not differentiable
    itself (third order is not supported). grad q is accumulated with fp32 atomics inside the key pass
    (15 GEMM units) unless ``torch.use_deterministic_algorithms(True)`` asks for the atomic-free path (a
    grad-q pass of its own, 20 units, reproducible bit for bit): ``deterministic_kernels``.
    """
    from gradmem_fast.kernels import attention as kernels

    return kernels.attention_dbwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        grad_dq,
        grad_dk,
        grad_dv,
        dlse=dlse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        seed=seed,
        window=window or None,
        fp32_precision=fp32_precision,
        softcap=softcap,
        deterministic=deterministic_kernels(),
    )


@attention_dbwd_op.register_fake
def _attention_dbwd_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    grad_dq: Tensor,
    grad_dk: Tensor,
    grad_dv: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    window: int,
    fp32_precision: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(q.shape),
        lse.new_empty(lse.shape),
    )


_BWD_ARGS = (
    "dout",
    "q",
    "k",
    "v",
    "out",
    "lse",
    "dlse",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "key_padding_mask",
    "causal",
    "scale",
    "dropout_p",
    "seed",
    "window",
    "fp32_precision",
    "softcap",
)
_OPTIONS = ("max_seqlen_q", "max_seqlen_k", "causal", "scale", "dropout_p", "window", "fp32_precision", "softcap")


def _bwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    args = dict(zip(_BWD_ARGS, inputs))
    ctx.save_for_backward(
        *(
            args[name]
            for name in (
                "dout",
                "q",
                "k",
                "v",
                "out",
                "lse",
                "dlse",
                "cu_seqlens_q",
                "cu_seqlens_k",
                "key_padding_mask",
                "seed",
            )
        )
    )
    ctx.options = {name: args[name] for name in _OPTIONS}
    ctx.has_dlse = args["dlse"] is not None


def _bwd_backward(
    ctx: Any, grad_dq: Tensor | None, grad_dk: Tensor | None, grad_dv: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Autograd of ``attention_bwd``: its differentiable inputs are ``q, k, v, dout, dlse``.

    ``out`` and ``lse`` get no gradient here on purpose: they are the forward's outputs, and their
    dependence on ``q, k, v`` is already inside the double-backward formulas (returning a gradient for them
    as well would count that path twice). The forward's autograd always passes its own outputs.
    """
    dout, q, k, v, out, lse, dlse, cu_q, cu_k, kpm, seed = ctx.saved_tensors
    if grad_dq is None and grad_dk is None and grad_dv is None:
        return (None,) * len(_BWD_ARGS)
    grad_dq = torch.zeros_like(q) if grad_dq is None else grad_dq
    grad_dk = torch.zeros_like(k) if grad_dk is None else grad_dk
    grad_dv = torch.zeros_like(v) if grad_dv is None else grad_dv
    o = ctx.options
    gq, gk, gv, gdout, gdlse = attention_dbwd_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        grad_dq,
        grad_dk,
        grad_dv,
        cu_q,
        cu_k,
        o["max_seqlen_q"],
        o["max_seqlen_k"],
        kpm,
        o["causal"],
        o["scale"],
        o["dropout_p"],
        seed,
        o["window"],
        o["fp32_precision"],
        o["softcap"],
    )
    return (gdout, gq, gk, gv, None, None, gdlse if ctx.has_dlse else None) + (None,) * (len(_BWD_ARGS) - 7)


attention_bwd_op.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


_FWD_ARGS = (
    "q",
    "k",
    "v",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "key_padding_mask",
    "causal",
    "scale",
    "dropout_p",
    "seed",
    "window",
    "fp32_precision",
    "softcap",
)


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    # The seed tensor is saved, not its number: the backward kernels read the forward's value on the device.
    ctx.save_for_backward(
        args["q"],
        args["k"],
        args["v"],
        out,
        lse,
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
        args["key_padding_mask"],
        args["seed"],
    )
    ctx.options = {name: args[name] for name in _OPTIONS}


def _fwd_backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, cu_q, cu_k, kpm, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        cu_q,
        cu_k,
        ctx.options["max_seqlen_q"],
        ctx.options["max_seqlen_k"],
        kpm,
        ctx.options["causal"],
        ctx.options["scale"],
        ctx.options["dropout_p"],
        seed,
        ctx.options["window"],
        ctx.options["fp32_precision"],
        ctx.options["softcap"],
    )
    return (dq, dk, dv) + (None,) * (len(_FWD_ARGS) - 3)


attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ----------------------------------------------------------------------------------------------------
# Torch backend: the reference (plain differentiable torch, double-differentiable, materialises scores)


def _visible(lq: int, lk: int, causal: bool, window: int | None, device: torch.device) -> Tensor:
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= i + (lk - lq))
    if window is not None:
        vis = vis & (j > i + (lk - lq) - window)
    return vis


def _reference_padded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    window: int | None,
    visible: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    batch, lq, hq, d = q.shape
    lk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    compute = _acc_dtype(q.dtype)
    qg = q.to(compute).reshape(batch, lq, hkv, group, d)
    s = torch.einsum("bihgd,bjhd->bhgij", qg, k.to(compute)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)  # capped before any mask, as Gemma 2's eager attention does
    vis = _visible(lq, lk, causal, window, q.device)[None, None, None] if visible is None else visible
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.bool()[:, None, None, None, :]
    if sinks is not None:
        # The sink column is one more finite logit per row: logsumexp is finite for every row, so the
        # masked scores can be -inf outright (a row with no visible key gets lse = sink, out = 0).
        s = s.masked_fill(~vis, float("-inf"))
        sink = sinks.to(compute).reshape(1, hkv, group, 1, 1).expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, sink], -1), -1, keepdim=True)
        row_has = torch.ones_like(vis[..., :1])
    else:
        row_has = vis.any(-1, keepdim=True)
        # Rows with no visible key keep their raw scores so logsumexp stays finite (no NaN in the gradient);
        # their probabilities are then zeroed by the mask.
        s = s.masked_fill(~(vis | ~row_has), float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * vis
    if dropout_p > 0:
        gen = torch.Generator(device=q.device).manual_seed(int(seed))
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    out = torch.einsum("bhgij,bjhd->bihgd", p, v.to(compute)).reshape(batch, lq, hq, dv)
    lse = lse.squeeze(-1).masked_fill(~row_has.squeeze(-1), float("-inf")).reshape(batch, hq, lq)
    return out.to(q.dtype), lse


def _reference_packed_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    window: int | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The packed layout without host reads (for tracing): query i of document b sees key j when j is in
    document b and ``visible(i - cu_q[b], j - cu_k[b])`` holds with ``diag = Lk_b - Lq_b``. O(Tq * Tk)
    memory, so only for small compiled problems (tests, the CPU backend). No dropout: its reference mask
    is drawn per document from a seeded generator, which a traced graph cannot reproduce."""
    if dropout_p > 0:
        raise NotImplementedError(
            "prefix_attention: the torch backend has no compiled dropout; use "
            "backend='triton' or dropout_p=0 under torch.compile"
        )
    tq, tk = q.shape[0], k.shape[0]
    doc_q = torch.searchsorted(cu_q, torch.arange(tq, device=q.device, dtype=cu_q.dtype), right=True) - 1
    doc_k = torch.searchsorted(cu_k, torch.arange(tk, device=q.device, dtype=cu_k.dtype), right=True) - 1
    i = torch.arange(tq, device=q.device) - cu_q[doc_q]
    j = torch.arange(tk, device=q.device) - cu_k[doc_k]
    diag = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1]))[doc_q]
    vis = doc_q[:, None] == doc_k[None, :]
    if causal:
        vis = vis & (j[None, :] <= (i + diag)[:, None])
    if window is not None:
        vis = vis & (j[None, :] > (i + diag - window)[:, None])
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.bool()[None, :]
    out, lse = _reference_padded(
        q[None],
        k[None],
        v[None],
        None,
        False,
        scale,
        0.0,
        0,
        None,
        visible=vis[None, None, None],
        softcap=softcap,
        sinks=sinks,
    )
    return out[0], lse[0]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = 0,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch backend: (out, lse) by the module docstring's formula, computed densely per sequence.

    Plain differentiable torch (any order of derivative, sinks included); the value head dim may differ
    from the query/key head dim here.

    Dropout draws its keep mask from ``torch.rand`` with a generator seeded by the low 32 bits of ``seed``
    (deterministic, but not the Triton kernels' Philox stream). A tensor ``seed`` is read back to the host
    (a synchronisation on a GPU: this backend is the eager reference), so dropout is not traceable here.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if isinstance(seed, Tensor):
        if dropout_p > 0 and torch.compiler.is_compiling():
            raise NotImplementedError(
                "prefix_attention: the torch backend has no compiled dropout (its mask comes from a host "
                "generator); use backend='triton' or dropout_p=0 under torch.compile"
            )
        seed = int(seed.reshape(-1)[0]) & 0xFFFFFFFF if dropout_p > 0 else 0
    seed = 0 if seed is None else seed
    if cu_seqlens_q is None:
        return _reference_padded(
            q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap=softcap, sinks=sinks
        )
    assert cu_seqlens_k is not None, "attention_reference: cu_seqlens_q and cu_seqlens_k come together"
    if torch.compiler.is_compiling():
        # The per-document loop below reads the offsets on the host (a graph break); traced, the packed
        # layout is one dense [Tq, Tk] problem whose mask keeps each query inside its own document.
        return _reference_packed_dense(
            q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, causal, scale, dropout_p, window, softcap, sinks
        )
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        kpm = None if key_padding_mask is None else key_padding_mask[ck[b] : ck[b + 1]][None]
        o, lse = _reference_padded(
            q[None, cq[b] : cq[b + 1]],
            k[None, ck[b] : ck[b + 1]],
            v[None, ck[b] : ck[b + 1]],
            kpm,
            causal,
            scale,
            dropout_p,
            seed + b,
            window,
            softcap=softcap,
            sinks=sinks,
        )
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros((0,) + tuple(q.shape[1:-1]) + (v.shape[-1],))
    lse = torch.cat(lses, 1) if lses else q.new_zeros((q.shape[1], 0), dtype=_acc_dtype(q.dtype))
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Public op


@torch.compiler.assume_constant_result  # a global setting: read when tracing, a constant in the graph
def _default_fp32_precision() -> str:
    """Follow torch's own fp32 matmul policy, so fp32 attention matches what eager matmuls would do."""
    matmul = torch.backends.cuda.matmul
    policy = getattr(matmul, "fp32_precision", "none")
    if policy in ("ieee", "tf32"):
        return policy
    return "tf32" if matmul.allow_tf32 else "ieee"


@overload
def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_q: int | None = ...,
    max_seqlen_k: int | None = ...,
    key_padding_mask: Tensor | None = ...,
    causal: bool = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    window: int | None = ...,
    seed: int | Tensor | None = ...,
    return_lse: Literal[False] = ...,
    fp32_precision: str | None = ...,
    backend: str = ...,
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> Tensor: ...


@overload
def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_q: int | None = ...,
    max_seqlen_k: int | None = ...,
    key_padding_mask: Tensor | None = ...,
    causal: bool = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    window: int | None = ...,
    seed: int | Tensor | None = ...,
    return_lse: Literal[True],
    fp32_precision: str | None = ...,
    backend: str = ...,
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: int | None = None,
    seed: int | Tensor | None = None,
    return_lse: bool = False,
    fp32_precision: str | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention of packed or padded sequences (formula in the module docstring).

    Layouts: packed ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q/k`` (int32 ``[B+1]``,
    FlashAttention convention, ending at Tq/Tk; checked on CPU only, as the check would sync a GPU;
    ``max_seqlen_q/k`` optional, derived when omitted), or padded
    ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` with an optional ``key_padding_mask [B, Sk]`` (nonzero =
    keep; in the packed layout a ``[Tk]`` mask). ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA, no K/V
    copies). ``causal`` aligns the diagonal bottom-right (``Lk > Lq``: the queries follow a cached prefix).
    ``window`` (causal only): each query sees its last ``window`` keys. ``dropout_p``: attention dropout
    with a Philox mask derived from ``seed``: None (default) takes the next seed of the device's dropout
    generator (``dropout_generator``; on the device, so compiled and graph-replayed calls get a fresh mask
    each time); an int in [0, 2**31) or an int64 tensor of one element on q's device is that seed (the same
    value gives the same mask; a tensor is read on the device, the torch backend reads it back).
    ``fp32_precision``
    (fp32 inputs on a GPU): ``"ieee"`` (exact fp32 dots on CUDA cores, small tiles, slower) or ``"tf32"``
    (tensor cores, ~1e-3 relative per dot); None follows ``torch.backends.cuda.matmul`` (``fp32_precision``
    / ``allow_tf32``), i.e. IEEE unless TF32 was enabled, as for eager matmuls.

    ``softcap`` (None or 0: off; else a finite float > 0): scores become ``softcap * tanh(s / softcap)``
    before any mask (Gemma 2). ``sinks`` (``[Hq]``, one logit per query head, may require grad; GPT-OSS's
    ``s_aux``): an extra softmax column per row with that logit and no value. Formulas in the module
    docstring; both work with every other option, on both backends, to second order.

    Returns ``out`` shaped like ``q`` (q's dtype; with v's head dim, which may differ from q's on the torch
    backend only), or ``(out, lse)`` with ``return_lse``: the natural log-sum-exp per query (the sink term
    included), ``[Hq, Tq]`` packed or ``[B, Hq, Sq]`` padded (fp32; fp64 for fp64 inputs), -inf for a
    query that sees no key and has no sink (its output is 0). Differentiable in q, k, v and sinks (and
    through ``lse``).
    """
    _check_args(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        window,
        fp32_precision,
        softcap,
        sinks,
    )
    softcap = float(softcap) if softcap else 0.0
    dropout_p = float(dropout_p)
    seed = _call_seed(seed, dropout_p, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if fp32_precision is None:
        fp32_precision = _default_fp32_precision()
    chosen = resolve_backend(backend, q.device)
    if chosen == "torch":
        out, lse = attention_reference(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            key_padding_mask=key_padding_mask,
            causal=causal,
            scale=scale,
            dropout_p=dropout_p,
            seed=seed,
            window=window,
            softcap=softcap or None,
            sinks=sinks,
        )
    else:
        if v.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"prefix_attention: the Triton backend needs one head dim for q, k and v; got q/k "
                f"{q.shape[-1]} and v {v.shape[-1]} (MLA-style value head dims run on backend='torch')"
            )
        if q.dtype == torch.float64 and q.device.type == "cuda":
            raise TypeError(
                "prefix_attention: float64 runs on the Triton backend only under the interpreter "
                "(CPU tensors); use backend='torch' for float64 on a GPU"
            )
        out, lse = attention_fwd_op(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            -1 if max_seqlen_q is None else int(max_seqlen_q),
            -1 if max_seqlen_k is None else int(max_seqlen_k),
            key_padding_mask,
            causal,
            scale,
            dropout_p,
            seed,
            int(window or 0),
            fp32_precision,
            softcap,
        )
        if sinks is not None:
            out, lse = _add_sinks(out, lse, sinks, cu_seqlens_q is not None)
    return (out, lse) if return_lse else out


def _add_sinks(out: Tensor, lse: Tensor, sinks: Tensor, packed: bool) -> tuple[Tensor, Tensor]:
    """The sink column on top of sink-free attention, ``(out * exp(lse - lse'), lse')`` with
    ``lse' = logaddexp(lse, sink_h)``: the sink adds exp(sink_h) to each row's normaliser and nothing to
    its numerator, so the sink-free output only shrinks by ``exp(lse - lse')`` (0 for a row with no
    visible key, whose lse is -inf). Plain torch on the kernels' outputs: autograd derives every order from
    the kernels' own backward and double backward (the sink's gradients, ``d sink_h = -sum_i exp(sink_h -
    lse'_i) delta_i``, included), for two elementwise passes over ``out``."""
    sink = sinks.to(lse.dtype)
    sink = sink[:, None] if packed else sink[None, :, None]  # lse is [Hq, Tq] or [B, Hq, Sq]
    sink = sink.expand_as(lse)
    # logaddexp by hand around a detached shift (the result does not depend on it): torch.logaddexp's own
    # double backward is NaN where lse = -inf, exp(lse - shift) is 0 there to every order
    shift = torch.maximum(lse, sink).detach()
    new_lse = shift + torch.log(torch.exp(lse - shift) + torch.exp(sink - shift))
    shrink = torch.exp(lse - new_lse)
    shrink = shrink.transpose(0, 1) if packed else shrink.transpose(1, 2)  # -> token-major, like out
    # in out's dtype: the product then saves the kernels' own output (already held for their backward) and the
    # [tokens, heads] factor, no upcast copy of out
    return out * shrink.to(out.dtype)[..., None], new_lse
