"""Logit post-processing in the fused linear cross-entropy: ``z = phi(s (W h + b))``, ``phi(x) = c tanh(x / c)``.

Against fp64 torch autograd of the dense formula (``F.linear``, times s, ``c * tanh(. / c)``,
``F.cross_entropy``): loss, first gradients with random cotangents for every reduction, ignored tokens, the
second order (random projections of the first gradients, and finite differences), fp32/fp16 bounds, and the
kernels themselves on NaN-filled output buffers. Hidden states are scaled so that many logits lie beyond the cap
(tanh far from linear) and the scales are not powers of two (rounding of s shows).
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.cross_entropy import linear_cross_entropy, postprocess_logits
from helpers import assert_close

IGNORE = -100
BACKENDS = ("torch", "triton")
REDUCTIONS = ("none", "sum", "mean", "sample_mean")
# (logit_scale, softcap): scale only (Cohere), 1 / logits_scaling (Granite), soft-capping only (Gemma 2), both
# with a negative scale and a cap that is not an fp32 number (0.7: the kernels' hi/lo pair must carry it).
TRANSFORMS = [(0.37, None), (1 / 3, None), (1.0, 2.5), (-1.3, 0.7)]
NAMES = {(0.37, None): "scale", (1 / 3, None): "third", (1.0, 2.5): "softcap", (-1.3, 0.7): "both"}


def ids(transforms):
    return [NAMES[t] for t in transforms]


@pytest.fixture
def small_tiles(monkeypatch):
    """Several V tiles per row and several row / hidden tiles in the product kernels (as in test_cross_entropy)."""
    from gradmem_fast.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "_TILE_INTERPRET", 256)
    monkeypatch.setattr(kernels, "_DOT_TILES_INTERPRET", {"dh": (16, 16, 256, 4, 1), "dw": (256, 16, 16, 4, 1)})


def dense(hidden, weight, bias, targets, reduction, scale, softcap, cu_seqlens=None):
    """The formula from full logits, written out independently of ``postprocess_logits``."""
    d = hidden.shape[-1]
    z = F.linear(hidden.reshape(-1, d), weight, bias) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = targets.reshape(-1).long()
    per_tok = F.cross_entropy(z, t, ignore_index=IGNORE, reduction="none")
    valid = (t != IGNORE).to(per_tok.dtype)
    if reduction == "none":
        return per_tok.reshape(targets.shape)
    if reduction == "sum":
        return per_tok.sum()
    if reduction == "mean":
        return per_tok.sum() / valid.sum().clamp(min=1)
    cu = cu_seqlens.tolist()
    return torch.stack([per_tok[a:e].sum() / valid[a:e].sum().clamp(min=1) for a, e in zip(cu[:-1], cu[1:])])


def inputs(n, d, vocab, dtype, device, seed, spread=4.0):
    """hidden, weight, bias, targets (20% ignored, the last row all ignored), cu_seqlens with an empty and a
    length-1 document. ``spread``: typical |W h| (several times the caps above)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * spread
    w = torch.randn(vocab, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.2] = IGNORE
    t[-1] = IGNORE
    cu = torch.tensor([0, 4, 4, 5, n - 1, n], dtype=torch.int32)
    return [x.to(device, dtype).requires_grad_() for x in (h, w, b)] + [t.to(device), cu.to(device)]


def fp64(*xs):
    return [x.detach().cpu().double().requires_grad_() for x in xs]


def run(h, w, b, t, cu, reduction, backend, transform, **kw):
    cu_kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}
    s, c = transform
    return linear_cross_entropy(
        h, w, t, b, reduction=reduction, backend=backend, logit_scale=s, softcap=c, **cu_kw, **kw
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "dtype,transform",
    [pytest.param(torch.float64, t, id=f"float64-{NAMES[t]}") for t in TRANSFORMS]
    + [pytest.param(torch.float32, TRANSFORMS[-1], id="float32-both")],
)
def test_first_order(backend, reduction, transform, dtype, device, small_tiles):
    """Loss and d/d(hidden, weight, bias) with a random cotangent; trainable head and bias, so "sum"/"mean"
    take the forward-time products and "none"/"sample_mean" the recomputing backward; 19 rows in chunks of 8,
    V = 601 (prime), d = 19."""
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("fp64 kernels run on the CPU interpreter only")
    h, w, b, t, cu = inputs(19, 19, 601, dtype, device, seed=zlib.crc32(f"{reduction}{transform}".encode()) % 1000)
    out = run(h, w, b, t, cu, reduction, backend, transform, chunk_size=8)
    hr, wr, br = fp64(h, w, b)
    ref = dense(hr, wr, br, t.cpu(), reduction, *transform, cu.cpu())
    assert_close(out, ref, dtype, name="loss")
    cot = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (h, w, b), cot.to(device, out.dtype))
    want = torch.autograd.grad(ref, (hr, wr, br), cot)
    for g, r, nm in zip(got, want, ("hidden", "weight", "bias")):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name=f"d{nm}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=ids(TRANSFORMS[1:]))
def test_frozen_head_forward_time_gradient(backend, transform, device, small_tiles):
    """The WRITE loop's case: only hidden needs a gradient, formed in the forward (unit gradient without the
    scale, which the backward's g_i brings); per-document means with a random cotangent."""
    h, w, b, t, cu = inputs(23, 16, 97, torch.float64 if device == "cpu" else torch.float32, device, seed=3)
    w, b = w.detach(), b.detach()
    out = run(h, w, b, t, cu, "sample_mean", backend, transform)
    hr, wr, br = fp64(h, w, b)
    ref = dense(hr, wr, br, t.cpu(), "sample_mean", *transform, cu.cpu())
    cot = torch.randn(ref.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, h, cot.to(device, out.dtype))
    (r,) = torch.autograd.grad(ref, hr, cot)
    assert_close(out, ref, h.dtype, name="loss")
    assert_close(g, r, h.dtype, name="dhidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("transform", [TRANSFORMS[0], *TRANSFORMS[2:]], ids=ids([TRANSFORMS[0], *TRANSFORMS[2:]]))
def test_second_order(backend, reduction, transform, device, small_tiles):
    """create_graph: a random projection of (dh, dW, db) differentiated with respect to hidden, weight, bias
    and the upstream cotangent, in fp64 (fp32 on a GPU), chunks of 8."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    h, w, b, t, cu = inputs(19, 16, 300, dtype, device, seed=7)
    out = run(h, w, b, t, cu, reduction, backend, transform, chunk_size=8, precompute_grad=False)
    hr, wr, br = fp64(h, w, b)
    ref = dense(hr, wr, br, t.cpu(), reduction, *transform, cu.cpu())
    cot_r = torch.randn(ref.shape, dtype=torch.float64, requires_grad=True)
    cot = cot_r.detach().to(device, out.dtype).requires_grad_()
    firsts = torch.autograd.grad(out, (h, w, b), cot, create_graph=True)
    firsts_r = torch.autograd.grad(ref, (hr, wr, br), cot_r, create_graph=True)
    projs = [torch.randn(x.shape, dtype=torch.float64) for x in firsts_r]
    f = sum((g * p.to(device, g.dtype)).sum() for g, p in zip(firsts, projs))
    fr = sum((g * p).sum() for g, p in zip(firsts_r, projs))
    got = torch.autograd.grad(f, (h, w, b, cot))
    want = torch.autograd.grad(fr, (hr, wr, br, cot_r))
    for g, r, nm in zip(got, want, ("hidden", "weight", "bias", "cotangent")):
        assert_close(g, r, dtype, name=f"d2/d{nm}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_fp64(backend):
    """Finite differences of the first derivatives with both scale and cap, two chunks, and of the second
    derivatives on the torch backend (the double backward is plain torch on both backends; the Triton
    backend's second order is test_second_order's, at 1e-10)."""
    h = (torch.randn(5, 3, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 6, 0, 3])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)

    def fn(h, w, b):
        return linear_cross_entropy(
            h, w, t, b, reduction="sample_mean", cu_seqlens=cu, backend=backend, chunk_size=3,
            logit_scale=0.6, softcap=1.1,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (h, w, b))
    if backend == "torch":
        assert torch.autograd.gradgradcheck(fn, (h, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_fp16(backend, device, small_tiles):
    """fp16 inputs within the fp16 bound (5e-3) of fp64, soft-capped and scaled, trainable head."""
    h, w, b, t, cu = inputs(19, 16, 97, torch.float16, device, seed=11, spread=2.0)
    out = run(h, w, b, t, cu, "mean", backend, (0.6, 2.5), chunk_size=8)
    hr, wr, br = fp64(h, w, b)
    ref = dense(hr, wr, br, t.cpu(), "mean", 0.6, 2.5)
    assert_close(out, ref, torch.float16, name="loss")
    got = torch.autograd.grad(out, (h, w, b))
    want = torch.autograd.grad(ref, (hr, wr, br))
    for g, r, nm in zip(got, want, ("hidden", "weight", "bias")):
        assert_close(g, r, torch.float16, name=f"d{nm}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_kernels_directly_softcap(dtype, device, nan_empty, small_tiles):
    """ce_forward / ce_dh / ce_dw / ce_grad with softcap on a chunk inside a NaN-padded buffer, outputs NaN-filled
    (dH) or random accumulators (dW, db): lse and loss of ``c tanh(y / c)`` and the gradients with respect to
    the stored logits y, per-token scales of both signs; the logits and their NaN padding stay untouched."""
    from gradmem_fast.kernels import cross_entropy as kernels
    from gradmem_fast.ops.cross_entropy import padded_vocab

    if dtype == torch.float64 and device != "cpu":
        pytest.skip("fp64 kernels run on the CPU interpreter only")
    rows, vocab, d, cap = 21, 301, 24, 0.7
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vpad = padded_vocab(vocab)
    buf = torch.full((rows, vpad), float("nan"), dtype=dtype, device=device)
    z = buf[:, :vocab]
    z.copy_(torch.randn(rows, vocab, device=device) * 3)
    z0 = z.clone()
    t = torch.randint(0, vocab, (rows,), device=device)
    t[::5] = IGNORE
    t[1] = 10**6  # matches no column
    scale = torch.randn(rows, device=device, dtype=acc)
    w = (torch.randn(vocab, d, device=device) / 2).to(dtype)
    h = torch.randn(rows, d, device=device).to(dtype)
    lse, loss = nan_empty(rows, dtype=acc), nan_empty(rows, dtype=acc)
    kernels.ce_forward(z, t, lse, loss, IGNORE, write_grad=False, n_load=vpad, softcap=cap)
    dh = torch.full((rows, d), float("nan"), dtype=dtype, device=device)
    kernels.ce_dh(z, t, lse, scale, w, dh, IGNORE, n_load=vpad, softcap=cap)
    dw0, db0 = torch.randn(vocab, d, device=device, dtype=acc), torch.randn(vocab, device=device, dtype=acc)
    dw, db = dw0.clone(), db0.clone()
    kernels.ce_dw(z, t, lse, scale, h, dw, db, IGNORE, n_load=vpad, softcap=cap)
    zs = z.clone()
    kernels.ce_grad(zs, t, lse, scale, IGNORE, softcap=cap)
    zg = z.clone()
    kernels.ce_forward(zg, t, nan_empty(rows, dtype=acc), nan_empty(rows, dtype=acc), IGNORE, True, softcap=cap)

    tc = t.cpu()
    yr = z0.cpu().double().requires_grad_()
    zr = cap * torch.tanh(yr / cap)
    in_range = (tc >= 0) & (tc < vocab)
    picked = zr.gather(1, torch.where(in_range, tc, 0)[:, None]).squeeze(1) * in_range
    lse_ref = zr.logsumexp(1)
    loss_ref = torch.where(tc != IGNORE, lse_ref - picked, torch.zeros_like(picked))
    (g_unit,) = torch.autograd.grad(loss_ref.sum(), yr, retain_graph=True)
    (g,) = torch.autograd.grad((loss_ref * scale.cpu().double()).sum(), yr)
    assert_close(lse, lse_ref, dtype, name="lse")
    assert_close(loss, loss_ref, dtype, name="loss")
    assert_close(dh, g @ w.cpu().double(), dtype, name="dh")
    assert_close(dw, dw0.cpu().double() + g.t() @ h.cpu().double(), dtype, name="dw")
    assert_close(db, db0.cpu().double() + g.sum(0), dtype, name="db")
    assert_close(zs, g, dtype, name="ce_grad")
    assert_close(zg, g_unit, dtype, name="ce_forward write_grad")
    assert torch.equal(z, z0) and torch.isnan(buf[:, vocab:]).all()


def test_postprocess_logits_formula():
    """The dense helper the reference and READ use: s * y, then c tanh(. / c); identity when off."""
    y = torch.randn(4, 9, dtype=torch.float64) * 5
    assert torch.equal(postprocess_logits(y), y)
    assert_close(postprocess_logits(y, 0.25), y * 0.25, torch.float64, name="scale")
    want = 3.0 * torch.tanh(y * -0.5 / 3.0)
    assert_close(postprocess_logits(y, -0.5, 3.0), want, torch.float64, name="scale + softcap")
    assert postprocess_logits(y, 1.0, 0.5).abs().max() <= 0.5


def test_off_is_the_plain_op(device):
    """logit_scale=1 and softcap=None give bit for bit the op without them (the same launches)."""
    h, w, b, t, cu = inputs(9, 16, 61, torch.float32, device, seed=5)
    a = linear_cross_entropy(h, w, t, b, reduction="none", backend="triton")
    c = linear_cross_entropy(h, w, t, b, reduction="none", backend="triton", logit_scale=1.0, softcap=None)
    assert torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite"),
        (dict(logit_scale=math.inf), ValueError, "logit_scale must be finite"),
        (dict(logit_scale=torch.tensor(2.0)), TypeError, "logit_scale must be a float"),
        (dict(logit_scale=True), TypeError, "logit_scale"),
        (dict(softcap=0.0), ValueError, "softcap must be None (off) or > 0"),
        (dict(softcap=-3.0), ValueError, "softcap must be None (off) or > 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be finite"),
        (dict(softcap="30"), TypeError, "softcap must be None or a float"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, exc, words):
    h, w, b, t, _ = inputs(3, 4, 5, torch.float32, "cpu", seed=0)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        linear_cross_entropy(h, w, t, b, **kwargs)


def test_kernel_launcher_rejects_bad_softcap():
    from gradmem_fast.kernels import cross_entropy as kernels

    z = torch.randn(2, 16)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap must be None or a finite float > 0"):
        kernels.ce_forward(z, t, torch.empty(2), torch.empty(2), IGNORE, False, softcap=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("reduction", ["mean", "sample_mean"])
def test_gpu_tiles(dtype, reduction, device):
    """The GPU tables' tiles (``interpret_gpu_tiles``) with scale and cap: a row kernel tile of 4 x 1024 and the
    dot tiles of the operand size (fp32 ce_dw at the soft-capping stage count), V = 601, d = 40 (a masked hidden
    tile), 37 rows; "mean" forms dH/dW/db in the forward, "sample_mean" recomputes them in the backward."""
    from gradmem_fast.kernels import cross_entropy as kernels

    h, w, b, t, cu = inputs(37, 40, 601, dtype, device, seed=13, spread=2.0)
    with kernels.interpret_gpu_tiles():
        out = run(h, w, b, t, cu, reduction, "triton", (0.6, 1.5))
        hr, wr, br = fp64(h, w, b)
        ref = dense(hr, wr, br, t.cpu(), reduction, 0.6, 1.5, cu.cpu())
        cot = torch.randn(ref.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, (h, w, b), cot.to(device, out.dtype))
    want = torch.autograd.grad(ref, (hr, wr, br), cot)
    assert_close(out, ref, dtype, name="loss")
    for g, r, nm in zip(got, want, ("hidden", "weight", "bias")):
        assert_close(g, r, dtype, name=f"d{nm}")


def test_census_passes_and_flops():
    """On the meta device (as the step census runs it), the WRITE loop's frozen head with scale and cap still
    makes 3 HBM passes per chunk over the logits (the scale rides on the GEMM: no extra pass), and the census
    counts the soft-capping's elementwise FLOPs (census_count.CE_SOFTCAP) on top of the plain op's."""
    from benchmarks.census import gpu_branches
    from benchmarks.census_count import CE_SOFTCAP, Census, ce_logits_passes, record_triton

    n, d, vocab = 3000, 64, 50257

    def count(**kw):
        census = Census()
        with gpu_branches(), record_triton(census), census:
            h = torch.randn(n, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(vocab, d, device="meta", dtype=torch.bfloat16)
            t = torch.randint(0, vocab, (n,), device="meta")
            out = linear_cross_entropy(h, w, t, reduction="mean", backend="triton", **kw)
            torch.autograd.grad(out, h)
        flops: dict = {}
        for x in census.launches:
            if x.kind == "triton":
                flops[x.name] = flops.get(x.name, 0) + x.flops
        return ce_logits_passes(census.launches)["passes"], flops, census.launches

    passes, plain, _ = count()
    for kw in (dict(logit_scale=0.5), dict(logit_scale=0.5, softcap=30.0)):
        got_passes, flops, launches = count(**kw)
        assert got_passes == passes == 3, kw
        for name in ("ce_forward_kernel", "ce_dh_kernel"):
            extra = CE_SOFTCAP[name] * n * vocab if "softcap" in kw else 0
            assert flops[name] == plain[name] + extra, (kw, name)
