"""Attention soft-capping and per-head sink logits (Gemma 2's ``softcap``, GPT-OSS's ``s_aux``), first and
second order, both backends, against an fp64 reference written here from the formulas (not the package's).

Scores are large enough that the cap saturates (c = 5 with |scale q.k| up to ~20) and the sinks take a real
share of each row's mass (both asserted), so a dropped tanh derivative or a sink missing from lse fails.
Cases: padded GQA causal with more keys than queries and a batch row without any key, a sliding window,
ragged varlen (a length-1 document, a document with keys but no queries), non-causal. Random cotangents for
every output (dlse included), NaN-filled outputs (deterministic mode fills torch.empty with NaN).
"""

import contextlib
import math
import zlib

import pytest
import torch
from test_attention import cu

from gradmem_fast import prefix_attention
from helpers import DEVICE, assert_close

CAP = 5.0
ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32}


# ----------------------------------------------------------------------------------------------------
# fp64 reference: the softmax with an explicit sink column, as GPT-OSS's eager attention writes it


def ref_padded(
    q, k, v, *, causal=True, kpm=None, window=None, softcap=None, sinks=None, scale=None, keep=None, dropout_p=0.0
):
    """out [B, Sq, Hq, Dv], lse [B, Hq, Sq] in fp64; a row with no visible key and no sink: 0 and -inf.
    ``keep`` (bool [B, Hq, Sq, Sk]): the dropout keep mask, applied to the visible probabilities."""
    q, k, v = q.double(), k.double(), v.double()
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    r = torch.einsum("bihd,bjhd->bhij", q, k) * (1.0 / math.sqrt(d) if scale is None else scale)
    s = softcap * torch.tanh(r / softcap) if softcap else r
    i, j = torch.arange(sq, device=q.device)[:, None], torch.arange(sk, device=q.device)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        vis = vis & (j <= i + sk - sq)
    if window is not None:
        vis = vis & (j > i + sk - sq - window)
    vis = vis[None, None].expand(batch, hq, sq, sk)
    if kpm is not None:
        vis = vis & kpm.bool()[:, None, None, :]
    if sinks is not None:
        col = sinks.double().reshape(1, hq, 1, 1).expand(batch, hq, sq, 1)
        logits = torch.cat([s.masked_fill(~vis, float("-inf")), col], -1)
        top = logits.max(-1, keepdim=True).values.detach()
        e = torch.exp(logits - top)
        den = e.sum(-1, keepdim=True)
        p = (e / den)[..., :-1]
        lse = (top + torch.log(den)).squeeze(-1)
    else:
        has = vis.any(-1, keepdim=True)
        s = s.masked_fill(~(vis | ~has), float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - lse) * vis
        lse = lse.squeeze(-1).masked_fill(~has.squeeze(-1), float("-inf"))
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def ref_varlen(q, k, v, cu_q, cu_k, keep=None, **kw):
    """Packed layout; ``keep`` as ``dropout_keep_mask`` gives it for the packed call ([B, Hq, max Lq, max Lk])."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        kb = None if keep is None else keep[b : b + 1, :, : cq[b + 1] - cq[b], : ck[b + 1] - ck[b]]
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, lse = ref_padded(q[None, sq], k[None, sk], v[None, sk], keep=kb, **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ----------------------------------------------------------------------------------------------------
# Geometries: (q, k, v shapes, prefix_attention keywords, reference)


def geometry(name):
    if name == "padded":  # GQA, Lk > Lq, a batch row whose keys are all padding
        kpm = torch.rand(2, 9, device=DEVICE) > 0.3
        kpm[1] = False
        shapes = [(2, 5, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16)]
        return shapes, dict(key_padding_mask=kpm), lambda q, k, v, **o: ref_padded(q, k, v, kpm=kpm, **o)
    if name == "window":
        shapes = [(1, 13, 2, 16), (1, 13, 1, 16), (1, 13, 1, 16)]
        return shapes, dict(window=3), lambda q, k, v, **o: ref_padded(q, k, v, window=3, **o)
    if name == "varlen":  # a length-1 document, a document with keys but no queries, a memory prefix
        lens_q, lens_k = [1, 6, 0, 4], [3, 6, 2, 9]
        cq, ck = cu(lens_q), cu(lens_k)
        shapes = [(sum(lens_q), 2, 16), (sum(lens_k), 1, 16), (sum(lens_k), 1, 16)]
        kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck)
        return shapes, kw, lambda q, k, v, **o: ref_varlen(q, k, v, cq, ck, **o)
    assert name == "noncausal"
    shapes = [(1, 4, 2, 16), (1, 7, 2, 16), (1, 7, 2, 16)]
    return shapes, dict(causal=False), lambda q, k, v, **o: ref_padded(q, k, v, causal=False, **o)


def lse_shape(shape):
    return (shape[1], shape[0]) if len(shape) == 3 else (shape[0], shape[2], shape[1])


def make_inputs(shapes, dtype, with_sinks, capped=True):
    """With the cap, q scaled so scale*q.k reaches ~20 (the cap at 5 saturates); sinks around +3 (a real share
    of the rows' mass next to scores of a few units)."""
    q = ((5 if capped else 1) * torch.randn(*shapes[0], dtype=torch.float64, device=DEVICE)).to(dtype)
    k, v = (torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes[1:])
    hq = shapes[0][-2]
    sinks = (3 + torch.randn(hq, dtype=torch.float64, device=DEVICE)).to(dtype) if with_sinks else None
    return q, k, v, sinks


def orders(q, k, v, sinks, dout, dlse, cots, fwd, second):
    """out, lse, first-order grads of <dout, out> + <dlse, lse> w.r.t. (q, k, v[, sinks]) and (``second``)
    the grads of <cots, those> w.r.t. (q, k, v, dout, dlse[, sinks])."""
    out, lse = fwd(q, k, v, sinks)
    fin = torch.isfinite(lse.detach())
    loss = (out.to(dout.dtype) * dout).sum() + (lse.to(dlse.dtype).masked_fill(~fin, 0.0) * dlse).sum()
    leaves = (q, k, v) + (() if sinks is None else (sinks,))
    grads = torch.autograd.grad(loss, leaves, create_graph=second)
    if not second:
        return out, lse, grads, ()
    inner = sum((g.to(c.dtype) * c).sum() for g, c in zip(grads, cots))
    return out, lse, grads, torch.autograd.grad(inner, (q, k, v, dout, dlse) + leaves[3:])


@contextlib.contextmanager
def nan_filled_empty(on=True):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def with_dropout(shapes, kw, ref, p=0.25, seed=91):
    """The geometry with attention dropout: the reference gets the kernels' own keep mask."""
    from gradmem_fast.kernels.attention import dropout_keep_mask

    cq, ck = kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")
    if cq is not None:
        dims = (cq.numel() - 1, int((cq[1:] - cq[:-1]).max()), int((ck[1:] - ck[:-1]).max()))
    else:
        dims = (shapes[0][0], shapes[0][1], shapes[1][1])
    keep = dropout_keep_mask(dims[0], shapes[0][-2], dims[1], dims[2], p, seed, DEVICE, cq, ck)
    return dict(kw, dropout_p=p, seed=seed), lambda q, k, v, **o: ref(q, k, v, keep=keep, dropout_p=p, **o)


def check(name, dtype, option, second, backend="triton", deterministic=True, dropout=False):
    torch.manual_seed(zlib.crc32(f"{name}-{dtype}-{option}-{dropout}".encode()))
    shapes, kw, ref = geometry(name)
    if dropout:
        kw, ref = with_dropout(shapes, kw, ref)
    softcap = CAP if option in ("softcap", "both") else None
    q, k, v, sinks = make_inputs(shapes, dtype, option in ("sinks", "both"), softcap is not None)
    acc = ACC[dtype]
    dout = torch.randn(*shapes[0], dtype=torch.float64, device=DEVICE).to(dtype)
    dlse = torch.randn(*lse_shape(shapes[0]), dtype=torch.float64, device=DEVICE).to(acc)
    cots = [torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes]
    if sinks is not None:
        cots.append(torch.randn(sinks.shape, dtype=torch.float64, device=DEVICE).to(dtype))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, dout, dlse) + (() if sinks is None else (sinks,))]
    with nan_filled_empty(deterministic):
        got = orders(
            *leaves[:3],
            leaves[5] if sinks is not None else None,
            leaves[3],
            leaves[4],
            cots,
            lambda q, k, v, s: prefix_attention(
                q, k, v, return_lse=True, backend=backend, softcap=softcap, sinks=s, fp32_precision="ieee", **kw
            ),
            second,
        )
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = orders(
        *l64[:3],
        l64[5] if sinks is not None else None,
        l64[3],
        l64[4],
        [c.double() for c in cots],
        lambda q, k, v, s: ref(q, k, v, softcap=softcap, sinks=s),
        second,
    )
    # the options bite: the cap saturates somewhere, the sinks hold a real share of the rows' mass
    if softcap:
        d = q.shape[-1]
        raw = q.double().reshape(-1, d) @ k.double().reshape(-1, d).T / math.sqrt(d)
        assert raw.abs().amax() > 2 * CAP  # tanh(2) = 0.96
    if sinks is not None:
        share = torch.exp(sinks.double().reshape(-1, 1) - want[1].transpose(0, -2).reshape(sinks.shape[0], -1))
        assert share.mean() > 0.05
    out, lse, grads, grads2 = got
    rout, rlse, rgrads, rgrads2 = want
    assert out.dtype == dtype and lse.dtype == acc
    assert_close(out, rout, dtype=dtype, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = torch.isfinite(rlse)
    assert_close(lse[fin], rlse[fin], dtype=dtype, name="lse")
    names = ("q", "k", "v", "sinks")
    for n, g, r in zip(names, grads, rgrads):
        assert_close(g, r, dtype=dtype, name=f"d{n}")
    for n, g, r in zip(("q", "k", "v", "dout", "dlse", "sinks"), grads2, rgrads2):
        assert_close(g, r, dtype=dtype, name=f"second-order grad {n}")


GEOMETRIES = ("padded", "window", "varlen", "noncausal")
OPTIONS = ("softcap", "sinks", "both")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_fp64_three_orders(name, option):
    check(name, torch.float64, option, second=True)


@pytest.mark.parametrize("name", ["padded", "varlen"])
def test_fp64_dropout(name):
    """Dropout on the visible probabilities only (the sink column has no value to drop), three orders."""
    check(name, torch.float64, "both", second=True, dropout=True)


@pytest.mark.parametrize("name, option", [("padded", "both"), ("varlen", "softcap")])
def test_fp64_atomic_paths(name, option):
    """Off deterministic mode: dQ by atomics in the backward, grad q by atomics in the fused double backward."""
    check(name, torch.float64, option, second=True, deterministic=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name, option", [("padded", "both"), ("varlen", "both"), ("window", "softcap")])
def test_low_precision(name, option, dtype):
    check(name, dtype, option, second=dtype == torch.float32)


@pytest.mark.parametrize("name, option", [("padded", "both"), ("varlen", "both")])
def test_torch_backend(name, option):
    check(name, torch.float64, option, second=True, backend="torch")


def test_sink_gradient_formula():
    """d sinks[h] = -sum_i exp(sinks[h] - lse_i) delta_i, delta_i = dout_i . out_i - dlse_i (fp64 autograd)."""
    shapes, _, ref = geometry("padded")
    q, k, v, sinks = make_inputs(shapes, torch.float64, True)
    sinks.requires_grad_()
    out, lse = ref(q, k, v, softcap=CAP, sinks=sinks)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (got,) = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), sinks)
    delta = (dout * out).sum(-1).transpose(1, 2) - dlse  # [B, Hq, Sq]
    want = -(torch.exp(sinks[None, :, None] - lse) * delta).sum((0, 2))
    assert_close(got, want.detach(), dtype=torch.float64, name="dsinks")


def test_row_without_keys_takes_the_sink():
    q, k, v = (torch.randn(1, 3, 2, 8, dtype=torch.float64) for _ in range(3))
    kpm = torch.zeros(1, 3, dtype=torch.bool)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    for backend in ("torch", "triton"):
        out, lse = prefix_attention(q, k, v, key_padding_mask=kpm, sinks=sinks, return_lse=True, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(lse, sinks[None, :, None].expand(1, 2, 3))


def test_value_head_dim_differs_torch_backend():
    """MLA-style heads (qk 24, v 16; DeepSeek-V3 uses 192/128): the torch backend, three orders, vs the
    reference; the Triton backend refuses with a ValueError that names both head dims."""
    q = torch.randn(2, 5, 4, 24, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 2, 24, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, 2, 16, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 5, 4, 16, dtype=torch.float64, requires_grad=True)
    dlse = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    cots = [torch.randn_like(t) for t in (q, k, v, sinks)]

    def run(fwd):
        out, lse = fwd(q, k, v, sinks)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v, sinks), create_graph=True)
        inner = sum((g * c).sum() for g, c in zip(grads, cots))
        return (out, lse, *grads, *torch.autograd.grad(inner, (q, k, v, sinks, dout, dlse)))

    got = run(lambda *a: prefix_attention(*a[:3], sinks=a[3], softcap=CAP, return_lse=True, backend="torch"))
    want = run(lambda *a: ref_padded(*a[:3], sinks=a[3], softcap=CAP))
    assert got[0].shape == (2, 5, 4, 16)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype=torch.float64, name=f"output {i}")
    with pytest.raises(ValueError, match="q/k 24 and v 16.*backend='torch'"):
        prefix_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softcap=True), ValueError, "softcap"),
        (dict(softcap="5"), ValueError, "softcap"),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be \[Hq\]"),
        (dict(sinks=torch.zeros(1, 4)), ValueError, r"sinks must be \[Hq\]"),
        (dict(sinks=[0.0] * 4), TypeError, "sinks must be a tensor"),
        (dict(sinks=torch.zeros(4, dtype=torch.int32)), TypeError, "sinks has dtype"),
    ],
)
def test_errors(kw, exc, match):
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    for backend in ("torch", "triton"):
        with pytest.raises(exc, match=match):
            prefix_attention(q, k, v, backend=backend, **kw)


def test_softcap_zero_is_off():
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    for backend in ("torch", "triton"):
        a = prefix_attention(q, k, v, backend=backend)
        assert torch.equal(prefix_attention(q, k, v, softcap=0, backend=backend), a)
        assert torch.equal(prefix_attention(q, k, v, softcap=None, backend=backend), a)


# ----------------------------------------------------------------------------------------------------
# Through transformers: Gemma 2 (attn_logit_softcapping) and GPT-OSS (sinks as s_aux) against eager


def _hf_model(family, attn_implementation):
    import transformers

    common = dict(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        max_position_embeddings=64,
    )
    if family == "gemma2":
        # a cap of 0.5 bites on random weights; the final logit cap is refused by the writer, off here
        cfg = transformers.Gemma2Config(
            **common, attn_logit_softcapping=0.5, final_logit_softcapping=None, query_pre_attn_scalar=16
        )
    else:
        cfg = transformers.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.data = 1.0 + torch.randn_like(p)  # a real share of every row's mass
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.data = p.data * 12  # scores of several units, where the cap of 0.5 saturates
    return model.float().eval()


@pytest.mark.parametrize("family", ["gemma2", "gptoss"])
def test_transformers_parity(family, monkeypatch):
    import gradmem_fast

    monkeypatch.setenv("GRADMEM_FAST_BACKEND", "triton")
    name = gradmem_fast.register_attention()
    eager, fast = _hf_model(family, "eager"), _hf_model(family, name)
    ids = torch.randint(1, 48, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: only real tokens are compared
    real = mask.bool()
    cot = torch.randn(int(real.sum()), 48)
    results = []
    for model in (eager, fast):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[real]
        (logits * cot).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert_close(logits, ref_logits, dtype=torch.float32, name="logits")
    assert ref_grads.keys() == grads.keys()
    if family == "gptoss":
        assert any(n.endswith("sinks") for n in grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], dtype=torch.float32, name=f"grad {n}")


def test_capped_tables_keep_every_class():
    """Leaving the entries that spill with the cap out (``_SOFTCAP_SPILLS``) empties no first-order list and
    takes no double-backward class off the GPU: the atomic-free path stays wherever it was supported."""
    from gradmem_fast.kernels import attention as attn

    for size, precisions in ((2, ("tf32",)), (4, ("tf32", "ieee"))):
        for cls in (64, 128, 256):
            for precision in precisions:
                for dropout in (False, True):
                    for aligned in (False, True):
                        args = (cls, size, dropout, precision, aligned)
                        for kind in ("fwd", "dkdv", "dkdv_atomic", "dq"):
                            for bucket in (None, 4096):  # with and without the short-document tiles
                                assert attn.gpu_configs(kind, *args, bucket, softcap=True), (kind, args, bucket)
                        if attn.dbwd_supported(*args, deterministic=True):
                            assert attn.dbwd_supported(*args, deterministic=True, softcap=True), args


def test_opcheck_with_softcap():
    from gradmem_fast.ops.attention import attention_bwd_op, attention_dbwd_op, attention_fwd_op

    q, k, v, dout, out, gq, gk, gv = (torch.randn(1, 5, 2, 16) for _ in range(8))
    lse, dlse = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    tail = (None, None, -1, -1, None, True, 0.25, 0.0, None, 0, "ieee", CAP)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(attention_fwd_op, (q, k, v) + tail, test_utils=checks)
    torch.library.opcheck(attention_bwd_op, (dout, q, k, v, out, lse, dlse) + tail, test_utils=checks)
    torch.library.opcheck(attention_dbwd_op, (dout, q, k, v, out, lse, dlse, gq, gk, gv) + tail, test_utils=checks)


def test_capped_launcher_falls_back_to_the_atomic_free_path(monkeypatch):
    """On a GPU, 16-bit d128 with dropout on unaligned tensors has no spill-free capped fused key pass: a capped
    call that allows atomics runs the atomic-free passes, the same call without the cap the fused pair."""
    from gradmem_fast.kernels import attention as attn

    monkeypatch.setattr(attn, "_interpreting", lambda: False)
    launched = []
    monkeypatch.setattr(attn, "_launch", lambda kind, *args: launched.append(kind))
    q = torch.randn(1, 5, 1, 129, dtype=torch.float16)[..., 1:]  # a view at an odd offset: unaligned tables
    lse = torch.zeros(1, 1, 5)
    seed = torch.tensor([3], dtype=torch.int64)
    for softcap, want in ((CAP, ["dbwd_row", "dbwd_dq", "dbwd_dkdv"]), (0.0, ["dbwd_row", "dbwd_fused"])):
        launched.clear()
        attn.attention_dbwd(q, q, q, q, q, lse, q, q, q, dropout_p=0.1, seed=seed, softcap=softcap, deterministic=False)
        assert launched == want, softcap
