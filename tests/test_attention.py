"""Prefix attention (Triton kernels, interpreter on CPU) against an fp64 softmax-attention reference.

Every case checks the output, the log-sum-exp and dq/dk/dv for a random cotangent. fp32 and fp16 run here;
bf16 dots are wrong in the interpreter and run only in the GPU suite (GRADMEM_TEST_DEVICE=cuda).
"""

import math

import pytest
import torch

from gradmem_fast import prefix_attention
from gradmem_fast.kernels import attention as kernels
from helpers import DEVICE, assert_close, rel_error, tolerance

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


# ----------------------------------------------------------------------------------------------------
# fp64 reference: plain softmax attention, written independently of the package


def ref_padded(q, k, v, *, causal=True, scale=None, kpm=None, window=None, keep=None, dropout_p=0.0):
    """out [B, Sq, Hq, D], lse [B, Hq, Sq] in fp64; rows with no visible key give 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        vis = vis & (j <= i + sk - sq)
    if window is not None:
        vis = vis & (j > i + sk - sq - window)
    vis = vis[None, None].expand(batch, hq, sq, sk)
    if kpm is not None:
        vis = vis & kpm.bool()[:, None, None, :]
    has = vis.any(-1, keepdim=True)
    s = s.masked_fill(~(vis | ~has), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * vis
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out, lse.squeeze(-1).masked_fill(~has.squeeze(-1), float("-inf"))


def ref_varlen(q, k, v, cu_q, cu_k, **kw):
    """Packed layout: out [Tq, Hq, D], lse [Hq, Tq]."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        o, lse = ref_padded(q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_()


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)


def assert_lse(lse, ref, dtype):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "log-sum-exp: -inf rows differ"
    fin = torch.isfinite(ref)
    if fin.any():
        assert_close(lse[fin], ref[fin], dtype=dtype, name="lse")


def check_all(q, k, v, dtype, op_kw, ref_fn, with_dlse=False):
    """Forward output, LSE and gradients (random cotangents) of the Triton op against ref_fn in fp64."""
    out, lse = prefix_attention(q, k, v, return_lse=True, backend="triton", **op_kw)
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rout, rlse = ref_fn(q64, k64, v64)
    assert_close(out, rout, dtype=dtype, name="out")
    assert_lse(lse, rlse, dtype)
    dout = torch.randn_like(rout)
    loss, rloss = (out.double() * dout).sum(), (rout * dout).sum()
    if with_dlse:
        dlse = torch.randn_like(rlse).masked_fill(torch.isneginf(rlse), 0.0)
        fin = torch.isfinite(rlse)
        loss = loss + (lse.double()[fin] * dlse[fin]).sum()
        rloss = rloss + (rlse[fin] * dlse[fin]).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    rgrads = torch.autograd.grad(rloss, (q64, k64, v64))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
        assert g.dtype == dtype
        assert_close(g, rg, dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------------------
# Padded layout

PADDED_CASES = [
    # batch, Lq, Lk, Hq, Hkv, D, causal
    pytest.param(2, 1, 1, 2, 1, 32, True, id="len1"),
    pytest.param(2, 7, 7, 4, 1, 64, True, id="len7-gqa4"),
    pytest.param(1, 33, 33, 8, 1, 80, False, id="len33-gqa8-d80-noncausal"),
    pytest.param(1, 130, 130, 2, 2, 32, True, id="len130"),
    pytest.param(1, 33, 33, 4, 1, 128, True, id="len33-d128"),
    pytest.param(2, 7, 40, 2, 1, 64, True, id="more-keys-than-queries"),
    pytest.param(1, 20, 5, 2, 1, 32, True, id="fewer-keys-rows-empty"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, lq, lk, hq, hkv, d, causal", PADDED_CASES)
def test_padded(batch, lq, lk, hq, hkv, d, causal, dtype):
    if dtype != torch.float32 and lq >= 130 and not ON_GPU:
        # On a GPU the 16-bit long case runs too: its 130 keys span several key blocks at every tile size of
        # the tables, so each dQ row collects atomic adds from several programs.
        pytest.skip("one dtype suffices for the long case (interpreter time)")
    q = randn(batch, lq, hq, d, dtype=dtype)
    k = randn(batch, lk, hkv, d, dtype=dtype)
    v = randn(batch, lk, hkv, d, dtype=dtype)
    check_all(
        q, k, v, dtype, dict(causal=causal), lambda q, k, v: ref_padded(q, k, v, causal=causal), with_dlse=(lq == 7)
    )


@pytest.mark.skipif(ON_GPU, reason="float64 runs on the Triton backend only under the interpreter")
def test_padded_fp64_window_mask_scale():
    """fp64 (the exact-arithmetic mode for gradient checks): sliding window, key padding and a scale."""
    dtype = torch.float64
    q, k, v = randn(2, 37, 4, 48, dtype=dtype), randn(2, 37, 2, 48, dtype=dtype), randn(2, 37, 2, 48, dtype=dtype)
    kpm = torch.rand(2, 37, device=DEVICE) > 0.3
    kw = dict(causal=True, window=5, scale=0.3)
    check_all(
        q,
        k,
        v,
        dtype,
        dict(key_padding_mask=kpm, **kw),
        lambda q, k, v: ref_padded(q, k, v, kpm=kpm, **kw),
        with_dlse=True,
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding_left_right(side):
    dtype = torch.float32
    batch, s, lens = 3, 19, [19, 11, 1]
    kpm = torch.zeros(batch, s, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lens):
        if side == "right":
            kpm[b, :n] = True
        else:
            kpm[b, s - n :] = True
    q, k, v = (
        randn(batch, s, 4, 32, dtype=dtype),
        randn(batch, s, 2, 32, dtype=dtype),
        randn(batch, s, 2, 32, dtype=dtype),
    )
    check_all(q, k, v, dtype, dict(key_padding_mask=kpm), lambda q, k, v: ref_padded(q, k, v, kpm=kpm))


def test_all_masked_rows_give_zero():
    dtype = torch.float32
    q, k, v = randn(2, 9, 2, 16, dtype=dtype), randn(2, 9, 2, 16, dtype=dtype), randn(2, 9, 2, 16, dtype=dtype)
    kpm = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    kpm[1] = False  # the second sequence has no key at all
    out, lse = prefix_attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1]))


# ----------------------------------------------------------------------------------------------------
# Packed varlen layout


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_ragged(dtype):
    # memory prefix of 8 keys before some documents' queries (READ), memory-only and length-1 documents,
    # and an empty document
    lens_q = [1, 17, 1, 0, 40, 3, 8]
    lens_k = [1, 25, 9, 0, 40, 11, 8]
    hq, hkv, d = 4, 1, 64
    cq, ck = cu(lens_q), cu(lens_k)
    q = randn(sum(lens_q), hq, d, dtype=dtype)
    k, v = randn(sum(lens_k), hkv, d, dtype=dtype), randn(sum(lens_k), hkv, d, dtype=dtype)
    check_all(
        q, k, v, dtype, dict(cu_seqlens_q=cq, cu_seqlens_k=ck), lambda q, k, v: ref_varlen(q, k, v, cq, ck, causal=True)
    )


def test_varlen_noncausal_gqa8_maxseqlen():
    dtype = torch.float32
    lens = [5, 1, 23]
    cq = cu(lens)
    q = randn(sum(lens), 8, 32, dtype=dtype)
    k, v = randn(sum(lens), 1, 32, dtype=dtype), randn(sum(lens), 1, 32, dtype=dtype)
    check_all(
        q,
        k,
        v,
        dtype,
        dict(cu_seqlens_q=cq, cu_seqlens_k=cq, max_seqlen_q=23, max_seqlen_k=23, causal=False),
        lambda q, k, v: ref_varlen(q, k, v, cq, cq, causal=False),
    )


def test_nan_filled_buffers(nan_empty):
    """Every element of the output, LSE and gradient buffers is written (the buffers start as NaN)."""
    dtype = torch.float32
    lens_q, lens_k = [1, 0, 13, 2], [4, 3, 13, 2]  # the empty-query document still owns keys (zero grads)
    cq, ck = cu(lens_q), cu(lens_k)
    hq, hkv, d = 4, 2, 48
    q = torch.randn(sum(lens_q), hq, d, device=DEVICE)
    k, v = torch.randn(sum(lens_k), hkv, d, device=DEVICE), torch.randn(sum(lens_k), hkv, d, device=DEVICE)
    geo = dict(cu_seqlens_q=cq, cu_seqlens_k=ck)
    out, lse = kernels.attention_fwd(q, k, v, **geo, out=nan_empty(*q.shape), lse=nan_empty(hq, q.shape[0]))
    rout, rlse = ref_varlen(q, k, v, cq, ck)
    assert_close(out, rout, dtype=dtype)
    assert_lse(lse, rlse, dtype)
    dout = torch.randn_like(q)
    delta = kernels.attention_bwd_preprocess(out, dout, cu_seqlens_q=cq, delta=nan_empty(hq, q.shape[0]))
    assert torch.isfinite(delta).all()
    dq, dk, dv = kernels.attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        **geo,
        delta=delta,
        dq=nan_empty(*q.shape),
        dk=nan_empty(*k.shape),
        dv=nan_empty(*v.shape),
    )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    rgrads = torch.autograd.grad(ref_varlen(q64, k64, v64, cq, ck)[0], (q64, k64, v64), dout.double())
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), rgrads):
        assert_close(g, rg, dtype=dtype, name=name)
    doc1 = slice(int(ck[1]), int(ck[2]))
    assert torch.equal(dk[doc1], torch.zeros_like(dk[doc1])) and torch.equal(dv[doc1], torch.zeros_like(dv[doc1]))


# ----------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_dropout_same_mask_forward_and_backward(layout):
    """The kernels' mask, regenerated from the seed, reproduces the forward and all three gradients."""
    dtype, p, seed = torch.float32, 0.25, 1234
    hq, hkv, d = 4, 2, 32
    if layout == "padded":
        batch, lq, lk = 2, 21, 29
        q = randn(batch, lq, hq, d, dtype=dtype)
        k, v = randn(batch, lk, hkv, d, dtype=dtype), randn(batch, lk, hkv, d, dtype=dtype)
        keep = kernels.dropout_keep_mask(batch, hq, lq, lk, p, seed, DEVICE)
        op_kw = dict(dropout_p=p, seed=seed)

        def ref(q, k, v):
            return ref_padded(q, k, v, keep=keep, dropout_p=p)
    else:
        lens_q, lens_k = [3, 18, 1], [11, 18, 9]
        cq, ck = cu(lens_q), cu(lens_k)
        q = randn(sum(lens_q), hq, d, dtype=dtype)
        k, v = randn(sum(lens_k), hkv, d, dtype=dtype), randn(sum(lens_k), hkv, d, dtype=dtype)
        keep = kernels.dropout_keep_mask(
            3, hq, max(lens_q), max(lens_k), p, seed, DEVICE, cu_seqlens_q=cq, cu_seqlens_k=ck
        )
        op_kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=p, seed=seed)

        def ref(q, k, v):
            outs, lses = [], []
            for b in range(3):
                sl_q, sl_k = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
                o, lse = ref_padded(
                    q[None, sl_q],
                    k[None, sl_k],
                    v[None, sl_k],
                    dropout_p=p,
                    keep=keep[b : b + 1, :, : lens_q[b], : lens_k[b]],
                )
                outs.append(o[0])
                lses.append(lse[0])
            return torch.cat(outs), torch.cat(lses, 1)

    check_all(q, k, v, dtype, op_kw, ref)
    # Deterministic: same seed, same output; another seed, another output.
    a = prefix_attention(q, k, v, backend="triton", **op_kw)
    b = prefix_attention(q, k, v, backend="triton", **op_kw)
    c = prefix_attention(q, k, v, backend="triton", **dict(op_kw, seed=seed + 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_keep_rate():
    p, n = 0.3, 2 * 4 * 64 * 64
    keep = kernels.dropout_keep_mask(2, 4, 64, 64, p, 7, DEVICE)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # heads and sequences draw different masks
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


# ----------------------------------------------------------------------------------------------------
# Backends, compile, errors


def test_torch_backend_matches_reference():
    dtype = torch.float64
    lens_q, lens_k = [2, 9], [6, 9]
    cq, ck = cu(lens_q), cu(lens_k)
    q = randn(sum(lens_q), 4, 16, dtype=dtype)
    k, v = randn(sum(lens_k), 2, 16, dtype=dtype), randn(sum(lens_k), 2, 16, dtype=dtype)
    out, lse = prefix_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend="torch")
    rout, rlse = ref_varlen(q, k, v, cq, ck)
    assert_close(out, rout)
    assert_lse(lse, rlse, dtype)
    # the reference path is double-differentiable (the later second-order work relies on it)
    (g,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)
    (gg,) = torch.autograd.grad((g**2).sum(), k)
    assert torch.isfinite(gg).all()


def test_torch_compile_first_order():
    """A compiled graph holds the custom op (fake implementation + registered autograd), fullgraph."""
    dtype = torch.float32
    q, k, v = randn(2, 9, 4, 16, dtype=dtype), randn(2, 9, 2, 16, dtype=dtype), randn(2, 9, 2, 16, dtype=dtype)

    def f(q, k, v):
        return (prefix_attention(q * 2.0, k, v, backend="triton") ** 2).sum()

    # aot_eager traces through fake tensors and AOT autograd like inductor does, without a C++ build
    # (inductor also works here but costs a minute of compilation on a CPU runner).
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    assert rel_error(loss, ref_loss) <= tolerance(dtype)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, dtype=dtype)


def test_opcheck_custom_ops():
    from gradmem_fast.ops.attention import attention_fwd_op, dropout_seed_op

    q, k, v = (torch.randn(1, 5, 2, 16, device=DEVICE) for _ in range(3))
    seed = torch.tensor([12], dtype=torch.int64, device=DEVICE)
    for p, s in ((0.0, None), (0.2, seed)):  # without dropout no seed tensor; with it, the seed on the device
        args = (q, k, v, None, None, -1, -1, None, True, 0.25, p, s, 0, "ieee")
        torch.library.opcheck(attention_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(dropout_seed_op, (seed,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("dtype", TypeError, "dtype"),
        ("mixed", TypeError, "share a dtype"),
        ("heads", ValueError, "multiple of key/value heads"),
        ("headdim", ValueError, "head dims must match"),
        ("rank", ValueError, "padded"),
        ("cu_one", ValueError, "both cu_seqlens_q and cu_seqlens_k"),
        ("cu_dtype", TypeError, "int32"),
        ("cu_batch", ValueError, "different batch sizes"),
        ("cu_total", ValueError, "end at"),
        ("kpm", ValueError, "key_padding_mask"),
        ("window", ValueError, "causal=True"),
        ("dropout", ValueError, "dropout_p"),
        ("maxlen", ValueError, "packed layout"),
    ],
)
def test_errors(case, exc, match):
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    kw = {}
    if case == "dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "mixed":
        q = q.half()
    elif case == "heads":
        k, v = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    elif case == "headdim":
        k = torch.randn(2, 5, 2, 8)
    elif case == "rank":
        q = q[0]
    elif case.startswith("cu"):
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        good = torch.tensor([0, 4, 10], dtype=torch.int32)
        kw = {
            "cu_one": dict(cu_seqlens_q=good),
            "cu_dtype": dict(cu_seqlens_q=good.long(), cu_seqlens_k=good.long()),
            "cu_batch": dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)),
            "cu_total": dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)),
        }[case]
    elif case == "kpm":
        kw = dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    elif case == "window":
        kw = dict(causal=False, window=3)
    elif case == "dropout":
        kw = dict(dropout_p=1.0)
    elif case == "maxlen":
        kw = dict(max_seqlen_q=5)
    with pytest.raises(exc, match=match):
        prefix_attention(q, k, v, backend="torch", **kw)
