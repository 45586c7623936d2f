"""The compiled write step (engine.CompiledBackbone) against the eager engine, on CPU with inductor.

Compile time dominates here (inductor's C++ backend on 2 cores), so each (family, ops) pair compiles once
and serves both optimizers, and the recompile-counting tests use the ``aot_eager`` backend (dynamo and
AOTAutograd exactly as with inductor, no code generation): what they check is tracing, guards and buckets.
"""

import dataclasses
import os

import pytest
import torch
from torch._dynamo.utils import counters

from gradmem_fast import MemoryWriter, WriteConfig, engine, reference
from gradmem_fast.ops.attention import _reference_packed_dense, attention_reference
from gradmem_fast.packing import bucket_rows, pack, padding_waste
from helpers import assert_close
from tiny_models import FAMILIES, VOCAB, tiny_model

CONFIGS = {
    "sgd-clip": WriteConfig(num_memory_tokens=2, steps=2, lr=0.5, clip_value=0.05, clip_norm=0.08),
    "adam-clip": WriteConfig(num_memory_tokens=2, steps=2, lr=0.02, optimizer="adam", clip_value=0.5, clip_norm=0.1),
}


@pytest.fixture(autouse=True)
def _one_compile_thread():
    """2 shared cores: no compile worker pool (its start-up costs more than it saves on tiny graphs)."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


def _graph_breaks():
    return sum(counters["graph_break"].values())


def test_dense_packed_reference_matches_the_per_document_loop():
    """The traceable packed attention of the torch backend (used under torch.compile) equals the per-document
    reference: causal with more keys than queries, windows, GQA, key padding, empty and length-1 documents."""
    torch.manual_seed(0)
    cu_q = torch.tensor([0, 1, 6, 6, 13], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 8, 9, 19], dtype=torch.int32)
    q = torch.randn(13, 4, 5, dtype=torch.float64)
    k = torch.randn(19, 2, 5, dtype=torch.float64)
    v = torch.randn(19, 2, 5, dtype=torch.float64)
    kpm = torch.rand(19) > 0.2
    for causal, window, mask in [(True, None, None), (True, 3, None), (False, None, kpm), (True, 2, kpm)]:
        ref_out, ref_lse = attention_reference(
            q,
            k,
            v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            key_padding_mask=mask,
            causal=causal,
            scale=0.3,
            window=window,
        )
        out, lse = _reference_packed_dense(q, k, v, cu_q, cu_k, mask, causal, 0.3, 0.0, window)
        assert_close(out, ref_out)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        assert_close(lse[finite], ref_lse[finite])


def _ragged_docs(lengths):
    return [torch.randint(0, VOCAB, (n,)) for n in lengths]


# A cold inductor compile costs about a minute on 2 cores, so CI runs inductor on two (family, ops) pairs and
# the aot_eager backend (the same dynamo graph and AOTAutograd forward/backward, no code generation) on the
# rest; GRADMEM_TEST_INDUCTOR=all runs inductor everywhere (make test-compile).
_INDUCTOR_IN_CI = {("llama", "triton"), ("gpt2", "torch")}
# The Triton ops run interpreted (about 25 s a family): CI runs them on two families (inductor and aot_eager);
# every family's layers are compiled with the torch ops in CI, and make test-compile runs all ten pairs.
_TRITON_OPS_IN_CI = ("llama", "gpt2")


def _compile_backend(family, ops):
    if os.environ.get("GRADMEM_TEST_INDUCTOR") == "all" or (family, ops) in _INDUCTOR_IN_CI:
        return "inductor"
    return "aot_eager"


@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_matches_eager_engine(family, ops):
    """The backbone compiled with fullgraph=True (inductor's CPU backend, or aot_eager, see above): the written
    change M - M0 of every document equals the eager engine's (fp32 bound), with SGD and Adam (both clipped),
    on our torch ops and on the Triton ops (interpreter, opaque custom ops inside the compiled graph; there
    SGD on three families, Adam on two)."""
    if ops == "triton" and family not in _TRITON_OPS_IN_CI and os.environ.get("GRADMEM_TEST_INDUCTOR") != "all":
        pytest.skip("Triton ops on this family: make test-compile (interpreted kernels are slow on 2 cores)")
    model = tiny_model(family, dtype=torch.float32)
    head = model.get_output_embeddings()
    m, d = 2, model.config.hidden_size
    docs = _ragged_docs([7, 1, 3, 12])
    real_rows = sum(len(x) for x in docs) + m * len(docs)
    packed = pack(docs, m, "cpu", rows=bucket_rows(real_rows, m))
    M0 = torch.randn(packed.batch, m, d) * 0.5
    backbone = engine.CompiledBackbone(model, backend=_compile_backend(family, ops))
    breaks = _graph_breaks()
    configs = CONFIGS
    if ops == "triton":  # the interpreter is slow: one optimizer per family, one step (both, two on torch ops)
        name = "adam-clip" if family in ("llama", "qwen2") else "sgd-clip"
        configs = {name: dataclasses.replace(CONFIGS[name], steps=1)}
    for name, cfg in configs.items():
        eager = engine.write_packed(model, packed, M0, cfg, head.weight, head.bias, ops)
        compiled = engine.write_packed(model, packed, M0, cfg, head.weight, head.bias, ops, backbone=backbone)
        for b in range(len(docs)):
            assert_close(
                compiled.memory[b] - M0[b],
                eager.memory[b] - M0[b],
                torch.float32,
                name=f"{name}: written change of document {b}",
            )
        assert_close(compiled.losses, eager.losses, torch.float32, name=f"{name}: losses")
        assert_close(compiled.grad_norms, eager.grad_norms, torch.float32, name=f"{name}: grad_norms")
    assert backbone.compiles == 1  # one shape: both optimizers and every step share one compiled function
    assert _graph_breaks() == breaks


def test_write_many_compiles_once_per_bucket():
    """A stream of ragged documents compiles exactly once per bucket shape that ``padding_waste`` predicts (the
    document count is dynamic, so batches with different counts share a compile), dynamo compiles no extra
    graph, writing a window again compiles nothing, and the memories equal the eager writer's."""
    model = tiny_model("llama", dtype=torch.float32)
    cfg = WriteConfig(num_memory_tokens=2, steps=1, lr=0.3, clip_norm=0.5)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 30, (24,), generator=gen).tolist()
    docs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    compiled = MemoryWriter(model, cfg, backend="triton", compile=True)
    compiled.backbone = engine.CompiledBackbone(model, backend="aot_eager")
    eager = MemoryWriter(model, cfg, backend="triton", compile=False)
    compiled.ops_backend = eager.ops_backend = "torch"  # the interpreter would triple this test's time
    graphs, breaks = counters["stats"]["unique_graphs"], _graph_breaks()
    plan = padding_waste(lengths, 2, batch_tokens=72, window=12)
    out = list(compiled.write_many(docs, batch_tokens=72, window=12))
    assert compiled.backbone.compiles == plan["buckets"] < plan["batches"]
    assert counters["stats"]["unique_graphs"] - graphs == plan["buckets"]
    assert _graph_breaks() == breaks
    again = list(compiled.write_many(docs[:12], batch_tokens=72, window=12))
    assert counters["stats"]["unique_graphs"] - graphs == plan["buckets"]
    ref = list(eager.write_many(docs, batch_tokens=72, window=12))
    for i, (a, r) in enumerate(zip(out, ref)):
        assert_close(a, r, torch.float32, name=f"memory of document {i}")
    for a, b in zip(out, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_mode,last_k", [("first", None), ("second", 1)])
def test_compiled_first_order_steps_keep_meta_gradients(grad_mode, last_k):
    """grad_mode "first" compiles every step and "second" its first-order steps only (the second-order step
    stays eager); the outer gradients (memory init and weights) equal the eager engine's, in fp64."""
    model = tiny_model("gpt2")
    cfg = WriteConfig(
        num_memory_tokens=2, steps=2, lr=0.5, clip_norm=0.2, grad_mode=grad_mode, last_k_second_order=last_k
    )
    head = model.get_output_embeddings()
    docs = _ragged_docs([4, 6])
    packed = pack(docs, 2, "cpu", rows=bucket_rows(14, 2))
    queries = torch.randint(0, VOCAB, (2, 3))
    cot = torch.randn(2, 4, VOCAB, dtype=torch.float64)
    M0 = (torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = engine.CompiledBackbone(model, backend="aot_eager")
    grads = []
    for bb in (None, backbone):
        M = M0.expand(packed.batch, -1, -1)
        memory = engine.write_packed(model, packed, M, cfg, head.weight, head.bias, "torch", backbone=bb).memory
        outer = (reference.read_logits(model, memory, queries) * cot).sum()
        grads.append(torch.autograd.grad(outer, [M0] + params, allow_unused=True))
    assert backbone.compiles == 1
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(b, a)


def test_compile_refuses_the_torch_backend():
    """(Attention dropout compiles: tests/test_attention_dropout_seed.py.)"""
    model = tiny_model("gpt2", dtype=torch.float32, attn_pdrop=0.1).train()
    with pytest.raises(ValueError, match="compile"):
        MemoryWriter(model, backend="torch", compile=True)
    with pytest.raises(ValueError, match="compile"):
        MemoryWriter(model, backend="triton", compile="yes")
    auto = MemoryWriter(model.eval(), backend="triton")
    assert auto.backbone is None  # "auto" compiles on CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_graphed_write_many_matches_eager_and_never_syncs(family):
    """On a GPU: the compiled step inside the captured K-step loop equals the eager engine, and a warmed-up
    write_many stream runs without a host synchronisation."""
    model = tiny_model(family, dtype=torch.float32).cuda()
    cfg = WriteConfig(num_memory_tokens=2, steps=3, lr=0.3, clip_norm=0.5)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (6, 1, 3, 9, 4, 2, 7, 5)]
    M0 = torch.randn(2, model.config.hidden_size, device="cuda") * 0.5
    eager = MemoryWriter(model, cfg, backend="triton", compile=False)
    fast = MemoryWriter(model, cfg, backend="triton", compile=True, cuda_graphs=True)
    ref = list(eager.write_many(docs, batch_tokens=40, memory=M0))
    out = list(fast.write_many(docs, batch_tokens=40, memory=M0))
    for a, r in zip(out, ref):
        assert_close(a - M0, r - M0, torch.float32, tf32=True)
    assert fast._graphed is not None and fast.backbone.compiles >= 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = list(fast.write_many(docs, batch_tokens=40, memory=M0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(out, again):
        assert torch.equal(a, b)
