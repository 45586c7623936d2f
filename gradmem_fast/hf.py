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
        raise ValueError(
            f"model: expected a Hugging Face causal LM wrapping a base model, got {type(model).__name__}"
        )
    return base


def hidden_size(model) -> int:
    return int(input_embeddings(model).weight.shape[1])


def backbone_hidden(model, inputs_embeds: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Final hidden states ``[B, T, d]`` of the backbone for ``inputs_embeds`` ``[B, T, d]``."""
    out = backbone(model)(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
