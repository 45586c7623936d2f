"""Hugging Face glue: finding a causal LM's parts, and (below) the attention registry entries.

Models are reached only through public APIs: ``get_input_embeddings``, ``get_output_embeddings`` and
``base_model``; no model class is patched.
"""

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import hf_contract

# Logit post-processing of Hugging Face causal LMs: what each class's own forward does to its head's output y
# after the head (read from transformers 5.x modeling_*.py). ``logit_postprocessing`` returns it as (s, c):
# logits = c tanh(s y / c), or s y when c is None; the write loss, the reference and READ scores apply the same.
#
#   classes                                       forward reads                        computes          (s, c)
#   Gemma2, Gemma3, Gemma3n, Gemma4, Gemma4Unified, config.final_logit_softcapping       c tanh(y / c)     (1, c)
#     VaultGemma, NanoChat (ForCausalLM)            (None: nothing)
#   Gemma3n, Gemma4, Gemma4Unified                text config .final_logit_softcapping c tanh(y / c)     (1, c)
#     (ForConditionalGeneration)
#   RecurrentGemmaForCausalLM                     config.logits_soft_cap               c tanh(y / c)     (1, c)
#   xLSTMForCausalLM                              config.output_logit_soft_cap         c tanh(y / c)     (1, c)
#   MuseGlimmerForConditionalGeneration           text config .output_multiplier and   c tanh(m y / c)   (m, c)
#                                                   .final_logit_softcapping
#   Cohere, Cohere2, Cohere2Moe, CohereCompass    model.logit_scale (= config's; the   s y               (s, None)
#     (ForCausalLM), CohereCompassFor-              ForCausalLM forwards fail on None,
#     ConditionalGeneration                         so it is refused; the other skips it)
#   Granite, GraniteSWA, GraniteMoe,              config.logits_scaling (text config   y / L             (1/L, None)
#     GraniteMoeSWA, GraniteMoeHybrid,              for Granite4Vision)
#     GraniteMoeShared (ForCausalLM),
#     Granite4VisionForConditionalGeneration
#   HyperCLOVAXForCausalLM                        config.logits_scaling                L y               (L, None)
#   FalconH1ForCausalLM                           model.model.lm_head_multiplier       m y               (m, None)
#   MiniCPM3ForCausalLM                           config.logits_scaling                head(h / L)       (1/L, None)
#                                                   (bias-free head: = y / L)
#   Inkling (ForCausalLM; ForConditionalGen-      (text) config.logits_mup_width_      head(h / L)       (1/L, None)
#     eration reads the text config)                multiplier (bias-free head)
#   MptForCausalLM                                (config.logit_scale is never read)   y                 (1, None)
#
# Any other class whose config (or text config) sets one of ``_LOGIT_POSTPROCESSING`` to something other than
# None (or 1 for a scale) is refused: we do not know what its forward does with it.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "output_logit_soft_cap",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "output_multiplier_scale",
    "logits_mup_width_multiplier",
)
_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap", "logit_softcapping")


def _text_config(model):
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _number(model, attr: str, value, *, positive: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the attribute and the model class."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0) or value == 0:
        need = "a finite number > 0" if positive else "a finite nonzero number"
        raise ValueError(f"model: {type(model).__name__} has {attr}={value!r}; expected {need}")
    return float(value)


def _cap(model, config, attr: str) -> tuple[float, float | None]:
    value = getattr(config, attr, None)
    return 1.0, None if value is None else _number(model, attr, value, positive=True)


def _scale(model, owner, attr: str, invert: bool = False, required: bool = False) -> tuple[float, float | None]:
    value = getattr(owner, attr, None)
    if value is None and not required:
        return 1.0, None
    s = _number(model, attr, value)
    return (1.0 / s if invert else s), None


def _hidden_divisor(model, config, attr: str) -> tuple[float, float | None]:
    """``head(h / L)``: equal to ``y / L`` for a head without bias (MiniCPM3, Inkling)."""
    if getattr(get_output_embeddings(model), "bias", None) is not None:  # h / L through a biased head is not y / L
        raise ValueError(f"model: {type(model).__name__} scales hidden states by 1/{attr} before a head with a bias")
    return _scale(model, config, attr, invert=True)


def _muse_glimmer(model) -> tuple[float, float | None]:
    text = _text_config(model)
    scale, _ = _scale(model, text, "output_multiplier")
    return scale, _number(
        model, "final_logit_softcapping", getattr(text, "final_logit_softcapping", None), positive=True
    )


_GEMMA = ("Gemma2", "Gemma3", "Gemma3n", "Gemma4", "Gemma4Unified", "VaultGemma", "NanoChat")
_GRANITE = ("Granite", "GraniteSWA", "GraniteMoe", "GraniteMoeSWA", "GraniteMoeHybrid", "GraniteMoeShared")
_COHERE = ("Cohere", "Cohere2", "Cohere2Moe", "CohereCompass")
_RECIPES = {
    **{f"{f}ForCausalLM": lambda m: _cap(m, m.config, "final_logit_softcapping") for f in _GEMMA},
    **{
        f"{f}ForConditionalGeneration": lambda m: _cap(m, _text_config(m), "final_logit_softcapping")
        for f in ("Gemma3n", "Gemma4", "Gemma4Unified")
    },
    "RecurrentGemmaForCausalLM": lambda m: _cap(m, m.config, "logits_soft_cap"),
    "xLSTMForCausalLM": lambda m: _cap(m, m.config, "output_logit_soft_cap"),
    "MuseGlimmerForConditionalGeneration": _muse_glimmer,
    **{
        f"{f}ForCausalLM": lambda m: _scale(
            m, m if hasattr(m, "logit_scale") else m.config, "logit_scale", required=True
        )
        for f in _COHERE
    },
    "CohereCompassForConditionalGeneration": lambda m: _scale(m, m, "logit_scale"),
    **{f"{f}ForCausalLM": lambda m: _scale(m, m.config, "logits_scaling", invert=True) for f in _GRANITE},
    "Granite4VisionForConditionalGeneration": lambda m: _scale(m, _text_config(m), "logits_scaling", invert=True),
    "HyperCLOVAXForCausalLM": lambda m: _scale(m, m.config, "logits_scaling"),
    "FalconH1ForCausalLM": lambda m: _scale(m, getattr(m, "model", m.config), "lm_head_multiplier"),
    "MiniCPM3ForCausalLM": lambda m: _hidden_divisor(m, m.config, "logits_scaling"),
    "InklingForCausalLM": lambda m: _hidden_divisor(m, m.config, "logits_mup_width_multiplier"),
    "InklingForConditionalGeneration": lambda m: _hidden_divisor(m, _text_config(m), "logits_mup_width_multiplier"),
    "MptForCausalLM": lambda m: (1.0, None),
}


def logit_postprocessing(model) -> tuple[float, float | None]:
    """``(logit_scale, softcap)``: what ``model``'s own forward does to its output head's result y, as
    ``softcap * tanh(logit_scale * y / softcap)`` (or ``logit_scale * y`` when softcap is None); ``(1.0, None)``
    when it does nothing. The table above lists every family; the class is matched along its MRO (a subclass
    inherits its family's forward). A config that sets a post-processing attribute this table does not explain
    for the class is refused with a ValueError naming the attribute and the class."""
    for cls in type(model).__mro__:
        recipe = _RECIPES.get(cls.__name__)
        if recipe is not None:
            return recipe(model)
    for config in {id(c): c for c in (getattr(model, "config", None), _text_config(model)) if c is not None}.values():
        for attr in _LOGIT_POSTPROCESSING:
            value = getattr(config, attr, None)
            neutral = value is None or value is False or (attr not in _CAPS and value == 1)
            if not neutral:
                raise ValueError(
                    f"model: {type(model).__name__} sets {attr}={value!r} in its config, which may post-process "
                    "logits after the output head in a way gradmem-fast does not know for this class; refused "
                    "rather than computing other logits than the model's"
                )
    return 1.0, None


def get_output_embeddings(model):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


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
    """The output projection ``[V, d]`` of ``model`` (a ``nn.Linear``-like module with ``weight``). Raises a
    ValueError for a model whose logit post-processing is unknown (``logit_postprocessing``): every caller
    forms logits from this head and must apply what ``logit_postprocessing`` returns."""
    head = get_output_embeddings(model)
    if head is None or getattr(head, "weight", None) is None or head.weight.dim() != 2:
        raise ValueError(
            "model: expected a causal LM with an output head (get_output_embeddings() returning a "
            f"Linear of shape [vocab, hidden]); {type(model).__name__} has none — pass a write_head"
        )
    logit_postprocessing(model)
    hf_contract.check_head_on_base(model, base_model(model), head)
    return head


def base_model(model) -> nn.Module:
    """The model's base (``base_model``; for Llama 4's text-only causal LM, whose base prefix names an
    attribute it does not have, its ``.model``), with any vision or audio towers a wrapper holds."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        base = getattr(model, "model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"model: expected a Hugging Face causal LM wrapping a base model, got {type(model).__name__}")
    return base


def backbone(model) -> nn.Module:
    """The base transformer returning final (normalised) hidden states, e.g. ``GPT2Model``.

    A wrapper whose base model holds a language model (Gemma 3 and Llama 4 ``...ForConditionalGeneration``,
    and other vision-language checkpoints whose text part is a causal LM) gives that language model: a
    WRITE and a READ see text (memory vectors and token embeddings) only, so the vision or audio towers
    never run, and the wrapper's own head (``get_output_embeddings``) still produces the logits.
    """
    base = base_model(model)
    language_model = getattr(base, "language_model", None)
    if isinstance(language_model, nn.Module) and language_model is not base:
        return language_model
    return base


def is_causal(model) -> bool:
    """Whether ``model``'s backbone is known to be causal: its attention modules say ``is_causal = True`` and none
    says False (BERT-style models built with ``is_decoder=False`` are bidirectional; XLM's attention has no such
    flag and is bidirectional unless its config says ``causal``: unknown counts as not causal)."""
    if getattr(getattr(model, "config", None), "is_decoder", True) is False:
        return False
    flags = [m.is_causal for m in backbone(model).modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


_PROBED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
# Relative error above which the probe calls the two logits different: far above the rounding of one dtype,
# far below what a skipped layer or scale gives (BERT-style transforms 1.2, Inkling 23, ProphetNet 33).
_PROBE_BOUND = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_logits_are_head_on_backbone(model) -> None:
    """Refuse ``model`` unless its own logits are what a write forms: ``phi(head(backbone(x)))`` with ``phi`` from
    ``logit_postprocessing`` (a probe on four token embeddings, once per model object, in eval mode, no grad).

    The table of ``logit_postprocessing`` and ``hf_contract.check_head_on_base`` name what is known; the probe
    catches what no table lists (a division of the hidden states in a class's forward, a head applied to
    another stream of the backbone): the family matrix found such models (Inkling, ProphetNet).
    """
    if model in _PROBED:
        return
    from gradmem_fast.ops.cross_entropy import postprocess_logits

    head = output_head(model)
    emb = input_embeddings(model)
    if emb.weight.is_meta:  # shapes only (the step census): there are no values to compare
        return
    ids = torch.arange(4, device=emb.weight.device) % emb.weight.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = emb(ids)[None]
            ones = torch.ones(1, 4, dtype=torch.long, device=ids.device)
            own = model(inputs_embeds=x, attention_mask=ones, use_cache=False).logits.double()
            hidden = backbone_hidden(model, x, ones, torch.arange(4, device=ids.device)[None])
            y = F.linear(hidden, head.weight, getattr(head, "bias", None)).double()
            ours = postprocess_logits(y, *logit_postprocessing(model))
    finally:
        model.train(was_training)
    err = float((own - ours).norm() / own.norm().clamp_min(1e-30)) if own.shape == ours.shape else float("inf")
    if not err <= _PROBE_BOUND.get(emb.weight.dtype, 1e-4):
        raise ValueError(
            f"model: {type(model).__name__}'s own logits are not its output head applied to its backbone's final "
            f"hidden states (relative difference {err:.2g} on a probe): its forward does something between them "
            "that gradmem-fast does not know, so a write would learn against other logits than the model's"
        )
    _PROBED[model] = True


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
    attention call) is applied inside the kernels, so no [q_length, kv_length] mask is ever built. The mask
    pattern is read from transformers' ``mask_function`` (``hf_contract.mask_pattern``); patterns the kernels
    cannot express (packed sequences detected from ``position_ids``, image-token blocks, custom or/and mask
    functions, chunked attention across a chunk boundary) are refused instead of silently ignored.
    """
    from transformers.masking_utils import prepare_padding_mask

    hf_contract.check_mask_consumer(kwargs.get("config"))
    if torch.compiler.is_compiling():
        # dynamo cannot read a closure's name and cells (and caches a constant-folded answer per code object,
        # which closures of one factory share): inside a compiled graph the pattern comes from the arguments.
        pattern, chunk = hf_contract.mask_pattern_from_arguments(mask_function, q_length, allow_is_causal_skip, kwargs)
    else:
        pattern, chunk = hf_contract.mask_pattern(mask_function)
    if pattern == "chunked" and kv_offset + kv_length > chunk:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r}: this model uses chunked attention with chunks of {chunk} "
            f"tokens and the sequence ({kv_offset + kv_length} keys) crosses a chunk boundary, which the kernels "
            "do not implement; use attn_implementation='eager' or 'sdpa'"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4-D mask; the attention function explains why it cannot take it
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return mask[:, kv_offset : kv_offset + kv_length].bool()


# The registry entry's settings: the backend its calls use, and whether the packed write engine is running
# (``engine.gradmem_attention``), in which case every call must carry the packed offsets.
_DEFAULT_BACKEND: dict = {"backend": "auto", "packed": False}


def gradmem_fast_attention(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` entry: ``query [B, Hq, Sq, D]``, ``key/value [B, Hkv, Sk, D]`` -> ``([B, Sq, Hq,
    D], None)``, computed by ``gradmem_fast.prefix_attention`` on the padded layout with the key padding mask
    from ``gradmem_fast_mask`` (no copies: the kernels read the transposed views through their strides).

    Every keyword argument is checked by ``hf_contract.attention_options``: honoured are ``scaling``,
    ``dropout``, ``sliding_window``, ``is_causal`` (else ``module.is_causal``; bottom-right aligned, which is
    what a KV cache needs), ``softcap`` (Gemma 2: scores ``c * tanh(s / c)``), ``s_aux`` (GPT-OSS: one sink
    logit per head) and the packed offsets ``cu_seq_lens_q/k``, ``max_length_q/k``; anything else that would
    change the result raises a ValueError naming it. ``dropout`` (nonzero when the model is in training mode)
    takes its seed from the device's dropout generator (``ops.attention.dropout_generator``), which each call
    advances on the device: compiled and graph-replayed steps draw a new mask per call. Attention weights are
    never returned.
    """
    from gradmem_fast.ops.attention import prefix_attention

    hf_contract.check_attention_module(module)
    opts = hf_contract.attention_options(module, kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} takes the 2-D padding mask made by its own mask function; "
            f"got a {attention_mask.dim()}-D attention mask of shape {tuple(attention_mask.shape)} (a custom "
            "prepared mask). Pass a 2-D attention_mask [batch, seq] (1 = keep) instead"
        )
    is_causal = opts.get("is_causal")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding_window = opts.get("sliding_window")
    window = int(sliding_window) if sliding_window is not None and causal else None
    common = dict(
        causal=bool(causal),
        scale=opts.get("scaling"),
        dropout_p=float(opts.get("dropout") or 0.0),
        window=window,
        backend=_DEFAULT_BACKEND["backend"],
    )
    # Only set options travel, so a model without them calls exactly the default kernels.
    if opts.get("softcap"):
        common["softcap"] = float(opts["softcap"])
    if opts.get("s_aux") is not None:
        common["sinks"] = opts["s_aux"]
    dv = value.shape[-1]
    if dv != query.shape[-1]:
        query, key, value, common["scale"] = _equal_head_dims(query, key, value, common["scale"])
    if opts.get("cu_seq_lens_q") is not None:
        return _packed_attention(query, key, value, opts, common)[..., :dv], None
    if _DEFAULT_BACKEND["packed"]:
        raise ValueError(
            f"model: {hf_contract.model_name(module)} does not pass the packed documents' offsets (cu_seq_lens_q/k) "
            "from its forward to its attention, so the packed write engine would let documents attend to each "
            "other; use backend='torch'"
        )
    k_len = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != k_len:
        attention_mask = attention_mask[:, -k_len:]
    out = prefix_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_padding_mask=attention_mask, **common
    )
    return out[..., :dv], None


def _equal_head_dims(query, key, value, scale):
    """Zero-pad the smaller head dim so q, k and v share one (MLA: DeepSeek-V3's q/k 192, v 128).

    Exact in every order: zero columns of v give zero output columns (sliced off by the caller, so their
    gradient is zero), and zero columns of q and k add nothing to q . k. The scale is fixed first from the
    real q/k head dim, since the kernels' default would use the padded one.
    """
    import torch.nn.functional as F

    dqk, dv = query.shape[-1], value.shape[-1]
    scale = dqk**-0.5 if scale is None else scale
    if dv < dqk:
        value = F.pad(value, (0, dqk - dv))
    else:
        query, key = F.pad(query, (0, dv - dqk)), F.pad(key, (0, dv - dqk))
    return query, key, value, scale


def _packed_attention(query, key, value, opts, common):
    """Packed documents (FlashAttention-style ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments,
    as the write engine passes them): ``query [1, Hq, T, D]`` is one sequence of documents back to back.

    The documents are defined by the offsets alone: packing has no padding, so a 2-D padding mask that
    comes along (the engine passes all ones to keep transformers from inspecting ``position_ids``, a host
    synchronisation) is not applied. Lengths given as Python ints avoid any synchronisation here.
    """
    from gradmem_fast.ops.attention import prefix_attention

    if query.shape[0] != 1:
        raise ValueError(f"packed attention (cu_seq_lens_q given) needs batch size 1, got {query.shape[0]}")
    cu_q = opts["cu_seq_lens_q"].to(torch.int32)
    cu_k = opts.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k.to(torch.int32)
    max_q, max_k = opts.get("max_length_q"), opts.get("max_length_k")
    out = prefix_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q if isinstance(max_q, int) else None,
        max_seqlen_k=max_k if isinstance(max_k, int) else None,
        **common,
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
