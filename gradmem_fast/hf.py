"""Hugging Face glue: finding a causal LM's parts, and (below) the attention registry entries.

Models are reached only through public APIs: ``get_input_embeddings``, ``get_output_embeddings`` and
``base_model``; no model class is patched.
"""

import torch
from torch import nn

# Config attributes that post-process logits after the output head; a write loss computed from
# ``hidden @ head.T`` would silently differ from the model's logits for such models, so they are rejected.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def input_embeddings(model) -> nn.Module:
    """The token embedding module of ``model`` (raises a ValueError naming ``model`` when absent)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module) or getattr(emb, "weight", None) is None:
        raise ValueError(
            "model: expected a Hugging Face causal LM with input embeddings (get_input_embeddings() "
            f"returning an nn.Embedding), got {type(model).__name__}"
        )
    return emb


def output_head(model) -> nn.Module:
    """The output projection ``[V, d]`` of ``model`` (a ``nn.Linear``-like module with ``weight``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "weight", None) is None or head.weight.dim() != 2:
        raise ValueError(
            "model: expected a causal LM with an output head (get_output_embeddings() returning a "
            f"Linear of shape [vocab, hidden]); {type(model).__name__} has none — pass a write_head"
        )
    config = getattr(model, "config", None)
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise ValueError(
                f"model: its config sets {attr}={value!r}, which post-processes logits after the output "
                "head; this is not supported by gradmem-fast yet"
            )
    return head


def backbone(model) -> nn.Module:
    """The base transformer returning final (normalised) hidden states, e.g. ``GPT2Model``."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"model: expected a Hugging Face causal LM wrapping a base model, got {type(model).__name__}")
    return base


def hidden_size(model) -> int:
    return int(input_embeddings(model).weight.shape[1])


def backbone_hidden(model, inputs_embeds: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Final hidden states ``[B, T, d]`` of the backbone for ``inputs_embeds`` ``[B, T, d]``."""
    out = backbone(model)(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ----------------------------------------------------------------------------------------------------
# Attention registry entries: ``register_attention()`` makes ``attn_implementation="gradmem_fast"`` work.

ATTENTION_NAME = "gradmem_fast"  # must not contain "flash", "sdpa" or "flex": transformers special-cases those


def gradmem_fast_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    allow_is_causal_skip=True,
    **kwargs,
):
    """Mask function for ``AttentionMaskInterface``: the 2-D key padding mask ``[B, kv_length]`` or None.

    The causal structure (bottom-right aligned, and the sliding window, which arrives as an argument of the
    attention call) is applied inside the kernels, so no [q_length, kv_length] mask is ever built. Mask
    patterns that cannot be expressed that way (packed sequences detected from ``position_ids``, or custom
    or/and mask functions) are rejected instead of silently ignored.
    """
    from transformers.masking_utils import bidirectional_mask_function, prepare_padding_mask

    if (not allow_is_causal_skip and q_length > 1 and mask_function is not bidirectional_mask_function) or (
        kwargs.get("use_vmap", False)
    ):
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} supports causal/bidirectional masks with padding and sliding "
            "windows; this model call needs another mask pattern (packed sequences given by position_ids, or "
            "custom mask functions). Pass an attention_mask instead, or call gradmem_fast.prefix_attention "
            "with cu_seqlens for packed documents"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4-D mask; the attention function explains why it cannot take it
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return mask[:, kv_offset : kv_offset + kv_length].bool()


_DEFAULT_BACKEND = {"backend": "auto"}


def gradmem_fast_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, is_causal=None, **kwargs
):
    """``AttentionInterface`` entry: ``query [B, Hq, Sq, D]``, ``key/value [B, Hkv, Sk, D]`` -> ``([B, Sq, Hq,
    D], None)``, computed by ``gradmem_fast.prefix_attention`` on the padded layout with the key padding mask
    from ``gradmem_fast_mask`` (no copies: the kernels read the transposed views through their strides).

    Causality follows ``is_causal`` or ``module.is_causal`` (bottom-right aligned, which is what a KV cache
    needs); ``sliding_window`` is honoured. ``dropout`` (nonzero when the model is in training mode) takes its
    seed from the device's dropout generator (``ops.attention.dropout_generator``), which each call advances
    on the device: compiled and graph-replayed steps draw a new mask per call. Attention weights are never
    returned.
    """
    from gradmem_fast.ops.attention import prefix_attention

    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} takes the 2-D padding mask made by its own mask function; "
            f"got a {attention_mask.dim()}-D attention mask of shape {tuple(attention_mask.shape)} (a custom "
            "prepared mask). Pass a 2-D attention_mask [batch, seq] (1 = keep) instead"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = int(sliding_window) if sliding_window is not None and causal else None
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed_attention(query, key, value, scaling, dropout, causal, window, kwargs), None
    k_len = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != k_len:
        attention_mask = attention_mask[:, -k_len:]
    out = prefix_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        key_padding_mask=attention_mask,
        causal=bool(causal),
        scale=scaling,
        dropout_p=float(dropout or 0.0),
        window=window,
        backend=_DEFAULT_BACKEND["backend"],
    )
    return out, None


def _packed_attention(query, key, value, scaling, dropout, causal, window, kwargs):
    """Packed documents (FlashAttention-style ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments,
    as the write engine passes them): ``query [1, Hq, T, D]`` is one sequence of documents back to back.

    The documents are defined by the offsets alone: packing has no padding, so a 2-D padding mask that
    comes along (the engine passes all ones to keep transformers from inspecting ``position_ids``, a host
    synchronisation) is not applied. Lengths given as Python ints avoid any synchronisation here.
    """
    from gradmem_fast.ops.attention import prefix_attention

    if query.shape[0] != 1:
        raise ValueError(f"packed attention (cu_seq_lens_q given) needs batch size 1, got {query.shape[0]}")
    cu_q = kwargs["cu_seq_lens_q"].to(torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k.to(torch.int32)
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    out = prefix_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q if isinstance(max_q, int) else None,
        max_seqlen_k=max_k if isinstance(max_k, int) else None,
        causal=bool(causal),
        scale=scaling,
        dropout_p=float(dropout or 0.0),
        window=window,
        backend=_DEFAULT_BACKEND["backend"],
    )
    return out.unsqueeze(0)


def register_attention(backend: str = "auto") -> str:
    """Register ``"gradmem_fast"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Afterwards ``from_pretrained(..., attn_implementation="gradmem_fast")`` and
    ``model.set_attn_implementation("gradmem_fast")`` route attention through ``prefix_attention``.
    ``backend`` (``auto``/``triton``/``torch``) is the backend those calls use. Returns the name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from gradmem_fast.backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"register_attention: backend must be one of {BACKENDS}, got {backend!r}")
    _DEFAULT_BACKEND["backend"] = backend
    AttentionInterface.register(ATTENTION_NAME, gradmem_fast_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, gradmem_fast_mask)
    return ATTENTION_NAME
