"""FLOP counts of a GradMem WRITE step, for throughput and MFU (model FLOPs utilisation) figures.

One WRITE step on a batch of documents = the forward pass over ``[M_b ; E(c_b)]`` plus the backward pass
that produces the gradient with respect to the memory only (input gradients; the frozen weights get no
gradient). Only matrix products are counted (2 FLOPs per multiply-add); norms, activations, softmax, the
cross-entropy's elementwise work and the update are ignored, as in the usual MFU convention. Recomputation
that an implementation may do (a flash-attention backward recomputing ``QK^T``) is not counted: these are
the *useful* FLOPs, the same number for every implementation, so MFU compares them fairly.

Notation, per model: ``L`` layers, hidden size ``d``, ``Hq`` query heads and ``Hkv`` key/value heads of
head dim ``Dh``, MLP width ``I`` with ``k_mlp = 3`` matrices for a gated MLP (Llama, Mistral, Qwen2:
gate, up, down) or ``k_mlp = 2`` otherwise (GPT-2, GPT-NeoX), vocabulary ``V``. Per document ``b`` with
``n_b`` context tokens and ``m`` memory vectors, the backbone runs on ``T_b = m + n_b`` positions and the
head on the ``n_b`` loss positions ``m-1 .. m+n_b-2``.

    linear per token   c_lin = 2 d (Hq Dh + 2 Hkv Dh) + 2 Hq Dh d + 2 k_mlp d I     (QKV, output, MLP)
    attention pairs    P_b   = T_b (T_b + 1) / 2                                     (causal: key j <= query i)
    forward            F_b   = L (T_b c_lin + 4 Hq Dh P_b) + 2 d V n_b              (QK^T and PV: 2 Dh each)
    input backward     B_b   = L (T_b c_lin + 8 Hq Dh P_b) + 2 d V n_b              (dX = dY W^T for each
                                                                                      linear; dP, dS->dQ,
                                                                                      dK, dV: 4 products)
    one WRITE step     sum_b (F_b + B_b)
                     = sum_b [ 2 L T_b c_lin + 12 L Hq Dh P_b + 4 d V n_b ]

A K-step write costs ``K`` times that. ``attention_pairs="full"`` counts ``T_b^2`` pairs instead of
``P_b`` (what an eager implementation that masks a full score matrix multiplies); that variant matches
``torch.utils.flop_counter`` on the eager reference exactly and is what the tests check.

``attention_flops`` is the other kind of count: the FLOPs our attention kernels *execute*, recomputation
included, per call of the forward, the backward and the double backward (the second-order WRITE's extra
attention work). Unit ``U = 2 Hq Dh P`` (one ``Lq x Lk x Dh`` matrix product over the ``P`` visible pairs);
the kernel docstrings derive the counts::

    forward                      2 U     S = q k^T, O = P v
    backward, split kernels      7 U     dK/dV kernel: S, dP, dV, dK (4); dQ kernel: S, dP, dQ (3)
    backward, atomic dQ          5 U     dK/dV kernel adds dQ = dS k by atomics: S, dP, dV, dK, dQ
    double backward, split      20 U     row pass 5 (S, B = 2, P (B - c) v, P gV); grad-q pass 7 (S, dP, B,
                                         C = 5, dS gK, G k); key pass 8 (S, dP, B, C, dS^T gQ + G^T q, W^T dO)
    double backward, fused      15 U     row pass 5; key pass with grad q by atomics 10

``deterministic=True`` (``torch.use_deterministic_algorithms(True)``) selects the split kernels of both.
Double backward over forward + backward: fused 15 / 7 = 2.14 (15 / 9 = 1.67 against the split backward);
split 20 / 9 = 2.22.
"""

import dataclasses
from collections.abc import Iterable

__all__ = [
    "ModelShape",
    "model_shape",
    "write_step_flops",
    "write_step_breakdown",
    "write_flops",
    "visible_pairs",
    "attention_flops",
    "ATTENTION_KERNEL_UNITS",
]

# GEMM units per call of our attention kernels (module docstring), split (deterministic) / atomic paths.
ATTENTION_KERNEL_UNITS = {
    "fwd": {True: 2, False: 2},
    "bwd": {True: 7, False: 5},
    "dbwd": {True: 20, False: 15},
}

# Model families whose MLP has three matrices (gate, up, down).
GATED_MLP_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "cohere",
        "granite",
        "smollm3",
    }
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that the FLOP count needs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool

    def linear_flops_per_token(self) -> int:
        """``c_lin`` of the module docstring: all projections of one layer for one token (forward)."""
        d, hq, hkv, dh = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        k_mlp = 3 if self.gated_mlp else 2
        return 2 * d * (hq * dh + 2 * hkv * dh) + 2 * hq * dh * d + 2 * k_mlp * d * self.intermediate_size


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(config_or_model, *, gated_mlp: bool | None = None) -> ModelShape:
    """``ModelShape`` of a Hugging Face config, a model (its ``.config``) or a ``ModelShape``.

    ``gated_mlp`` overrides the detection (a model is gated when it has a ``gate_proj``/``gate_up_proj``
    submodule; a config when its ``model_type`` is one of ``GATED_MLP_TYPES``).
    """
    if isinstance(config_or_model, ModelShape):
        return config_or_model if gated_mlp is None else dataclasses.replace(config_or_model, gated_mlp=gated_mlp)
    config = getattr(config_or_model, "config", config_or_model)
    if gated_mlp is None:
        named_modules = getattr(config_or_model, "named_modules", None)
        if callable(named_modules):
            gated_mlp = any(name.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj") for name, _ in named_modules())
        else:
            gated_mlp = getattr(config, "model_type", "") in GATED_MLP_TYPES
    d = int(_first(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=d // heads))
    inter = _first(config, "intermediate_size", "n_inner", "ffn_dim")
    inter = int(inter) if inter is not None else 4 * d
    vocab = int(_first(config, "vocab_size"))
    return ModelShape(d, layers, heads, kv_heads, head_dim, inter, vocab, bool(gated_mlp))


def _lengths(lengths) -> list:
    if hasattr(lengths, "tolist"):
        lengths = lengths.tolist()
    out = [int(n) for n in lengths]
    if any(n < 0 for n in out):
        raise ValueError(f"lengths must be >= 0, got {out}")
    return out


def write_step_breakdown(
    config,
    lengths: Iterable[int],
    num_memory_tokens: int,
    *,
    vocab_size: int | None = None,
    attention_pairs: str = "causal",
) -> dict:
    """FLOPs of one WRITE step split into ``linear``, ``attention`` and ``head`` (plus ``total``).

    ``lengths``: context tokens per document (a list or a 1-D tensor, e.g. ``attention_mask.sum(1)``).
    ``vocab_size`` overrides the model's (a separate write head). ``attention_pairs``: ``"causal"``
    (the useful count, default) or ``"full"`` (``T^2`` pairs, what eager attention multiplies).
    """
    if attention_pairs not in ("causal", "full"):
        raise ValueError(f"attention_pairs must be 'causal' or 'full', got {attention_pairs!r}")
    if int(num_memory_tokens) < 0:
        raise ValueError(f"num_memory_tokens must be >= 0, got {num_memory_tokens}")
    shape = model_shape(config)
    vocab = shape.vocab_size if vocab_size is None else int(vocab_size)
    m = int(num_memory_tokens)
    L, hq, dh, d = shape.num_layers, shape.num_heads, shape.head_dim, shape.hidden_size
    c_lin = shape.linear_flops_per_token()
    linear = attention = head = 0
    for n in _lengths(lengths):
        t = m + n
        pairs = t * (t + 1) // 2 if attention_pairs == "causal" else t * t
        linear += 2 * L * t * c_lin  # forward + input-gradient backward, 1x each
        attention += 12 * L * hq * dh * pairs  # forward 4 Hq Dh P, backward 8 Hq Dh P
        head += 4 * d * vocab * n  # logits forward + d hidden backward
    return {"linear": linear, "attention": attention, "head": head, "total": linear + attention + head}


def write_step_flops(
    config,
    lengths: Iterable[int],
    num_memory_tokens: int,
    *,
    vocab_size: int | None = None,
    attention_pairs: str = "causal",
) -> int:
    """Useful FLOPs of one WRITE step (forward + memory-gradient backward) over a batch of documents.

    ``config``: a Hugging Face config, a model, or a ``ModelShape``; ``lengths``: context tokens per
    document; ``num_memory_tokens``: m. The formula is in the module docstring:
    ``sum_b [2 L T_b c_lin + 12 L Hq Dh T_b (T_b + 1) / 2 + 4 d V n_b]`` with ``T_b = m + n_b``.
    """
    return write_step_breakdown(
        config, lengths, num_memory_tokens, vocab_size=vocab_size, attention_pairs=attention_pairs
    )["total"]


def write_flops(config, lengths: Iterable[int], num_memory_tokens: int, steps: int, **kwargs) -> int:
    """FLOPs of a whole ``steps``-step WRITE: ``steps * write_step_flops(...)``."""
    return int(steps) * write_step_flops(config, lengths, num_memory_tokens, **kwargs)


def visible_pairs(lq: int, lk: int, causal: bool = True, window: int | None = None) -> int:
    """(query, key) pairs the prefix attention computes for ``lq`` queries and ``lk`` keys: query ``i`` sees
    key ``j`` iff ``j <= i + lk - lq`` (causal, bottom-right aligned) and ``j > i + lk - lq - window``."""
    lq, lk = int(lq), int(lk)
    if lq < 0 or lk < 0:
        raise ValueError(f"lengths must be >= 0, got lq={lq}, lk={lk}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if not causal and window is None:
        return lq * lk
    diag = lk - lq
    total = 0
    for i in range(lq):
        hi = min(lk, i + diag + 1) if causal else lk
        lo = 0 if window is None else max(0, i + diag - int(window) + 1)
        total += max(0, hi - lo)
    return total


def attention_flops(
    lengths_q: Iterable[int],
    lengths_k: Iterable[int] | None = None,
    *,
    num_heads: int,
    head_dim: int,
    causal: bool = True,
    window: int | None = None,
    deterministic: bool = False,
) -> dict:
    """FLOPs our attention kernels execute for one call over documents of ``lengths_q`` queries and
    ``lengths_k`` keys (default: the same), ``num_heads`` query heads of ``head_dim``: a dict with ``fwd``,
    ``bwd`` and ``dbwd`` (the double backward), ``pairs`` (visible pairs per head) and ``unit``
    (``2 num_heads head_dim pairs``). ``deterministic`` picks the split kernels (torch's deterministic mode)
    instead of the atomic ones; the unit counts are in the module docstring and ``ATTENTION_KERNEL_UNITS``.
    """
    lq = _lengths(lengths_q)
    lk = lq if lengths_k is None else _lengths(lengths_k)
    if len(lq) != len(lk):
        raise ValueError(f"lengths_q and lengths_k must have the same number of documents, got {len(lq)} and {len(lk)}")
    pairs = sum(visible_pairs(a, b, causal, window) for a, b in zip(lq, lk))
    unit = 2 * int(num_heads) * int(head_dim) * pairs
    counts = {name: units[bool(deterministic)] * unit for name, units in ATTENTION_KERNEL_UNITS.items()}
    return {**counts, "pairs": pairs, "unit": unit}
