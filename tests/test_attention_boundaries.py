"""Block-range boundaries of the attention kernels: every residue, for every tile shape of the GPU tables.

A block range one key (or one query) off matters only when the causal diagonal's offset ``Lk - Lq`` or the
sliding window's edge falls on a particular residue modulo the tile a kernel streams (``BLOCK_N`` for the
query-side kernels, ``BLOCK_M`` for the key-side ones). Here every tile shape ``(BLOCK_M, BLOCK_N)`` that any
GPU table holds (read through ``gpu_configs``, so a re-tuned table is picked up) runs, pinned for the kernel
kinds whose tables hold it (every kind in the full run; ``interpret_configs``), on one packed (varlen) call
whose documents have ``Lk - Lq = 0, 1, ..., B - 1`` for the edge B each pinned kind streams (BLOCK_M for the
key-side kernels, with BLOCK_M + 1 queries per document: a key block's first visible row is then, for one
offset of each residue, the last row of a query block; BLOCK_N for the query-side ones, with one or two
queries): every residue in one launch, and a document with keys and no query closes the pack. With a window
W, the offsets are shifted by W - 1, so the window's lower edge ``row + diag - W + 1`` also takes every residue
inside each document; W itself rotates over shapes (and every residue of W modulo the streamed edge is drawn by
the property test in the full run).

Checked in fp64 (bound 1e-10; the kernels run fp64 in the interpreter, small head dim 16, GQA 2:1) against
the fp64 reference of tests/test_attention.py: forward and log-sum-exp, backward on the deterministic path and
on the atomic one (dQ by atomics inside the dK/dV kernel), double backward on the atomic-free path and the
fused one, with random cotangents and NaN-filled outputs. Default options only (no soft-capping, no sinks).

``make test`` runs every tile shape once, the mode (causal, window, non-causal, padded with key padding)
rotating with the shape, one backward and one double-backward path per case (alternating), GQA on every
other shape, plus two derandomised property examples and an fp64 dropout case; ``make test-kernels-full``
(``GRADMEM_KERNELS_FULL=1``) runs every shape in every mode, every residue of the padded layout's offset, and
200 property examples.
"""

import contextlib
import os

import pytest
import torch
from test_attention import cu, ref_padded

from gradmem_fast import prefix_attention
from gradmem_fast.kernels import attention as attn
from helpers import DEVICE, assert_close

if DEVICE == "cuda":
    pytest.skip("interpreter tests of the GPU tiles", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FULL = os.environ.get("GRADMEM_KERNELS_FULL", "0") == "1"
F64 = torch.float64
D, HQ, HKV = 16, 2, 1
MODES = ("causal", "window", "noncausal", "padded")


def table_shapes():
    """{(BLOCK_M, BLOCK_N): kinds whose GPU lists hold it} over head-dim classes, dtypes, dropout, precisions
    and alignments (short-document tiles included)."""
    shapes: dict = {}
    for kind in attn.KINDS:
        for block_d in (16, 128, 256):
            for size, precisions in ((2, ("tf32",)), (4, ("tf32", "ieee"))):
                for precision in precisions:
                    for dropout in (False, True):
                        for aligned in (True, False):
                            for cfg in attn.gpu_configs(kind, block_d, size, dropout, precision, aligned=aligned):
                                shapes.setdefault(tuple(cfg[:2]), set()).add(kind)
    return shapes


TABLE = table_shapes()
SHAPES = sorted(TABLE)
# Kernels that own a key block and stream query blocks (BLOCK_M is their streamed edge); the others own a
# query block and stream key blocks (BLOCK_N).
KEY_SIDE = {"dkdv", "dkdv_atomic", "dbwd_dkdv", "dbwd_fused"}


def pinned_kinds(shape):
    """make test: the kinds whose tables hold ``shape`` (the others keep the small interpreter tile, CPU time);
    the full run pins every kind to every shape."""
    return set(attn.KINDS) if FULL else TABLE[shape]


def pins(shape):
    return {kind: (shape[0], shape[1], 4, 1) for kind in pinned_kinds(shape)}


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty returns NaN-filled tensors inside (deterministic mode): a skipped store stays NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@contextlib.contextmanager
def forced(launcher, deterministic):
    original = getattr(attn, launcher)
    setattr(attn, launcher, lambda *a, **kw: original(*a, **{**kw, "deterministic": deterministic}))
    try:
        yield
    finally:
        setattr(attn, launcher, original)


def residue_documents(shape, shift=0, causal=True):
    """(query count, key count) of documents whose Lk - Lq is ``shift + r`` for every residue r of the edges
    the pinned kinds stream.

    Key-side kinds pinned: r = 0 .. BM - 1 with BM + 1 queries (a full query block and a one-row block after
    it), so that for every residue of the offset modulo BM some key block's first visible row is the last row
    of a query block (where a key-side range one block off shows: a row below BM cannot be that row); without
    a diagonal (non-causal) no row is special: two queries each, plus one document of BM + 1.
    Query-side kinds pinned: r = 0 .. BN - 1 with one or two queries (the key range of a query block moves
    with the offset; its own rows do not need to fill a block). ``shift = W - 1`` places the window's lower
    edge of the first row at key r, so it also takes every residue inside the document."""
    bm, bn = shape
    kinds = pinned_kinds(shape)
    docs = []
    if kinds & KEY_SIDE:
        # Without a diagonal no row is special: two queries each, and one document with a partial query block
        # (CPU time).
        lq = bm + 1 if causal else 2
        docs += [(lq, lq + shift + r) for r in range(bm)] + ([] if causal else [(bm + 1, bm + 1)])
    if kinds - KEY_SIDE:
        docs += [(1 + r % 2, 1 + r % 2 + shift + r) for r in range(bn)]
    return docs + [(0, 3)]


def varlen_case(docs, causal, window, hq=HQ, hkv=HKV):
    lens_q, lens_k = [n for n, _ in docs], [n for _, n in docs]
    cq, ck = cu(lens_q), cu(lens_k)

    def ref(q, k, v):
        outs, lses = [], []
        for b in range(len(docs)):
            sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            o, lse = ref_padded(q[None, sq], k[None, sk], v[None, sk], causal=causal, window=window)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    shapes = [(sum(lens_q), hq, D), (sum(lens_k), hkv, D), (sum(lens_k), hkv, D)]
    return shapes, dict(cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal, window=window), ref


def padded_case(lq, lk, batch, window=None, seed=0):
    """Padded batch with a key padding mask: sequence b's first b keys are padding (left padding whose edge
    takes ``batch`` residues), random holes after that, and the last sequence has no key at all."""
    gen = torch.Generator().manual_seed(seed)
    kpm = torch.rand(batch, lk, generator=gen) > 0.2
    for b in range(batch):
        kpm[b, :b] = False
    kpm[-1] = False
    shapes = [(batch, lq, HQ, D), (batch, lk, HKV, D), (batch, lk, HKV, D)]
    kw = dict(key_padding_mask=kpm, window=window)
    return shapes, kw, lambda q, k, v: ref_padded(q, k, v, kpm=kpm, window=window)


def orders(q, k, v, dout, dlse, cots, fwd):
    out, lse = fwd(q, k, v)
    fin = torch.isfinite(lse.detach())
    loss = (out * dout).sum() + (lse.masked_fill(~fin, 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    inner = sum((g * c).sum() for g, c in zip(grads, cots))
    return out, lse, grads, inner


def check(shape, shapes, op_kw, ref_fn, paths=(True, False)):
    """Forward, the backward and double-backward paths ``paths`` (True: deterministic / atomic-free, False:
    atomic dQ / fused) with every kind pinned to ``shape``."""
    q, k, v = (torch.randn(*s, dtype=F64).requires_grad_() for s in shapes)
    hq = shapes[0][-2]
    lse_shape = (hq, shapes[0][0]) if len(shapes[0]) == 3 else (shapes[0][0], hq, shapes[0][1])
    dout = torch.randn(*shapes[0], dtype=F64).requires_grad_()
    dlse = torch.randn(*lse_shape, dtype=F64).requires_grad_()
    cots = [torch.randn(*s, dtype=F64) for s in shapes]
    leaves = (q, k, v, dout, dlse)

    rleaves = [t.detach().clone().requires_grad_() for t in leaves]
    rout, rlse, rgrads, rinner = orders(*rleaves, cots, ref_fn)
    rsecond = torch.autograd.grad(rinner, rleaves)

    def fwd(q, k, v):
        return prefix_attention(q, k, v, return_lse=True, backend="triton", **op_kw)

    with attn.interpret_configs(**pins(shape)), nan_filled_empty():
        for bwd_deterministic in paths:
            with forced("attention_bwd", bwd_deterministic):
                out, lse, grads, inner = orders(q, k, v, dout, dlse, cots, fwd)
            path = "deterministic" if bwd_deterministic else "atomic dQ"
            for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
                assert_close(g, r, F64, name=f"{name} ({path} backward)")
        assert_close(out, rout, F64, name="out")
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), "lse: rows without keys differ"
        fin = torch.isfinite(rlse)
        assert_close(lse[fin], rlse[fin], F64, name="lse")
        for dbwd_deterministic in paths:
            with forced("attention_dbwd", dbwd_deterministic):
                second = torch.autograd.grad(inner, leaves, retain_graph=True)
            path = "atomic-free" if dbwd_deterministic else "fused"
            for name, g, r in zip(("q", "k", "v", "dout", "dlse"), second, rsecond):
                assert_close(g, r, F64, name=f"second-order grad {name} ({path} double backward)")


def run_mode(shape, mode, variant=0):
    bm, bn = shape
    edge = max(bm, bn)
    # make test (CPU time): one backward and one double-backward path per case, alternating over the shapes so
    # each path meets every mode; the full run takes both everywhere.
    paths = (True, False) if FULL else ((variant + variant // 4) % 2 == 0,)
    if mode == "padded":
        # The offset Lk - Lq of a padded call is one residue: rotate it with the variant (every residue in full).
        lq = bm + 1
        check(shape, *padded_case(lq, lq + variant % edge, batch=min(edge, 5) if not FULL else min(edge, 9)), paths)
        return
    window = None
    if mode == "window":
        # Windows below, at and above the edges; the lower edge takes every residue through the offsets.
        window = max(1, (bn - 1, bn + 1, bm + 3, 1)[variant % 4])
    shift = 0 if window is None else window - 1
    # make test (CPU time): GQA 2:1 on every other shape, one head elsewhere (the residues do not depend on it).
    hq = HQ if FULL or variant % 2 == 0 else HKV
    docs = residue_documents(shape, shift, causal=mode != "noncausal")
    check(shape, *varlen_case(docs, causal=mode != "noncausal", window=window, hq=hq), paths)


def _params():
    if FULL:
        return [pytest.param(s, m, i, id=f"{s[0]}x{s[1]}-{m}") for i, s in enumerate(SHAPES) for m in MODES]
    return [
        pytest.param(s, MODES[i % len(MODES)], i, id=f"{s[0]}x{s[1]}-{MODES[i % len(MODES)]}")
        for i, s in enumerate(SHAPES)
    ]


@pytest.mark.parametrize("shape, mode, variant", _params())
def test_sample_every_residue(shape, mode, variant):
    run_mode(shape, mode, variant)


def test_sample_covers_every_table_shape_and_mode():
    """The make-test sample runs every tile shape, and every mode on some shape."""
    params = _params()
    assert {p.values[0] for p in params} == set(SHAPES)
    assert {p.values[1] for p in params} == set(MODES)
    assert len(SHAPES) >= 5, "the GPU tables hold several tile shapes"


@pytest.mark.skipif(not FULL, reason="every residue of the padded offset: make test-kernels-full")
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}" for s in SHAPES])
def test_padded_offsets_every_residue(shape):
    for offset in range(max(shape)):
        run_mode(shape, "padded", offset)


@settings(
    max_examples=200 if FULL else 2,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_sample_property_random_geometry(data):
    """Random tile shape, document lengths, offset and window (every residue of W modulo the streamed edge
    possible), varlen or padded with key padding, causal or not."""
    shape = data.draw(st.sampled_from(SHAPES), label="shape")
    edge = max(shape)
    causal = data.draw(st.booleans(), label="causal")
    window = data.draw(st.one_of(st.none(), st.integers(1, 2 * edge + 2)), label="window") if causal else None
    paths = (True, False) if FULL else (data.draw(st.booleans(), label="deterministic paths"),)
    if data.draw(st.booleans(), label="varlen"):
        n = data.draw(st.integers(1, 4), label="documents")
        docs = [(data.draw(st.integers(0, shape[0] + 2)), 0) for _ in range(n)]
        docs = [(nq, nq + data.draw(st.integers(0 if nq else 1, edge + 2))) for nq, _ in docs]
        check(shape, *varlen_case(docs, causal, window), paths)
    else:
        lq = data.draw(st.integers(1, shape[0] + 2), label="lq")
        lk = lq + data.draw(st.integers(0, edge + 2), label="offset")
        shapes, kw, ref = padded_case(lq, lk, batch=2, window=window, seed=lk)
        kw["causal"] = causal
        check(
            shape,
            shapes,
            kw,
            lambda q, k, v: ref_padded(q, k, v, kpm=kw["key_padding_mask"], window=window, causal=causal),
            paths,
        )


def test_sample_fp64_dropout_reads_its_rescale():
    """fp64 calls read their scalars from an fp64 tensor (``load_scalars``): with dropout the kept
    probabilities are scaled by 1/(1-p) from it (a mutation tool's survivor read the neighbouring log2 e)."""
    p, seed, lq, lk, batch = 0.3, 77, 17, 20, 2
    keep = attn.dropout_keep_mask(batch, HQ, lq, lk, p, seed, DEVICE)
    shapes = [(batch, lq, HQ, D), (batch, lk, HKV, D), (batch, lk, HKV, D)]
    check(
        (16, 16),
        shapes,
        dict(dropout_p=p, seed=seed),
        lambda q, k, v: ref_padded(q, k, v, keep=keep, dropout_p=p),
    )
