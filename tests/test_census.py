"""The step census (benchmarks/census.py, benchmarks/census_count.py): counting rules on known op sequences,
Triton launch recording, attention pair counts, the roofline arithmetic, and the census of the real loops
at the dry-run shapes (the reference's FLOPs against gradmem_fast.flops, no host sync in the engine's loop).
"""

import json
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import census
from benchmarks.census_count import (
    GPU,
    Census,
    InfraCensus,
    Launch,
    attention_pass_flops,
    causal_pairs,
    fusion_bound,
    record_inductor,
    record_triton,
    roofline,
    tensor_bytes,
    tile_pairs,
)


def test_known_op_sequence():
    """Launches, FLOPs, bytes and syncs of a hand-counted sequence of meta-tensor ops."""
    c = Census()
    with c:
        a = torch.empty(4, 8, device="meta")  # allocation: no launch
        w = torch.empty(8, 3, device="meta")
        b = a + 1  # launch 1: reads 128 B, writes 128 B
        b.view(32)  # view: no launch
        b.t()  # view: no launch
        y = a @ w  # launch 2: 2*4*8*3 FLOPs; 128 + 96 B read, 48 B written
        e = a.unsqueeze(0).expand(5, 4, 8) * 2.0  # launch 3: the broadcast operand is read once (128 B)
        s = y.sum()  # launch 4: 48 B read, 4 B written
        value = s.item()  # sync on a value that depends on unknown data
    assert [x.name for x in c.launches] == ["aten.add", "aten.mm", "aten.mul", "aten.sum"]
    assert [x.flops for x in c.launches] == [0, 2 * 4 * 8 * 3, 0, 0]
    assert [x.bytes for x in c.launches] == [256, 128 + 96 + 48, 128 + 5 * 128, 48 + 4]
    assert e.shape == (5, 4, 8)
    totals = c.since()
    assert totals["launches"] == 4 and totals["flops"] == 192 and totals["bytes"] == 256 + 272 + 768 + 52
    assert totals["syncs"] == 1 and totals["unknown_values"] == 1 and value == 0


def test_values_follow_meta_tensors():
    """Host-known values travel with meta tensors: syncs answer with the true values and are counted."""
    c = Census()
    host = torch.tensor([[3, 1, 0], [4, 1, 1]])
    with c:
        ids = host.to("meta")  # blocking H2D copy: one memcpy launch, one sync
        total = int(ids.sum())  # one sum launch, one sync
        rows = ids.sum(1).tolist()  # one sum launch, one D2H copy (launch + sync)
        where = (ids == 1).nonzero()  # eq launch; nonzero: launch + sync, real output size
        back = ids.cpu()  # D2H: launch + sync
        lazy = host.to("meta", non_blocking=True)  # a non-blocking H2D copy does not wait
        lazy.mul_(torch.empty(3, device="meta"))  # written with unknown values: no longer known
        unknown = bool(lazy.sum())
    assert total == 10 and rows == [4, 6] and tuple(where.shape) == (3, 2) and where.device.type == "meta"
    assert torch.equal(back, host) and back.device.type == "cpu" and unknown is False
    kinds = [s.name for s in c.syncs]
    assert kinds == ["blocking H2D copy", "item", "D2H copy", "nonzero", "D2H copy", "item"]
    assert [s.known for s in c.syncs] == [True, True, True, True, True, False]
    assert c.since()["launches"] == 10  # 4 memcpy, 3 sums, eq, nonzero, mul_
    assert sum(x.kind == "memcpy" for x in c.launches) == 4


def test_host_ops_run_for_real_without_launches():
    c = Census()
    with c:
        x = torch.arange(6).reshape(2, 3).cumsum(1)
        n = int(x[-1, -1])
    assert n == 12 and c.launches == [] and c.syncs == [] and c.host_ops >= 3


def test_tensor_bytes_counts_broadcast_once():
    t = torch.empty(3, 1, 5, dtype=torch.bfloat16).expand(3, 7, 5)
    assert tensor_bytes(t) == 3 * 5 * 2
    assert tensor_bytes(torch.empty(0, 4)) == 0
    assert tensor_bytes(torch.empty(4, 6)[:, ::2]) == 4 * 3 * 4


@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (3, 7), (7, 3), (6, 1), (1, 6), (0, 4)])
def test_causal_pairs_brute_force(lq, lk):
    expected = sum(1 for i in range(lq) for j in range(lk) if j <= i + lk - lq)
    assert causal_pairs(lq, lk) == expected
    assert causal_pairs(lq, lk, causal=False) == lq * lk


@pytest.mark.parametrize("lq,lk", [(1, 1), (37, 37), (20, 45), (45, 20), (64, 64)])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (True, 17), (False, None)])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 64)])
def test_tile_pairs_are_the_grid_tiles_holding_a_visible_pair(lq, lk, causal, window, bm, bn):
    """Against the mask (the torch reference's, as tests/test_attention_flops.py checks visible_pairs against
    its own): every tile of the bm x bn grid with at least one visible pair, computed whole."""
    from gradmem_fast.ops.attention import _visible

    vis = _visible(lq, lk, causal, window, torch.device("cpu"))
    rows, cols = vis.nonzero(as_tuple=True)
    tiles = {(int(a) // bm, int(b) // bn) for a, b in zip(rows, cols)}
    assert tile_pairs(lq, lk, bm, bn, causal, window) == len(tiles) * bm * bn >= int(vis.sum())


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=keep), mask=keep)


def test_triton_launch_recorded_not_run_then_restored():
    c = Census()
    x, y = torch.empty(10, device="meta"), torch.empty(10, device="meta")
    with record_triton(c), c:
        _double_kernel[(1,)](x, y, 10, BLOCK=16)
        _double_kernel[(1,)](x, x, 10, BLOCK=16)  # the same buffer twice is one tensor's traffic
    assert [(ln.name, ln.kind, ln.bytes) for ln in c.launches] == [
        ("_double_kernel", "triton", 80),
        ("_double_kernel", "triton", 40),
    ]
    assert c.uncounted_flops == 2  # an unknown kernel's FLOPs are reported as not modelled
    xr = torch.randn(10)
    yr = torch.full((10,), float("nan"))
    _double_kernel[(1,)](xr, yr, 10, BLOCK=16)  # outside the context the kernel runs again
    assert torch.equal(yr, 2 * xr)


def test_attention_launch_flops_from_packed_lengths():
    """Our varlen attention on meta tensors: the forward is one launch of 4 Hq D P FLOPs with P the causal
    pairs of the packed documents (read from the known cu_seqlens); the backward does at least the useful
    8 Hq D P."""
    from gradmem_fast.ops.attention import prefix_attention

    lengths, H, D = [5, 1, 7], 2, 16
    P = sum(n * (n + 1) // 2 for n in lengths)
    T = sum(lengths)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    c = Census()
    with record_triton(c), c:
        q = torch.empty(T, H, D, device="meta", requires_grad=True)
        k, v = torch.empty(T, H, D, device="meta"), torch.empty(T, H, D, device="meta")
        cu_m = cu.to("meta")
        out = prefix_attention(
            q, k, v, cu_seqlens_q=cu_m, cu_seqlens_k=cu_m, max_seqlen_q=7, max_seqlen_k=7, backend="triton"
        )
        fwd = [x for x in c.launches if x.kind == "triton"]
        mark = c.mark()
        (g,) = torch.autograd.grad(out, q, torch.empty(T, H, D, device="meta"))
    assert g.shape == q.shape
    assert [(x.name, x.flops, x.parent) for x in fwd] == [
        ("attn_fwd_kernel", 4 * H * D * P, "gradmem_fast::attention_fwd")
    ]
    assert fwd[0].bytes >= 4 * T * H * D * 4  # q, k, v read and out written at least
    bwd = c.since(mark)
    assert bwd["flops"] >= 8 * H * D * P and bwd["syncs"] == 0
    assert all(x.parent == "gradmem_fast::attention_bwd" for x in c.launches[len(fwd) + 1 :] if x.kind == "triton")


def test_roofline_arithmetic():
    gpu = GPU(
        "test",
        bf16_tflops=100.0,
        tf32_tflops=50.0,
        fp32_tflops=10.0,
        hbm_tbps=1.0,
        compute_fraction=0.5,
        bandwidth_fraction=0.5,
        launch_us=4.0,
        graph_launch_us=1.0,
        min_kernel_us=2.0,
        sync_us=10.0,
    )
    launches = [
        Launch("gemm", "aten", int(1e9), int(1e6), torch.bfloat16),  # 20 us compute, 2 us memory
        Launch("copy", "aten", 0, int(5e6), torch.float32),  # 10 us memory
        Launch("tiny", "aten", 0, 10, torch.float32),
    ]  # floor of 2 us
    r = roofline(launches, syncs=2, gpu=gpu)
    assert math.isclose(r["gpu_busy_us"], 20 + 10 + 2)
    assert math.isclose(r["compute_us"], 20) and math.isclose(r["memory_us"], 2 + 10 + 2e-5)
    assert math.isclose(r["host_launch_us"], 12) and math.isclose(r["step_us"], 32 + 20)
    assert r["bound"] == "compute"
    fast = roofline(launches[2:] * 10, syncs=0, gpu=gpu)
    assert fast["bound"] == "launch" and math.isclose(fast["step_us"], 40)
    graphed = roofline(launches[2:] * 10, syncs=0, gpu=gpu, graphs=True)
    assert math.isclose(graphed["step_us"], 20) and graphed["bound"] == "memory"


def test_fusion_bound_on_a_hand_made_step():
    """Elementwise runs between anchors become one kernel per reduction (at least one), reading what comes
    from outside once and writing only what is read outside (or by nobody)."""
    f32 = torch.float32
    launches = [
        Launch("aten.mm", "aten", 64, 1150, f32, reads=(("W", 1000), ("X", 50)), writes=(("A", 100),)),
        Launch("aten.add", "aten", 0, 310, f32, reads=(("A", 100), ("B", 10)), writes=(("C", 100),)),
        Launch("aten.mul", "aten", 0, 200, f32, reads=(("C", 100),), writes=(("D", 100),)),
        Launch("aten.sum", "aten", 0, 104, f32, reads=(("D", 100),), writes=(("E", 4),)),
        Launch("attn_fwd_kernel", "triton", 10, 300, f32, reads=(("D", 100), ("F", 200))),
        Launch("aten.add", "aten", 0, 400, f32, reads=(("F", 200),), writes=(("G", 200),)),
        Launch("aten.mul", "aten", 0, 400, f32, reads=(("G", 200),), writes=(("H", 200),)),
        Launch("aten.sum", "aten", 0, 204, f32, reads=(("H", 200),), writes=(("I", 4),)),
        Launch("aten.max", "aten", 0, 204, f32, reads=(("H", 200),), writes=(("J", 4),)),
    ]
    fused = fusion_bound(launches)
    assert [x.name for x in fused] == ["aten.mm", "fused", "attn_fwd_kernel", "fused", "fused"]
    # A and B come in; D is read by the attention launch, E by nobody; C stays inside.
    assert fused[1].bytes == 100 + 10 + 100 + 4
    # F comes in; I and J are results; G and H stay inside; two reductions -> two kernels.
    assert fused[3].bytes + fused[4].bytes == 200 + 4 + 4
    assert fusion_bound(launches[:1]) == launches[:1]


def test_compiled_code_is_counted_kernel_by_kernel():
    """Under InfraCensus a torch.compile'd function runs compiled (not skipped to eager): its extern GEMM is
    seen through the dispatcher and each generated kernel call is recorded by record_inductor."""

    def f(x, w):
        return torch.nn.functional.gelu(x @ w).sin().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4)
    compiled(x, w).backward()  # compiles the forward and the backward outside the census
    c = InfraCensus()
    with record_inductor(c), c:
        y = compiled(x, w)
        forward = list(c.launches)
        y.backward()
    fused = [ln for ln in forward if ln.kind == "fused"]
    assert len(fused) == 1 and fused[0].name.startswith("inductor.") and fused[0].bytes >= 8 * 4 * 4
    assert [(ln.name, ln.flops) for ln in forward if ln.kind == "aten"] == [("aten.mm", 2 * 8 * 16 * 4)]
    assert sum(ln.kind == "fused" for ln in c.launches) == 2 and c.syncs == []
    torch.testing.assert_close(y, f(x, w))  # the kernels ran, not just their records


def test_compiled_counts_take_anchors_from_full_shape_and_scale_the_rest():
    f32 = torch.float32
    gemm_full = Launch("aten.mm", "aten", 1000, 500, f32)
    eager_full = {
        "launches_1": [gemm_full, Launch("aten.add", "aten", 0, 400, f32)],
        "launches_2": [gemm_full, Launch("aten.add", "aten", 0, 400, f32)] * 2,
    }
    eager_small = {
        "launches_1": [Launch("aten.mm", "aten", 10, 5, f32), Launch("aten.add", "aten", 0, 4, f32)],
        "launches_2": [Launch("aten.mm", "aten", 10, 5, f32), Launch("aten.add", "aten", 0, 4, f32)] * 2,
    }
    compiled = {
        1: [Launch("aten.mm", "aten", 10, 5, f32), Launch("inductor.k", "fused", 0, 3, f32)],
        2: [Launch("aten.mm", "aten", 10, 5, f32), Launch("inductor.k", "fused", 0, 3, f32)] * 2,
    }
    out = census.compiled_counts(compiled, {1: 0, 2: 1}, eager_small, eager_full)
    assert [x.name for x in out["launches_1"]] == ["aten.mm", "inductor.k"]
    assert out["launches_1"][1].bytes == 300  # 3 bytes x (400 / 4)
    step = out["step"]
    assert step["launches"] == 2 and step["flops"] == 1000 and step["bytes"] == 800 and step["syncs"] == 1
    assert step["fused_kernels"] == 1


@pytest.fixture(scope="module")
def gpt2_dry():
    spec = census.specs(True, ("gpt2_124m",))[0]
    return spec, census._case_inputs(spec)


def test_reference_step_flops_match_flops_module(gpt2_dry):
    """The reference loop's counted FLOPs per step equal gradmem_fast.flops on the padded batch (eager
    attention multiplies full S x S scores and the head runs on every padded position)."""
    from gradmem_fast.flops import write_step_flops

    spec, (model, ids, mask, lengths, M0) = gpt2_dry
    counts = census.count_steps(census._runner("reference", model, spec, ids, mask, M0))
    step = counts["step"]
    padded = [max(lengths)] * len(lengths)
    assert step["flops"] == write_step_flops(model, padded, spec.memory_tokens, attention_pairs="full")
    assert step["syncs"] == 0 and step["launches"] > 0 and step["bytes"] > 0
    assert counts["setup"]["syncs"] > 0  # input validation reads values once, before the loop


def test_engine_step_has_no_host_sync_and_counts_our_kernels(gpt2_dry):
    spec, (model, ids, mask, lengths, M0) = gpt2_dry
    counts = census.count_steps(census._runner("engine_eager", model, spec, ids, mask, M0))
    step = counts["step"]
    assert step["syncs"] == 0 and step["unknown_values"] == 0 and step["uncounted_flops"] == 0
    names = {x.name for x in counts["launches_2"]}
    assert {"attn_fwd_kernel", "ce_forward_kernel", "ce_dh_kernel", "_memory_update_kernel"} <= names
    # The WRITE loop's frozen head: GEMM write, statistics read, dH read of each logits chunk (issue 14: <= 3).
    assert step["ce_logits_passes"]["passes"] == 3
    # Executed FLOPs: at least the useful ones (causal attention, no padding), at most the eager reference's.
    from gradmem_fast.flops import write_step_flops

    assert step["flops"] >= write_step_flops(model, lengths, spec.memory_tokens)


@pytest.mark.parametrize("deterministic", [False, True])
def test_engine_step_attention_flops_match_the_formula(gpt2_dry, deterministic):
    """The census of the engine's real WRITE step, in torch's default and deterministic modes: our attention
    kernels' FLOPs per step equal L x gradmem_fast.flops.attention_flops over the packed documents (m + n_b
    positions each), with the split backward's 7 units in deterministic mode and the atomic one's 5 otherwise."""
    from gradmem_fast.flops import attention_flops, model_shape

    spec, (model, ids, mask, lengths, M0) = gpt2_dry
    with census.deterministic_mode(deterministic):
        step = census.count_steps(census._runner("engine_eager", model, spec, ids, mask, M0))["step"]
    assert torch.are_deterministic_algorithms_enabled() is False  # the mode is restored
    shape = model_shape(model.config)
    want = attention_flops(
        [spec.memory_tokens + n for n in lengths],
        num_heads=shape.num_heads,
        head_dim=shape.head_dim,
        deterministic=deterministic,
    )
    assert step["attention_flops"] == {
        "fwd": shape.num_layers * want["fwd"],
        "bwd": shape.num_layers * want["bwd"],
        "dbwd": 0,
    }
    assert step["by_kind"]["triton"] > 0 and step["syncs"] == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_windowed_attention_call_counts_the_window(deterministic):
    """A sliding-window call, packed (GQA) and padded: the census counts the pairs inside the window (the
    kernels never visit tiles wholly outside it, census_count.launch_window), forward, backward and double
    backward, equal to attention_flops(window=...) and fewer than the causal pairs."""
    from gradmem_fast.flops import attention_flops
    from gradmem_fast.ops.attention import prefix_attention

    lengths, hq, hkv, d, window = [9, 1, 4], 4, 2, 16, 3
    t = sum(lengths)
    cu = torch.tensor([0, 9, 10, 14], dtype=torch.int32)  # moved to meta inside the census: values known
    want = attention_flops(lengths, num_heads=hq, head_dim=d, window=window, deterministic=deterministic)
    assert want["pairs"] < attention_flops(lengths, num_heads=hq, head_dim=d)["pairs"]
    calls = {
        "packed": ((t, hq, d), (t, hkv, d), dict(max_seqlen_q=9, max_seqlen_k=9)),
        "padded": ((3, 9, hq, d), (3, 9, hkv, d), {}),
    }
    for layout, (q_shape, kv_shape, kw) in calls.items():
        c = Census()
        with census.deterministic_mode(deterministic), record_triton(c), c:
            q = torch.empty(q_shape, device="meta", requires_grad=True)
            k, v = (torch.empty(kv_shape, device="meta", requires_grad=True) for _ in range(2))
            if layout == "packed":
                cu_m = cu.to("meta")
                kw = dict(kw, cu_seqlens_q=cu_m, cu_seqlens_k=cu_m)
            out = prefix_attention(q, k, v, window=window, backend="triton", **kw)
            grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out), create_graph=True)
            first = attention_pass_flops(c.launches)
            inner = sum((g * torch.empty_like(g)).sum() for g in grads)
            torch.autograd.grad(inner, (q, k, v))
        second = attention_pass_flops(c.launches)
        if layout == "padded":  # three rows of 9 tokens: the window's pairs of a 9 x 9 sequence, three times
            want = attention_flops([9] * 3, num_heads=hq, head_dim=d, window=window, deterministic=deterministic)
        assert first == {"fwd": want["fwd"], "bwd": want["bwd"], "dbwd": 0}, layout
        # The second-order pass adds the double backward's kernels. (It currently also reruns the first-order
        # backward on zero cotangents, the forward's autograd node being reached with no gradient: not pinned.)
        assert (second["fwd"], second["dbwd"]) == (want["fwd"], want["dbwd"]), layout


def test_tile_flops_of_a_long_windowed_call():
    """At the GPU tables' tiles a launch computes whole tiles: at least its visible pairs, and with a window fewer
    tiles than the causal triangle (the kernels skip the tiles outside it)."""
    from gradmem_fast.ops.attention import prefix_attention

    def forward(window):
        c = Census()
        with record_triton(c), c:
            q, k, v = (torch.empty(2, 512, 4, 64, device="meta", dtype=torch.bfloat16) for _ in range(3))
            prefix_attention(q, k, v, window=window, backend="triton")
        (launch,) = [x for x in c.launches if x.name == "attn_fwd_kernel"]
        return launch

    causal, windowed = forward(None), forward(64)
    for x in (causal, windowed):
        assert x.flops <= x.tile_flops[0] <= x.tile_flops[1]
    assert windowed.flops < causal.flops / 3
    assert windowed.tile_flops[0] < causal.tile_flops[0] and windowed.tile_flops[1] < causal.tile_flops[1]


def test_engine_step_on_a_sliding_window_model():
    """A Mistral with a sliding window (Hugging Face passes it to our attention) through the engine's WRITE step:
    the census counts the windowed pairs, L x attention_flops(window=...), not the causal triangle."""
    import dataclasses

    from gradmem_fast import MemoryWriter, WriteConfig
    from gradmem_fast.flops import attention_flops, model_shape
    from tiny_models import VOCAB, tiny_model

    model = tiny_model("mistral", dtype=torch.float32, sliding_window=3).to("meta").requires_grad_(False)
    lengths, m = [6, 1, 4], 2
    ids = torch.randint(1, VOCAB, (3, 6))
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    config = WriteConfig(num_memory_tokens=m, steps=1, lr=0.1)
    writer = MemoryWriter(model, config, backend="triton")

    def run(steps):
        writer.config = dataclasses.replace(config, steps=steps)
        return writer.write(ids, mask, memory=torch.randn(m, model.config.hidden_size)).memory

    step = census.count_steps(run)["step"]
    shape = model_shape(model.config)
    docs = [m + n for n in lengths]
    want = attention_flops(docs, num_heads=shape.num_heads, head_dim=shape.head_dim, window=3)
    assert want["pairs"] < attention_flops(docs, num_heads=shape.num_heads, head_dim=shape.head_dim)["pairs"]
    assert step["attention_flops"] == {
        "fwd": shape.num_layers * want["fwd"],
        "bwd": shape.num_layers * want["bwd"],
        "dbwd": 0,
    }


def test_deterministic_mode_no_longer_hides_the_engine(monkeypatch):
    """torch.use_deterministic_algorithms(True) imports triton (through torch._dynamo) before the census starts;
    the census used to leave TRITON_INTERPRET unset whenever triton was imported, and the engine then read as
    "needs CUDA or TRITON_INTERPRET=1". What decides is whether our kernels were decorated yet."""
    import sys

    import gradmem_fast.kernels.attention  # noqa: F401  (loaded, as in any test process that ran a kernel)

    with census.deterministic_mode(True):
        assert "triton" in sys.modules
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "before TRITON_INTERPRET=1 was set" in census._interpreter_problem()
    with pytest.raises(census.NotAvailable, match="before TRITON_INTERPRET=1 was set"):
        census._runner("engine_eager", None, None, None, None, None)
    for name in [m for m in sys.modules if m.startswith("gradmem_fast.kernels")]:
        monkeypatch.delitem(sys.modules, name)  # restored by monkeypatch
    assert census._interpreter_problem() is None
    census._ensure_interpreter()
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_cli_deterministic_flag(tmp_path):
    rc = census.main(
        ["--dry-run", "--deterministic", "--cases", "tiny_kv", "--impls", "engine_eager", "--out", str(tmp_path)]
    )
    assert rc == 0 and torch.are_deterministic_algorithms_enabled() is False
    with open(os.path.join(tmp_path, "census.json")) as f:
        result = json.load(f)
    (eager,) = [r for r in result["records"] if r["impl"] == "engine_eager"]
    assert result["meta"]["deterministic"] is True and eager["status"] == "ok" and eager["deterministic"] is True
    att = eager["attention_flops"]
    assert att["bwd"] * 2 == att["fwd"] * 7  # split backward: 7 units against the forward's 2
    assert "deterministic mode" in open(os.path.join(tmp_path, "census.txt")).read()


def test_projection_for_the_gpu_suite():
    plain = census.projection("tiny_kv", "gradmem_fast", dry_run=True)
    graphed = census.projection("tiny_kv", "gradmem_fast_graphs", dry_run=True)
    spec = census.specs(True, ("tiny_kv",))[0]
    assert plain["projected_step_ms"] > 0
    assert math.isclose(plain["projected_write_ms"], spec.steps * plain["projected_step_ms"])
    assert graphed["projected_step_ms"] <= plain["projected_step_ms"]
    with pytest.raises(KeyError):
        census.projection("tiny_kv", "gradmem_ops", dry_run=True)  # not modelled by the census


def test_compare_measured_with_projected(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "meta": {"dry_run": True, "gpu": "NVIDIA H200"},
                "records": [
                    {"bench": "write", "status": "ok", "impl": "gradmem_fast", "case": "tiny_kv", "ms": 5.0},
                    {"bench": "write", "status": "ok", "impl": "gradmem_ops", "case": "tiny_kv", "ms": 5.0},
                    {"bench": "write", "status": "error", "impl": "reference", "case": "tiny_kv"},
                ],
            }
        )
    )
    rows = census.compare(str(path))
    assert [(r["case"], r["impl"], r["gpu"]) for r in rows] == [("tiny_kv", "gradmem_fast", "H200")]
    expected = census.projection("tiny_kv", "gradmem_fast", dry_run=True, gpu="H200")["projected_write_ms"]
    assert math.isclose(rows[0]["measured_over_projected"], 5.0 / expected)
    # The command line writes into an --out folder that does not exist yet (it used to raise FileNotFoundError).
    out = tmp_path / "new" / "folder"
    assert census.main(["--compare", str(path), "--out", str(out)]) in (0, None)
    written = json.loads((out / "census_vs_measured.json").read_text())
    assert [(r["case"], r["impl"]) for r in written] == [("tiny_kv", "gradmem_fast")]


def test_uniform_mix_waste_is_the_writers_padding():
    """The census reports the writer's own bucketing (packing.padding_waste) on the issue's length mix."""
    import torch

    from gradmem_fast.packing import padding_waste

    w = census.uniform_mix_waste(docs=3000, seed=3)
    lengths = torch.randint(100, 451, (3000,), generator=torch.Generator().manual_seed(3)).tolist()
    assert w["row_waste"] == padding_waste(lengths, 8)["row_waste"]
    assert w["real_rows"] == sum(lengths) + 8 * 3000
    assert 0 < w["row_waste"] <= w["target_max"]


def test_cli_dry_run_writes_json(tmp_path, capsys):
    # The compiled implementations compile on the CPU (tens of seconds): the benchmark dry run covers them.
    rc = census.main(
        ["--dry-run", "--cases", "tiny_kv", "--impls", "reference,torch_sdpa,engine_eager", "--out", str(tmp_path)]
    )
    assert rc == 0
    with open(os.path.join(tmp_path, "census.json")) as f:
        result = json.load(f)
    impls = {r["impl"]: r for r in result["records"]}
    assert set(impls) == {"reference", "torch_sdpa", "engine_eager", "engine_fusion_bound"}
    for name in impls:
        assert impls[name]["status"] == "ok", impls[name]
        assert impls[name]["projection"]["H100 SXM"]["step_ms"] > 0
    assert impls["engine_fusion_bound"]["launches"] < impls["engine_eager"]["launches"]
    assert "PROJECTION" in capsys.readouterr().out
    assert os.path.exists(os.path.join(tmp_path, "census.txt"))
    with pytest.raises(SystemExit):
        census.main(["--dry-run", "--cases", "nope"])
