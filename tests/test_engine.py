"""The packed write engine against the torch reference (DESIGN.md semantics contract)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradmem_fast import MemoryWriter, WriteConfig, engine, reference
from gradmem_fast.inputs import check_token_batch
from gradmem_fast.packing import bucket_rows, documents_from_batch, pack
from helpers import assert_close, eager_capture, packed_attention_without_host_reads
from tiny_models import FAMILIES, VOCAB, tiny_model


def ragged(lengths):
    B, S = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids, mask


def engine_write(model, ids, mask, M0, cfg, backend):
    ids, mask = check_token_batch(ids, mask, VOCAB)
    packed = pack(documents_from_batch(ids, mask), cfg.num_memory_tokens, "cpu")
    head = model.get_output_embeddings()
    M = M0.expand(ids.shape[0], -1, -1) if M0.dim() == 2 else M0
    return engine.write_packed(model, packed, M, cfg, head.weight, head.bias, backend)


def assert_same_write(result, ref, dtype, tf32=False):
    assert_close(result.memory, ref.memory, dtype, tf32, name="memory")
    assert_close(result.losses, ref.losses, dtype, tf32, name="losses")
    assert_close(result.grad_norms, ref.grad_norms, dtype, tf32, name="grad_norms")


CONFIGS = [
    WriteConfig(num_memory_tokens=3, steps=3, lr=0.5, clip_value=0.05, clip_norm=0.08),
    WriteConfig(num_memory_tokens=2, steps=3, lr=0.02, optimizer="adam"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd-clip", "adam"])
def test_engine_torch_ops_match_reference_fp64(family, cfg):
    """Packing, the loss alignment and the update wiring, exactly (fp64, torch ops)."""
    model = tiny_model(family)
    ids, mask = ragged([5, 1, 12, 2])
    M0 = torch.randn(cfg.num_memory_tokens, model.config.hidden_size, dtype=torch.float64) * 0.5
    ref = reference.write(model, ids, mask, M0, cfg)
    out = engine_write(model, ids, mask, M0, cfg, "torch")
    assert_same_write(out, ref, torch.float64)
    assert model.config._attn_implementation == "test_eager64"  # switched back after the write


def test_fixed_shape_filler_does_not_change_real_documents():
    """Bucket padding (used for CUDA-graph replay): filler documents leave real results unchanged."""
    model = tiny_model("llama")
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.3, clip_norm=0.1)
    ids, mask = check_token_batch(*ragged([6, 1, 3]), VOCAB)
    docs = documents_from_batch(ids, mask)
    M = torch.randn(3, 2, model.config.hidden_size, dtype=torch.float64)
    head = model.get_output_embeddings()
    plain = engine.write_packed(model, pack(docs, 2, "cpu"), M, cfg, head.weight, None, "torch")
    padded_pack = pack(docs, 2, "cpu", rows=41)  # 16 real rows, 25 filler rows: 4 documents of <= 8 rows
    assert padded_pack.batch == 7 and max(padded_pack.lengths[3:]) <= 6 and padded_pack.total_rows == 41
    padded = engine.write_packed(
        model, padded_pack, torch.cat([M, M.new_zeros(4, 2, M.shape[2])]), cfg, head.weight, None, "torch"
    )
    assert padded.memory.shape == plain.memory.shape
    assert_same_write(padded, plain, torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager_engine():
    model = tiny_model("llama", dtype=torch.float32).cuda()
    cfg = WriteConfig(num_memory_tokens=2, steps=3, lr=0.3, clip_norm=0.5)
    eager_writer = MemoryWriter(model, cfg, backend="triton", compile=False)  # compile="auto" would compile it
    graph_writer = MemoryWriter(model, cfg, backend="triton", cuda_graphs=True)  # compiled step inside the graph
    for lengths in ([6, 1, 3], [5, 2, 2], [9, 4]):  # the first two share a bucket: a replay
        ids, mask = ragged(lengths)
        a = eager_writer.write(ids.cuda(), mask.cuda())
        b = graph_writer.write(ids.cuda(), mask.cuda())
        assert_same_write(b, a, torch.float32, tf32=True)
    assert len(graph_writer._graphed.graphs) >= 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd-clip", "adam"])
def test_graphed_write_loop_with_a_cpu_stand_in_capture(cfg, monkeypatch):
    """GraphedWriteLoop's buffer discipline with a CPU stand-in for the capture: each replay re-runs the loop
    on the static buffers and must run the captured call's exact op sequence (``helpers.eager_capture``: a
    CUDA graph freezes shapes and scalars), and batches that share the graph give the eager engine's
    memories, losses and norms (fp64, torch ops)."""
    counter = {"captures": 0, "replays": 0}
    monkeypatch.setattr(engine, "capture_cuda_graph", eager_capture(counter))
    packed_attention_without_host_reads(monkeypatch)
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    m = cfg.num_memory_tokens
    loop = engine.GraphedWriteLoop(model, cfg, head.weight, head.bias, "torch")
    keys = set()
    for lengths in ([6, 1, 3], [2, 7, 1], [3, 5, 2]):
        docs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
        packed = pack(docs, m, "cpu", rows=bucket_rows(sum(lengths) + m * len(lengths), m), doc_multiple=8)
        keys.add(loop.key(packed))
        M = torch.randn(packed.batch, m, model.config.hidden_size, dtype=torch.float64) * 0.5
        got = loop(packed, M)
        want = engine.write_packed(model, packed, M, cfg, head.weight, head.bias, "torch")
        assert got.memory.shape == (len(lengths), m, model.config.hidden_size)
        assert_same_write(got, want, torch.float64)
    assert counter == {"captures": len(keys), "replays": 3} and len(keys) < 3  # a graph served two batches


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_triton_matches_reference_fp32(family):
    """The Triton kernels (interpreter) in the loop, fp32."""
    model = tiny_model(family, dtype=torch.float32)
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.5, clip_norm=0.1)
    ids, mask = ragged([7, 1, 3])
    M0 = torch.randn(2, model.config.hidden_size) * 0.5
    ref = reference.write(model.double(), ids, mask, M0.double(), cfg)
    model.float()
    out = MemoryWriter(model, cfg, backend="triton").write(ids, mask, M0)
    assert_same_write(out, ref, torch.float32)


@pytest.mark.parametrize(
    "family,grad_mode,last_k", [("llama", "first", None), ("gpt2", "second", None), ("qwen2", "second", 1)]
)
def test_engine_meta_gradients_match_reference(family, grad_mode, last_k):
    model = tiny_model(family)
    cfg = WriteConfig(
        num_memory_tokens=2, steps=2, lr=0.5, clip_norm=0.2, grad_mode=grad_mode, last_k_second_order=last_k
    )
    ids, mask = ragged([4, 6])
    queries = torch.randint(0, VOCAB, (2, 3))
    cot = torch.randn(2, 4, VOCAB, dtype=torch.float64)
    M0 = (torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    params = list(model.parameters())
    grads = []
    for write in (
        lambda: reference.write(model, ids, mask, M0, cfg),
        lambda: engine_write(model, ids, mask, M0, cfg, "torch"),
    ):
        memory = write().memory
        outer = (reference.read_logits(model, memory, queries) * cot).sum()
        grads.append(torch.autograd.grad(outer, [M0] + params, allow_unused=True))
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert_close(b, a)


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def _weight_shaped_products(model, with_weights):
    """Shapes of backward matrix products that produce a weight-shaped result (a weight gradient)."""
    cfg = WriteConfig(num_memory_tokens=2, steps=1, lr=0.1)
    ids, mask = check_token_batch(*ragged([5, 3]), VOCAB)  # 12 packed rows: no weight is [12, x]
    packed = pack(documents_from_batch(ids, mask), cfg.num_memory_tokens, "cpu")
    M = torch.randn(2, 2, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()(packed.tokens).detach()
    params = [p for p in model.parameters() if p.dim() == 2]
    weight_shapes = {tuple(p.shape) for p in params} | {tuple(p.shape[::-1]) for p in params}
    from gradmem_fast.backend import use_backend

    with use_backend("torch"), engine.gradmem_attention(model):
        loss = engine._step_loss(model, M, engine.packed_input(packed, emb), packed, head.weight, None)
        rec = _MatmulShapes()
        with rec:
            torch.autograd.grad(loss.sum(), [M] + (params if with_weights else []), allow_unused=True)
    return [s for s in rec.shapes if s[-2:] in weight_shapes]


def test_no_weight_gradients_are_computed():
    """Frozen weights: the write's backward forms no weight-gradient product, even when the weights
    could take gradients (requires_grad=True, as a freshly loaded model has)."""
    model = tiny_model("gpt2")
    for p in model.parameters():
        p.requires_grad_(True)
    assert _weight_shaped_products(model, with_weights=False) == []
    assert all(p.grad is None for p in model.parameters())
    # The detector itself works: asking for weight gradients makes such products appear.
    assert len(_weight_shaped_products(model, with_weights=True)) >= 4


def test_write_many_matches_write_and_keeps_order():
    model = tiny_model("qwen2")
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.3)
    docs = [torch.randint(0, VOCAB, (n,)) for n in [9, 1, 4, 7, 2, 5, 3]]
    writer = MemoryWriter(model, cfg, backend="torch")
    streamed = list(writer.write_many(iter(docs), batch_tokens=14, window=4))
    assert len(streamed) == len(docs)
    for doc, mem in zip(docs, streamed):
        alone = writer.write(doc[None]).memory[0]
        assert_close(mem, alone)


def test_write_many_bad_input():
    writer = MemoryWriter(tiny_model("gpt2"), WriteConfig(num_memory_tokens=2, steps=1), backend="torch")
    with pytest.raises(ValueError, match=r"documents\[1\]"):
        list(writer.write_many([[1, 2], []]))
    with pytest.raises(ValueError, match="batch_tokens"):
        list(writer.write_many([[1, 2]], batch_tokens=0))


def test_triton_engine_rejects_models_without_attention_interface():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)
            self.base_model_prefix = "inner"
            self.inner = torch.nn.Identity()

        def get_input_embeddings(self):
            return self.emb

        @property
        def base_model(self):
            return self.inner

    with pytest.raises(ValueError, match="AttentionInterface"):
        MemoryWriter(Plain(), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-synchronisation check needs a GPU")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_k_step_loop_has_no_host_synchronisation(family):
    model = tiny_model(family, dtype=torch.float32).cuda()
    cfg = WriteConfig(num_memory_tokens=2, steps=3, lr=0.3, clip_norm=0.5, optimizer="sgd")
    ids, mask = check_token_batch(*ragged([6, 1, 3]), VOCAB)
    packed = pack(documents_from_batch(ids, mask), 2, "cuda")
    head = model.get_output_embeddings()
    M = torch.randn(3, 2, model.config.hidden_size, device="cuda")
    engine.write_packed(model, packed, M, cfg, head.weight, head.bias, "triton")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.write_packed(model, packed, M, cfg, head.weight, head.bias, "triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
