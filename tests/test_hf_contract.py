"""The Hugging Face contract (gradmem_fast/hf_contract.py): every attention argument honoured or refused, every
mask pattern expressible or refused, every non-attention sequence mixer kept off the packed engine, wrapped
vision-language models written through their language model, bf16 refused where the interpreter cannot do it.

Each refusal is proven on a real transformers function or model, and each acceptance next to it (a refusal
test alone would pass for a contract that refuses everything).
"""

import pytest
import torch
import transformers
from transformers import masking_utils as mu

from gradmem_fast import MemoryWriter, WriteConfig, hf, hf_contract, prefix_attention
from gradmem_fast.engine import check_model_supported
from helpers import DEVICE, assert_close
from tiny_models import EAGER64, register_eager64, tiny_model

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Attention keyword arguments


def _llama_attention():
    model = tiny_model("llama", dtype=torch.float32)
    return model, model.model.layers[0].self_attn


def test_attention_options_honours_ignores_and_refuses():
    _, attn = _llama_attention()
    got = hf_contract.attention_options(
        attn,
        dict(scaling=0.5, dropout=0.0, sliding_window=None, softcap=None, position_ids=torch.arange(3), use_cache=0),
    )
    assert got == dict(scaling=0.5, dropout=0.0, sliding_window=None, softcap=None)
    # An unknown argument that is absent (None) changes nothing; with a value it is refused, named with the model.
    assert hf_contract.attention_options(attn, dict(position_bias=None)) == {}
    with pytest.raises(ValueError, match=r"position_bias \(LlamaAttention.*'eager'"):
        hf_contract.attention_options(attn, dict(position_bias=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"indices \(LlamaAttention"):
        hf_contract.attention_options(attn, dict(indices=torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ValueError, match="output_attentions=True"):
        hf_contract.attention_options(attn, dict(output_attentions=True))
    assert hf_contract.attention_options(attn, dict(output_attentions=False)) == {}
    with pytest.raises(ValueError, match="seq_idx"):
        hf_contract.attention_options(attn, dict(seq_idx=torch.zeros(3, dtype=torch.int32)))
    cu = torch.tensor([0, 3], dtype=torch.int32)
    assert "cu_seq_lens_q" in hf_contract.attention_options(attn, dict(seq_idx=cu, cu_seq_lens_q=cu))


def test_registered_attention_refuses_an_unknown_argument_before_computing():
    """The registered function itself (not only the helper) refuses: a relative position bias must not be
    dropped on the way to the kernels."""
    _, attn = _llama_attention()
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="position_bias"):
        hf.gradmem_fast_attention(attn, q, k, k, None, scaling=0.3, position_bias=torch.randn(1, 4, 5, 5))
    out, weights = hf.gradmem_fast_attention(attn, q, k, k, None, scaling=0.3, position_ids=torch.arange(5)[None])
    ref = prefix_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), scale=0.3, backend="torch")
    assert weights is None
    assert_close(out, ref, torch.float32)


def test_output_attentions_through_the_model_is_refused():
    hf.register_attention("torch")
    model = tiny_model("llama", dtype=torch.float32, attn_implementation=hf.ATTENTION_NAME)
    ids = torch.randint(0, 61, (1, 6))
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)


# ----------------------------------------------------------------------------------------------------
# Mask functions


def test_mask_patterns_the_kernels_express():
    assert hf_contract.mask_pattern(mu.causal_mask_function) == ("causal", None)
    assert hf_contract.mask_pattern(None) == ("causal", None)
    assert hf_contract.mask_pattern(mu.bidirectional_mask_function) == ("bidirectional", None)
    assert hf_contract.mask_pattern(mu.sliding_window_causal_mask_function(4)) == ("sliding", None)
    chunked = mu.chunked_causal_mask_function(7, torch.zeros(2, dtype=torch.long))
    assert hf_contract.mask_pattern(chunked) == ("chunked", 7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
        lambda: mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(1, 4))),
        lambda: mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.zeros(1, 4))),
        lambda: mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 2),
        lambda: mu.sliding_window_bidirectional_mask_function(3),
    ],
    ids=["or_masks", "packed_sequences", "blockwise", "custom_and", "bidirectional_window"],
)
def test_mask_patterns_refused(make):
    with pytest.raises(ValueError, match="supports causal, sliding-window and bidirectional"):
        hf_contract.mask_pattern(make())


def test_packed_position_ids_through_the_model_are_refused():
    """transformers finds packed sequences from position_ids that restart, and builds a packed-sequence mask:
    the drop-in attention must refuse it (it would let the sequences see each other)."""
    hf.register_attention("torch")
    model = tiny_model("llama", dtype=torch.float32, attn_implementation=hf.ATTENTION_NAME)
    ids = torch.randint(0, 61, (1, 8))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="packed_sequence_mask_function"):
        model(input_ids=ids, position_ids=position_ids, use_cache=False)


def _tiny_llama4(chunk: int):
    cfg = transformers.Llama4TextConfig(
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=61,
        num_local_experts=2,
        attention_chunk_size=chunk,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_chunked_attention_within_one_chunk_matches_eager_and_across_chunks_is_refused():
    model = _tiny_llama4(chunk=8)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        hf.register_attention("torch")
        model.set_attn_implementation(hf.ATTENTION_NAME)
        assert_close(model(input_ids=ids).logits, ref, torch.float32)
        with pytest.raises(ValueError, match="chunked attention with chunks of 8"):
            model(input_ids=torch.randint(0, 61, (1, 11)))
    with pytest.raises(ValueError, match="attention_chunk_size=8"):
        check_model_supported(model)


# ----------------------------------------------------------------------------------------------------
# Sequence mixers other than attention on the packed engine


def _tiny_recurrent_gemma():
    cfg = transformers.RecurrentGemmaConfig(
        hidden_size=32,
        lru_width=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=61,
        block_types=["recurrent", "attention"],
        attention_window_size=16,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(F64).eval()


def test_recurrent_layers_are_refused_on_the_packed_engine_before_any_work():
    model = _tiny_recurrent_gemma()
    with pytest.raises(ValueError, match=r"recurrent.*backend='torch'"):
        check_model_supported(model)
    with pytest.raises(ValueError, match="layers other than attention"):
        MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="triton")
    # The torch backend (one document per batch row) accepts it.
    MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="torch")


def test_sequence_mixers_found_by_module_and_by_config():
    model = tiny_model("llama", dtype=torch.float32)
    assert hf_contract.sequence_mixers(model) == []
    check_model_supported(model)
    model.model.layers[0].mixer = torch.nn.Conv1d(4, 4, 3)  # a causal convolution added to a layer
    assert hf_contract.sequence_mixers(model) == ["modules Conv1d"]
    with pytest.raises(ValueError, match="Conv1d"):
        check_model_supported(model)
    del model.model.layers[0].mixer
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert hf_contract.sequence_mixers(model) == ["config.layer_types lists linear_attention layers"]


def test_gpt2_conv1d_is_a_linear_layer_not_a_mixer():
    model = tiny_model("gpt2", dtype=torch.float32)
    assert hf_contract.sequence_mixers(model) == []


# ----------------------------------------------------------------------------------------------------
# Wrapped vision-language models


def _tiny_gemma3_wrapper():
    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=300,
        head_dim=16,
        sliding_window=4,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(F64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 write through the interpreter")
def test_wrapped_gemma3_writes_through_its_language_model():
    """Gemma3ForConditionalGeneration: the write runs the text model only (the vision tower's convolution is
    not a sequence mixer of the write), the engine matches the torch backend and an independent loop on the
    wrapper's own logits."""
    model = _tiny_gemma3_wrapper()
    assert type(hf.backbone(model)).__name__ == "Gemma3TextModel"
    check_model_supported(model)
    ids = torch.randint(0, 290, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    memory = torch.randn(2, 32, dtype=F64) * 0.1
    config = WriteConfig(num_memory_tokens=2, steps=2, lr=0.1)
    engine = MemoryWriter(model, config, backend="triton").write(ids, mask, memory=memory).memory
    reference = MemoryWriter(model, config, backend="torch").write(ids, mask, memory=memory).memory
    # Independent loop: the wrapper's own forward on [M; E(tokens)] per document, the loss of DESIGN.md.
    emb = model.get_input_embeddings()
    for b in range(2):
        tokens = ids[b, : int(mask[b].sum())]
        M = memory.clone()
        for _ in range(2):
            M.requires_grad_(True)
            logits = model(inputs_embeds=torch.cat([M, emb(tokens[None])[0]])[None]).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[1 : 1 + len(tokens)], tokens)
            (grad,) = torch.autograd.grad(loss, M)
            M = (M - 0.1 * grad).detach()
        assert_close(engine[b], M, F64, name=f"engine document {b}")
        assert_close(reference[b], M, F64, name=f"reference document {b}")


# ----------------------------------------------------------------------------------------------------
# bf16 under the interpreter


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 dot")
def test_bf16_on_the_triton_backend_on_cpu_is_refused():
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(Exception, match="bfloat16 on the triton backend needs a GPU"):
        prefix_attention(q, q, q, backend="triton")
    model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 weights on the triton backend need a GPU"):
        MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="triton")
    # float16 is exact in the interpreter and stays available.
    h = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    ref = prefix_attention(h.double(), h.double(), h.double(), backend="torch")
    assert_close(prefix_attention(h, h, h, backend="triton"), ref, torch.float16)


# ----------------------------------------------------------------------------------------------------
# Heads and padding


def test_layers_between_backbone_and_head_are_refused():
    """BERT-style causal LMs compute logits = decoder(LayerNorm(act(dense(h)))): writing against decoder(h)
    would be silently wrong (found by the family matrix: 120-150% off), so the head is refused."""
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=61, is_decoder=True
    )
    model = transformers.BertLMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match=r"layers between the backbone and the output head \(cls\.predictions"):
        hf.output_head(model)
    with pytest.raises(ValueError, match="layers between the backbone"):
        MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="torch").write(
            torch.randint(0, 61, (1, 5))
        )
    hf.output_head(tiny_model("llama", dtype=torch.float32))  # a plain head on the backbone passes


def _tiny_gemma3_text(window: int, attn_implementation: str):
    cfg = transformers.Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=61,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
    )
    register_eager64()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    model = model.to(F64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 write through the interpreter")
@pytest.mark.parametrize(
    "attn_implementation, backends",
    [("eager", ("torch",)), (EAGER64, ("torch", "triton"))],
    ids=["hf_eager", "eager64"],
)
def test_padding_longer_than_the_sliding_window_stays_finite_and_exact(attn_implementation, backends):
    """A padded row whose padding outruns the sliding window used to give the torch backend NaN: with Hugging
    Face's eager attention (fp32 softmax) its padding rows had no visible key, then 0 * NaN in P @ V reached
    the real rows. Every backend now matches the document written alone. (EAGER64, an fp64 softmax, makes the
    fp64 comparison with the kernels meaningful; it never produced the NaN.)"""
    model = _tiny_gemma3_text(2, attn_implementation)
    ids = torch.randint(0, 61, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # 7 padding tokens > window 2
    memory = torch.randn(2, 32, dtype=F64) * 0.1
    config = WriteConfig(num_memory_tokens=2, steps=2, lr=0.1)
    alone = MemoryWriter(model, config, backend="torch").write(ids[1:, :3], memory=memory).memory[0]
    for backend in backends:
        got = MemoryWriter(model, config, backend=backend).write(ids, mask, memory=memory)
        assert torch.isfinite(got.losses).all(), backend
        # Hugging Face's eager attention takes its softmax in fp32 even for an fp64 model, so the padded batch
        # and the document alone agree to fp32's bound there (random draws reached 2e-8); EAGER64 is fp64 end to end.
        bound = torch.float32 if attn_implementation == "eager" else F64
        assert_close(got.memory[1], alone, bound, name=backend)


def test_attention_modules_the_kernels_cannot_reproduce_are_refused():
    """BigBird-Pegasus's decoder self-attention says is_causal=False and is causal only through its 4-D mask:
    the drop-in attention gave logits 8e-3 off eager (family matrix) before it was refused."""
    cfg = transformers.BigBirdPegasusConfig(
        d_model=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        vocab_size=61,
        attention_type="original_full",
    )
    model = transformers.BigBirdPegasusForCausalLM(cfg).eval()
    hf.register_attention("torch")
    model.set_attn_implementation(hf.ATTENTION_NAME)
    with pytest.raises(ValueError, match=r"BigBirdPegasusDecoderAttention.*is_causal=False"):
        model(input_ids=torch.randint(0, 61, (1, 6)))
    with pytest.raises(ValueError, match="backend='torch'"):
        check_model_supported(model)


# ----------------------------------------------------------------------------------------------------
# Value head dim != query/key head dim (MLA)


def _tiny_deepseek_v3():
    """DeepSeek-V3's multi-head latent attention at a tiny size: q/k head dim 12 (8 + 4 rotary), v head dim 6.
    Dense layers only (the routed experts' grouped matmul has no fp64)."""
    cfg = transformers.DeepseekV3Config(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=61,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
    )
    register_eager64()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=EAGER64).to(F64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 write through the interpreter")
def test_mla_value_head_dim_writes_on_the_engine_first_and_second_order():
    """The kernels take one head dim; the adapter zero-pads v (exact in every order). Engine = torch backend in
    fp64, and the drop-in attention = fp64 eager logits and input gradients."""
    model = _tiny_deepseek_v3()
    ids = torch.randint(0, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    for grad_mode in ("none", "second"):
        memory = (torch.randn(2, 32, dtype=F64) * 0.1).requires_grad_(grad_mode == "second")
        config = WriteConfig(num_memory_tokens=2, steps=2, lr=0.1, grad_mode=grad_mode)
        cotangent = torch.randn(2, 2, 32, dtype=F64)
        results = {}
        for backend in ("torch", "triton"):
            out = MemoryWriter(model, config, backend=backend).write(ids, mask, memory=memory).memory
            grad = torch.autograd.grad((out * cotangent).sum(), memory)[0] if grad_mode == "second" else None
            results[backend] = (out.detach(), grad)
        assert_close(results["triton"][0], results["torch"][0], F64, name=f"memory ({grad_mode})")
        if grad_mode == "second":
            assert_close(results["triton"][1], results["torch"][1], F64, name="d memory / d M0 (second order)")
    x = torch.randn(2, 7, 32, dtype=F64, requires_grad=True)
    keep = mask.bool()
    ref = model(inputs_embeds=x, attention_mask=mask).logits[keep]
    cotangent = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad((ref * cotangent).sum(), x)
    hf.register_attention("triton")
    model.set_attn_implementation(hf.ATTENTION_NAME)
    out = model(inputs_embeds=x, attention_mask=mask).logits[keep]
    (out_grad,) = torch.autograd.grad((out * cotangent).sum(), x)
    assert_close(out, ref, F64, name="drop-in logits")
    assert_close(out_grad[keep], ref_grad[keep], F64, name="drop-in input gradient")


# ----------------------------------------------------------------------------------------------------
# Inside a compiled graph


def test_mask_pattern_from_arguments_in_compiled_graphs():
    """dynamo cannot read closures, so a compiled call reads the pattern from the mask builders' arguments."""
    read = hf_contract.mask_pattern_from_arguments
    llama4 = transformers.Llama4TextConfig(attention_chunk_size=8)
    assert read(mu.causal_mask_function, 5, True, {}) == ("causal", None)
    assert read(mu.bidirectional_mask_function, 5, False, {}) == ("bidirectional", None)
    assert read(mu.causal_mask_function, 5, True, {"local_size": 4}) == ("sliding", None)
    assert read(mu.causal_mask_function, 5, True, {"local_size": 8, "config": llama4}) == ("chunked", 8)
    assert read(mu.causal_mask_function, 1, False, {}) == ("causal", None)  # static-cache decoding
    for args in ((5, True, {"use_vmap": True}), (5, False, {})):
        with pytest.raises(ValueError, match="compiled model call builds another mask"):
            read(mu.causal_mask_function, *args)


def test_compiled_drop_in_attention_matches_eager_and_refuses_packed_position_ids():
    hf.register_attention("torch")
    model = tiny_model("llama", dtype=torch.float32, attn_implementation=hf.ATTENTION_NAME)
    reference = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 61, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = mask.bool()
        assert_close(out[keep], ref[keep], torch.float32)
        packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
        with pytest.raises(Exception, match="compiled model call builds another mask"):
            compiled(input_ids=ids[:1], position_ids=packed, use_cache=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 write through the interpreter")
def test_engine_refuses_a_model_whose_layers_drop_the_packed_offsets():
    """A decoder layer that does not forward **kwargs leaves its attention without cu_seq_lens: on the packed
    engine its documents would attend to each other (Moshi: 35% off, found by the family matrix)."""
    model = tiny_model("llama")
    layer = model.model.layers[1]
    original = layer.forward

    def forward(*args, **kwargs):
        kept = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        return original(*args, **kept)

    layer.forward = forward
    ids = torch.randint(0, 61, (2, 5))
    config = WriteConfig(num_memory_tokens=2, steps=1)
    with pytest.raises(ValueError, match="does not pass the packed documents' offsets"):
        MemoryWriter(model, config, backend="triton").write(ids)
    MemoryWriter(model, config, backend="torch").write(ids)  # one document per row: nothing to keep apart


def test_logits_probe_refuses_an_unknown_step_between_backbone_and_head():
    """What no table lists (Inkling divided its hidden states before the head; ProphetNet's head reads another
    stream): the probe compares the model's own logits with head(backbone(x)) and refuses a difference."""
    model = tiny_model("llama", dtype=torch.float32)
    hf.check_logits_are_head_on_backbone(model)  # a plain model passes
    model = tiny_model("llama", dtype=torch.float32, seed=1)
    weight = model.lm_head.weight
    model.lm_head.forward = lambda h: torch.nn.functional.linear(h / 3.0, weight)
    assert model.training is False
    with pytest.raises(ValueError, match="own logits are not its output head applied"):
        MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="torch")
    assert model.training is False  # the probe restores the mode it found


def test_models_that_read_the_4d_mask_themselves_are_refused_by_the_mask_function():
    """Doge and the DeepSeek sparse indexer index a 4-D mask inside their attention: without this refusal the
    drop-in crashed inside their code with an IndexError (family matrix)."""
    with pytest.raises(ValueError, match="model_type 'doge': dynamic mask attention"):
        hf.gradmem_fast_mask(1, 4, 4, mask_function=mu.causal_mask_function, config=transformers.DogeConfig())
    sparse = transformers.LlamaConfig(num_hidden_layers=2)
    sparse.layer_types = ["deepseek_sparse_attention", "full_attention"]
    with pytest.raises(ValueError, match="sparse attention indexer"):
        hf.gradmem_fast_mask(1, 4, 4, mask_function=mu.causal_mask_function, config=sparse)
    assert (
        hf.gradmem_fast_mask(1, 4, 4, mask_function=mu.causal_mask_function, config=transformers.LlamaConfig()) is None
    )


def test_bf16_refusal_leaves_meta_tensors_to_the_step_census():
    """The census counts a bf16 GPT-2 step on the meta device: nothing is computed there, nothing to refuse."""
    from gradmem_fast.backend import check_interpreter_dtype

    check_interpreter_dtype(torch.empty(2, 2, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(TypeError, match="bfloat16 weights"):
        check_interpreter_dtype(torch.empty(2, 2, dtype=torch.bfloat16))
