"""Option matrix: every combination of the WRITE options against an independent fp64 loop written here.

Two levels: the update op runs every combination in ``make test``; the whole WRITE runs a pairwise-covering
sample there (every pair of values of any two options at least once; deterministic) and every combination
with ``GRADMEM_OPTIONS_FULL=1`` (``make test-options``):

* the update op ``memory_update``: optimiser x clip value x clip norm x grad mode x per-document lr/step x
  backend (torch fp64, triton fp32 kernel), two consecutive steps (Adam's moments carry a norm clip that a
  fresh Adam step is blind to), values, raw norms and first/second-order gradients;
* the whole WRITE (``MemoryWriter``): optimiser x clip value x clip norm x grad mode x last-K x schedule x
  given tokens x path (the torch reference, the packed engine on torch ops, the packed engine on the Triton
  kernels in the interpreter), fp64, on a tiny random Llama (GQA), memories, losses, raw norms and the
  gradient of a random projection of the written memory with respect to M0 and every weight.

Inputs are built so each option changes the result: per-document gradient norms above the clip, below it,
and just above it (0.005 (1 + 1e-4), where the clip's epsilon of 1e-6 moves the update by 2e-4 relative, 20
times the fp32 bound: a planted epsilon of 1e-5 or 0 is caught), entries beyond the clamp of both signs (and beyond
Adam's default clamp of 10), schedules with warmup and decay, a document with no token after the given ones.
Each check compares the change ``M - M0`` (not ``M``, in which a small update drowns).

Combinations the API cannot run are refused with a ValueError naming the option; the matrix tests the
refusal instead (``REFUSED``): Adam with grad_mode="second" (Adam is first-order only; the config refuses it,
and the op refuses a gradient that requires grad), last-K without grad_mode="second".
"""

import itertools
import math
import os

import pytest
import torch
from covering import pairwise

from gradmem_fast import MemoryWriter, WriteConfig, memory_update
from gradmem_fast.config import Schedule
from helpers import rel_error, tolerance
from tiny_models import VOCAB, tiny_model

F64 = torch.float64
FULL = os.environ.get("GRADMEM_OPTIONS_FULL") == "1"
EPS = 1e-6  # DESIGN.md item 4, written here on purpose: the test must not import the constant it pins


def _cases(axes, allowed):
    if FULL:
        return [c for c in (dict(zip(axes, v)) for v in itertools.product(*axes.values())) if allowed(c)]
    return pairwise(axes, allowed)


def _id(case):
    return "-".join(f"{v}" for v in case.values())


# ------------------------------------------------------------------------------ independent fp64 formulas


def clip(g, clip_value, clip_norm):
    """Clamp, then scale by clip_norm / (||g|| + 1e-6) when ||g|| > clip_norm (one sample)."""
    if clip_value is not None:
        g = torch.where(g > clip_value, clip_value, torch.where(g < -clip_value, -clip_value, g))
    if clip_norm is not None:
        n = (g * g).sum().sqrt()
        if n > clip_norm:
            g = g * (clip_norm / (n + EPS))
    return g


def adam_direction(g, state, step, betas=(0.9, 0.999)):
    """(direction m_hat / (sqrt(max(v_hat, 1e-8)) + 1e-8), new state) of one sample."""
    b1, b2 = betas
    m1 = b1 * state[0] + (1 - b1) * g
    m2 = b2 * state[1] + (1 - b2) * g * g
    v_hat = m2 / (1 - b2**step)
    v_hat = torch.where(v_hat < 1e-8, torch.full_like(v_hat, 1e-8), v_hat)
    return (m1 / (1 - b1**step)) / (v_hat.sqrt() + 1e-8), (m1, m2)


# ------------------------------------------------------------------------------------------- the update op

B, M_ROWS, D = 3, 3, 8
CLIP_NORM = 0.005
CLIP_VALUE = 0.005


def op_gradient(seed):
    """[B, m, d] gradient: sample 0 has four entries of +-20 (beyond the clamp and Adam's default 10) and a
    post-clamp norm of ~2.8 clip_norm (clip_value = clip_norm); sample 1 has norm clip_norm / 2; sample 2 has
    norm clip_norm (1 + 1e-4) with every entry inside the clamp."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.empty(B, M_ROWS * D, dtype=F64)
    for b, norm in enumerate((2 * CLIP_NORM, 0.5 * CLIP_NORM, CLIP_NORM * (1 + 1e-4))):
        small = (torch.rand(M_ROWS * D, generator=gen, dtype=F64) + 1) * torch.randn(
            M_ROWS * D, generator=gen, dtype=F64
        ).sign()
        G[b] = small * norm / small.norm()
    G[0, :4] = torch.tensor([20.0, -20.0, 20.0, -20.0])
    assert G[1:].abs().max() < CLIP_VALUE
    return G.view(B, M_ROWS, D)


OP_AXES = {
    "optimizer": ["sgd", "adam"],
    "clip_value": [None, CLIP_VALUE],
    "clip_norm": [None, CLIP_NORM],
    "grad_mode": ["none", "first", "second"],
    "lr_step": ["shared", "per_doc"],
    "backend": ["torch64", "triton32"],
}


def _op_refused(c):
    return c["optimizer"] == "adam" and c["grad_mode"] == "second"


# Every accepted combination even in make test (80 cases, each a few milliseconds of torch or one small kernel):
# pairs alone missed a triple (triton backend x second order x clamp) that a mutation tool's mutant needed.
OP_CASES = [c for c in (dict(zip(OP_AXES, v)) for v in itertools.product(*OP_AXES.values())) if not _op_refused(c)]


def _oracle_op(c, M, Gs, lrs, steps):
    """Two steps per sample in fp64 with autograd kept (the caller differentiates what grad_mode allows)."""
    cv = c["clip_value"] if c["clip_value"] is not None or c["optimizer"] == "sgd" else 10.0
    news = []
    for b in range(B):
        Mb = M[b]
        state = (torch.zeros_like(Mb), torch.zeros_like(Mb))
        for k, G in enumerate(Gs):
            g = clip(G[b], cv, c["clip_norm"])
            if c["optimizer"] == "sgd":
                Mb = Mb - lrs[k][b] * g
            else:
                direction, state = adam_direction(g, state, steps[k][b])
                Mb = Mb - lrs[k][b] * direction
        news.append(Mb)
    return torch.stack(news)


@pytest.mark.parametrize("c", OP_CASES, ids=[_id(c) for c in OP_CASES])
def test_update_op_matrix(c):
    dtype = F64 if c["backend"] == "torch64" else torch.float32
    backend = "torch" if c["backend"] == "torch64" else "triton"
    per_doc = c["lr_step"] == "per_doc"
    # Memories small beside the updates: an fp32 memory's own rounding must not swamp the change M - M0.
    M64 = (1e-3 * torch.randn(B, M_ROWS, D, dtype=F64)).to(dtype).to(F64)
    G64s = [op_gradient(1).to(dtype).to(F64), (op_gradient(2) * 1.3).to(dtype).to(F64)]
    lr_values = [torch.tensor([0.7, 0.2, 1.1], dtype=F64), torch.tensor([0.4, 0.9, 0.3], dtype=F64)]
    step_values = [torch.tensor([1, 4, 2]), torch.tensor([2, 5, 3])]
    if not per_doc:
        lr_values = [torch.full((B,), float(v[0]), dtype=F64) for v in lr_values]
        step_values = [torch.full((B,), 1), torch.full((B,), 2)]
    lr_values = [v.to(dtype).to(F64) for v in lr_values]

    first, second = c["grad_mode"] != "none", c["grad_mode"] == "second"
    M = M64.to(dtype).requires_grad_(first)
    Gs = [g.to(dtype).requires_grad_(second) for g in G64s]
    lrs = [v.to(dtype).requires_grad_(first and per_doc) if per_doc else float(v[0]) for v in lr_values]
    steps = [s if per_doc else int(s[0]) for s in step_values]
    kw = dict(optimizer=c["optimizer"], clip_value=c["clip_value"], clip_norm=c["clip_norm"], backend=backend)

    new, state, norms = M, None, []
    with torch.set_grad_enabled(first):
        for k in range(2):
            out = memory_update(new, Gs[k], lr=lrs[k], state=state, step=steps[k], **kw)
            new, state = out.memory, out.state
            norms.append(out.grad_norm)

    M_o = M64.clone().requires_grad_(first)
    G_o = [g.clone().requires_grad_(second) for g in G64s]
    lr_o = [v.clone().requires_grad_(first and per_doc) for v in lr_values]
    want = _oracle_op(c, M_o, G_o, lr_o, [s.tolist() for s in step_values])

    bound = tolerance(dtype)
    for b in range(B):
        err = rel_error(new[b].detach().to(F64) - M64[b], want[b].detach() - M64[b])
        assert err <= bound, f"sample {b}: update M - M0 off by {err:.3e}"
    for k in range(2):
        assert rel_error(norms[k].to(F64), G64s[k].flatten(1).norm(dim=1)) <= bound, f"raw norms of step {k}"
    if not first:
        assert not new.requires_grad
        return
    cot = torch.randn(B, M_ROWS, D, dtype=F64)
    leaves = [M] + (Gs if second else []) + ([x for x in lrs if isinstance(x, torch.Tensor)])
    leaves_o = [M_o] + (G_o if second else []) + ([x for x in lr_o if x.requires_grad])
    got = torch.autograd.grad((new.to(F64) * cot).sum(), leaves, allow_unused=True)
    exp = torch.autograd.grad((want * cot).sum(), leaves_o, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, exp)):
        w = torch.zeros_like(leaves_o[i]) if w is None else w
        g = torch.zeros_like(w) if g is None else g.to(F64)
        err = rel_error(g, w)
        assert err <= bound, f"gradient {i} of {len(leaves)} (M, grads, lrs): relative error {err:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_op_refuses_adam_second_order(backend):
    M = torch.zeros(B, M_ROWS, D, requires_grad=True)
    G = op_gradient(1).float().requires_grad_(True)
    with pytest.raises(ValueError, match="grad: Adam is first-order only"):
        memory_update(M, G, lr=0.1, optimizer="adam", backend=backend)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["torch64", "triton32"])
def test_norm_clip_epsilon_is_one_millionth(dtype):
    """At ||g|| = clip_norm (1 + 1e-4) = 0.005 the clip's epsilon is 2e-4 of the scale: 1e-5 or 0 instead of
    1e-6 moves the update by 1.8e-3 or 2e-4 relative (fp64 bound 1e-10, fp32 1e-5). The scale is checked against
    the DESIGN.md formula with its constant written out, and against the two wrong constants."""
    backend = "torch" if dtype == F64 else "triton"
    G = op_gradient(3)[2:3].to(dtype)
    M = torch.zeros_like(G)
    new = memory_update(M, G, lr=1.0, clip_norm=CLIP_NORM, backend=backend).memory.to(F64)
    g = G.to(F64)
    n = g.norm()
    assert CLIP_NORM < n < CLIP_NORM * (1 + 2e-4)
    want = -g * CLIP_NORM / (n + 1e-6)
    assert rel_error(new, want) <= tolerance(dtype)
    for wrong in (1e-5, 0.0):
        assert rel_error(new, -g * CLIP_NORM / (n + wrong)) > 10 * tolerance(dtype)


# ----------------------------------------------------------------------------------------- the whole WRITE

DOCS = (7, 1, 4)  # one document with nothing after a given token
STEPS = 3
SCHEDULE = Schedule("cosine", warmup=1, final=0.1)

WRITE_AXES = {
    "optimizer": ["sgd", "adam"],
    "clip_value": [None, "bites"],
    "clip_norm": [None, "bites"],
    "grad_mode": ["none", "first", "second", "second_last1"],
    "schedule": [None, "cosine"],
    "given": [0, 1],
    "path": ["reference", "engine_torch", "engine_triton"],
}


def _write_refused(c):
    return c["optimizer"] == "adam" and c["grad_mode"].startswith("second")


def _write_allowed(c):
    # The kernels under the interpreter cost ~10x the torch ops: keep them to the cases a pair needs.
    return not _write_refused(c)


WRITE_CASES = _cases(WRITE_AXES, _write_allowed)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=F64, initializer_range=0.3)


def _documents():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in DOCS]


def doc_loss(model, memory, tokens, given):
    m, n = memory.shape[0], tokens.shape[0]
    if n <= given:
        return (memory * 0).sum()
    x = torch.cat([memory, model.get_input_embeddings()(tokens)])[None]
    logits = model(inputs_embeds=x).logits[0, m - 1 + given : m - 1 + n]
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp[torch.arange(n - given), tokens[given:]].mean()


def schedule_factor(kind, k, total):
    if kind is None:
        return 1.0
    if k < 1:  # one warmup step
        return (k + 1) / 1
    p = min(1.0, (k - 1) / max(1, total - 1))
    return 0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2


def oracle_write(model, docs, M0, lr, c, clip_value, clip_norm):
    """One document at a time: (memories, losses [K, B], raw norms [K, B]); the graph kept as grad_mode says."""
    mode = c["grad_mode"]
    last = {"second": STEPS, "second_last1": 1}.get(mode, 0)
    cv = clip_value if clip_value is not None or c["optimizer"] == "sgd" else 10.0
    mems, losses, norms = [], [], []
    for tokens in docs:
        M = M0
        state = (torch.zeros_like(M0), torch.zeros_like(M0))
        ls, ns = [], []
        for k in range(STEPS):
            leaf = M.detach().requires_grad_(True) if mode == "none" else M
            if not leaf.requires_grad:
                leaf = leaf.detach().requires_grad_(True)
            loss = doc_loss(model, leaf, tokens, c["given"])
            second = k >= STEPS - last
            (g,) = torch.autograd.grad(loss, leaf, create_graph=second)
            if not second:
                g = g.detach()
            ls.append(float(loss.detach()))
            ns.append(float(g.detach().norm()))
            g = clip(g, cv, clip_norm)
            step_lr = lr * schedule_factor(c["schedule"], k, STEPS)
            if c["optimizer"] == "sgd":
                M = leaf - step_lr * g
            else:
                direction, state = adam_direction(g, state, k + 1)
                M = leaf - step_lr * direction
            if mode == "none":
                M = M.detach()
        mems.append(M)
        losses.append(ls)
        norms.append(ns)
    return mems, torch.tensor(losses, dtype=F64).t(), torch.tensor(norms, dtype=F64).t()


def _thresholds(model, docs, M0, lr, c):
    """Clip settings that bite on these inputs: the clamp at half the largest first-step entry, the norm clip
    between the documents' first-step norms (some above, some below)."""
    g0 = []
    for tokens in docs:
        leaf = M0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(doc_loss(model, leaf, tokens, c["given"]), leaf)
        g0.append(g)
    norms = sorted(float(g.norm()) for g in g0 if g.norm() > 0)
    clip_value = 0.5 * max(float(g.abs().max()) for g in g0) if c["clip_value"] else None
    clip_norm = math.sqrt(norms[0] * norms[-1]) if c["clip_norm"] else None
    return clip_value, clip_norm


@pytest.mark.parametrize("c", WRITE_CASES, ids=[_id(c) for c in WRITE_CASES])
def test_write_matrix(model64, c):
    docs = _documents()
    lr = 0.3 if c["optimizer"] == "sgd" else 0.05
    M0 = (0.5 * torch.randn(2, model64.config.hidden_size, dtype=F64)).requires_grad_(True)
    clip_value, clip_norm = _thresholds(model64, docs, M0, lr, c)
    mode = "second" if c["grad_mode"].startswith("second") else c["grad_mode"]
    config = WriteConfig(
        num_memory_tokens=2,
        steps=STEPS,
        lr=lr,
        optimizer=c["optimizer"],
        clip_value=clip_value,
        clip_norm=clip_norm,
        grad_mode=mode,
        last_k_second_order=1 if c["grad_mode"] == "second_last1" else None,
        schedule=SCHEDULE if c["schedule"] else None,
        given_tokens=c["given"],
    )
    want_M, want_losses, want_norms = oracle_write(model64, docs, M0, lr, c, clip_value, clip_norm)
    if clip_norm is not None:
        assert (want_norms < clip_norm).any() and (want_norms > clip_norm).any(), "the norm clip must bite"

    if c["path"] == "reference":
        writer = MemoryWriter(model64, config, backend="torch")
    else:
        writer = MemoryWriter(model64, config, backend="triton", compile=False)
        writer.ops_backend = "torch" if c["path"] == "engine_torch" else "triton"
    ids = torch.zeros(len(docs), max(DOCS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, d in enumerate(docs):
        ids[b, : len(d)], mask[b, : len(d)] = d, 1
    out = writer.write(ids, mask, M0)

    bound = tolerance(F64)
    for b in range(len(docs)):
        want = want_M[b].detach() - M0.detach()
        if DOCS[b] <= c["given"]:
            assert torch.equal(out.memory[b].detach(), M0.detach()), f"document {b} has nothing to predict"
            continue
        err = rel_error(out.memory[b].detach() - M0.detach(), want)
        assert err <= bound, f"document {b}: M - M0 off by {err:.3e}"
    # The reported statistics are fp32 (WriteResult), whatever the memory's precision.
    assert rel_error(out.losses.to(F64), want_losses) <= tolerance(torch.float32)
    assert rel_error(out.grad_norms.to(F64), want_norms) <= tolerance(torch.float32)
    if mode == "none":
        assert not out.memory.requires_grad
        return

    cot = torch.randn_like(out.memory)
    params = [M0, *model64.parameters()]
    got = torch.autograd.grad((out.memory * cot).sum(), params, allow_unused=True)
    exp = torch.autograd.grad((torch.stack(want_M) * cot).sum(), params, allow_unused=True)
    checked = 0
    for (name, p), g, w in zip([("M0", M0), *model64.named_parameters()], got, exp):
        if g is None and w is None:
            continue
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        err = rel_error(g, w)
        assert err <= bound, f"d (cot . M) / d {name}: relative error {err:.3e}"
        checked += 1
    assert checked >= (1 if mode == "first" else 2), "second order must reach the weights"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="adam", grad_mode="second"), "grad_mode='second' is not supported with optimizer='adam'"),
        (dict(optimizer="adam", grad_mode="second", last_k_second_order=1), "not supported with optimizer='adam'"),
        (dict(grad_mode="first", last_k_second_order=1), "last_k_second_order is only meaningful"),
        (dict(grad_mode="none", last_k_second_order=1), "last_k_second_order is only meaningful"),
    ],
)
def test_write_matrix_refusals(kwargs, match):
    """The combinations the matrix leaves out are refused when the config is built, before any work."""
    with pytest.raises(ValueError, match=match):
        WriteConfig(**kwargs)


def test_matrix_sample_covers_every_pair():
    """The make-test sample holds every pair of option values that the API accepts."""
    for axes, cases, ok in (
        (OP_AXES, OP_CASES, lambda c: not _op_refused(c)),
        (WRITE_AXES, WRITE_CASES, _write_allowed),
    ):
        every = [dict(zip(axes, v)) for v in itertools.product(*axes.values())]
        need = {(a, c[a], b, c[b]) for c in every if ok(c) for a, b in itertools.combinations(axes, 2)}
        have = {(a, c[a], b, c[b]) for c in cases for a, b in itertools.combinations(axes, 2)}
        assert need <= have
        assert not any(_op_refused(c) for c in cases if axes is OP_AXES)
        assert not any(_write_refused(c) for c in cases if axes is WRITE_AXES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("step", [torch.tensor([True]), torch.tensor([1 + 1j])], ids=["bool", "complex"])
def test_update_op_refuses_bool_and_complex_steps(backend, step):
    M = torch.zeros(1, M_ROWS, D)
    with pytest.raises(TypeError, match="step: expected an integer or floating tensor"):
        memory_update(M, torch.ones_like(M), lr=0.1, optimizer="adam", step=step, backend=backend)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("lr_step", ["shared", "per_doc"])
def test_update_kernel_compile_specs_hold_every_lr_step_kind(optimizer, lr_step):
    """The compile check (make test) compiles what the lr/step option launches: per-document lr/step is the
    PER_SAMPLE specialisation with [B] pointer arguments (a mutation tool's survivor compiled the 1-element
    specialisation twice and never the per-document one)."""
    from gradmem_fast.kernels import update as ku

    adam, per_doc = optimizer == "adam", lr_step == "per_doc"
    for clip_norm in (False, True):
        for split in (False, True):
            found = [
                s
                for s in ku.compile_specs()
                if s.name.startswith("update.memory_update[fp32,")
                and s.constexprs.get("ADAM") == adam
                and s.constexprs.get("HAS_CLIP_NORM") == clip_norm
                and s.constexprs.get("SPLIT") == split
                and s.constexprs.get("PER_SAMPLE") == per_doc
                and s.constexprs.get("SCALAR_PTRS") == per_doc
            ]
            assert len(found) == 1, f"clip_norm={clip_norm} split={split}: {len(found)} specs"
            assert found[0].signature["lr"] == ("*fp32" if per_doc else "fp32")
            if adam:
                assert found[0].signature["step"] == ("*i64" if per_doc else "i32")
