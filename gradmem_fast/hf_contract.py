"""What gradmem-fast computes for a Hugging Face model, and what it refuses: the contract in one place.

DESIGN.md, semantics item 9: a model is computed exactly as its own eager forward computes it, or refused
before any work with an error that names what is missing. Three gates live here:

1. ``attention_options(module, kwargs)``: every keyword argument transformers passes to an attention
   function is either honoured (returned as an option of ``prefix_attention``), known to leave the
   attention's result unchanged (bookkeeping for other implementations or for the caller), or refused with
   a ``ValueError`` naming the argument and the model. Nothing is swallowed by ``**kwargs``.
2. ``mask_pattern(mask_function)``: the registered mask function receives transformers' mask function; the
   kernels can express causal (bottom-right aligned), causal with a sliding window (the window itself
   arrives as the attention call's ``sliding_window``) and bidirectional masks, plus key padding. Any
   other pattern (chunked attention, packed sequences found from ``position_ids``, blockwise image tokens,
   custom or/and mask functions) is refused.
3. ``check_packed_engine(model)``: the write engine packs documents back to back in one sequence; only
   attention with our offsets keeps them apart. A model with any other sequence-mixing layer (recurrent,
   state-space, convolution, linear attention), declared in its config's layer types or found among its
   modules, is refused on the packed engine with the torch backend suggested (which runs each document in
   its own batch row).
"""

import re

from torch import nn

# Attention-call keywords the kernels implement (see gradmem_fast.hf.gradmem_fast_attention).
HONOURED = (
    "scaling",
    "dropout",
    "sliding_window",
    "is_causal",
    "softcap",
    "s_aux",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)

# Keywords that transformers forwards to every attention function but that do not change what attention
# computes: position ids (rotary is applied before the call; packed documents are given by cu_seq_lens),
# output flags of the model (output_attentions is checked separately), loss bookkeeping, cache bookkeeping,
# and FlashAttention's determinism flag (our deterministic choice is ops.attention.deterministic_kernels).
NO_EFFECT = frozenset(
    {
        "position_ids",
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "use_cache",
        "cache_position",
        "past_key_values",
        "past_key_value",
        "layer_idx",
        "return_dict",
        "deterministic",
        "position_embeddings",
        "token_type_ids",
    }
)


def model_name(module) -> str:
    """``ClassName (model_type)`` of an attention module or a model, for error messages."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    return f"{type(module).__name__}" + (f" (model_type {model_type!r})" if model_type else "")


# Attention modules whose result the kernels cannot reproduce from what the call gives them, found by the family
# matrix (tests/families.py): class name -> why.
UNSUPPORTED_ATTENTION = {
    # Its decoder self-attention is built with is_causal=False and takes its causality from the 4-D mask alone
    # (BART's decoder passes is_causal=True); the same class serves as cross-attention, so neither choice of
    # causality is right for every call.
    "BigBirdPegasusDecoderAttention": "declares is_causal=False and takes its causality from a 4-D mask only",
    # Dynamic mask attention: an additive bias computed from the hidden states, passed as a 4-D float mask.
    "DogeAttention": "adds a bias computed from the hidden states (dynamic mask attention) to the scores",
}


# Models whose attention reads a 4-D additive mask itself (a sparse indexer's top-k over the scores, a dynamic
# mask computed from the hidden states): the drop-in's 2-D padding mask cannot serve them, so the mask function
# refuses them by name instead of letting them fail inside their own code. Found by the family matrix.
MASK_READING_MODEL_TYPES = {"doge": "dynamic mask attention"}
MASK_READING_LAYER_TYPES = {"deepseek_sparse_attention": "the sparse attention indexer"}


def check_mask_consumer(config) -> None:
    """Raise ``ValueError`` when ``config``'s model reads the attention mask as a 4-D tensor itself."""
    if config is None:
        return
    why = MASK_READING_MODEL_TYPES.get(getattr(config, "model_type", None))
    for kind in getattr(config, "layer_types", None) or ():
        why = why or MASK_READING_LAYER_TYPES.get(kind)
    if why:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', None)!r}: {why} reads the 4-D attention mask itself, which "
            "attn_implementation='gradmem_fast' does not build (it passes a 2-D padding mask to its kernels); use "
            "attn_implementation='eager' and backend='torch'"
        )


def check_attention_module(module) -> None:
    """Raise ``ValueError`` for an attention module listed in ``UNSUPPORTED_ATTENTION``."""
    why = UNSUPPORTED_ATTENTION.get(type(module).__name__)
    if why is not None:
        raise ValueError(
            f"{model_name(module)}: this attention {why}, which attn_implementation='gradmem_fast' and the write "
            "engine do not implement; use attn_implementation='eager' and backend='torch'"
        )


def attention_options(module, kwargs: dict) -> dict:
    """The attention call's keyword arguments, checked: returns the honoured ones (absent ones omitted).

    Raises ``ValueError`` naming the argument and ``module``'s model for any keyword that would change the
    result and that the kernels do not implement (e.g. a relative position bias, sparse indices).
    """
    honoured = {}
    for name, value in kwargs.items():
        if name in HONOURED:
            honoured[name] = value
        elif name == "output_attentions":
            if value:
                raise ValueError(
                    f"output_attentions=True ({model_name(module)}): attn_implementation='gradmem_fast' never "
                    "materialises attention weights; use attn_implementation='eager' to get them"
                )
        elif name == "seq_idx":
            if value is not None and kwargs.get("cu_seq_lens_q") is None:
                raise ValueError(
                    f"seq_idx ({model_name(module)}): packed sequences given by seq_idx alone are not supported "
                    "by attn_implementation='gradmem_fast'; pass cu_seq_lens_q/k (FlashAttention convention)"
                )
        elif name in NO_EFFECT or value is None:
            continue
        else:
            raise ValueError(
                f"{name} ({model_name(module)}): this attention argument is not implemented by "
                "attn_implementation='gradmem_fast', and ignoring it would compute a different attention; "
                "use attn_implementation='eager' (or 'sdpa') for this model"
            )
    return honoured


# ----------------------------------------------------------------------------------------------------
# Mask functions


def _closure_values(fn) -> list:
    cells = getattr(fn, "__closure__", None) or ()
    values = []
    for cell in cells:
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _mask_parts(fn) -> list:
    """``(name, closure variables)`` of the leaf mask functions of an ``and_masks`` composition (an
    ``or_masks`` or a custom function is one leaf, named by its qualified name)."""
    qualname = getattr(fn, "__qualname__", "")
    if qualname.startswith("and_masks."):
        parts = []
        for value in _closure_values(fn):
            if isinstance(value, (tuple, list)):
                for inner in value:
                    parts.extend(_mask_parts(inner))
        return parts
    name = qualname.split(".<locals>")[0]
    code = getattr(fn, "__code__", None)
    free = dict(zip(code.co_freevars, _closure_values(fn))) if code is not None else {}
    return [(name, free)]


_SUPPORTED_MASKS = {
    ("causal_mask_function",): "causal",
    ("bidirectional_mask_function",): "bidirectional",
    ("causal_mask_function", "sliding_window_overlay"): "sliding",
    ("causal_mask_function", "chunked_overlay"): "chunked",
}


def mask_pattern(mask_function) -> tuple[str, int | None]:
    """``(pattern, chunk size)`` for the mask functions the kernels can express: ``"causal"``, ``"sliding"``
    (the window arrives as the attention call's ``sliding_window``), ``"bidirectional"``, or ``"chunked"``
    (Llama 4's chunked attention, with its chunk size: exact only while a row fits in one chunk, which the
    caller checks).

    Raises ``ValueError`` naming the pattern otherwise (``packed_sequence_mask_function``: documents packed
    in one row found from position_ids; ``blockwise_overlay``: bidirectional image-token blocks;
    ``or_masks`` or a custom function).
    """
    if mask_function is None:
        return "causal", None
    parts = sorted(_mask_parts(mask_function), key=lambda part: part[0])
    names = tuple(name for name, _ in parts)
    pattern = _SUPPORTED_MASKS.get(names)
    if pattern is None:
        raise ValueError(
            "attn_implementation='gradmem_fast' supports causal, sliding-window and bidirectional masks with "
            f"key padding; this model call builds the mask {' & '.join(names) or repr(mask_function)} "
            "(packed sequences found from position_ids, image-token blocks or a custom mask function). Use "
            "attn_implementation='eager', or call gradmem_fast.prefix_attention with cu_seqlens for packed "
            "documents"
        )
    chunk = None
    if pattern == "chunked":
        chunk = int(dict(parts)["chunked_overlay"]["chunk_size"])
    return pattern, chunk


def mask_pattern_from_arguments(mask_function, q_length, allow_is_causal_skip, kwargs) -> tuple[str, int | None]:
    """``mask_pattern`` for a compiled graph, from what transformers' mask builders pass to the mask interface.

    Custom or/and mask functions come with ``use_vmap=True``; packed sequences and image-token blocks turn
    ``allow_is_causal_skip`` off (as does a static cache while decoding, which has one query); sliding
    windows and chunks pass their size as ``local_size``, told apart by the config's ``attention_chunk_size``
    (a size equal to it is taken as a chunk: the stricter reading).
    """
    from transformers.masking_utils import bidirectional_mask_function

    if kwargs.get("use_vmap", False) or (
        not allow_is_causal_skip and q_length > 1 and mask_function is not bidirectional_mask_function
    ):
        raise ValueError(
            "attn_implementation='gradmem_fast' supports causal, sliding-window and bidirectional masks with "
            "key padding; this compiled model call builds another mask (packed sequences found from "
            "position_ids, image-token blocks or a custom mask function). Use attn_implementation='eager', or "
            "call gradmem_fast.prefix_attention with cu_seqlens for packed documents"
        )
    if mask_function is bidirectional_mask_function:
        return "bidirectional", None
    config = kwargs.get("config")
    chunk = getattr(getattr(config, "text_config", config), "attention_chunk_size", None)
    local_size = kwargs.get("local_size")
    if chunk and local_size == chunk:
        return "chunked", int(chunk)
    return ("sliding" if local_size else "causal"), None


# ----------------------------------------------------------------------------------------------------
# Sequence mixers other than attention

# Layer-type names that configs use for attention layers (Gemma 2/3, Qwen, Mistral, GPT-OSS, Llama 4, ...).
_ATTENTION_LAYER_TYPES = frozenset({"attention", "full_attention", "sliding_attention", "chunked_attention"})
# Config fields that list each layer's kind.
_LAYER_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types", "layers_type", "hybrid_override_pattern")
# Module class names of sequence mixers other than softmax attention.
_MIXER_NAME = re.compile(
    r"(Mamba|Recurrent|Rglru|RGLRU|LinearAttention|DeltaNet|ShortConv|CausalConv|Ssm|SSM|Rwkv|RWKV|Lstm|LSTM|"
    r"Retention|Hyena|Conv1d|Conv2d|TokenShift|TimeMix|Xlstm)"
)
_CHUNKED_FIELDS = ("attention_chunk_size",)


def sequence_mixers(model) -> list[str]:
    """Descriptions of the layers of ``model`` (the text backbone that a write runs) that mix the sequence by
    something other than attention."""
    found = []
    configs = [getattr(model, "config", None)]
    for config in configs:
        for field in _LAYER_TYPE_FIELDS:
            value = getattr(config, field, None)
            if value is None:
                continue
            if isinstance(value, str):
                # hybrid_override_pattern style strings: "M" mamba, "*" attention, "-" MLP, "E" experts
                odd = sorted({c for c in value if c not in "*-E"})
            else:
                odd = sorted({str(k) for k in value if str(k).lower() not in _ATTENTION_LAYER_TYPES})
            if odd:
                found.append(f"config.{field} lists {', '.join(odd)} layers")
    classes = set()
    for _, module in model.named_modules():
        cls = type(module)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.RNNBase)) or (
            _MIXER_NAME.search(cls.__name__) and not _is_hf_linear(module)
        ):
            classes.add(cls.__name__)
    if classes:
        found.append(f"modules {', '.join(sorted(classes))}")
    return found


def _is_hf_linear(module) -> bool:
    """GPT-2's ``Conv1D`` is a linear layer with transposed weights, not a convolution over the sequence."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(module, Conv1D)


def check_packed_engine(model, text_model=None) -> None:
    """Raise ``ValueError`` unless the packed write engine computes ``model`` exactly. ``text_model``: the
    backbone a write runs (``hf.backbone``; the language model of a vision-language wrapper), whose layers
    are the ones inspected (a vision tower's convolutions never see the packed documents).

    The engine needs attention routed through transformers' AttentionInterface (so our varlen offsets keep
    packed documents apart) and no other sequence-mixing layer (a recurrent state or a convolution would run
    from one document into the next). The torch backend (one document per batch row) computes such models.
    """
    supports = getattr(model, "_supports_attention_backend", False)
    if not supports or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"model: {model_name(model)} does not route its attention through transformers' "
            "AttentionInterface, so the triton write engine cannot run it; use backend='torch'"
        )
    text_model = model if text_model is None else text_model
    for module in text_model.modules():
        check_attention_module(module)
    mixers = sequence_mixers(text_model)
    if mixers:
        raise ValueError(
            f"model: {model_name(model)} mixes the sequence with layers other than attention "
            f"({'; '.join(mixers)}); the packed write engine places documents back to back and cannot keep "
            "them apart in such layers. Use backend='torch', which runs each document in its own batch row"
        )
    for cfg in (getattr(model, "config", None), getattr(text_model, "config", None)):
        for field in _CHUNKED_FIELDS:
            value = getattr(cfg, field, None)
            if value:
                raise ValueError(
                    f"model: {model_name(model)} sets {field}={value!r} (chunked attention), which the kernels "
                    "do not implement; use backend='torch'"
                )


# ----------------------------------------------------------------------------------------------------
# The output head


def check_head_on_base(model, base, head) -> None:
    """Raise ``ValueError`` unless ``model``'s logits are ``head`` applied to ``base``'s final hidden states.

    A write forms logits as ``head(hidden)`` (plus the logit post-processing of ``hf.logit_postprocessing``).
    Models whose causal-LM class puts trained layers between the backbone and the head (BERT-style
    prediction transforms ``dense -> activation -> LayerNorm``, Electra's generator projection) would be
    written against different logits: every parameter of ``model`` must belong to ``base`` or to ``head``.
    """
    owned = {id(p) for p in base.parameters()} | {id(p) for p in head.parameters()}
    extra = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if id(p) not in owned})
    if extra:
        raise ValueError(
            f"model: {model_name(model)} computes its logits with layers between the backbone and the output "
            f"head ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}), which gradmem-fast does not "
            "apply; such a model (a masked-LM style prediction head) is not supported"
        )
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    weight = getattr(head, "weight", None)
    if isinstance(hidden, int) and weight is not None and weight.dim() == 2 and weight.shape[1] != hidden:
        raise ValueError(
            f"model: {model_name(model)} has an output head of shape {tuple(weight.shape)}, which does not take "
            f"the backbone's hidden size {hidden}"
        )
