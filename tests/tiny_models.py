"""Tiny random Hugging Face causal LMs of the supported families, built locally (no downloads)."""
import torch
import transformers

VOCAB = 61  # prime on purpose: no block size divides it


def _config(family: str, **over):
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common,
        )
    elif family == "llama":  # GQA 4:2
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common,
        )
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
            **common,
        )
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, **common,
        )
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **common,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


FAMILIES = ("gpt2", "llama", "gpt_neox", "qwen2", "mistral")


def tiny_model(family: str, dtype=torch.float64, attn_implementation: str = "eager", seed: int = 0, **over):
    """A randomly initialised tiny causal LM in eval mode (no dropout)."""
    cfg = _config(family, **over)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.to(dtype).eval()
