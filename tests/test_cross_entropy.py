"""Fused linear cross-entropy against an fp64 ``F.linear`` + ``F.cross_entropy`` reference.

Both backends (torch and triton; the kernels run in the Triton interpreter on CPU). Small shapes keep the
interpreter fast; ``chunk_size`` and a shrunken kernel tile force several token chunks and several
vocabulary tiles per row, which is where an online log-sum-exp or chunk bookkeeping would go wrong.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gradmem_fast.ops.cross_entropy import chunk_rows, linear_cross_entropy
from helpers import assert_close

IGNORE = -100
BACKENDS = ("torch", "triton")
REDUCTIONS = ("none", "sum", "mean", "sample_mean")


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter tiles of 256 elements: rows longer than 256 take several V tiles (online LSE); the matrix
    product kernels take 16-wide row / hidden tiles and 256-wide V tiles (several of each)."""
    from gradmem_fast.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "_TILE_INTERPRET", 256)
    monkeypatch.setattr(kernels, "_DOT_TILES_INTERPRET", {"dh": (16, 16, 256, 4, 1), "dw": (256, 16, 16, 4, 1)})


def reference(hidden, weight, bias, targets, reduction, cu_seqlens=None):
    """fp64 reference of the op's contract, from full logits."""
    d = hidden.shape[-1]
    logits = F.linear(hidden.reshape(-1, d), weight, bias)
    t = targets.reshape(-1).long()
    per_tok = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none")
    valid = (t != IGNORE).to(per_tok.dtype)
    if reduction == "none":
        return per_tok.reshape(targets.shape)
    if reduction == "sum":
        return per_tok.sum()
    if reduction == "mean":
        return per_tok.sum() / valid.sum().clamp(min=1)
    if cu_seqlens is None:
        b, s = targets.shape
        return per_tok.reshape(b, s).sum(1) / valid.reshape(b, s).sum(1).clamp(min=1)
    cu = cu_seqlens.tolist()
    return torch.stack([per_tok[a:e].sum() / valid[a:e].sum().clamp(min=1) for a, e in zip(cu[:-1], cu[1:])])


def make_inputs(device, n_shape, d, vocab, dtype=torch.float32, bias=True, ignore_frac=0.2):
    hidden = torch.randn(*n_shape, d, device=device, dtype=dtype)
    weight = (torch.randn(vocab, d, device=device) / d**0.5).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, vocab, n_shape, device=device)
    targets[torch.rand(n_shape, device=device) < ignore_frac] = IGNORE
    return hidden, weight, b, targets


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def fp64(*xs):
    return [None if x is None else x.detach().cpu().double().requires_grad_() for x in xs]


def check_grads(out, ref, inputs, ref_inputs, dtype, names=("hidden", "weight", "bias")):
    """Random (non-uniform) cotangent; compare the loss and every gradient with the fp64 reference."""
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, name="loss")
    cot = torch.randn(ref.shape, dtype=torch.float64)
    pairs = [(x, r, nm) for x, r, nm in zip(inputs, ref_inputs, names) if x is not None]
    got = torch.autograd.grad(out, [p[0] for p in pairs], cot.to(out.device, out.dtype))
    want = torch.autograd.grad(ref, [p[1] for p in pairs], cot)
    for g, w, (x, _, nm) in zip(got, want, pairs):
        assert g.dtype == x.dtype
        assert_close(g, w, dtype, name=f"d{nm}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("precompute", [None, False])
def test_packed_all_reductions(backend, reduction, precompute, device, small_tiles):
    """[N, d] input, V = 1007 (no block size divides it), d = 19 (a masked hidden tile), chunks of 12, 12, 12
    and 1 rows, a bias, ignored tokens, and for sample_mean ragged rows including an empty one, a length-1 one
    and one with only ignored tokens."""
    n, d, vocab = 37, 19, 1007
    h, w, b, t = make_inputs(device, (n,), d, vocab)
    cu = torch.tensor([0, 10, 10, 11, 30, 37], dtype=torch.int32, device=device)
    t[11:30][::2] = IGNORE
    t[30:] = IGNORE  # the last row has no valid token
    kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(
        h, w, t, b, reduction=reduction, backend=backend, chunk_size=12, precompute_grad=precompute, **kw
    )
    hr, wr, br = fp64(h, w, b)
    ref = reference(hr, wr, br, t.cpu(), reduction, cu.cpu() if kw else None)
    check_grads(out, ref, (h, w, b), (hr, wr, br), torch.float32)
    if reduction == "sample_mean":
        assert float(out[-1].detach()) == 0.0 and float(out[1].detach()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sample_mean", "mean", "none"])
def test_frozen_head_batched(backend, reduction, device, small_tiles):
    """The WRITE loop: [B, S, d] input, only hidden needs a gradient (computed in the forward sweep),
    default chunking, one row entirely ignored, V = 61."""
    bsz, s, d, vocab = 3, 9, 16, 61
    h, w, b, t = make_inputs(device, (bsz, s), d, vocab)
    t[1] = IGNORE
    (h,) = leaves(h)
    out = linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend)
    hr, wr, br = fp64(h, w, b)
    ref = reference(hr, wr, br, t.cpu(), reduction)
    check_grads(out, ref, (h,), (hr,), torch.float32, names=("hidden",))
    if reduction == "sample_mean":
        assert out.shape == (bsz,) and float(out[1].detach()) == 0.0
        (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend).sum(), h)
        assert torch.all(gh[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_batched_sample_mean(backend, device, small_tiles):
    """Outer-loop training: per-sample losses with a trainable head and no bias, random cotangent."""
    h, w, _, t = make_inputs(device, (2, 7), 16, 300, bias=False)
    h, w = leaves(h, w)
    out = linear_cross_entropy(h, w, t, reduction="sample_mean", backend=backend, chunk_size=3)
    hr, wr = fp64(h, w)
    ref = reference(hr, wr, None, t.cpu(), "sample_mean")
    check_grads(out, ref, (h, w), (hr, wr), torch.float32, names=("hidden", "weight"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_single_token(backend, shape, device):
    h, w, b, t = make_inputs(device, shape, 16, 61, ignore_frac=0.0)
    h, w, b = leaves(h, w, b)
    red = "sample_mean" if len(shape) == 2 else "mean"
    out = linear_cross_entropy(h, w, t, b, reduction=red, backend=backend)
    hr, wr, br = fp64(h, w, b)
    check_grads(out, reference(hr, wr, br, t.cpu(), red), (h, w, b), (hr, wr, br), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend, device):
    h, w, b, t = make_inputs(device, (2, 5), 16, 61)
    t.fill_(IGNORE)
    h, w, b = leaves(h, w, b)
    for red in ("mean", "sum", "sample_mean"):
        out = linear_cross_entropy(h, w, t, b, reduction=red, backend=backend)
        assert torch.all(out == 0)
        grads = torch.autograd.grad(out.sum(), (h, w, b))
        assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype, device, small_tiles):
    """16-bit inputs, fp32 math: the reference is fp64 on the same (rounded) inputs."""
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter (test_bf16_emulation.py); bf16 runs on a GPU")
    h, w, b, t = make_inputs(device, (29,), 32, 523, dtype=dtype)
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(h, w, t, b, reduction="none", backend=backend, chunk_size=16)
    assert out.dtype == torch.float32
    hr, wr, br = fp64(h, w, b)
    check_grads(out, reference(hr, wr, br, t.cpu(), "none"), (h, w, b), (hr, wr, br), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_batched(backend, device):
    """cu_seqlens over a packed batch gives the same per-row losses as the padded [B, S, d] layout."""
    h, w, b, t = make_inputs(device, (3, 6), 16, 61)
    lens = [6, 1, 4]
    for i, ln in enumerate(lens):
        t[i, ln:] = IGNORE
    packed_h = torch.cat([h[i, :ln] for i, ln in enumerate(lens)])
    packed_t = torch.cat([t[i, :ln] for i, ln in enumerate(lens)])
    cu = torch.tensor([0, 6, 7, 11], dtype=torch.int32, device=device)
    a = linear_cross_entropy(h, w, t, b, reduction="sample_mean", backend=backend)
    p = linear_cross_entropy(
        packed_h, w, packed_t, b, reduction="sample_mean", cu_seqlens=cu, backend=backend, chunk_size=4
    )
    assert_close(p, a, torch.float32)


class _SizeRecorder(TorchDispatchMode):
    """Records the size in bytes of every tensor an aten op creates. Bytes, not elements: the Triton
    interpreter copies each argument's storage as a uint8 tensor, whose element count is its byte count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_head", [False, True])
def test_never_builds_full_logits(backend, train_head, device):
    """N=4096, V=2048, fp32: no tensor created in forward or backward comes near the N x V logits; with
    the default chunk rule the largest is a quarter of them (the live logits chunk)."""
    n, d, vocab = 4096, 8, 2048
    h, w, b, t = make_inputs(device, (n,), d, vocab)
    h, w, b = leaves(h, w, b)
    w.requires_grad_(train_head)
    b.requires_grad_(train_head)
    rec = _SizeRecorder()
    with rec:
        for red in ("mean", "none"):
            out = linear_cross_entropy(h, w, t, b, reduction=red, backend=backend)
            grads = torch.autograd.grad(out, [x for x in (h, w, b) if x.requires_grad], torch.ones_like(out))
    full = n * vocab * 4
    assert rec.largest <= full // 4, f"a tensor of {rec.largest} bytes was created (N x V logits: {full})"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_order(backend, reduction, device, small_tiles):
    """grad_mode="second": differentiate a random projection of the returned hidden-gradient with respect
    to hidden, weight and bias (also the first gradient itself), against fp64 double backward."""
    n, d, vocab = 23, 16, 300
    h, w, b, t = make_inputs(device, (n,), d, vocab)
    cu = torch.tensor([0, 10, 10, 23], dtype=torch.int32, device=device)
    kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(
        h, w, t, b, reduction=reduction, backend=backend, chunk_size=8, precompute_grad=False, **kw
    )
    hr, wr, br = fp64(h, w, b)
    ref = reference(hr, wr, br, t.cpu(), reduction, cu.cpu() if kw else None)
    cot = torch.randn(ref.shape, dtype=torch.float64)
    proj = torch.randn(n, d, dtype=torch.float64)
    (gh,) = torch.autograd.grad(out, h, cot.to(device, torch.float32), create_graph=True)
    (ghr,) = torch.autograd.grad(ref, hr, cot, create_graph=True)
    assert_close(gh, ghr, torch.float32, name="dL/dh")
    got = torch.autograd.grad((gh * proj.to(device, torch.float32)).sum(), (h, w, b))
    want = torch.autograd.grad((ghr * proj).sum(), (hr, wr, br))
    for g, r, nm in zip(got, want, ("hidden", "weight", "bias")):
        assert_close(g, r, torch.float32, name=f"d2/d{nm}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_through_weight_gradient(backend, device):
    """Meta-training with a trainable head: a function of both first gradients (dh and dW), with the
    forward-time gradients left on (they must not leak into the create_graph path)."""
    h, w, b, t = make_inputs(device, (2, 6), 16, 61)
    h, w, b = leaves(h, w, b)
    hr, wr, br = fp64(h, w, b)
    out = linear_cross_entropy(h, w, t, b, reduction="mean", backend=backend, chunk_size=5)
    ref = reference(hr, wr, br, t.cpu(), "mean")
    ph, pw = torch.randn(h.shape, dtype=torch.float64), torch.randn(w.shape, dtype=torch.float64)
    gh, gw = torch.autograd.grad(out, (h, w), create_graph=True)
    ghr, gwr = torch.autograd.grad(ref, (hr, wr), create_graph=True)
    f = (gh * ph.to(device, gh.dtype)).sum() + (gw * pw.to(device, gw.dtype)).sum()
    fr = (ghr * ph).sum() + (gwr * pw).sum()
    for g, r, nm in zip(
        torch.autograd.grad(f, (h, w, b)), torch.autograd.grad(fr, (hr, wr, br)), ("hidden", "weight", "bias")
    ):
        assert_close(g, r, torch.float32, name=f"d2/d{nm}")


@pytest.mark.parametrize("backend,reduction", [("torch", "none"), ("torch", "sample_mean"), ("triton", "sample_mean")])
def test_gradgradcheck_fp64(backend, reduction):
    """Finite differences of the double backward (also with respect to the incoming cotangents); two chunks of
    3 and 2 rows."""
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 6, 0, 3])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}

    def fn(h, w, b):
        return linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend, chunk_size=3, **kw)

    assert torch.autograd.gradcheck(fn, (h, w, b))
    assert torch.autograd.gradgradcheck(fn, (h, w, b))


def test_fp64_matches_tightly(device):
    h, w, b, t = make_inputs(device, (11,), 8, 61, dtype=torch.float64)
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(h, w, t, b, reduction="none", backend="triton", chunk_size=4)
    hr, wr, br = fp64(h, w, b)
    check_grads(out, reference(hr, wr, br, t.cpu(), "none"), (h, w, b), (hr, wr, br), torch.float64)


@pytest.mark.parametrize("vocab", [61, 1007])
def test_kernels_directly(vocab, device, nan_empty, small_tiles):
    """The launch helpers on NaN-filled output buffers: every row's lse/loss is written, ignored rows get
    loss 0 and a zero gradient row, and ce_grad folds in the per-token scale."""
    from gradmem_fast.kernels import cross_entropy as kernels

    rows = 13
    z = torch.randn(rows, vocab, device=device) * 4
    t = torch.randint(0, vocab, (rows,), device=device)
    t[[2, 7]] = IGNORE
    lse, loss = nan_empty(rows), nan_empty(rows)
    zg = z.clone()
    kernels.ce_forward(zg, t, lse, loss, IGNORE, write_grad=True)
    zr = z.cpu().double().requires_grad_()
    ref_loss = F.cross_entropy(zr, t.cpu(), ignore_index=IGNORE, reduction="none")
    assert_close(lse, zr.logsumexp(1), torch.float32, name="lse")
    assert_close(loss, ref_loss, torch.float32, name="loss")
    (unit,) = torch.autograd.grad(ref_loss.sum(), zr)
    assert_close(zg, unit, torch.float32, name="unit gradient")
    scale = torch.randn(rows, device=device)
    zs = z.clone()
    kernels.ce_grad(zs, t, lse, scale, IGNORE)
    assert_close(zs, unit * scale.cpu().double()[:, None], torch.float32, name="scaled gradient")


def check_product_kernels(dtype, rows, vocab, d, split, device):
    """ce_forward (statistics), ce_dh and ce_dw on a chunk inside a NaN-padded [rows, Vpad] buffer, against fp64
    autograd of the per-token cross-entropy times random per-token scales of both signs. Targets include
    ignored rows, one inside the padding columns and one far past V (both match no column); dH is written
    over NaN (in ``dtype``: with split > 1 the fp32 partial sums are rounded once), dW and db are added to
    random accumulators, and db alone (unit scale, no dW) is checked too. Afterwards Z and its NaN padding are
    unchanged: the kernels read the logits and never write them."""
    from gradmem_fast.kernels import cross_entropy as kernels
    from gradmem_fast.ops.cross_entropy import padded_vocab

    vpad = padded_vocab(vocab)
    buf = torch.full((rows, vpad), float("nan"), dtype=dtype, device=device)
    z = buf[:, :vocab]
    z.copy_(torch.randn(rows, vocab, device=device) * 3)
    z0 = z.clone()
    t = torch.randint(0, vocab, (rows,), device=device)
    t[::4] = IGNORE
    if rows > 2:
        t[1], t[2] = (vpad - 1 if vpad > vocab else vocab), 10**6
    t[-1] = vocab - 1  # the last column, in a masked tail tile
    scale = torch.randn(rows, device=device)
    w = (torch.randn(vocab, d, device=device) / 2).to(dtype)
    h = torch.randn(rows, d, device=device).to(dtype)
    nan = torch.full((rows,), float("nan"), device=device)
    lse, loss = nan.clone(), nan.clone()
    kernels.ce_forward(z, t, lse, loss, IGNORE, write_grad=False, n_load=vpad)
    dh = torch.full((rows, d), float("nan"), dtype=dtype, device=device)
    kernels.ce_dh(z, t, lse, scale, w, dh, IGNORE, n_load=vpad, split=split)
    dw0, db0 = torch.randn(vocab, d, device=device), torch.randn(vocab, device=device)
    dw, db, db_unit = dw0.clone(), db0.clone(), torch.zeros(vocab, device=device)
    kernels.ce_dw(z, t, lse, scale, h, dw, db, IGNORE, n_load=vpad)
    kernels.ce_dw(z, t, lse, None, h, None, db_unit, IGNORE, n_load=vpad)

    tc = t.cpu()
    zr = z0.cpu().double().requires_grad_()
    in_range = (tc >= 0) & (tc < vocab)
    picked = zr.gather(1, torch.where(in_range, tc, 0)[:, None]).squeeze(1) * in_range
    lse_ref = zr.logsumexp(1)
    loss_ref = torch.where(tc != IGNORE, lse_ref - picked, torch.zeros_like(picked))
    (g_unit,) = torch.autograd.grad(loss_ref.sum(), zr, retain_graph=True)
    (g,) = torch.autograd.grad((loss_ref * scale.cpu().double()).sum(), zr)
    assert_close(lse, lse_ref, dtype, name="lse")
    assert_close(loss, loss_ref, dtype, name="loss")
    assert_close(dh, g @ w.cpu().double(), dtype, name="dh")
    assert_close(dw, dw0.cpu().double() + g.t() @ h.cpu().double(), dtype, name="dw")
    assert_close(db, db0.cpu().double() + g.sum(0), dtype, name="db")
    assert_close(db_unit, g_unit.sum(0), dtype, name="db (unit scale, no dW)")
    assert torch.equal(z, z0) and torch.isnan(buf[:, vocab:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 3])
def test_product_kernels_directly(dtype, split, device, small_tiles):
    """37 rows (3 row tiles of 16), V = 601 (prime; three 256-wide V steps, three split-K slices), d = 40 (3
    hidden tiles, the last masked), dW in 3 row steps (see check_product_kernels for the rest). bf16 on a GPU
    only (the interpreter's bf16 dots are wrong; test_bf16_emulation.py covers that path on CPU)."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter")
    check_product_kernels(dtype, 37, 601, 40, split, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_logits_buffer_never_leaks(backend, device, monkeypatch):
    """The op's logits buffer is [C, Vpad] with Vpad = 128 for V = 97, and its padding columns hold NaN (torch's
    deterministic mode fills torch.empty with NaN): loss and every gradient match fp64, through the forward-time
    products ("mean", trainable head) and the recomputing backward ("none"), and the padding is still NaN
    afterwards. Fails if the padding is read into lse or G (a load masked by Vpad without the V mask after it)
    or written, or if the buffer is not padded."""
    from gradmem_fast.ops import cross_entropy as ops

    bufs = []
    real = ops._logits_buffer

    def recording(*args):
        bufs.append(real(*args))
        return bufs[-1]

    monkeypatch.setattr(ops, "_logits_buffer", recording)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for reduction in ("mean", "none"):
            h, w, b, t = make_inputs(device, (13,), 16, 97)
            h, w, b = leaves(h, w, b)
            out = linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend, chunk_size=5)
            hr, wr, br = fp64(h, w, b)
            check_grads(out, reference(hr, wr, br, t.cpu(), reduction), (h, w, b), (hr, wr, br), torch.float32)
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(bufs) == 3  # forward, forward, recomputing backward
    assert all(x.shape == (5, 128) and x.stride(0) == 128 for x in bufs)
    assert all(torch.isnan(x[:, 97:]).all() for x in bufs)


def test_gpt2_vocabulary(device):
    """GPT-2's odd V = 50257 (rows padded to 50304) with a trainable head and bias, "sum" (forward-time dH, dW,
    db), a target in the last column."""
    h, w, b, t = make_inputs(device, (6,), 24, 50257)
    t[-1] = 50256
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(h, w, t, b, reduction="sum", backend="triton")
    hr, wr, br = fp64(h, w, b)
    check_grads(out, reference(hr, wr, br, t.cpu(), "sum"), (h, w, b), (hr, wr, br), torch.float32)


@pytest.mark.parametrize(
    "case, passes",
    [("loss only", 2), ("frozen head", 3), ("trainable head, mean", 4), ("trainable head, per token", 5)],
)
def test_census_counts_logits_passes(case, passes):
    """On the meta device (as the step census runs it), forward and backward make 2 / 3 / 4 / 5 HBM passes per
    chunk over the logits: GEMM write + statistics read, + dH read (the WRITE loop's frozen head), + dW read (a
    trainable head; "none" recomputes Z in the backward: 2 + 3), counted by census_count.ce_logits_passes. And
    the accounting itself: a gradient written in place over Z (ce_forward with write_grad) counts 2."""
    from benchmarks.census import gpu_branches
    from benchmarks.census_count import Census, ce_logits_passes, record_triton
    from gradmem_fast.kernels import cross_entropy as kernels
    from gradmem_fast.ops.cross_entropy import chunk_rows

    n, d, vocab = 3000, 64, 50257
    census = Census()
    with gpu_branches(), record_triton(census), census:
        h = torch.randn(n, d, device="meta", dtype=torch.bfloat16, requires_grad=case != "loss only")
        w = torch.randn(vocab, d, device="meta", dtype=torch.bfloat16, requires_grad=case.startswith("trainable"))
        t = torch.randint(0, vocab, (n,), device="meta")
        with torch.set_grad_enabled(case != "loss only"):
            red = "none" if case.endswith("per token") else "mean"
            out = linear_cross_entropy(h, w, t, reduction=red, backend="triton")
            if out.requires_grad:
                torch.autograd.grad(out, [x for x in (h, w) if x.requires_grad], torch.ones_like(out))
    counted = ce_logits_passes(census.launches)
    chunks = -(-n // chunk_rows(n, vocab, hidden_size=d, elem_size=2))
    assert counted["passes"] == passes and counted["chunks"] == chunks
    assert set(counted["by_op"]) <= {"aten.addmm", "aten.mm", "ce_forward_kernel", "ce_dh_kernel", "ce_dw_kernel"}

    census = Census()
    with record_triton(census), census:
        z = torch.empty(16, 64, device="meta")
        torch.mm(torch.randn(16, 8, device="meta"), torch.randn(8, 64, device="meta"), out=z)
        t = torch.zeros(16, dtype=torch.int64, device="meta")
        stats = torch.empty(16, device="meta")
        kernels.ce_forward(z, t, stats, torch.empty_like(stats), IGNORE, write_grad=True)
    assert ce_logits_passes(census.launches) == {
        "chunks": 1,
        "passes": 3,
        "by_op": {"aten.mm": 1, "ce_forward_kernel": 2},
    }


def test_padded_rows_compile_to_vector_loads():
    """sm_90 PTX (ahead-of-time compile, no GPU) of the statistics kernel and the dH kernel in the specialisation
    the op launches at GPT-2's odd V (row stride and n_load = Vpad divisible by 16, V not): 16-byte loads of
    the logits (``ld.global.v4`` / 16-byte ``cp.async``) and no 16-bit scalar load, as with an aligned V; an
    unpadded odd-V chunk (the statistics kernel's ``unaligned`` variant) gets scalar 16-bit loads. Fails if a
    load's mask uses V instead of n_load, which no numerical test can see."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, re
from gradmem_fast.kernels import cross_entropy as c
from gradmem_fast.tools.compile_check import compile_source
specs = {s.name: s for s in c.compile_specs()}
out = {}
for name in ("ce_forward[bf16,i64,grad=0,M=1,V=4096]", "ce_dh[bf16,ieee,i64,scale=0,M=64,N=16,K=64]"):
    for v in specs[name].variants:
        if v.label == "padded" or (v.label == "unaligned" and name.startswith("ce_forward")):
            ptx = compile_source(specs[name], v, 90).asm["ptx"]
            out[name.split("[")[0] + " " + v.label] = [
                len(re.findall(r"ld\\.global\\.v4|cp\\.async\\.cg\\.shared\\.global", ptx)),
                len(re.findall(r"ld\\.global\\.b16", ptx)),
            ]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for kernel in ("ce_forward", "ce_dh"):
        vector, scalar = got[f"{kernel} padded"]
        assert vector > 0 and scalar == 0, (kernel, got)
    assert got["ce_forward unaligned"][1] > 0, got  # the check can see scalar loads


def test_chunk_rule():
    """At most 2**26 logits and a quarter of N x V per chunk; the L2-resident chunk (half the L2) where the head
    stays in L2 (a small head, or GPT-2's on a 200 MiB L2); GPT-2's 77 MB head on a 50 MiB L2 keeps 1280-row
    chunks (re-reading it per 256-row chunk would cost more than the two passes saved; module docstring)."""
    from gradmem_fast.ops.cross_entropy import l2_bytes, padded_vocab

    mib = 1 << 20
    assert chunk_rows(4096, 2048, hidden_size=8, elem_size=4) * 4 <= 4096
    for n, v in [(16384, 50257), (16384, 256000), (300, 128256), (64 * 450, 50304)]:
        c = chunk_rows(n, v, hidden_size=768)
        assert 16 <= c <= n and c * v <= 1 << 26
    assert chunk_rows(28672, 50257, hidden_size=768, elem_size=2, l2=50 * mib) == 1280
    assert chunk_rows(28672, 50257, hidden_size=768, elem_size=2, l2=200 * mib) == 100 * mib // (50304 * 2) // 16 * 16
    small = chunk_rows(28672, 8192, hidden_size=128, elem_size=2, l2=50 * mib)
    assert small * 8192 * 2 <= 25 * mib < (small + 16) * 8192 * 2
    assert padded_vocab(50257) == 50304 and padded_vocab(64) == 64 and padded_vocab(1) == 64
    if device_is_cpu():
        assert l2_bytes("cpu") == 50 * mib
    else:
        assert l2_bytes("cuda") == torch.cuda.get_device_properties(0).L2_cache_size
    assert chunk_rows(10, 61) == 10 and chunk_rows(100, 61, chunk_size=7) == 7


def device_is_cpu():
    from helpers import DEVICE

    return DEVICE == "cpu"


def test_exported_from_package():
    import gradmem_fast

    assert gradmem_fast.linear_cross_entropy is linear_cross_entropy


def test_clear_errors(device):
    h, w, b, t = make_inputs(device, (2, 5), 8, 61)
    flat_h, flat_t = h.reshape(10, 8), t.reshape(10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    cases = [
        (ValueError, "reduction", dict(reduction="avg")),
        (ValueError, "weight", dict(weight=w[:, :4])),
        (TypeError, "weight dtype", dict(weight=w.double())),
        (ValueError, "bias", dict(bias=b[:5])),
        (TypeError, "targets", dict(targets=t.float())),
        (ValueError, "targets must have shape", dict(targets=t[:, :3])),
        (ValueError, "hidden", dict(hidden=h[0, 0])),
        (TypeError, "hidden", dict(hidden=h.long(), weight=w.long())),
        (ValueError, "sample_mean", dict(hidden=flat_h, targets=flat_t, reduction="sample_mean")),
        (ValueError, "cu_seqlens", dict(hidden=flat_h, targets=flat_t, reduction="mean", cu_seqlens=cu)),
        (ValueError, "cu_seqlens", dict(reduction="sample_mean", cu_seqlens=cu)),
        (TypeError, "cu_seqlens", dict(hidden=flat_h, targets=flat_t, reduction="sample_mean", cu_seqlens=cu.float())),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (ValueError, "backend", dict(backend="cuda")),
    ]
    if device == "cpu":  # values of cu_seqlens are checked only where that costs no synchronisation
        cases.append(
            (
                ValueError,
                "N=10",
                dict(
                    hidden=flat_h,
                    targets=flat_t,
                    reduction="sample_mean",
                    cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
                ),
            )
        )
    base = dict(hidden=h, weight=w, targets=t, bias=b)
    for exc, text, over in cases:
        kw = dict(base, **over)
        args = (kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"))
        with pytest.raises(exc, match=text):
            linear_cross_entropy(*args, **kw)
