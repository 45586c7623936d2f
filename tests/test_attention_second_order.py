"""Second-order prefix attention (the double backward, Triton kernels in the interpreter) against fp64 autograd
of plain softmax attention.

Every case differentiates a random projection of (dq, dk, dv) — themselves the gradient of a random
projection of (out, lse) — with respect to q, k, v, dout and dlse, and compares with the same computation on
the independent fp64 reference of tests/test_attention.py. The cases run the default (fused) double backward,
whose key pass adds grad q by atomics; ``test_second_order_deterministic_path`` runs the atomic-free one.
"""

import contextlib

import pytest
import torch
from test_attention import cu, ref_padded, ref_varlen
from torch.autograd import gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from gradmem_fast import prefix_attention
from gradmem_fast.kernels import attention as kernels
from helpers import DEVICE, assert_close


def second_order(q, k, v, dout, dlse, cots, fwd):
    """Gradients w.r.t. (q, k, v, dout[, dlse]) of <cots, d(<dout, out> + <dlse, lse>)/d(q, k, v)>."""
    out, lse = fwd(q, k, v)
    loss = (out.to(dout.dtype) * dout).sum()
    if dlse is not None:
        fin = torch.isfinite(lse.detach())
        loss = loss + (lse.to(dlse.dtype).masked_fill(~fin, 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    inner = sum((g.to(c.dtype) * c).sum() for g, c in zip(grads, cots))
    inputs = (q, k, v, dout) + (() if dlse is None else (dlse,))
    return torch.autograd.grad(inner, inputs)


def check_second_order(shapes, dtype, op_kw, ref_fn, with_dlse=True):
    q, k, v = (torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_() for s in shapes)
    lse_shape = (shapes[0][1], shapes[0][0]) if len(shapes[0]) == 3 else (shapes[0][0], shapes[0][2], shapes[0][1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dout = torch.randn(*shapes[0], dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_()
    dlse = torch.randn(*lse_shape, dtype=torch.float64, device=DEVICE).to(acc).requires_grad_() if with_dlse else None
    cots = [torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes]
    got = second_order(
        q, k, v, dout, dlse, cots, lambda q, k, v: prefix_attention(q, k, v, return_lse=True, backend="triton", **op_kw)
    )
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, dout)]
    dlse64 = None if dlse is None else dlse.detach().double().requires_grad_()
    want = second_order(*leaves64, dlse64, [c.double() for c in cots], ref_fn)
    for name, g, w in zip(("q", "k", "v", "dout", "dlse"), got, want):
        assert g.dtype == (acc if name == "dlse" else dtype)
        assert_close(g, w, dtype=dtype, name=f"second-order grad {name}")


# ----------------------------------------------------------------------------------------------------
# Against the fp64 reference


def _varlen_case():
    # a length-1 document, more keys than queries (memory prefix), a document with keys but no queries
    lens_q, lens_k = [1, 17, 0, 3, 6], [9, 17, 2, 3, 6]
    cq, ck = cu(lens_q), cu(lens_k)
    return (
        [(sum(lens_q), 4, 32), (sum(lens_k), 1, 32), (sum(lens_k), 1, 32)],
        dict(cu_seqlens_q=cq, cu_seqlens_k=ck),
        lambda q, k, v: ref_varlen(q, k, v, cq, ck, causal=True),
    )


def _padded_kpm_case():
    kpm = torch.rand(2, 13, device=DEVICE) > 0.3
    kpm[1] = False  # a sequence without any key: its rows give 0 and no NaN
    return (
        [(2, 9, 4, 32), (2, 13, 1, 32), (2, 13, 1, 32)],
        dict(key_padding_mask=kpm),
        lambda q, k, v: ref_padded(q, k, v, kpm=kpm),
    )


def _noncausal_d80_case():
    return (
        [(1, 19, 2, 80), (1, 23, 2, 80), (1, 23, 2, 80)],
        dict(causal=False),
        lambda q, k, v: ref_padded(q, k, v, causal=False),
    )


def _window_scale_case():
    kw = dict(causal=True, window=5, scale=0.3)
    return ([(2, 21, 2, 16), (2, 21, 2, 16), (2, 21, 2, 16)], kw, lambda q, k, v: ref_padded(q, k, v, **kw))


def _dropout_padded_case():
    p, seed = 0.3, 11
    keep = kernels.dropout_keep_mask(2, 4, 9, 13, p, seed, DEVICE)
    return (
        [(2, 9, 4, 32), (2, 13, 1, 32), (2, 13, 1, 32)],
        dict(dropout_p=p, seed=seed),
        lambda q, k, v: ref_padded(q, k, v, keep=keep, dropout_p=p),
    )


def _dropout_varlen_case():
    p, seed = 0.25, 5
    lens_q, lens_k = [3, 1, 11], [7, 1, 11]
    cq, ck = cu(lens_q), cu(lens_k)
    keep = kernels.dropout_keep_mask(3, 2, max(lens_q), max(lens_k), p, seed, DEVICE, cu_seqlens_q=cq, cu_seqlens_k=ck)

    def ref(q, k, v):
        outs, lses = [], []
        for b in range(3):
            sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            o, lse = ref_padded(
                q[None, sq], k[None, sk], v[None, sk], dropout_p=p, keep=keep[b : b + 1, :, : lens_q[b], : lens_k[b]]
            )
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    return (
        [(sum(lens_q), 2, 32), (sum(lens_k), 2, 32), (sum(lens_k), 2, 32)],
        dict(cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=p, seed=seed),
        ref,
    )


CASES = {
    "varlen-len1-morekeys-gqa4": _varlen_case,
    "padded-kpm-gqa4-emptyseq": _padded_kpm_case,
    "noncausal-d80": _noncausal_d80_case,
    "window-scale": _window_scale_case,
    "dropout-padded": _dropout_padded_case,
    "dropout-varlen": _dropout_varlen_case,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_matches_fp64_reference(case, dtype):
    shapes, op_kw, ref_fn = CASES[case]()
    check_second_order(shapes, dtype, op_kw, ref_fn)


@contextlib.contextmanager
def deterministic_algorithms(on=True):
    """torch.use_deterministic_algorithms(on) inside (the ops' choice of the atomic-free kernels)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("case", ["varlen-len1-morekeys-gqa4"])
def test_second_order_deterministic_path(case):
    """torch.use_deterministic_algorithms(True) selects the atomic-free path (row pass, grad-q pass, key pass;
    NaN-filled outputs in that mode): catches a wrong grad-q pass or a launcher that forgets one of its passes."""
    shapes, op_kw, ref_fn = CASES[case]()
    with deterministic_algorithms():
        check_second_order(shapes, torch.float32, op_kw, ref_fn)


def _dbwd_inputs(shapes, dtype, lse_fn):
    q, k, v = (torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes)
    dout = torch.randn(*shapes[0], dtype=torch.float64, device=DEVICE).to(dtype)
    out, lse = lse_fn(q, k, v)
    dlse = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0.0)
    cots = [torch.randn(*s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes]
    return (dout, q, k, v, out, lse, *cots), dlse


def test_fused_and_deterministic_paths_agree_over_many_key_blocks():
    """Both paths of the launcher on one call whose rows collect grad q from up to 3 key blocks (16-key tiles
    under the interpreter) and 2 query heads per KV head, with a window and an lse cotangent: the
    atomic accumulation must equal the grad-q pass to fp64 rounding. Catches an atomic add that misses a
    key block, a query head of the group or a row (its mask), or an accumulator not zeroed."""
    lens = [1, 41, 20]
    cq = cu(lens)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=cq, max_seqlen_q=41, max_seqlen_k=41, window=33)
    shapes = [(sum(lens), 4, 24), (sum(lens), 2, 24), (sum(lens), 2, 24)]
    args, dlse = _dbwd_inputs(shapes, torch.float64, lambda q, k, v: kernels.attention_fwd(q, k, v, **kw))
    fused = kernels.attention_dbwd(*args, dlse=dlse, deterministic=False, **kw)
    split = kernels.attention_dbwd(*args, dlse=dlse, deterministic=True, **kw)
    for name, a, b in zip(("q", "k", "v", "dout", "dlse"), fused, split):
        assert a.dtype == b.dtype
        assert_close(a, b, name=f"fused vs deterministic grad {name}")


def test_second_order_fp16_keys_with_a_shared_component():
    """fp16 keys whose shared component is 10 times the rest (real keys share a large mean direction): the
    scores' row-constant part cancels in the softmax, but B = scale (gQ.k + q.gK) then has a large row level.
    The row pass casts P (B - c) with c near the row's mean of B and corrects with (beta - c) O; a row pass
    without the centre (c = 0) casts P B and loses the spread of B to fp16 rounding: psi, and with it grad q,
    misses the bound (measured: grad q 1.1e-2 without the centre, 2.9e-3 with it)."""
    torch.manual_seed(3)
    lq, lk, d = 24, 40, 64
    shared = 10.0 * torch.randn(1, 1, 1, d, dtype=torch.float64, device=DEVICE)
    q, k, v, dout, gq, gk, gv = (
        torch.randn(1, n, 1, d, dtype=torch.float64, device=DEVICE) for n in (lq, lk, lk, lq, lq, lk, lk)
    )
    k = k + shared
    leaves = [t.to(torch.float16).requires_grad_() for t in (q, k, v)]
    dout = dout.to(torch.float16).requires_grad_()
    cots = [t.to(torch.float16) for t in (gq, gk, gv)]
    got = second_order(
        *leaves, dout, None, cots, lambda q, k, v: prefix_attention(q, k, v, return_lse=True, backend="triton")
    )
    leaves64 = [t.detach().double().requires_grad_() for t in (*leaves, dout)]
    want = second_order(*leaves64, None, [c.double() for c in cots], lambda q, k, v: ref_padded(q, k, v))
    for name, g, w in zip(("q", "k", "v", "dout"), got, want):
        assert_close(g, w, dtype=torch.float16, name=f"second-order grad {name}")


def test_second_order_fp16():
    shapes, op_kw, ref_fn = _varlen_case()
    check_second_order(shapes, torch.float16, op_kw, ref_fn)


def test_second_order_without_lse_and_partial_cotangents():
    """No lse cotangent, and only dq used downstream (dk/dv cotangents absent): the missing ones are zeros."""
    shapes, op_kw, ref_fn = _padded_kpm_case()
    dtype = torch.float64
    q, k, v = (torch.randn(*s, dtype=dtype, device=DEVICE).requires_grad_() for s in shapes)
    dout = torch.randn(*shapes[0], dtype=dtype, device=DEVICE).requires_grad_()
    cot = torch.randn(*shapes[0], dtype=dtype, device=DEVICE)
    results = []
    for fwd in (
        lambda q, k, v: prefix_attention(q, k, v, backend="triton", **op_kw),
        lambda q, k, v: ref_fn(q, k, v)[0],
    ):
        (dq,) = torch.autograd.grad((fwd(q, k, v) * dout).sum(), q, create_graph=True)
        results.append(torch.autograd.grad((dq * cot).sum(), (q, k, v, dout)))
    for name, g, w in zip(("q", "k", "v", "dout"), *results):
        assert_close(g, w, name=f"second-order grad {name}")


# ----------------------------------------------------------------------------------------------------
# gradgradcheck (fp64). The Triton path uses fast mode (one random direction): the full Jacobian would
# take hundreds of kernel launches under the interpreter.


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradgradcheck_padded_gqa_kpm_lse(backend):
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 7, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(2))
    kpm = torch.tensor([[1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    assert gradgradcheck(
        lambda q, k, v: prefix_attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend),
        (q, k, v),
        fast_mode=True,
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradgradcheck_varlen_dropout(backend):
    cq, ck = cu([1, 4]), cu([3, 4])
    q = torch.randn(5, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(7, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(2))
    assert gradgradcheck(
        lambda q, k, v: prefix_attention(
            q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=0.2, seed=3, backend=backend
        ),
        (q, k, v),
        fast_mode=True,
    )


# ----------------------------------------------------------------------------------------------------
# Memory, errors, custom-op registration


class _SizeRecorder(TorchDispatchMode):
    """Records the size in bytes of every tensor an aten op creates (the interpreter copies kernel arguments
    as uint8 tensors, so bytes, not elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


def test_second_order_never_builds_an_s_by_s_tensor():
    """S = 192 queries and keys, one head of dim 16 (fp32): an S x S score tensor would be 147 KB; the
    largest tensor created in forward, backward or double backward is an [S, D] one (12 KB)."""
    s, d = 192, 16
    q, k, v = (torch.randn(1, s, 1, d, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, s, 1, d, device=DEVICE, requires_grad=True)
    cots = [torch.randn(1, s, 1, d, device=DEVICE) for _ in range(3)]
    rec = _SizeRecorder()
    with rec:
        out = prefix_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad((out * dout).sum(), (q, k, v), create_graph=True)
        gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(grads, cots)), (q, k, v, dout))
    assert all(torch.isfinite(g).all() for g in gg)
    assert rec.largest <= s * d * 4, f"largest tensor {rec.largest} B; an S x S one would be {s * s * 4} B"


def test_third_order_is_a_clear_error():
    q, k, v = (torch.randn(1, 5, 2, 16, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(3))
    out = prefix_attention(q, k, v, backend="triton")
    (g,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)
    (gg,) = torch.autograd.grad((g**2).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_dbwd"):
        torch.autograd.grad((gg**2).sum(), v)


def test_gpu_classes_without_a_spill_free_config_are_refused(monkeypatch):
    """On a GPU the launcher runs only configurations that passed the sm_90 compile check; classes without
    one (IEEE fp32 unaligned or above head dim 128, fp32 head dims above 128) are refused with a clear error,
    and classes where only the atomic-free path fits (IEEE fp32 d128 aligned) run that path."""
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    for deterministic in (True, False):
        assert kernels.dbwd_supported(64, 2, True, "tf32", deterministic=deterministic)
        assert kernels.dbwd_supported(128, 4, False, "tf32", deterministic=deterministic)
        assert kernels.dbwd_supported(256, 2, True, "tf32", deterministic=deterministic)
        assert kernels.dbwd_supported(64, 4, True, "ieee", aligned=True, deterministic=deterministic)
        assert not kernels.dbwd_supported(64, 4, False, "ieee", deterministic=deterministic)
        assert not kernels.dbwd_supported(256, 4, False, "tf32", deterministic=deterministic)
        assert not kernels.dbwd_supported(256, 4, False, "ieee", aligned=True, deterministic=deterministic)
    assert kernels.dbwd_supported(128, 4, False, "ieee", aligned=True, deterministic=True)
    assert not kernels.dbwd_supported(128, 4, False, "ieee", aligned=True, deterministic=False)
    q = torch.randn(1, 3, 1, 17, device=DEVICE)[..., 1:]  # a view at an odd offset: the unaligned tables
    with pytest.raises(NotImplementedError, match="fp32_precision='ieee'.*backend='torch'"):
        kernels.attention_dbwd(q, q, q, q, q, torch.zeros(1, 1, 3, device=DEVICE), q, q, q, fp32_precision="ieee")


def test_launcher_falls_back_to_the_atomic_free_path(monkeypatch):
    """On a GPU, IEEE fp32 at head dim 128 (aligned) has no spill-free fused key pass: a call that allows
    atomics runs the atomic-free passes instead; TF32 runs the fused pair. Catches a launcher that launches
    a kind whose table is empty (a spilling or missing configuration)."""
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    launched = []
    monkeypatch.setattr(kernels, "_launch", lambda kind, *args: launched.append(kind))
    q = torch.randn(1, 5, 1, 128, device=DEVICE)
    lse = torch.zeros(1, 1, 5, device=DEVICE)
    for precision, want in (("ieee", ["dbwd_row", "dbwd_dq", "dbwd_dkdv"]), ("tf32", ["dbwd_row", "dbwd_fused"])):
        launched.clear()
        kernels.attention_dbwd(q, q, q, q, q, lse, q, q, q, fp32_precision=precision, deterministic=False)
        assert launched == want, precision


def test_opcheck_double_backward_op():
    from gradmem_fast.ops.attention import attention_dbwd_op

    q, k, v, dout, out = (torch.randn(1, 5, 2, 16, device=DEVICE) for _ in range(5))
    lse = torch.randn(1, 2, 5, device=DEVICE)
    gq, gk, gv = (torch.randn(1, 5, 2, 16, device=DEVICE) for _ in range(3))
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    for p, s in ((0.0, None), (0.2, seed)):  # the dropout seed is a device tensor (None without dropout)
        args = (dout, q, k, v, out, lse, None, gq, gk, gv, None, None, -1, -1, None, True, 0.25, p, s, 0, "ieee")
        torch.library.opcheck(attention_dbwd_op, args, test_utils=("test_schema", "test_faketensor"))
