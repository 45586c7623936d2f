"""The GPU tiles in the interpreter (issue 12, item 2): every configuration of the kernels' GPU tables runs
on CPU, for fp32 and fp16, forward, backward and double backward, on geometries placed against tile edges.

The launchers use one small tile under the interpreter; ``interpret_configs`` (attention) and
``interpret_gpu_tiles`` (cross-entropy) make them launch the GPU tiles instead. The tables are read through
``gpu_configs`` / ``pick_blocks`` / ``compile_specs``, so a re-tuned table is tested without editing this file.

Geometries (B a tile edge of the pinned configurations): packed documents of length 1, B-1, B, B+1 whose key
count exceeds their query count by 0, 1, B-2, B-1 (the causal diagonal's offset within a key tile); padded
batches with the same offsets, a key padding mask (left padding, holes, a sequence without keys) or a
sliding window; GQA everywhere; dropout for the dropout tables. Every output starts NaN-filled (torch's
deterministic mode fills ``torch.empty``), cotangents are random, references are fp64.

``make test`` runs a deterministic sample in which every tile shape of every table (aligned and unaligned lists,
short-document tiles included) runs at least once (one geometry per shape, rotating): warps, stages and pointer
alignment change only what the compiler builds, which the compile check covers. ``GRADMEM_KERNELS_FULL=1``
(``make test-kernels-full``) runs every geometry for every shape and a longer property-based search.
"""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from test_attention import assert_lse, cu, ref_padded
from test_cross_entropy import check_product_kernels
from test_update import clips_for, make_inputs, ref_update

from gradmem_fast import prefix_attention
from gradmem_fast.kernels import attention as attn
from gradmem_fast.kernels import cross_entropy as ce
from gradmem_fast.kernels import update as ku
from gradmem_fast.ops.cross_entropy import linear_cross_entropy
from helpers import DEVICE, assert_close

if DEVICE == "cuda":
    pytest.skip("interpreter tests of the GPU tiles (on a GPU the autotuner picks the tiles)", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FULL = os.environ.get("GRADMEM_KERNELS_FULL", "0") == "1"
ACC = torch.float32


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty returns NaN-filled tensors inside: an output element a kernel never writes stays NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


# ----------------------------------------------------------------------------------------------------
# The attention tables

# (name, dtype, element size, fp32 precision): fp16 stands for both 16-bit dtypes (they share tables; bf16
# dots are wrong in the interpreter, see test_bf16_emulation.py).
DTYPE_GROUPS = [
    ("fp16", torch.float16, 2, "tf32"),
    ("fp32-tf32", torch.float32, 4, "tf32"),
    ("fp32-ieee", torch.float32, 4, "ieee"),
]
HEAD_DIM_CLASSES = (64, 128, 256)
# A head dim below the class width (masked columns) for the sample, the class width too in the full run.
HEAD_DIMS = {64: (48, 64), 128: (80, 128), 256: (160, 256)}
FWD_KINDS = ("fwd", "dkdv", "dkdv_atomic", "dq")
# The launcher keeps separate tables for calls with 16-byte aligned pointers and strides and for the rest.
ALIGNMENTS = (True, False)


def tile_shapes(kind, cls, size, dropout, precision):
    """The configurations of ``kind``'s aligned and unaligned GPU lists (short-document tiles included), one per
    tile shape (BLOCK_M, BLOCK_N): the interpreter runs one program per tile whatever the warps, stages and
    pointer alignment, which only the compiler sees (the compile check compiles every entry in its
    specialisations), so an entry whose shape ran already adds nothing here."""
    shapes = {}
    for align in ALIGNMENTS:
        for cfg in attn.gpu_configs(kind, cls, size, dropout, precision, aligned=align):
            shapes.setdefault(tuple(cfg[:2]), tuple(cfg))
    return list(shapes.values())


def attention_cases():
    """One case per (dtype group, head-dim class, dropout, column): column i pins shape i (cyclically) of every
    kind's ``tile_shapes``, so the columns together run every tile shape of every table. The double backward
    runs where every double-backward kind has an entry (elsewhere the launcher refuses it on a GPU), in the
    columns that pin a double-backward shape for the first time (later columns, there for longer first-order
    lists, run the first order only: CI time)."""
    cases = []
    for gname, dtype, size, precision in DTYPE_GROUPS:
        for cls in HEAD_DIM_CLASSES:
            for dropout in (False, True):
                lists = {kind: tile_shapes(kind, cls, size, dropout, precision) for kind in attn.KINDS}
                second = all(lists[kind] for kind in attn.KINDS if kind not in FWD_KINDS)
                second_cols = max(len(v) for kind, v in lists.items() if kind not in FWD_KINDS)
                for col in range(max(len(v) for v in lists.values())):
                    cases.append(
                        dict(
                            id=f"{gname}-d{cls}-{'dropout' if dropout else 'plain'}-{col}",
                            dtype=dtype,
                            precision=precision,
                            cls=cls,
                            dropout=dropout,
                            pins={kind: v[col % len(v)] for kind, v in lists.items() if v},
                            second=second and col < second_cols,
                        )
                    )
    return cases


def running_kinds(case):
    """The kinds a case runs: the first-order ones, and the double backward's where the case runs it."""
    return [k for k in case["pins"] if case["second"] or k in FWD_KINDS]


CASES = attention_cases()
GEOMETRIES = ("varlen-short", "varlen-edges", "padded-kpm", "padded-window", "padded-noncausal")


# one program per key tile (BLOCK_N), streaming query tiles (BLOCK_M)
KEY_SIDE = ("dkdv", "dkdv_atomic", "dbwd_dkdv", "dbwd_fused")


def tile_edges(kind, cfg):
    """(edge of the tile a program owns, edge of the tiles it streams) of ``kind`` under config ``cfg``:
    sequence lengths are placed around the first, key-minus-query offsets around the second."""
    bm, bn = cfg[:2]
    return (bn, bm) if kind in KEY_SIDE else (bm, bn)


def offsets_for(b):
    """Key-minus-query offsets 0, 1, B-2, B-1 against the edge B."""
    return sorted({o for o in (0, 1, b - 2, b - 1) if o >= 0})


def _keep(batch, hq, lq, lk, p, seed, cq=None, ck=None):
    return attn.dropout_keep_mask(batch, hq, lq, lk, p, seed, DEVICE, cu_seqlens_q=cq, cu_seqlens_k=ck)


def varlen_geometry(lens_q, lens_k, hq, hkv, d, p, seed, **ref_kw):
    """Packed documents with these query/key counts: (shapes, op keywords, fp64 reference function)."""
    cq, ck = cu(lens_q), cu(lens_k)
    keep = _keep(len(lens_q), hq, max(lens_q), max(lens_k), p, seed, cq, ck) if p else None

    def ref(q, k, v):
        outs, lses = [], []
        for b in range(len(lens_q)):
            sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            kb = None if keep is None else keep[b : b + 1, :, : lens_q[b], : lens_k[b]]
            o, lse = ref_padded(q[None, sq], k[None, sk], v[None, sk], keep=kb, dropout_p=p, **ref_kw)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    shapes = [(sum(lens_q), hq, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d)]
    return shapes, dict(cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=p, seed=seed, **ref_kw), ref


def build_geometry(geom, kind, pins, hq, hkv, d, dropout, variant=0):
    """(shapes of q, k, v; op keywords; fp64 reference function) of geometry ``geom`` against the tile edges of
    ``kind`` under ``pins`` (``tile_edges``)."""
    p, seed = (0.2, 1234 + variant) if dropout else (0.0, 0)
    own, streamed = tile_edges(kind, pins[kind])
    offsets = offsets_for(streamed)
    if geom.startswith("varlen"):
        # varlen-short: for the streamed edge B of every pinned kernel, a document of two queries and B keys
        # (its first row sees all but the last key of the tile: where a diagonal one key off shows), and a
        # document with keys and no query (its key gradients must be zeros, not NaN).
        # varlen-edges adds documents of length 1, B-1, B, B+1 around the kind's own tile (CI: B+1 only) at
        # rotating offsets.
        streamed_edges = sorted({tile_edges(kk, c)[1] for kk, c in pins.items()})
        docs = [(2, b - 2) for b in streamed_edges]
        window = None
        if geom == "varlen-short" and variant % 2:
            # Every other case adds a sliding window W wider than those documents, a document of two queries
            # and W + 1 keys (its second row's window starts one key into the first tile, whose tiles are
            # otherwise fully visible) and one of W + B keys (its first row's window starts at the last key of
            # the first tile of the smallest edge B): where a window edge one key off shows.
            window = 2 * streamed_edges[-1]
            docs += [(2, window - 1), (2, window + streamed_edges[0] - 2)]
        if geom == "varlen-edges":
            lens = sorted({n for n in (1, own - 1, own, own + 1) if n > 0}) if FULL else [own + 1]
            docs += [(n, offsets[(i + variant + 2) % len(offsets)]) for i, n in enumerate(lens)]
        docs += [(0, 3)]
        return varlen_geometry([n for n, _ in docs], [n + o for n, o in docs], hq, hkv, d, p, seed, window=window)
    lq = own + 1
    lk = lq + offsets[variant % len(offsets)]
    kw, ref_kw = dict(dropout_p=p, seed=seed), dict(dropout_p=p)
    batch = 2 if FULL or geom == "padded-kpm" else 1
    if geom == "padded-kpm":
        kpm = torch.rand(batch, lk, device=DEVICE) > 0.25
        kpm[0, : streamed + 1] = False  # left padding across a whole first tile
        kpm[1] = False  # a sequence without any key
        kw["key_padding_mask"] = ref_kw["kpm"] = kpm
    elif geom == "padded-window":
        window = (own, streamed)[variant % 2] + (1 if variant % 3 else -1)
        kw["window"] = ref_kw["window"] = max(1, window)
    elif geom == "padded-noncausal":
        kw["causal"] = ref_kw["causal"] = False
        lk = lq + 1 + variant  # not a multiple of any tile
    if dropout:
        ref_kw["keep"] = _keep(batch, hq, lq, lk, p, seed)
    shapes = [(batch, lq, hq, d), (batch, lk, hkv, d), (batch, lk, hkv, d)]
    return shapes, kw, lambda q, k, v: ref_padded(q, k, v, **ref_kw)


@contextlib.contextmanager
def forced_path(launcher, deterministic):
    """``attn.<launcher>`` on one path whatever torch's deterministic switch says (``nan_filled_empty`` turns it
    on for its NaN-filled buffers): ``attention_bwd`` (split dK/dV and dQ kernels, or dQ by atomics inside the
    dK/dV kernel) or ``attention_dbwd`` (atomic-free, or the fused key pass with atomic grad q)."""
    original = getattr(attn, launcher)
    setattr(attn, launcher, lambda *a, **kw: original(*a, **{**kw, "deterministic": deterministic}))
    try:
        yield
    finally:
        setattr(attn, launcher, original)


def three_orders(q, k, v, dout, dlse, cots, fwd, second):
    """out, lse, grads of <dout, out> + <dlse, lse> w.r.t. q, k, v, and (``second``) the gradients of
    <cots, those grads> w.r.t. q, k, v, dout, dlse: by both paths of the double backward on a GPU-table
    configuration (the reference gets one), so every table entry of both runs in the CI sample."""
    out, lse = fwd(q, k, v)
    fin = torch.isfinite(lse.detach())
    loss = (out.to(dout.dtype) * dout).sum() + (lse.to(dlse.dtype).masked_fill(~fin, 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=second)
    if not second:
        return out, lse, grads, []
    inner = sum((g.to(c.dtype) * c).sum() for g, c in zip(grads, cots))
    leaves = (q, k, v, dout, dlse)
    if q.dtype == torch.float64:
        return out, lse, grads, [torch.autograd.grad(inner, leaves)]
    paths = []
    for deterministic in (False, True):
        with forced_path("attention_dbwd", deterministic):
            paths.append(torch.autograd.grad(inner, leaves, retain_graph=not deterministic))
    return out, lse, grads, paths


def check_attention(shapes, op_kw, ref_fn, dtype, precision, pins, second, atomic=False):
    """Forward, backward and (``second``) double backward with ``pins`` against the fp64 reference; with
    ``atomic`` also the backward's default path off deterministic mode (dQ by atomics inside the dK/dV
    kernel, pinned as ``dkdv_atomic``; ``nan_filled_empty`` turns deterministic mode on)."""

    def rnd(shape, dt=dtype):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dt)

    q, k, v = (rnd(s).requires_grad_() for s in shapes)
    lse_shape = (shapes[0][1], shapes[0][0]) if len(shapes[0]) == 3 else (shapes[0][0], shapes[0][2], shapes[0][1])
    dout = rnd(shapes[0]).requires_grad_()
    dlse = rnd(lse_shape, ACC).requires_grad_()
    cots = [rnd(s) for s in shapes]
    with attn.interpret_configs(**pins), nan_filled_empty():
        got = three_orders(
            q,
            k,
            v,
            dout,
            dlse,
            cots,
            lambda q, k, v: prefix_attention(
                q, k, v, return_lse=True, backend="triton", fp32_precision=precision, **op_kw
            ),
            second,
        )
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, dout, dlse)]
    want = three_orders(*leaves, [c.double() for c in cots], ref_fn, second)
    out, lse, grads, paths = got
    rout, rlse, rgrads, rpaths = want
    assert out.dtype == dtype
    assert_close(out, rout, dtype=dtype, name="out")
    assert_lse(lse, rlse, dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(g, r, dtype=dtype, name=name)
    for path, gg in zip(("fused", "deterministic"), paths):
        for name, g, r in zip(("q", "k", "v", "dout", "dlse"), gg, rpaths[0]):
            assert_close(g, r, dtype=dtype, name=f"second-order grad {name} ({path} path)")
    if atomic:
        with attn.interpret_configs(**pins), nan_filled_empty(), forced_path("attention_bwd", False):
            out, lse = prefix_attention(q, k, v, return_lse=True, backend="triton", fp32_precision=precision, **op_kw)
            _, _, agrads, _ = three_orders(q, k, v, dout, dlse, cots, lambda *_: (out, lse), False)
        for name, g, r in zip(("dq", "dk", "dv"), agrads, rgrads):
            assert_close(g, r, dtype=dtype, name=f"{name} (atomic dQ)")


def _atomic_shape(case):
    return case["cls"], tuple(case["pins"]["dkdv_atomic"][:2])


# The backward's atomic path runs as the backward of the geometries aimed at it (kind "dkdv_atomic") and, CI
# time, once more per tile shape of its table and head-dim class, in the varlen-short geometry of the first
# case that pins it (the interpreter executes shapes; warps and stages only matter to the compiler, which the
# compile check covers); GRADMEM_KERNELS_FULL=1 runs it after every geometry.
ATOMIC_RUNS = {}
for _case in CASES:
    ATOMIC_RUNS.setdefault(_atomic_shape(_case), _case["id"])


def _heads(i, geom, kind):
    if FULL:
        return ((2, 1), (4, 2), (3, 3))[i % 3]
    if geom.startswith("varlen") or kind in KEY_SIDE:
        return 2, 1  # GQA: two query heads share the KV head (the key-side kernels loop over the group)
    return 1, 1  # CI time: one head for the query-side kinds' padded geometries


def _sample_params():
    """CI: varlen-short for every case (so every tile shape runs), and for every fourth case one more geometry,
    rotating over the others, the kinds whose edges it targets (shifted by one per round of geometries, so a
    geometry meets different kinds), and offsets (CI time)."""
    params = []
    others = GEOMETRIES[1:]
    j = 0
    for i, case in enumerate(CASES):
        kinds = running_kinds(case)
        kind = kinds[i % len(kinds)]
        params.append(pytest.param(case, GEOMETRIES[0], kind, i, id=f"{case['id']}-{GEOMETRIES[0]}-{kind}"))
        if i % 4 == 0:
            geom, kind = others[j % len(others)], kinds[(j + j // len(others)) % len(kinds)]
            params.append(pytest.param(case, geom, kind, i, id=f"{case['id']}-{geom}-{kind}"))
            j += 1
    return params


def _full_params():
    params = []
    for i, case in enumerate(CASES):
        kinds = running_kinds(case)
        for geom in GEOMETRIES:
            for j, kind in enumerate(kinds):
                params.append(pytest.param(case, geom, kind, i + j, id=f"{case['id']}-{geom}-{kind}"))
    return params


@pytest.mark.parametrize("case, geom, kind, variant", _full_params() if FULL else _sample_params())
def test_attention_gpu_tiles(case, geom, kind, variant):
    hq, hkv = _heads(variant, geom, kind)
    dims = HEAD_DIMS[case["cls"]]
    d = dims[variant % len(dims)] if FULL else dims[0]
    shapes, op_kw, ref_fn = build_geometry(geom, kind, case["pins"], hq, hkv, d, case["dropout"], variant)
    args = (shapes, op_kw, ref_fn, case["dtype"], case["precision"], case["pins"], case["second"])
    if kind == "dkdv_atomic":  # a geometry against the atomic kernel's edges: its backward is the atomic one
        with forced_path("attention_bwd", False):
            check_attention(*args)
    else:
        check_attention(*args, FULL or (geom == GEOMETRIES[0] and ATOMIC_RUNS[_atomic_shape(case)] == case["id"]))


def test_sample_runs_every_table_entry():
    """The CI sample runs the tile shape of every entry of every GPU list (aligned and unaligned, the
    short-document tiles of ``_SHORT`` included) in its dtype group, class and dropout setting; a
    double-backward entry in a case that runs the double backward wherever the class has one (guards the
    column construction)."""
    ran = {
        (c["dtype"], c["precision"], c["cls"], c["dropout"], kind, c["pins"][kind][:2])
        for c in CASES
        for kind in running_kinds(c)
    }
    second_kinds = [kind for kind in attn.KINDS if kind not in FWD_KINDS]
    expected = set()
    for _, dtype, size, precision in DTYPE_GROUPS:
        for cls in HEAD_DIM_CLASSES:
            for dropout in (False, True):
                lists = {
                    kind: [
                        cfg
                        for a in ALIGNMENTS
                        for cfg in attn.gpu_configs(kind, cls, size, dropout, precision, aligned=a)
                    ]
                    for kind in attn.KINDS
                }
                has_second = all(lists[kind] for kind in second_kinds)
                for kind, cfgs in lists.items():
                    if kind in FWD_KINDS or has_second:
                        expected |= {(dtype, precision, cls, dropout, kind, tuple(cfg[:2])) for cfg in cfgs}
    assert expected <= ran, sorted(expected - ran, key=str)
    # the short-document tiles explicitly (fp16 stands for the 16-bit tables, TF32 for the fp32 ones)
    groups = {2: (torch.float16, "tf32"), 4: (torch.float32, "tf32")}
    for kind, table in attn._SHORT.items():
        for (cls, size), variants in table.items():
            for variant, cfgs in variants.items():
                for cfg in cfgs:
                    assert (*groups[size], cls, variant == "dropout", kind, tuple(cfg[:2])) in ran, (kind, cls, cfg)
    sampled = {(p.values[0]["id"], p.values[1]) for p in _sample_params()}
    assert all((c["id"], GEOMETRIES[0]) in sampled for c in CASES)


# Soft-capping (SOFTCAP constexpr) and sink logits on the GPU tables' tiles: column 0 of two cases (CI) or
# of every case that runs the double backward (GRADMEM_KERNELS_FULL=1), in a varlen geometry against the
# pinned tiles' edges, three orders against the fp64 reference of test_attention_softcap_sinks.py. The cap's
# tanh and slope tiles add register pressure on a GPU (the compile check compiles every entry with it); here
# the interpreter runs the code on the tables' tile shapes.
SOFTCAP_CI = ("fp16-d64-plain-0", "fp32-ieee-d64-dropout-0")
SOFTCAP_CASES = [c for c in CASES if c["second"] and (FULL or c["id"] in SOFTCAP_CI) and c["id"].endswith("-0")]


@pytest.mark.parametrize("case", SOFTCAP_CASES, ids=[c["id"] for c in SOFTCAP_CASES])
def test_softcap_sinks_gpu_tiles(case):
    from test_attention_softcap_sinks import CAP
    from test_attention_softcap_sinks import ref_varlen as capped_ref

    size = torch.tensor([], dtype=case["dtype"]).element_size()
    pins, hq, hkv = dict(case["pins"]), 2, 1
    for kind in pins:  # a pin that capped calls never launch gives way to one of the capped lists' entries
        capped = [
            cfg
            for a in ALIGNMENTS
            for cfg in attn.gpu_configs(kind, case["cls"], size, case["dropout"], case["precision"], a, softcap=True)
        ]
        if capped and pins[kind] not in capped:
            pins[kind] = capped[0]
    d = HEAD_DIMS[case["cls"]][0]
    p, seed = (0.2, 77) if case["dropout"] else (0.0, 0)
    # per pinned kind: a document of two queries across its streamed edge, one of own edge + 1 queries; then
    # a length-1 document and one with keys but no query
    docs = [(2, b - 2) for b in sorted({tile_edges(kk, c)[1] for kk, c in pins.items()})]
    docs += [(tile_edges("fwd", pins["fwd"])[0] + 1, 1), (1, 0), (0, 3)]
    lens_q, lens_k = [n for n, _ in docs], [n + o for n, o in docs]
    cq, ck = cu(lens_q), cu(lens_k)
    keep = _keep(len(docs), hq, max(lens_q), max(lens_k), p, seed, cq, ck) if p else None
    sinks = 1.0 + torch.randn(hq, dtype=torch.float64, device=DEVICE)
    op_kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=p, seed=seed, softcap=CAP, sinks=sinks.to(case["dtype"]))

    def ref(q, k, v):
        return capped_ref(q, k, v, cq, ck, keep=keep, dropout_p=p, softcap=CAP, sinks=sinks)

    shapes = [(sum(lens_q), hq, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d)]
    check_attention(shapes, op_kw, ref, case["dtype"], case["precision"], pins, True, atomic=True)


def test_interpret_configs_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        with attn.interpret_configs(forward=(16, 16, 4, 1)):
            pass


# ----------------------------------------------------------------------------------------------------
# Property-based search over small random geometries (hypothesis)


@st.composite
def attention_geometry(draw):
    case = draw(st.sampled_from(CASES))
    kind = draw(st.sampled_from(running_kinds(case)))
    bm, bn = case["pins"][kind][:2]
    edge = st.sampled_from(sorted({1, bm - 1, bm, bm + 1, bn - 1, bn, bn + 1}))
    length = st.one_of(st.integers(1, 24), edge)
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from(HEAD_DIMS[case["cls"]]))
    varlen = draw(st.booleans())
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 2 * max(bm, bn)))) if causal else None
    seed = draw(st.integers(0, 2**31 - 1))
    if varlen:
        lens_q = draw(st.lists(st.one_of(st.just(0), length), min_size=1, max_size=3))
        lens_k = [lq + draw(st.one_of(st.integers(0, 3), st.sampled_from([bn - 2, bn - 1, bm - 1]))) for lq in lens_q]
        geo = dict(lens_q=lens_q, lens_k=lens_k)
    else:
        lq = draw(length)
        geo = dict(
            batch=draw(st.integers(1, 2)),
            lq=lq,
            lk=lq + draw(st.integers(-2, bn)) if causal else draw(length),
            kpm=draw(st.booleans()),
        )
        geo["lk"] = max(1, geo["lk"])
    return case, dict(hq=hq, hkv=hkv, d=d, varlen=varlen, causal=causal, window=window, seed=seed, **geo)


def _random_geometry(case, g):
    torch.manual_seed(g["seed"])
    p = 0.25 if case["dropout"] else 0.0
    kw = dict(causal=g["causal"], window=g["window"], dropout_p=p, seed=g["seed"])
    ref_kw = dict(causal=g["causal"], window=g["window"], dropout_p=p)
    hq, hkv, d = g["hq"], g["hkv"], g["d"]
    if g["varlen"]:
        return varlen_geometry(
            g["lens_q"], g["lens_k"], hq, hkv, d, p, g["seed"], causal=g["causal"], window=g["window"]
        )
    batch, lq, lk = g["batch"], g["lq"], g["lk"]
    if g["kpm"]:
        kw["key_padding_mask"] = ref_kw["kpm"] = torch.rand(batch, lk, device=DEVICE) > 0.3
    if p:
        ref_kw["keep"] = _keep(batch, hq, lq, lk, p, g["seed"])
    shapes = [(batch, lq, hq, d), (batch, lk, hkv, d), (batch, lk, hkv, d)]
    return shapes, kw, lambda q, k, v: ref_padded(q, k, v, **ref_kw)


@settings(
    max_examples=200 if FULL else 4,
    deadline=None,
    derandomize=not FULL,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(attention_geometry())
def test_attention_random_geometries(drawn):
    case, g = drawn
    shapes, op_kw, ref_fn = _random_geometry(case, g)
    check_attention(shapes, op_kw, ref_fn, case["dtype"], case["precision"], case["pins"], case["second"])


# ----------------------------------------------------------------------------------------------------
# Fused linear cross-entropy: the GPU tiles of pick_blocks


def ce_configs():
    """{GPU tile (BLOCK_M, BLOCK_V, num_warps): smallest V that picks it}, over V = 16 .. 2**18 (as the
    compile check's list)."""
    found = {}
    for e in range(4, 19):
        found.setdefault(ce.pick_blocks(2**e, interpret=False), 2**e)
    return found


CE_CONFIGS = ce_configs()


def ce_geometries(cfg, v0):
    """(rows, V) pairs that pick ``cfg`` on a GPU: rows around BLOCK_M, V with a masked tail tile and (for the
    widest tile) several tiles per row."""
    bm, bv, _ = cfg
    vs = [v for v in (v0 // 2 + 1, v0 - 1, v0, bv + 1, 2 * bv + 3) if ce.pick_blocks(v, interpret=False) == cfg]
    rows = [r for r in (1, bm - 1, bm, bm + 1, 2 * bm + 1) if r > 0]
    if FULL:
        return [(r, v) for r in rows for v in sorted(set(vs))]
    return [(bm + 1, vs[-1 if bv >= 4096 else 0])]


CE_PARAMS = [
    pytest.param(cfg, rows, v, dtype, id=f"M{cfg[0]}-V{cfg[1]}-rows{rows}-v{v}-{str(dtype)[6:]}")
    for i, (cfg, v0) in enumerate(CE_CONFIGS.items())
    for j, (rows, v) in enumerate(ce_geometries(cfg, v0))
    for dtype in ((torch.float32, torch.float16) if FULL else ((torch.float32, torch.float16)[(i + j) % 2],))
]


@pytest.mark.parametrize("cfg, rows, vocab, dtype", CE_PARAMS)
def test_cross_entropy_gpu_tiles(cfg, rows, vocab, dtype, nan_empty):
    """Both row kernels with the GPU tile on NaN-filled buffers: lse, loss, the unit gradient written in place,
    and the scaled gradient from the saved lse, against fp64 ``F.cross_entropy``."""
    z = (torch.randn(rows, vocab, dtype=torch.float64, device=DEVICE) * 4).to(dtype)
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[::3] = -100  # ignored rows: loss 0, gradient row 0
    t[-1] = vocab - 1  # the last column, in the masked tail tile
    zr = z.double().requires_grad_()
    ref_loss = F.cross_entropy(zr, t, ignore_index=-100, reduction="none")
    (unit,) = torch.autograd.grad(ref_loss.sum(), zr)
    scale = torch.randn(rows, device=DEVICE)
    with ce.interpret_gpu_tiles():
        assert ce.pick_blocks(vocab) == cfg
        lse, loss = nan_empty(rows), nan_empty(rows)
        zg = z.clone()
        ce.ce_forward(zg, t, lse, loss, -100, write_grad=True)
        zs = z.clone()
        ce.ce_grad(zs, t, lse, scale, -100)
    assert_close(lse, zr.detach().logsumexp(1), dtype=dtype, name="lse")
    assert_close(loss, ref_loss, dtype=dtype, name="loss")
    assert_close(zg, unit, dtype=dtype, name="unit gradient")
    assert_close(zs, unit * scale.double()[:, None], dtype=dtype, name="scaled gradient")


@pytest.mark.parametrize("cfg", list(CE_CONFIGS), ids=lambda c: f"M{c[0]}-V{c[1]}")
def test_linear_cross_entropy_gpu_tiles_three_orders(cfg):
    """The op on each GPU tile: loss, gradients and the double backward (create_graph) against fp64 autograd."""
    v0 = CE_CONFIGS[cfg]
    vocab = v0 // 2 + 1 if ce.pick_blocks(v0 // 2 + 1, interpret=False) == cfg else v0 + 1
    rows, d = cfg[0] + 1, 16
    h = torch.randn(rows, d, device=DEVICE, requires_grad=True)
    w = (torch.randn(vocab, d, device=DEVICE) / 4).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[0] = -100
    cot = torch.randn(rows, d, device=DEVICE)

    def orders(h, w, fn):
        loss = fn(h, w)
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        return (loss, gh, *torch.autograd.grad((gh * cot.to(gh.dtype)).sum(), (h, w)))

    with ce.interpret_gpu_tiles(), nan_filled_empty():
        got = orders(h, w, lambda h, w: linear_cross_entropy(h, w, t, backend="triton", reduction="sum"))
    want = orders(
        h.detach().double().requires_grad_(),
        w.detach().double().requires_grad_(),
        lambda h, w: F.cross_entropy(F.linear(h, w), t, ignore_index=-100, reduction="sum"),
    )
    for name, g, r in zip(("loss", "grad hidden", "second-order grad hidden", "second-order grad weight"), got, want):
        assert_close(g, r, dtype=torch.float32, name=name)


def ce_dot_configs():
    """[(kernel, operand bytes, GPU tile)]: every tile pick_dot_blocks gives ce_dh or ce_dw for fp16 and fp32
    operands (bf16 shares fp16's tiles; its dots are wrong in the interpreter), each tile shape once: both
    kernels run in every case, so a ce_dw shape equal to a ce_dh shape is already covered (warps and stages do
    not change what the interpreter computes)."""
    found = {}
    for kind in ("dh", "dw"):
        for size in (2, 4):
            for d in (16, 32, 64, 128, 256, 4096):
                tile = ce.pick_dot_blocks(d, size, interpret=False, kind=kind)
                found.setdefault((size, tile[:3]), (kind, tile))
    return [(kind, size, tile) for (size, _), (kind, tile) in found.items()]


CE_DOT_CONFIGS = ce_dot_configs()


def ce_dot_geometries(cfg):
    """(rows, V, d, split) for ``cfg``: rows around BLOCK_M (ce_dh's row tile) and BLOCK_K (ce_dw's row step), V
    around BLOCK_K (ce_dh's step) and BLOCK_M (ce_dw's V tile) with a masked tail, the hidden sizes at the edges
    of BLOCK_N that still pick this tile, split-K 1 and 2 (ce_dw's tile reads as BLOCK_V, BLOCK_N, BLOCK_C)."""
    kind, size, (bm, bn, bk, _, _) = cfg
    ds = sorted(
        d
        for d in {bn - 1, bn, bn + 1, 2 * bn + 1}
        if d >= 1 and ce.pick_dot_blocks(d, size, interpret=False, kind=kind) == cfg[2]
    )
    big = max(bm, bk)
    if FULL:  # split-K 2 on the V that has more than two K steps
        rows = (1, bk - 1, bm + 1, 2 * big + 1)
        return [(r, v, d, 1) for r in rows for v in (bk - 1, bm + 1, 2 * big + 3) for d in ds] + [
            (r, 2 * big + 3, d, 2) for r in rows for d in ds
        ]
    return [(big + 1, 2 * big + 3, ds[-1], 2)]


CE_DOT_PARAMS = [
    pytest.param(
        cfg, *geo, id=f"{cfg[0]}-{cfg[1]}B-{'-'.join(map(str, cfg[2][:3]))}-rows{geo[0]}-v{geo[1]}-d{geo[2]}-s{geo[3]}"
    )
    for cfg in CE_DOT_CONFIGS
    for geo in ce_dot_geometries(cfg)
]


@pytest.mark.parametrize("cfg, rows, vocab, d, split", CE_DOT_PARAMS)
def test_cross_entropy_products_gpu_tiles(cfg, rows, vocab, d, split):
    """ce_dh / ce_dw (and the statistics) with the GPU tiles on a NaN-padded chunk, against fp64
    (test_cross_entropy.check_product_kernels)."""
    kind, size, tile = cfg
    dtype = torch.float16 if size == 2 else torch.float32
    with ce.interpret_gpu_tiles():
        assert ce.pick_dot_blocks(d, size, kind=kind) == tile
        check_product_kernels(dtype, rows, vocab, d, split, DEVICE)


# ----------------------------------------------------------------------------------------------------
# Fused memory update: every launch variant of compile_specs (the GPU's tiles are the interpreter's; the split
# reduction runs on a GPU only when few samples are large, so it is forced here)


def update_variants():
    """Distinct (ADAM, HAS_CLIP_NORM, SCALAR_PTRS, SPLIT, PER_SAMPLE) of the update kernel's compile specs."""
    keys = ("ADAM", "HAS_CLIP_NORM", "SCALAR_PTRS", "SPLIT", "PER_SAMPLE")
    return sorted({tuple(s.constexprs[k] for k in keys) for s in ku.compile_specs() if "ADAM" in s.constexprs})


UPDATE_SIZES = (ku.BLOCK - 1, ku.BLOCK + 1, 3 * ku.BLOCK + 1)  # elements per sample (m * d) around BLOCK
UPDATE_PARAMS = [
    pytest.param(
        var,
        n,
        dtype,
        id=f"{'adam' if var[0] else 'sgd'}-clipnorm{int(var[1])}-ptrs{int(var[2])}"
        f"-split{int(var[3])}{'-per_sample' if var[4] else ''}-n{n}-{str(dtype)[6:]}",
    )
    for i, var in enumerate(update_variants())
    for j, n in enumerate(UPDATE_SIZES if FULL else (UPDATE_SIZES[(i + 2) % 3],))
    for dtype in ((torch.float32, torch.float16) if FULL else ((torch.float32, torch.float16)[i % 2],))
]


@pytest.mark.parametrize("variant, numel, dtype", UPDATE_PARAMS)
def test_update_variants(variant, numel, dtype, nan_empty):
    """launch_update in each compiled variant on NaN-filled outputs; the change M - M0 (not M, where an error in
    the step would hide under M0) against the fp64 formula, with Adam state, non-default betas and a clip."""
    adam, has_clip_norm, scalar_ptrs, split, per_sample = variant
    B, m = 3, 1
    M, G, M64, G64 = make_inputs(B, m, numel, dtype)
    clip_value = 0.8 if adam or numel % 2 else None
    cv, cn = clips_for(G64, clip_value, has_clip_norm)
    betas, step, lr = (0.8, 0.95), 3, 0.05
    state = (torch.randn(B, m, numel).abs() * 0.01, torch.rand(B, m, numel) * 1e-3) if adam else None
    ref_new, ref_norm, ref_state = ref_update(M64, G64, lr, "adam" if adam else "sgd", cv, cn, state, step, betas)
    outs = dict(out=nan_empty(B, m, numel, dtype=dtype), norm_out=nan_empty(B))
    if adam:
        outs.update(exp_avg_out=nan_empty(B, m, numel), exp_avg_sq_out=nan_empty(B, m, numel))
    lr_arg = torch.tensor([lr]) if scalar_ptrs else lr
    step_arg = torch.tensor([step]) if scalar_ptrs else step
    if per_sample:  # [B] tensors holding the same value: the per-sample loads against the shared formula
        lr_arg, step_arg = lr_arg.expand(B), step_arg.expand(B)
    new, norm, m1, m2 = ku.launch_update(
        M,
        G,
        lr=lr_arg,
        adam=adam,
        step=step_arg,
        clip_value=cv,
        clip_norm=cn,
        betas=betas,
        exp_avg=None if state is None else state[0],
        exp_avg_sq=None if state is None else state[1],
        num_splits=3 if split else 1,
        **outs,
    )
    # M0 is rounded to dtype; the change is compared in fp64 from the same rounded M0.
    assert_close(new.double() - M64, ref_new - M64, dtype=dtype, name="M - M0")
    assert_close(norm, ref_norm, dtype=torch.float32, name="raw norm")
    if adam:
        assert_close(m1, ref_state[0], dtype=torch.float32, name="exp_avg")
        assert_close(m2, ref_state[1], dtype=torch.float32, name="exp_avg_sq")
