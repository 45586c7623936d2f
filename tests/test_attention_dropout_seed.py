"""Attention dropout seeds on the device: a seed is an int64 tensor the kernels read, the per-device generator
advances in place per unseeded call, and backward / double backward regenerate the forward's mask from the
value the forward used (the generator having moved on). Compiled with fullgraph=True, unseeded calls draw
new masks per call and match the eager op at the same generator value.

Each test names the one-line bug it exists to catch.
"""

import os

import pytest
import torch
from test_attention import cu, ref_varlen
from test_attention_second_order import check_second_order
from torch._dynamo.utils import counters

from gradmem_fast import WriteConfig, engine, prefix_attention
from gradmem_fast.kernels import attention as kernels
from gradmem_fast.ops import attention as attn_op
from gradmem_fast.packing import bucket_rows, pack
from helpers import DEVICE, assert_close
from tiny_models import VOCAB, tiny_model

P = 0.3
LENS_Q, LENS_K = [3, 1, 7], [5, 4, 7]  # memory prefixes (more keys), a length-1 document


def _qkv(dtype=torch.float32, hq=4, hkv=2, d=16, requires_grad=False):
    shapes = [(sum(LENS_Q), hq, d), (sum(LENS_K), hkv, d), (sum(LENS_K), hkv, d)]
    return [torch.randn(*s, device=DEVICE, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def _attn(q, k, v, **kw):
    cq, ck = cu(LENS_Q), cu(LENS_K)
    return prefix_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=P, backend="triton", **kw)


def _ref(q, k, v, seed):
    """fp64 reference (out, lse) with the kernels' mask for ``seed`` (an int), per document."""
    cq, ck = cu(LENS_Q), cu(LENS_K)
    keep = kernels.dropout_keep_mask(
        len(LENS_Q), q.shape[1], max(LENS_Q), max(LENS_K), P, seed, DEVICE, cu_seqlens_q=cq, cu_seqlens_k=ck
    )
    outs, lses = [], []
    for b in range(len(LENS_Q)):
        sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        kb = keep[b : b + 1, :, : LENS_Q[b], : LENS_K[b]]
        o, lse = ref_varlen(q[sq], k[sk], v[sk], cu([LENS_Q[b]]), cu([LENS_K[b]]), keep=kb, dropout_p=P)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def _seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_a_seed_value_gives_one_mask_whatever_holds_it():
    """Catches a kernel that reads the wrong seed (a stale scalar, the wrong word): an int and a tensor holding
    the same value give the same mask and output; the next value another. The counter's high word is dropped
    (seed + 2^32 is seed), so a long-running counter wraps instead of colliding with the head index."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    base = kernels.dropout_keep_mask(2, 3, 9, 11, P, seed, DEVICE)
    assert torch.equal(kernels.dropout_keep_mask(2, 3, 9, 11, P, _seed_tensor(seed), DEVICE), base)
    assert torch.equal(kernels.dropout_keep_mask(2, 3, 9, 11, P, _seed_tensor(seed + 2**32), DEVICE), base)
    assert not torch.equal(kernels.dropout_keep_mask(2, 3, 9, 11, P, _seed_tensor(seed + 1), DEVICE), base)
    q, k, v = _qkv()
    out = _attn(q, k, v, seed=_seed_tensor(seed))
    assert torch.equal(out, _attn(q, k, v, seed=seed))
    assert_close(out, _ref(q, k, v, seed)[0], torch.float32)


def test_unseeded_calls_take_consecutive_values_of_the_device_generator():
    """Catches forgetting to advance the counter (two calls, one mask), advancing before taking (the first
    call would use seed + 1), and replacing the generator tensor instead of updating it in place (a compiled
    or captured graph holding the old tensor would repeat one mask)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    attn_op.set_dropout_seed(seed, DEVICE)
    state = attn_op.dropout_generator(DEVICE)
    ptr = state.data_ptr()
    q, k, v = _qkv()
    first, second = _attn(q, k, v), _attn(q, k, v)
    assert not torch.equal(first, second)
    assert torch.equal(first, _attn(q, k, v, seed=seed))
    assert torch.equal(second, _attn(q, k, v, seed=seed + 1))
    assert attn_op.dropout_generator(DEVICE).data_ptr() == ptr and int(state) == seed + 2
    _attn(q, k, v, seed=5)  # an explicit seed leaves the generator alone
    assert int(state) == seed + 2
    prefix_attention(q, k, v, cu_seqlens_q=cu(LENS_Q), cu_seqlens_k=cu(LENS_K), backend="triton")  # no dropout
    assert int(state) == seed + 2


def test_generator_starts_from_torch_seed():
    """Catches a first value that ignores torch's generator (runs after torch.manual_seed not reproducible)."""
    key = str(torch.device(DEVICE))
    saved = attn_op._GENERATORS.pop(key, None)
    try:
        values = []
        for _ in range(2):
            torch.manual_seed(1234)
            values.append(int(attn_op.dropout_generator(DEVICE)))
            attn_op._GENERATORS.pop(key)
        torch.manual_seed(4321)
        other = int(attn_op.dropout_generator(DEVICE))
        assert values[0] == values[1] != other and 0 <= other < 2**31
    finally:
        if saved is not None:
            attn_op._GENERATORS[key] = saved


def test_backward_regenerates_the_forward_mask_after_the_generator_moved_on():
    """Catches saving the generator tensor (or a user's seed tensor) instead of the value the forward used:
    between forward and backward the generator advances (another call) and the user's tensor is overwritten,
    and the gradients must still be those of the forward's mask (fp64 reference)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    q, k, v = _qkv(requires_grad=True)
    dout = torch.randn_like(q)
    attn_op.set_dropout_seed(seed, DEVICE)
    unseeded = _attn(q, k, v)
    user_seed = _seed_tensor(seed)
    seeded = _attn(q, k, v, seed=user_seed)
    _attn(q, k, v)  # moves the generator on again
    user_seed.fill_(seed + 7)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_ref(q64, k64, v64, seed)[0], (q64, k64, v64), dout.double())
    for out in (unseeded, seeded):
        got = torch.autograd.grad(out, (q, k, v), dout)
        for name, g, w in zip("qkv", got, want):
            assert_close(g, w, torch.float32, name=f"d{name}")


def test_double_backward_regenerates_the_forward_mask():
    """Catches the double backward reading the generator (advanced after the forward) instead of the value saved
    with the first-order backward: forward, backward and double backward of an unseeded call equal the fp64
    reference with the mask of the generator's value at the forward (q, k, v, dout and dlse gradients)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    cq, ck = cu(LENS_Q), cu(LENS_K)
    shapes = [(sum(LENS_Q), 2, 16), (sum(LENS_K), 1, 16), (sum(LENS_K), 1, 16)]
    attn_op.set_dropout_seed(seed, DEVICE)
    op_kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=P)
    check_second_order(shapes, torch.float32, op_kw, lambda q, k, v: _ref(q, k, v, seed))
    assert int(attn_op.dropout_generator(DEVICE)) == seed + 1


@pytest.mark.parametrize(
    "seed, exc, match",
    [
        (torch.tensor([3], dtype=torch.int32), TypeError, "int64"),
        (torch.tensor([3, 4]), TypeError, "one element"),
        (True, ValueError, "seed"),
        (2**31, ValueError, "seed"),
        (1.5, ValueError, "seed"),
    ],
)
def test_bad_seeds_are_named(seed, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        _attn(q, k, v, seed=seed)


def test_set_dropout_seed_rejects_non_ints():
    with pytest.raises(ValueError, match="seed"):
        attn_op.set_dropout_seed(-1, DEVICE)


def _two_layers(q, k, v, w):
    """Two attention calls in one graph (two layers): each draws its own seed."""
    h = _attn(q, k, v)
    return _attn(h @ w, k, v)


def test_compiled_calls_draw_new_masks_and_match_eager():
    """fullgraph=True (aot_eager: dynamo and AOTAutograd's partitioned forward/backward, as with inductor).
    Catches a seed frozen into the graph (two calls of the compiled function give one mask), a host read of
    the seed (a graph break, an error under fullgraph), and a compiled backward that regenerates its mask from
    the advanced generator instead of the saved value: at the same generator value, compiled output and
    gradients equal the eager op's exactly, and the generator advances by one per attention call."""
    q, k, v = _qkv(requires_grad=True)
    w = torch.randn(q.shape[-1], q.shape[-1], device=DEVICE) * 0.3
    dout = torch.randn_like(q)
    attn_op.dropout_generator(DEVICE)  # exists before tracing: no recompile when it would be created
    fn = torch.compile(_two_layers, fullgraph=True, backend="aot_eager")
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    results = {}
    for mode, f in (("eager", _two_layers), ("compiled", fn), ("again", fn)):
        if mode != "again":
            attn_op.set_dropout_seed(seed, DEVICE)
        out = f(q, k, v, w)
        results[mode] = (out, torch.autograd.grad(out, (q, k, v), dout))
        assert int(attn_op.dropout_generator(DEVICE)) == seed + (4 if mode == "again" else 2)
    (eo, eg), (co, cg), (ao, _) = results["eager"], results["compiled"], results["again"]
    assert torch.equal(co, eo)
    for g, e in zip(cg, eg):
        assert torch.equal(g, e)
    assert not torch.equal(ao, co)


def test_compiled_write_step_with_attention_dropout():
    """The engine's compiled step (Triton ops interpreted) on a GPT-2 in training mode with attention dropout,
    no longer refused. ``make test`` compiles with ``aot_eager`` (dynamo and AOTAutograd's partitioned graphs
    without inductor's minute-long C++ build on 2 cores); ``make test-compile`` (GRADMEM_TEST_INDUCTOR=all)
    with inductor. Catches a frozen seed (the next write repeats the masks: equal
    memories), a compiled backward on another mask than its forward (compiled != eager at one generator
    value), and seeding that does not reproduce (a reset generator must give the same memories exactly)."""
    model = tiny_model("gpt2", dtype=torch.float32, attn_pdrop=0.3).train()
    assert engine.attention_dropout_active(model)
    head = model.get_output_embeddings()
    m, layers = 2, model.config.n_layer
    cfg = WriteConfig(num_memory_tokens=m, steps=1, lr=0.5, clip_norm=0.5)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (6, 1, 9)]
    packed = pack(docs, m, "cpu", rows=bucket_rows(sum(len(x) for x in docs) + m * len(docs), m))
    M0 = torch.randn(packed.batch, m, model.config.n_embd) * 0.5
    compiler = "inductor" if os.environ.get("GRADMEM_TEST_INDUCTOR") == "all" else "aot_eager"
    backbone = engine.CompiledBackbone(model, backend=compiler)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    breaks = sum(counters["graph_break"].values())
    runs = {}
    with torch._inductor.config.patch(compile_threads=1):
        for name, bb in (("eager", None), ("compiled", backbone), ("next", backbone), ("again", backbone)):
            if name != "next":
                attn_op.set_dropout_seed(seed, "cpu")
            runs[name] = engine.write_packed(model, packed, M0, cfg, head.weight, head.bias, "triton", backbone=bb)
            # one seed per attention call: a forward per layer and step
            assert int(attn_op.dropout_generator("cpu")) == seed + layers * (2 if name == "next" else 1)
    eager, compiled = runs["eager"], runs["compiled"]
    for b in range(len(docs)):
        assert_close(compiled.memory[b] - M0[b], eager.memory[b] - M0[b], torch.float32, name=f"document {b}")
    assert_close(compiled.losses, eager.losses, torch.float32, name="losses")
    assert not torch.allclose(runs["next"].memory, compiled.memory)
    assert torch.equal(runs["again"].memory, compiled.memory)
    assert backbone.compiles == 1 and sum(counters["graph_break"].values()) == breaks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replays_draw_new_masks():
    """On a GPU: an unseeded call captured in a CUDA graph reads the generator at every replay and advances it,
    so replays give the masks of seeds s, s + 1, ... (equal to explicitly seeded eager calls); the forward's
    backward inside the graph uses the forward's seed."""
    q, k, v = (t.cuda() for t in _qkv(torch.float16, requires_grad=False))
    q.requires_grad_(True)
    dout = torch.randn_like(q)
    static = {}

    def step():
        out = _attn(q, k, v)
        (dq,) = torch.autograd.grad(out, q, dout)
        return out, dq

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels and creates the generator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static["out"], static["dq"] = step()
    seed = 1000
    attn_op.set_dropout_seed(seed, q.device)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append((static["out"].clone(), static["dq"].clone()))
    torch.cuda.synchronize()
    assert int(attn_op.dropout_generator(q.device)) == seed + 2
    assert not torch.equal(replays[0][0], replays[1][0])
    for i, (out, dq) in enumerate(replays):
        ref = _attn(q, k, v, seed=seed + i)
        (ref_dq,) = torch.autograd.grad(ref, q, dout)
        assert torch.equal(out, ref) and torch.equal(dq, ref_dq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphed_compiled_write_loop_with_attention_dropout():
    """On a GPU: the K-step loop captured once (compiled step inside) and replayed with attention dropout: a
    replay at a generator value equals the eager engine at that value, the next replay draws other masks, and
    each replay advances the generator by one per attention forward (layers x steps)."""
    model = tiny_model("gpt2", dtype=torch.float32, attn_pdrop=0.3).cuda().train()
    head = model.get_output_embeddings()
    m, layers = 2, model.config.n_layer
    cfg = WriteConfig(num_memory_tokens=m, steps=2, lr=0.3, clip_norm=0.5)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (6, 1, 9, 4)]
    packed = pack(docs, m, "cuda", rows=bucket_rows(sum(len(x) for x in docs) + m * len(docs), m))
    M0 = torch.randn(packed.batch, m, model.config.n_embd, device="cuda") * 0.5
    loop = engine.GraphedWriteLoop(
        model, cfg, head.weight, head.bias, "triton", backbone=engine.CompiledBackbone(model)
    )
    loop(packed, M0)  # warm-up and capture
    seed = 4321
    attn_op.set_dropout_seed(seed, "cuda")
    first = loop(packed, M0)
    second = loop(packed, M0)
    assert int(attn_op.dropout_generator("cuda")) == seed + 2 * layers * cfg.steps
    attn_op.set_dropout_seed(seed, "cuda")
    eager = engine.write_packed(model, packed, M0, cfg, head.weight, head.bias, "triton")
    for b in range(len(docs)):
        assert_close(first.memory[b] - M0[b], eager.memory[b] - M0[b], torch.float32, tf32=True, name=f"doc {b}")
    assert not torch.allclose(first.memory, second.memory)
