"""Attention backward, both ways of forming dQ (issue 14 item 2), against fp64 autograd of a plain reference.

``attention_bwd(deterministic=False)`` adds dQ from the dK/dV programs with atomics (5 GEMM units);
``deterministic=True`` runs the split dK/dV and dQ kernels (7 units). Each case runs both on NaN-filled
output buffers with a random cotangent (and a random log-sum-exp cotangent), compares each with the fp64
reference and the two with each other; the op layer picks the path from torch's deterministic switch.
"""

import pytest
import torch
from test_attention import cu, ref_padded, ref_varlen

from gradmem_fast import prefix_attention
from gradmem_fast.kernels import attention as kernels
from gradmem_fast.ops import attention as ops
from helpers import DEVICE, assert_close, rel_error, tolerance

CASES = [
    # dtype, layout (padded: (batch, Lq, Lk); varlen: (lens_q, lens_k)), Hq, Hkv, D, options
    pytest.param(torch.float32, (2, 1, 1), 2, 1, 32, {}, id="len1-fp32"),
    pytest.param(torch.float16, (1, 13, 17), 4, 2, 80, {}, id="prime-gqa2-d80-fp16"),
    pytest.param(torch.float32, (2, 11, 11), 2, 2, 24, dict(causal=False, kpm=True), id="noncausal-kpm-fp32"),
    pytest.param(torch.float32, ([1, 9, 1, 0], [1, 13, 5, 3]), 2, 1, 48, dict(window=6), id="varlen-len1-gqa2-window"),
    pytest.param(torch.float64, (2, 13, 18), 2, 1, 40, dict(kpm=True, window=5, scale=0.3), id="fp64-kpm-window"),
    pytest.param(torch.float32, ([3, 9, 1], [6, 9, 4]), 2, 1, 32, dict(dropout=0.25), id="varlen-dropout-fp32"),
    pytest.param(torch.float16, (1, 9, 14), 2, 1, 64, dict(dropout=0.2), id="padded-dropout-fp16"),
]


def _problem(dtype, layout, hq, hkv, d, opts):
    """Inputs, launcher keywords and the fp64 reference function of one case."""
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype)  # noqa: E731
    causal, window, scale = opts.get("causal", True), opts.get("window"), opts.get("scale")
    p, seed = opts.get("dropout", 0.0), 4321
    ref_kw = dict(causal=causal, window=window, scale=scale, dropout_p=p)
    kw = dict(causal=causal, window=window, scale=scale, dropout_p=p, seed=seed)
    if isinstance(layout[0], list):
        lens_q, lens_k = layout
        cq, ck = cu(lens_q), cu(lens_k)
        q, k, v = rnd(sum(lens_q), hq, d), rnd(sum(lens_k), hkv, d), rnd(sum(lens_k), hkv, d)
        kw.update(cu_seqlens_q=cq, cu_seqlens_k=ck)
        if p:
            keep = kernels.dropout_keep_mask(
                len(lens_q), hq, max(lens_q), max(lens_k), p, seed, DEVICE, cu_seqlens_q=cq, cu_seqlens_k=ck
            )

            def ref(q, k, v):
                outs, lses = [], []
                for b in range(len(lens_q)):
                    sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
                    o, lse = ref_padded(
                        q[None, sq],
                        k[None, sk],
                        v[None, sk],
                        keep=keep[b : b + 1, :, : lens_q[b], : lens_k[b]],
                        **ref_kw,
                    )
                    outs.append(o[0])
                    lses.append(lse[0])
                return torch.cat(outs), torch.cat(lses, 1)

            return (q, k, v), kw, ref
        return (q, k, v), kw, lambda q, k, v: ref_varlen(q, k, v, cq, ck, **ref_kw)
    batch, lq, lk = layout
    q, k, v = rnd(batch, lq, hq, d), rnd(batch, lk, hkv, d), rnd(batch, lk, hkv, d)
    if opts.get("kpm"):
        kpm = torch.rand(batch, lk, device=DEVICE) > 0.3
        kpm[-1, :] = False  # a sequence without keys: zero gradients, no NaN
        kw["key_padding_mask"] = ref_kw["kpm"] = kpm
    if p:
        ref_kw["keep"] = kernels.dropout_keep_mask(batch, hq, lq, lk, p, seed, DEVICE)
    return (q, k, v), kw, lambda q, k, v: ref_padded(q, k, v, **ref_kw)


def _both_paths(q, k, v, kw, nan_empty, dlse_scale=1.0):
    """(dout, dlse, {deterministic: (dq, dk, dv)}) from the launchers on NaN-filled buffers."""
    out, lse = kernels.attention_fwd(q, k, v, **kw)
    dout = torch.randn(q.shape, dtype=torch.float64, device=DEVICE).to(q.dtype)
    dlse = dlse_scale * torch.randn(lse.shape, dtype=lse.dtype, device=DEVICE).masked_fill(torch.isneginf(lse), 0.0)
    geo = {n: kw[n] for n in ("cu_seqlens_q",) if n in kw}
    grads = {}
    for det in (True, False):
        delta = kernels.attention_bwd_preprocess(out, dout, **geo) - dlse
        bufs = dict(dq=nan_empty(*q.shape, dtype=q.dtype), dk=nan_empty(*k.shape, dtype=k.dtype))
        bufs["dv"] = nan_empty(*v.shape, dtype=v.dtype)
        grads[det] = kernels.attention_bwd(dout, q, k, v, out, lse, delta=delta, deterministic=det, **kw, **bufs)
    return dout, dlse, grads


@pytest.mark.parametrize("dtype, layout, hq, hkv, d, opts", CASES)
def test_both_paths_against_fp64(dtype, layout, hq, hkv, d, opts, nan_empty):
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("float64 runs under the interpreter only")
    (q, k, v), kw, ref = _problem(dtype, layout, hq, hkv, d, opts)
    dout, dlse, grads = _both_paths(q, k, v, kw, nan_empty)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rout, rlse = ref(*leaves)
    fin = torch.isfinite(rlse)
    loss = (rout * dout.double()).sum() + (rlse[fin] * dlse.double()[fin]).sum()
    rgrads = torch.autograd.grad(loss, leaves)
    for det, got in grads.items():
        for name, g, r in zip(("dq", "dk", "dv"), got, rgrads):
            assert g.dtype == dtype
            assert_close(g, r, dtype=dtype, name=f"{name} ({'deterministic' if det else 'atomic'})")
    # The two paths differ only in the order of fp32 (fp64) additions before the final rounding: dq agrees far
    # inside the dtype's bound (fp32 ~1e-7, fp16 one rounding); dk, dv come from the same code, bit for bit
    # in the interpreter's single tile (on a GPU the two kernels have tile tables of their own).
    exact = 0.0 if DEVICE == "cpu" else tolerance(dtype)
    for name, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False]):
        err = rel_error(b, a)
        assert err <= (tolerance(dtype) if name == "dq" else exact), f"{name}: atomic vs deterministic {err:.2e}"


def test_preallocated_strided_dq(nan_empty):
    """dq handed over as a strided fp32 view (the atomic adds go straight into it): only its own elements are
    written, with its strides; the fp16 inputs of the same geometry take the cast path (covered above)."""
    lens = [5, 1, 12]
    cq = cu(lens)
    q = torch.randn(sum(lens), 2, 40, device=DEVICE)
    k, v = torch.randn(sum(lens), 1, 40, device=DEVICE), torch.randn(sum(lens), 1, 40, device=DEVICE)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=cq)
    out, lse = kernels.attention_fwd(q, k, v, **kw)
    dout = torch.randn_like(q)
    backing = nan_empty(sum(lens), 4, 48)
    dq = backing[:, 1:3, 3:43]  # unit last stride, token stride 192, head stride 48, offset 51 elements
    got = kernels.attention_bwd(dout, q, k, v, out, lse, dq=dq, deterministic=False, **kw)
    assert got[0] is dq
    want = kernels.attention_bwd(dout, q, k, v, out, lse, deterministic=True, **kw)
    assert_close(dq, want[0], dtype=torch.float32, name="dq")
    untouched = torch.ones_like(backing, dtype=torch.bool)
    untouched[:, 1:3, 3:43] = False
    assert torch.isnan(backing[untouched]).all(), "the atomic dq wrote outside its view"


def test_op_follows_torch_deterministic_switch(monkeypatch):
    """The op asks for the atomic path by default and for the split kernels under
    torch.use_deterministic_algorithms(True); both give the fp64 reference's gradients."""
    seen = []
    launcher = kernels.attention_bwd

    def spy(*args, **kw):
        seen.append(kw["deterministic"])
        return launcher(*args, **kw)

    monkeypatch.setattr(kernels, "attention_bwd", spy)
    q = torch.randn(1, 11, 4, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 11, 2, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 11, 2, 32, device=DEVICE, requires_grad=True)
    cot = torch.randn(1, 11, 4, 32, device=DEVICE)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rgrads = torch.autograd.grad(ref_padded(*leaves)[0], leaves, cot.double())
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            assert ops.deterministic_kernels() is det
            out = prefix_attention(q, k, v, backend="triton")
            for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), cot), rgrads):
                assert_close(g, r, name=name)
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [False, True]


def test_census_counts_five_units_atomic_seven_deterministic():
    """The step census charges the backward what it launches: 5 units (10 Hq D P FLOPs) by default, 7 with
    torch's deterministic mode (census_count.ATTENTION_UNITS)."""
    from benchmarks.census_count import Census, record_triton

    lengths, H, D = [6, 1, 9], 2, 16
    P = sum(n * (n + 1) // 2 for n in lengths)
    T = sum(lengths)
    offsets = torch.tensor([0, 6, 7, 16], dtype=torch.int32)
    was = torch.are_deterministic_algorithms_enabled()
    units = {}
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            c = Census()
            with record_triton(c), c:
                cu_m = offsets.to("meta")  # inside the census: it keeps the values of the copy (the lengths)
                q = torch.empty(T, H, D, device="meta", requires_grad=True)
                k, v = torch.empty(T, H, D, device="meta"), torch.empty(T, H, D, device="meta")
                out = prefix_attention(
                    q, k, v, cu_seqlens_q=cu_m, cu_seqlens_k=cu_m, max_seqlen_q=9, max_seqlen_k=9, backend="triton"
                )
                mark = len(c.launches)
                torch.autograd.grad(out, q, torch.empty(T, H, D, device="meta"))
            attn = [x for x in c.launches[mark:] if x.kind == "triton" and x.name.startswith("attn_bwd_d")]
            units[det] = sum(x.flops for x in attn) / (2 * H * D * P)
    finally:
        torch.use_deterministic_algorithms(was)
    assert units == {False: 5, True: 7}


# ----------------------------------------------------------------------------------------------------
# Autotuning by length bucket (issue 14 item 4)


def test_length_bucket_and_short_document_tiles():
    """Buckets are powers of two of the longest sequence, clamped to [128, 4096]; the short-document tiles
    join the candidates up to 1024 tokens only, and the bucket-free list (compile check, tile tests) holds
    every entry any bucket may use."""
    assert [kernels.length_bucket(n, n) for n in (1, 100, 136, 600, 1025, 10**6)] == [128, 128, 256, 1024, 2048, 4096]
    assert kernels.length_bucket(7, 900) == kernels.length_bucket(900, 7) == 1024
    for kind, (cls, size), variants in ((k, c, v) for k, t in kernels._SHORT.items() for c, v in t.items()):
        for variant, short in variants.items():
            new_somewhere = False
            for aligned in (True, False):
                args = (kind, cls, size, variant == "dropout", "tf32", aligned)
                lists = {b: kernels.gpu_configs(*args, bucket=b) for b in (None, 128, 1024, 2048, 4096)}
                long = lists[2048]
                assert lists[4096] == long
                assert lists[None] == lists[128] == lists[1024] == long + [c for c in short if c not in long]
                new_somewhere |= bool(set(short) - set(long))
            assert new_somewhere, (kind, cls, size, variant)  # an entry adds a tile to one of the two tables
            # the short tiles: 64 query rows (query-side kernels) or 64 keys (key-side kernels) at most
            edge = 1 if kind in ("dkdv", "dkdv_atomic") else 0
            assert all(c[edge] <= 64 for c in short)


def test_launch_tunes_per_length_bucket(monkeypatch):
    """On a GPU each launch goes to the autotuner of its length bucket (from max_seqlen_q / max_seqlen_k)."""
    seen = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def tuned(kind, block_d, element_size, dropout, precision, aligned, bucket):
        seen.append((kind, bucket))
        return Launch()

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_tuned", tuned)
    q = torch.randn(700, 2, 64, dtype=torch.float16)
    for n, bucket in ((136, 256), (600, 1024), (3000, 4096)):
        offsets = torch.tensor([0, 700 - n, 700], dtype=torch.int32)
        kernels.attention_fwd(q, q, q, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=n, max_seqlen_k=n)
        assert seen[-1] == ("fwd", bucket)


def test_autotuning_call_zeroes_the_atomic_accumulators(monkeypatch):
    """On a GPU the first call of each tuning key autotunes: Triton times every configuration on the call's own
    buffers, many runs each, then runs the best once more. The atomic backward's dQ and the fused double
    backward's grad q are added into accumulators with atomics, so a tuner that does not zero them before every
    run returns the sum of all its runs. Here the GPU launch path runs under the interpreter with two tile
    configurations and a stand-in timer that runs each twice: the results must be those of one launch."""
    if DEVICE == "cuda":
        pytest.skip("runs the GPU launch path under the interpreter")
    lens = [1, 19]  # a length-1 document and one spanning two 16-key blocks
    cq = cu(lens)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=cq, max_seqlen_q=19, max_seqlen_k=19)
    shapes = [(sum(lens), 2, 16), (sum(lens), 1, 16), (sum(lens), 1, 16)]
    rnd = lambda s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    q, k, v = (rnd(s) for s in shapes)
    dout, gq, gk, gv = rnd(shapes[0]), rnd(shapes[0]), rnd(shapes[1]), rnd(shapes[2])
    out, lse = kernels.attention_fwd(q, k, v, **kw)
    dlse = torch.randn_like(lse)

    def run():
        delta = kernels.attention_bwd_preprocess(out, dout, cu_seqlens_q=cq) - dlse
        first = kernels.attention_bwd(dout, q, k, v, out, lse, delta=delta, deterministic=False, **kw)
        second = kernels.attention_dbwd(dout, q, k, v, out, lse, gq, gk, gv, dlse=dlse, deterministic=False, **kw)
        return first + second

    want = run()  # the interpreter's single untuned launch per kind

    def timer(kernel_call, quantiles):
        for _ in range(2):
            kernel_call()
        return [1.0, 1.0, 1.0]

    real_tuned = kernels._tuned.__wrapped__

    def tuned(*key):
        tuner = real_tuned(*key)
        tuner._do_bench = timer
        return tuner

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    monkeypatch.setattr(kernels, "configs", lambda *a, **kw: [(16, 16, 4, 1), (32, 16, 4, 1)])
    monkeypatch.setattr(kernels, "_tuned", tuned)
    got = run()
    names = ("dq", "dk", "dv", "grad q", "grad k", "grad v", "grad dout", "grad dlse")
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a, b, dtype=torch.float64, name=f"{name} of the tuning call")
