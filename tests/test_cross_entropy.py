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
    """Interpreter tiles of 256 elements: rows longer than 256 take several V tiles (online LSE)."""
    from gradmem_fast.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "_TILE_INTERPRET", 256)


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
    """[N, d] input, V = 1007 (no block size divides it), 5 chunks, a bias, ignored tokens, and for
    sample_mean ragged rows including an empty one, a length-1 one and one with only ignored tokens."""
    n, d, vocab = 37, 16, 1007
    h, w, b, t = make_inputs(device, (n,), d, vocab)
    cu = torch.tensor([0, 10, 10, 11, 30, 37], dtype=torch.int32, device=device)
    t[11:30][::2] = IGNORE
    t[30:] = IGNORE  # the last row has no valid token
    kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}
    h, w, b = leaves(h, w, b)
    out = linear_cross_entropy(
        h, w, t, b, reduction=reduction, backend=backend, chunk_size=8, precompute_grad=precompute, **kw
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
    """Finite differences of the double backward (also with respect to the incoming cotangents)."""
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 6, 0, 3])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    kw = dict(cu_seqlens=cu) if reduction == "sample_mean" else {}

    def fn(h, w, b):
        return linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend, chunk_size=2, **kw)

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


def test_chunk_rule():
    assert chunk_rows(4096, 2048) * 4 <= 4096
    for n, v in [(16384, 50257), (16384, 256000), (300, 128256), (64 * 450, 50304)]:
        c = chunk_rows(n, v)
        assert 16 <= c <= n and c * v <= 1 << 26
    assert chunk_rows(10, 61) == 10 and chunk_rows(100, 61, chunk_size=7) == 7


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
