"""Tiny random Hugging Face causal LMs of the supported families, built locally (no downloads)."""

import torch
import transformers

VOCAB = 61  # prime on purpose: no block size divides it

EAGER64 = "test_eager64"


def _eager64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention in the inputs' precision. Hugging Face's eager attention takes its softmax
    in fp32 for most families, which would put fp32 noise into an fp64 oracle."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_eager64():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER64, _eager64_attention)
    AttentionMaskInterface.register(EAGER64, eager_mask)


def _config(family: str, **over):
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    elif family == "llama":  # GQA 4:2
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            rotary_pct=0.5,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **common,
        )
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=None,
            **common,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


FAMILIES = ("gpt2", "llama", "gpt_neox", "qwen2", "mistral")


def _rotary_in_fp64(module):
    """Hugging Face computes rotary cos/sin in fp32 whatever the model dtype; vectorised fp32 cos/sin can
    differ by an ulp between tensor shapes (packed [1, T] vs padded [B, S] positions), which would put
    fp32 noise into fp64 comparisons. For fp64 test models this instance computes them in fp64."""

    def forward(x, position_ids, *args, **kwargs):
        freqs = position_ids.to(torch.float64)[..., None] * module.inv_freq.to(torch.float64)
        angles = torch.cat([freqs, freqs], dim=-1)
        scaling = getattr(module, "attention_scaling", 1.0)
        return (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)

    module.forward = forward


def _rms_norm_in_input_dtype(module):
    """Hugging Face RMSNorms upcast to fp32 only, which for fp64 models *lowers* precision to fp32."""

    def forward(hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

    module.forward = forward


def tiny_model(family: str, dtype=torch.float64, attn_implementation: str = None, seed: int = 0, **over):
    """A randomly initialised tiny causal LM in eval mode (no dropout).

    In fp64 the model is made truly fp64 (rotary tables, RMSNorm and the eager softmax, which Hugging Face
    computes in fp32), so that fp64 comparisons measure our code, not fp32 rounding inside the model.
    """
    if attn_implementation is None:
        attn_implementation = EAGER64 if dtype == torch.float64 else "eager"
    if attn_implementation == EAGER64:
        register_eager64()
    cfg = _config(family, **over)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    model = model.to(dtype).eval()
    if dtype == torch.float64:
        for sub in model.modules():
            if hasattr(sub, "inv_freq") and "Rotary" in type(sub).__name__:
                _rotary_in_fp64(sub)
            elif type(sub).__name__.endswith("RMSNorm") and hasattr(sub, "variance_epsilon"):
                _rms_norm_in_input_dtype(sub)
    return model
