"""The written change ``M - M0`` of every document, and meta-gradients, against the eager oracle.

Why the change and not ``M``: a WRITE moves the memory by a small fraction of its norm, so ``M`` is
mostly ``M0`` and a relative error bound on ``M`` dilutes an error of the update itself (about 60x for
the tiny models here: a norm-clip epsilon of 1e-5 instead of 1e-6 passed). Here every document's change
``M_b - M0`` is compared with tests/eager_gradmem.py (one document at a time, fp64, no shared code) within
the DESIGN.md bound of the fast path's dtype.

Also covered here because nothing else did: Adam with ``clip_norm`` (Adam is scale-invariant at a step
with fresh moments, so a clip that scales ``g`` is only visible through the moments of later steps or
through the ``v`` floor: both are exercised), Adam in ``grad_mode="first"``, non-default ``adam_betas``,
``clip_value`` under first and second order, and the write head under second order.

Backends: ``torch`` (the reference, fp64) and ``triton`` (the engine on the kernels; fp32 in the
interpreter). ``make mutants`` (scripts/mutants.py) relies on these tests to kill planted update bugs.
"""

import copy

import pytest
import torch

import eager_gradmem as eager
from gradmem_fast import MemoryWriter, WriteConfig, memory_update, reference
from helpers import rel_error, tolerance
from tiny_models import VOCAB, tiny_model

F64 = torch.float64
BACKENDS = [("torch", F64), ("triton", torch.float32)]
BACKEND_IDS = ["torch64", "triton32"]


def ragged(lengths):
    """Right-padded ids/mask and the list of documents."""
    B, S = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids, mask, [ids[b, :n] for b, n in enumerate(lengths)]


def models(family, dtype):
    """(fp64 oracle model, the same weights in ``dtype``): tiny_model draws fp32 weights from a fixed seed
    and casts them, so both hold identical values."""
    model64 = tiny_model(family)
    return model64, model64 if dtype == F64 else tiny_model(family, dtype=dtype)


def initial_memory(d, m=2, scale=0.5):
    """fp64 values that are exact in fp32, so both sides start from the same M0."""
    return (torch.randn(m, d, dtype=F64) * scale).float().to(F64)


def eager_write(model, docs, M0, cfg, head=None, grad_mode="none"):
    return [
        eager.write_one(
            model,
            doc,
            M0,
            cfg.steps,
            cfg.lr,
            cfg.optimizer,
            cfg.clip_value,
            cfg.clip_norm,
            grad_mode=grad_mode,
            last_k=cfg.last_k_second_order,
            write_head=head,
            betas=cfg.adam_betas,
        )
        for doc in docs
    ]


def assert_deltas(memory, M0, eager_results, dtype, name=""):
    """Every document's change ``M_b - M0`` within the bound of ``dtype``."""
    bound = tolerance(dtype)
    for b, (want_M, _, _) in enumerate(eager_results):
        want = want_M.detach() - M0
        got = memory[b].detach().to(F64).cpu() - M0
        assert want.norm() > 0, f"{name} document {b}: the oracle did not move the memory"
        err = rel_error(got, want)
        assert err <= bound, f"{name} document {b}: change M - M0 off by {err:.3e} (bound {bound:.0e})"


# ------------------------------------------------------------------------------------------ the update op


def _oracle_update(M, G, lr, optimizer, clip_value, clip_norm, state=None, step=1, betas=(0.9, 0.999)):
    """One update per sample with the eager oracle's clip (fp64); Adam from the given moments."""
    news, m1s, m2s = [], [], []
    for b in range(M.shape[0]):
        g = eager._clip(G[b], clip_value if clip_value is not None or optimizer == "sgd" else 10.0, clip_norm)
        if optimizer == "sgd":
            news.append(M[b] - lr * g)
            continue
        b1, b2 = betas
        m1 = b1 * state[0][b] + (1 - b1) * g
        m2 = b2 * state[1][b] + (1 - b2) * g * g
        v_hat = torch.clamp(m2 / (1 - b2**step), min=1e-8)
        news.append(M[b] - lr * (m1 / (1 - b1**step)) / (torch.sqrt(v_hat) + 1e-8))
        m1s.append(m1)
        m2s.append(m2)
    return torch.stack(news), (torch.stack(m1s), torch.stack(m2s)) if m1s else None


def _op_inputs(dtype, grad_scale):
    """Memories of scale 0.1 and gradients of per-sample norms about ``grad_scale`` x (1, 0.3, 2)."""
    B, m, d = 3, 3, 40
    M = (0.1 * torch.randn(B, m, d, dtype=F64)).to(dtype)
    scales = torch.tensor([1.0, 0.3, 2.0], dtype=F64).view(B, 1, 1) * grad_scale / (m * d) ** 0.5
    G = (torch.randn(B, m, d, dtype=F64) * scales).to(dtype)
    return M, G, M.to(F64), G.to(F64)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("clip_value", [None, 2e-4], ids=["no_clamp", "clamp"])
def test_sgd_norm_clip_change_at_small_norms(backend, dtype, clip_value):
    """Norms of about 1e-3 clipped to 4e-4: the 1e-6 of ``clip_norm / (n + 1e-6)`` is 1e-3 of the step."""
    M, G, M64, G64 = _op_inputs(dtype, 1e-3)
    lr, clip_norm = 30.0, 4e-4
    res = memory_update(M, G, lr=lr, clip_value=clip_value, clip_norm=clip_norm, backend=backend)
    want, _ = _oracle_update(M64, G64, lr, "sgd", clip_value, clip_norm)
    norms = torch.linalg.vector_norm(G64.clamp(-(clip_value or 1), clip_value or 1), dim=(1, 2))
    assert (norms > clip_norm).sum() >= 2 and (norms < 1e-2).all()  # the clip acts, at small norms
    err = rel_error(res.memory.to(F64) - M64, want - M64)
    assert err <= tolerance(dtype), f"change off by {err:.3e}"


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("regime", ["v_floor", "moments"])
def test_adam_norm_clip_change(backend, dtype, regime):
    """Adam with ``clip_norm``. ``v_floor``: fresh moments, gradients clipped to norms where ``v_hat`` hits
    its 1e-8 floor, so the step is linear in the clipped gradient. ``moments``: step 4 from earlier moments,
    so the clip scale sets the balance between the new gradient and the history."""
    M, G, M64, G64 = _op_inputs(dtype, 0.5)
    B = M.shape[0]
    if regime == "v_floor":
        step, clip_norm, lr = 1, 3e-4, 1e-3
        state64 = (torch.zeros_like(M64), torch.zeros_like(M64))
    else:
        step, clip_norm, lr = 4, 0.2, 1e-2
        state64 = (0.02 * torch.randn_like(M64), 1e-4 * torch.rand_like(M64))
    state = tuple(s.to(torch.float32 if dtype != F64 else F64) for s in state64)
    res = memory_update(
        M, G, lr=lr, optimizer="adam", clip_norm=clip_norm, state=state, step=step, betas=(0.8, 0.95), backend=backend
    )
    want, (m1, m2) = _oracle_update(M64, G64, lr, "adam", None, clip_norm, state64, step, (0.8, 0.95))
    assert (torch.linalg.vector_norm(G64, dim=(1, 2)) > clip_norm).sum() >= 2  # the clip acts
    err = rel_error(res.memory.to(F64) - M64, want - M64)
    assert err <= tolerance(dtype), f"change off by {err:.3e}"
    for got, ref, name in zip(res.state, (m1, m2), ("exp_avg", "exp_avg_sq")):
        assert rel_error(got, ref) <= tolerance(dtype), name
    assert res.memory.shape == (B, 3, 40)


# ------------------------------------------------------------------------------------------ whole writes

WRITE_CASES = {
    # clamp and norm clip both active at the tiny models' gradient norms (about 0.02 - 0.04)
    "sgd_clips": WriteConfig(num_memory_tokens=2, steps=3, lr=2.0, clip_value=2e-3, clip_norm=6e-3),
    # Adam with a norm clip; three steps so the clip scale shows through the moments
    "adam_clip_norm": WriteConfig(
        num_memory_tokens=2, steps=3, lr=0.02, optimizer="adam", clip_norm=5e-3, adam_betas=(0.8, 0.99)
    ),
    # Adam whose clipped gradient sits at the v floor (clip_norm 1e-4 over 64 entries)
    "adam_v_floor": WriteConfig(num_memory_tokens=2, steps=2, lr=0.2, optimizer="adam", clip_norm=1e-4),
    "adam_betas": WriteConfig(
        num_memory_tokens=2, steps=3, lr=0.02, optimizer="adam", clip_value=4e-3, adam_betas=(0.5, 0.9)
    ),
}


# The interpreter is slow: the triton engine runs the cases that reach different kernel paths.
WRITE_PARAMS = [("torch", F64, case) for case in WRITE_CASES] + [
    ("triton", torch.float32, case) for case in ("sgd_clips", "adam_clip_norm", "adam_v_floor")
]


@pytest.mark.parametrize("backend,dtype,case", WRITE_PARAMS, ids=[f"{b}-{c}" for b, _, c in WRITE_PARAMS])
def test_write_change_matches_eager(backend, dtype, case):
    """MemoryWriter on ragged documents (one of length 1): every document's M - M0, loss and norm."""
    cfg = WRITE_CASES[case]
    model, fast = models("llama", dtype)  # GQA 4:2
    ids, mask, docs = ragged([5, 1, 8])
    M0 = initial_memory(model.config.hidden_size)
    want = eager_write(model, docs, M0, cfg)
    out = MemoryWriter(fast, cfg, backend=backend).write(ids, mask, M0.to(dtype))
    assert_deltas(out.memory, M0, want, dtype, case)
    norms = torch.tensor([w[2] for w in want]).t()
    if cfg.clip_norm is not None:
        assert (norms > cfg.clip_norm).all(), "the norm clip must act at every step"
    assert rel_error(out.grad_norms, norms) <= tolerance(dtype)
    assert rel_error(out.losses, torch.tensor([w[1] for w in want]).t()) <= tolerance(dtype)


# ------------------------------------------------------------------------------------------ meta-gradients


def _outer(model, memory, queries, cot):
    """A random projection of the READ logits (fp64)."""
    return (reference.read_logits(model, memory, queries).to(F64) * cot).sum()


def _eager_outer(model, docs, M0, queries, cot, cfg, head):
    total = 0.0
    for b, (M, _, _) in enumerate(eager_write(model, docs, M0, cfg, head, grad_mode=cfg.grad_mode)):
        total = total + (eager.read_logits_one(model, M, queries[b]) * cot[b]).sum()
    return total


META_CASES = {
    "adam_first": (
        WriteConfig(
            num_memory_tokens=2,
            steps=3,
            lr=0.02,
            optimizer="adam",
            clip_norm=5e-3,
            adam_betas=(0.8, 0.99),
            grad_mode="first",
        ),
        False,
    ),
    "clamp_first": (WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, clip_value=2e-3, grad_mode="first"), False),
    "clamp_second": (
        WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, clip_value=2e-3, clip_norm=6e-3, grad_mode="second"),
        False,
    ),
    "head_second": (
        WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, clip_norm=6e-3, grad_mode="second", last_k_second_order=1),
        True,
    ),
}


def _meta_case(case, backend, dtype, family="gpt2"):
    """Gradients of the outer loss w.r.t. M0, the write head and every weight: (fast, eager, names)."""
    cfg, with_head = META_CASES[case]
    model, fast = models(family, dtype)
    ids, mask, docs = ragged([4, 1, 6])
    queries = torch.randint(0, VOCAB, (3, 3))
    cot = torch.randn(3, 4, VOCAB, dtype=F64)
    M0 = initial_memory(model.config.hidden_size)
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, dtype=F64) if with_head else None
    head_params = list(head.parameters()) if with_head else []
    names = ["M0"] + [f"write_head.{n}" for n, _ in (head.named_parameters() if with_head else ())]
    names += [n for n, _ in model.named_parameters()]

    M0_e = M0.clone().requires_grad_(True)
    eag_head = (head.weight, head.bias) if with_head else None
    want = torch.autograd.grad(
        _eager_outer(model, docs, M0_e, queries, cot, cfg, eag_head),
        [M0_e, *head_params, *model.parameters()],
        allow_unused=True,
    )

    fast_head = copy.deepcopy(head).to(dtype) if with_head else None
    fast_head_params = list(fast_head.parameters()) if with_head else []
    M0_f = M0.to(dtype).requires_grad_(True)
    memory = MemoryWriter(fast, cfg, backend=backend, write_head=fast_head).write(ids, mask, M0_f).memory
    got = torch.autograd.grad(
        _outer(fast, memory, queries, cot), [M0_f, *fast_head_params, *fast.parameters()], allow_unused=True
    )
    return got, want, dtype, names


def _assert_grads(got, want, dtype, names):
    checked = 0
    for name, g, w in zip(names, got, want):
        if g is None and w is None:
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        err = rel_error(g, w)
        assert err <= tolerance(dtype), f"d outer / d {name}: relative error {err:.3e}"
        checked += 1
    assert checked >= len(names) - 1, "most gradients must exist"


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_gradients_match_eager_torch(case):
    """The torch backend (the reference) in fp64."""
    _assert_grads(*_meta_case(case, "torch", F64))


@pytest.mark.parametrize("case", ["adam_first", "clamp_second"])
def test_meta_gradients_match_eager_triton(case):
    """The engine on the kernels (interpreter) in fp32; second order runs the attention double backward."""
    _assert_grads(*_meta_case(case, "triton", torch.float32, family="llama"))


def test_head_second_order_triton_fp64():
    """The write head under second order on the triton backend: fp64 through the kernels (interpreter)."""
    _assert_grads(*_meta_case("head_second", "triton", F64, family="llama"))


def test_mutant_table_matches_the_code():
    """Every planted bug of ``make mutants`` (scripts/mutants.py) still names a line that exists exactly once:
    a refactor that moves one must move the mutant too, or the mutation check silently checks nothing."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("mutants", root / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    assert len(mutants.MUTANTS) >= 12
    for m in mutants.MUTANTS:
        mutants.locate(str(root), m)  # raises naming the mutant and what was found
        assert m.original != m.replacement and m.tests, m.name
