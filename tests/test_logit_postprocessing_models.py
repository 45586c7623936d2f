"""Families whose causal-LM head post-processes logits (Gemma 2 soft-capping, Cohere scale, Granite division):
a WRITE and a READ equal what the model's own full forward gives.

The oracle is an independent loop over documents: ``model(inputs_embeds=[M ; E(c)]).logits`` (the model's own
forward, post-processing included), mean cross-entropy, ``torch.autograd`` for the gradient (with
``create_graph`` for the second order), SGD. Against it: the torch reference, the packed engine with torch ops
and with the Triton kernels (interpreter), all fp64. Head weights are scaled up so that logits lie beyond
Gemma 2's cap (tanh far from linear) and scales are not powers of two.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_engine import engine_write, ragged

from gradmem_fast import MemoryReader, WriteConfig, engine, hf, reference
from gradmem_fast.inputs import head_logit_transform
from gradmem_fast.reader import teacher_forced
from gradmem_fast.scoring import score_memories
from helpers import assert_close
from tiny_models import EAGER64, VOCAB, _rotary_in_fp64, register_eager64

F64 = torch.float64
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# family: (config, expected (logit_scale, softcap), factor on the head weight)
FAMILIES = {
    "gemma2": (
        lambda: transformers.Gemma2Config(
            **SMALL, head_dim=8, final_logit_softcapping=0.9, attn_logit_softcapping=None, sliding_window=64
        ),
        (1.0, 0.9),
        60.0,
    ),
    "cohere": (lambda: transformers.CohereConfig(**SMALL, logit_scale=0.37), (0.37, None), 8.0),
    "granite": (lambda: transformers.GraniteConfig(**SMALL, logits_scaling=0.3), (1 / 0.3, None), 2.0),
}


def _norm_in_fp64(module):
    """The family's norm computed in the model's dtype (Gemma 2's RMSNorm and Cohere's LayerNorm upcast to
    fp32, which would put fp32 noise into fp64 comparisons of differently shaped batches)."""
    name = type(module).__name__
    if name == "Gemma2RMSNorm":

        def forward(x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * (1.0 + module.weight)

    elif name == "CohereLayerNorm":

        def forward(x):
            x = x - x.mean(-1, keepdim=True)
            return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    elif name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):

        def forward(x):
            return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    else:
        return
    module.forward = forward


def family_model(family, seed=0):
    make, _, factor = FAMILIES[family]
    register_eager64()
    cfg = make()
    cfg._attn_implementation = EAGER64
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=EAGER64)
    model = model.to(F64).eval()
    for sub in model.modules():
        if hasattr(sub, "inv_freq") and "Rotary" in type(sub).__name__:
            _rotary_in_fp64(sub)
        _norm_in_fp64(sub)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def own_forward_write(model, ids, mask, M0, cfg, create_graph=False):
    """The oracle: per document, K SGD steps on the mean CE of the model's own logits (no clipping)."""
    emb = model.get_input_embeddings()
    m = M0.shape[0]
    memories, losses = [], []
    for b in range(ids.shape[0]):
        doc = ids[b][mask[b].bool()]
        M, doc_losses = M0, []
        for _ in range(cfg.steps):
            if not M.requires_grad:
                M = M.detach().requires_grad_(True)
            x = torch.cat([M, emb(doc)], 0)[None]
            logits = model(inputs_embeds=x, use_cache=False).logits[0, m - 1 : m - 1 + len(doc)]
            loss = F.cross_entropy(logits, doc)
            (g,) = torch.autograd.grad(loss, M, create_graph=create_graph)
            doc_losses.append(loss.detach())
            M = M - cfg.lr * g
        memories.append(M)
        losses.append(torch.stack(doc_losses))
    return torch.stack(memories), torch.stack(losses, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_postprocessing_reads_the_config(family):
    model = family_model(family)
    scale, softcap = hf.logit_postprocessing(model)
    assert scale == pytest.approx(FAMILIES[family][1][0], rel=1e-15) and softcap == FAMILIES[family][1][1]
    head = model.get_output_embeddings()
    assert head_logit_transform(model, head.weight) == hf.logit_postprocessing(model)
    other = torch.nn.Linear(32, VOCAB, bias=False, dtype=F64)
    assert head_logit_transform(model, other.weight) == (1.0, None)  # a separate write head is a plain linear


@pytest.mark.parametrize("family", FAMILIES)
def test_first_order_write_matches_own_forward(family):
    """grad_mode "none": memories and per-step losses of the reference, the engine with torch ops and the engine
    with the Triton kernels equal the model's own forward loop (fp64, ragged documents incl. length 1)."""
    model = family_model(family)
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.3)
    ids, mask = ragged([5, 1, 7])
    M0 = torch.randn(2, 32, dtype=F64) * 0.5
    want_M, want_L = own_forward_write(model, ids, mask, M0, cfg)
    got = {
        "reference": reference.write(model, ids, mask, M0, cfg),
        "engine-torch": engine_write(model, ids, mask, M0, cfg, "torch"),
        "engine-triton": engine_write(model, ids, mask, M0, cfg, "triton"),
    }
    for name, res in got.items():
        assert_close(res.memory, want_M, F64, name=f"{name} memory")
        assert_close(res.losses, want_L, torch.float32, name=f"{name} losses")  # stats are reported in fp32


@pytest.mark.parametrize("family", FAMILIES)
def test_second_order_write_matches_own_forward(family):
    """grad_mode "second": gradients of a random projection of the written memories with respect to the
    initial memory and the output head (the head is differentiated through the post-processing) equal the
    oracle's double backward, for the reference and the Triton engine."""
    model = family_model(family)
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.3, grad_mode="second")
    ids, mask = ragged([4, 1, 6])
    M0 = torch.randn(2, 32, dtype=F64) * 0.5
    head = model.get_output_embeddings().weight
    cot = torch.randn(3, 2, 32, dtype=F64)

    def grads(memory, leaf):
        return torch.autograd.grad((memory * cot).sum(), (leaf, head))

    leaf = M0.clone().requires_grad_(True)
    want = grads(own_forward_write(model, ids, mask, leaf, cfg, create_graph=True)[0], leaf)
    for name, write in (
        ("reference", lambda leaf: reference.write(model, ids, mask, leaf, cfg)),
        ("engine-triton", lambda leaf: engine_write(model, ids, mask, leaf, cfg, "triton")),
    ):
        leaf = M0.clone().requires_grad_(True)
        got = grads(write(leaf).memory, leaf)
        for g, w, what in zip(got, want, ("M0", "head")):
            assert_close(g, w, F64, name=f"{name} d/d{what}")


@pytest.mark.parametrize("family", FAMILIES)
def test_read_logits_and_scores_equal_own_forward(family):
    """READ logits (reference oracle and MemoryReader) are the model's own logits; teacher-forced losses and
    the scores of a memory are its own cross-entropies."""
    model = family_model(family)
    memory = torch.randn(2, 3, 32, dtype=F64)
    queries = torch.randint(0, VOCAB, (2, 4))
    emb = model.get_input_embeddings()
    own = model(inputs_embeds=torch.cat([memory, emb(queries)], 1), use_cache=False).logits[:, 2:]
    assert_close(reference.read_logits(model, memory, queries), own, F64, name="reference.read_logits")
    assert_close(MemoryReader(model).logits(memory, queries), own, F64, name="MemoryReader.logits")
    docs = [queries[0], queries[1, :3]]
    want = torch.stack([F.cross_entropy(own[b, : len(d)], d) for b, d in enumerate(docs)])
    loss, _ = teacher_forced(model, memory, docs)
    assert_close(loss, want, F64, name="teacher_forced loss")
    scores = score_memories(model, memory, docs, model.get_output_embeddings().weight, None)
    assert_close(scores.loss, want, F64, name="score_memories loss")


def test_unknown_postprocessing_is_refused():
    """A class outside the table whose config sets a post-processing attribute is refused, naming both."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="LlamaForCausalLM sets final_logit_softcapping=30.0"):
        hf.output_head(model)
    model.config.final_logit_softcapping = None
    model.config.logits_scaling = 1.0  # neutral
    assert hf.logit_postprocessing(model) == (1.0, None)
    model.config.logits_scaling = 2.0
    with pytest.raises(ValueError, match="logits_scaling=2.0"):
        MemoryReader(model)


@pytest.mark.parametrize(
    "family,attr,value,words",
    [
        ("gemma2", "final_logit_softcapping", 0.0, "final_logit_softcapping=0.0; expected a finite number > 0"),
        ("gemma2", "final_logit_softcapping", float("nan"), "final_logit_softcapping=nan"),
        ("granite", "logits_scaling", 0.0, "logits_scaling=0.0; expected a finite nonzero number"),
    ],
)
def test_bad_known_values_are_refused(family, attr, value, words):
    model = family_model(family)
    setattr(model.config, attr, value)
    with pytest.raises(ValueError, match=words):
        hf.logit_postprocessing(model)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_gradmem_model_read_head_is_the_models(family):
    """GradMemModel's READ head (no control tokens, no projection: the prefix is the memory) gives the wrapped
    model's own logits, post-processing included."""
    from gradmem_fast.model import GradMemConfig, GradMemModel

    lm = family_model(family)
    gm = GradMemModel(GradMemConfig(n_mem_tokens=3, K=1, lr=0.3, backend="torch"), model=lm)
    memory = torch.randn(2, 3, 32, dtype=F64)
    queries = torch.randint(0, VOCAB, (2, 4))
    own = lm(inputs_embeds=torch.cat([memory, lm.get_input_embeddings()(queries)], 1), use_cache=False).logits
    assert_close(gm.read_logits(memory, queries), own[:, 2:], F64, name="GradMemModel.read_logits")


def test_separate_write_head_is_a_plain_linear():
    """A write head other than the model's own is the caller's [V, d] linear: no soft-capping of its logits, on
    the reference and on the engine alike (Gemma 2, whose own head is capped at 0.9)."""
    from gradmem_fast.packing import documents_from_batch, pack

    model = family_model("gemma2")
    head = torch.nn.Linear(32, VOCAB, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.3)
    ids, mask = ragged([5, 3])
    M0 = torch.randn(2, 32, dtype=F64) * 0.5
    m, memories = 2, []
    for b in range(2):  # oracle: the backbone's hidden states through the plain head
        doc, M = ids[b][mask[b].bool()], M0
        for _ in range(cfg.steps):
            M = M.detach().requires_grad_(True)
            x = torch.cat([M, model.get_input_embeddings()(doc)], 0)[None]
            hidden = model.model(inputs_embeds=x, use_cache=False).last_hidden_state[0, m - 1 : m - 1 + len(doc)]
            (g,) = torch.autograd.grad(F.cross_entropy(head(hidden), doc), M)
            M = M - cfg.lr * g
        memories.append(M)
    want = torch.stack(memories)
    ref = reference.write(model, ids, mask, M0, cfg, write_head=head)
    packed = pack(documents_from_batch(ids, mask), 2, "cpu")
    eng = engine.write_packed(model, packed, M0.expand(2, -1, -1), cfg, head.weight, None, "triton")
    assert_close(ref.memory, want, F64, name="reference memory")
    assert_close(eng.memory, want, F64, name="engine memory")


def test_cohere_without_a_scale_is_refused():
    """CohereForCausalLM multiplies by its logit_scale unconditionally (its own forward fails on None): refused."""
    model = family_model("cohere")
    model.logit_scale = None
    with pytest.raises(ValueError, match="CohereForCausalLM has logit_scale=None"):
        hf.output_head(model)


# Every other ForCausalLM row of hf.logit_postprocessing's table: a tiny random model built from its own config
# class (sizes overridden, post-processing attributes set away from neutral), fp32 (the MoE families' grouped
# products take no fp64).
TABLE_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    # MLA (MiniCPM3), xLSTM, MoE sizes
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    embedding_dim=32,
    num_heads=4,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    shared_intermediate_size=32,
    moe_intermediate_size=32,
    # the post-processing itself
    logits_scaling=0.3,
    lm_head_multiplier=0.7,
    final_logit_softcapping=0.9,
    logits_soft_cap=0.9,
    output_logit_soft_cap=0.9,
    logit_scale=0.37,
    dim_model_base=8,
)
MAMBA_SIZES = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_ssm=64)
TABLE_CLASSES = [
    "HyperCLOVAXForCausalLM",
    "FalconH1ForCausalLM",
    "MiniCPM3ForCausalLM",
    "RecurrentGemmaForCausalLM",
    "VaultGemmaForCausalLM",
    "NanoChatForCausalLM",
    "Gemma3ForCausalLM",
    "Cohere2ForCausalLM",
    "Cohere2MoeForCausalLM",
    "GraniteMoeForCausalLM",
    "GraniteMoeSharedForCausalLM",
    "GraniteMoeHybridForCausalLM",
    "xLSTMForCausalLM",
    "MptForCausalLM",
]


@pytest.mark.parametrize("name", TABLE_CLASSES)
def test_table_matches_each_familys_forward(name):
    """``postprocess_logits(head(backbone hidden), *logit_postprocessing(model))`` is the model's own
    ``model(inputs_embeds=x).logits`` (logits scaled up by 40 so a cap bends them), fp32."""
    from gradmem_fast.ops.cross_entropy import postprocess_logits

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers has no {name}")
    cfg = cls.config_class()
    sizes = {**TABLE_SIZES, **MAMBA_SIZES}
    for key, value in sizes.items():
        if hasattr(cfg, key) or key in SMALL:
            try:
                setattr(cfg, key, value)
            except AttributeError:  # a derived property (MiniCPM3's logits_scaling = hidden / dim_model_base)
                pass
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(cfg).float().eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(40)
        x = torch.randn(1, 5, hf.hidden_size(model))
        own = model(inputs_embeds=x, use_cache=False).logits
        hidden = hf.backbone_hidden(model, x, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None])
        ours = postprocess_logits(F.linear(hidden, head.weight, head.bias), *hf.logit_postprocessing(model))
    assert hf.logit_postprocessing(model) != (1.0, None) or name == "MptForCausalLM"
    assert_close(ours, own, torch.float32, name=name)
