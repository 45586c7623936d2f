"""attn_implementation="gradmem_fast" against eager attention on tiny random models of five families.

Models run in fp64 with the Triton backend (the interpreter on CPU handles fp64 exactly), so outputs and
gradients must agree to the fp64 bound. Only real (non-padding) tokens are compared: eager attention gives
fully padded query rows a uniform average, gradmem_fast gives them 0, and neither reaches a real token.
"""

import pytest
import torch
import transformers

import gradmem_fast
from gradmem_fast.hf import ATTENTION_NAME, gradmem_fast_mask
from helpers import DEVICE, assert_close
from tiny_models import EAGER64, FAMILIES, VOCAB, register_eager64, tiny_model

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("GRADMEM_FAST_BACKEND", "triton")
    assert gradmem_fast.register_attention() == "gradmem_fast"
    yield


def batch(side, lengths=(11, 6, 1), seq=11):
    ids = torch.randint(1, VOCAB, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long, device=DEVICE)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq - n :] = 1
    return ids, mask


def logits_and_grads(model, ids, mask, cotangent):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    (logits[real] * cotangent).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


def assert_parity(eager, fast, ids, mask):
    cot = torch.randn(int(mask.sum()), VOCAB, dtype=DTYPE, device=DEVICE)
    ref_logits, ref_grads = logits_and_grads(eager, ids, mask, cot)
    logits, grads = logits_and_grads(fast, ids, mask, cot)
    assert_close(logits, ref_logits, name="logits")
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], name=f"grad {name}")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_parity(family, side):
    eager = tiny_model(family, dtype=DTYPE).to(DEVICE)  # fp64 eager softmax attention
    fast = tiny_model(family, dtype=DTYPE).to(DEVICE)  # same seed, same weights
    fast.set_attn_implementation(ATTENTION_NAME)
    assert fast.config._attn_implementation == ATTENTION_NAME
    assert_parity(eager, fast, *batch(side))


def test_from_pretrained(tmp_path):
    tiny_model("llama", dtype=DTYPE).save_pretrained(tmp_path)
    register_eager64()
    eager, fast = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, dtype=DTYPE)
        .to(DEVICE)
        .eval()
        for impl in (EAGER64, ATTENTION_NAME)
    )
    assert fast.config._attn_implementation == ATTENTION_NAME
    assert_parity(eager, fast, *batch("left"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_sliding_window_mistral(side):
    eager = tiny_model("mistral", dtype=DTYPE, sliding_window=4).to(DEVICE)
    fast = tiny_model("mistral", dtype=DTYPE, sliding_window=4).to(DEVICE)
    fast.set_attn_implementation(ATTENTION_NAME)
    assert_parity(eager, fast, *batch(side))


def test_mask_function_returns_key_padding_only():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = gradmem_fast_mask(2, 4, 4, attention_mask=mask)
    assert out.shape == (2, 4) and out.dtype == torch.bool and torch.equal(out, mask)
    assert gradmem_fast_mask(2, 4, 4, attention_mask=None) is None


def test_packed_position_ids_rejected():
    model = tiny_model("llama", dtype=DTYPE, attn_implementation=ATTENTION_NAME).to(DEVICE)
    ids = torch.randint(1, VOCAB, (1, 6), device=DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]], device=DEVICE)
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=position_ids, use_cache=False)


def test_four_d_mask_rejected():
    model = tiny_model("llama", dtype=DTYPE, attn_implementation=ATTENTION_NAME).to(DEVICE)
    ids = torch.randint(1, VOCAB, (1, 5), device=DEVICE)
    mask4d = torch.zeros(1, 1, 5, 5, dtype=DTYPE, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=mask4d)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_with_cache_left_padding(family):
    """Decoding with a KV cache: one query against all cached keys (bottom-right causal alignment)."""
    over = {"sliding_window": 5} if family == "mistral" else {}
    eager = tiny_model(family, dtype=DTYPE, **over).to(DEVICE)
    fast = tiny_model(family, dtype=DTYPE, **over).to(DEVICE)
    fast.set_attn_implementation(ATTENTION_NAME)
    ids, mask = batch("left", lengths=(7, 3), seq=7)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    ref = eager.generate(input_ids=ids, attention_mask=mask, **kw)
    out = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (lg, rlg) in enumerate(zip(out.logits, ref.logits)):
        assert_close(lg, rlg, name=f"logits of step {step}")
