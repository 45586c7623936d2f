"""Fused per-sample memory update (issue 5): the op on both backends against the DESIGN.md item 4 formula.

The reference below is written independently of the op: one sample at a time in fp64, with Python
branches for the norm clip (``if n > clip_norm`` is False for a NaN norm, as the where-form is).
"""

import inspect
import math

import pytest
import torch

from gradmem_fast import UpdateResult, memory_update
from gradmem_fast.ops.update import AdamState
from helpers import DEVICE, assert_close, rel_error, tolerance

F64 = torch.float64


# ------------------------------------------------------------------------------------------ reference


def _clamp(g, c):
    return torch.where(g > c, torch.full_like(g, c), torch.where(g < -c, torch.full_like(g, -c), g))


def ref_update(M, G, lr, optimizer="sgd", clip_value=None, clip_norm=None, state=None, step=1, betas=(0.9, 0.999)):
    """(new memory, raw norms, (exp_avg, exp_avg_sq) or None), fp64, differentiable for SGD."""
    M, G = M.to(F64), G.to(F64)
    lr = lr.to(F64).reshape(()) if isinstance(lr, torch.Tensor) else lr
    if optimizer == "adam" and clip_value is None:
        clip_value = 10.0
    news, norms, m1s, m2s = [], [], [], []
    for b in range(M.shape[0]):
        g = G[b]
        norms.append(torch.sqrt((g.detach() ** 2).sum()))
        if clip_value is not None:
            g = _clamp(g, clip_value)
        if clip_norm is not None:
            n = torch.sqrt((g**2).sum())
            if n > clip_norm:
                g = g * clip_norm / (n + 1e-6)
        if optimizer == "sgd":
            news.append(M[b] - lr * g)
            continue
        g = g.detach()
        m1 = torch.zeros_like(g) if state is None else state[0][b].to(F64)
        m2 = torch.zeros_like(g) if state is None else state[1][b].to(F64)
        b1, b2 = betas
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        k = float(step)
        m_hat = m1 / (1 - b1**k)
        v_hat = m2 / (1 - b2**k)
        v_hat = torch.where(v_hat < 1e-8, torch.full_like(v_hat, 1e-8), v_hat)
        news.append(M[b] - lr * m_hat / (torch.sqrt(v_hat) + 1e-8))
        m1s.append(m1)
        m2s.append(m2)
    new_state = (torch.stack(m1s), torch.stack(m2s)) if optimizer == "adam" else None
    return torch.stack(news), torch.stack(norms), new_state


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(B, m, d, dtype, device=DEVICE, grad_scale=None):
    """Memory (small) and gradient (per-sample scales 1, 0.2, 3, 0.5, ...: some samples above and some
    below a norm clip) rounded to ``dtype``; fp64 copies of the rounded values for the reference."""
    M = 0.1 * torch.randn(B, m, d, dtype=F64)
    scales = torch.tensor([[1.0, 0.2, 3.0, 0.5][b % 4] for b in range(B)], dtype=F64).view(B, 1, 1)
    G = torch.randn(B, m, d, dtype=F64) * (scales if grad_scale is None else grad_scale)
    M, G = M.to(dtype), G.to(dtype)
    return M.to(device), G.to(device), M.to(F64).cpu(), G.to(F64).cpu()


def clips_for(G64, clip_value, clip_norm):
    """Concrete thresholds: clip_value 0.8; clip_norm 0.7 x the clamped norm of sample 0 (clipped)."""
    cv = 0.8 if clip_value else None
    cn = None
    if clip_norm:
        g0 = G64[0] if cv is None else _clamp(G64[0], cv)
        cn = 0.7 * float(g0.norm())
    return cv, cn


CASES = [  # optimizer, clip_value on, clip_norm on
    ("sgd", False, False),
    ("sgd", True, False),
    ("sgd", False, True),
    ("sgd", True, True),
    ("adam", False, False),
    ("adam", True, False),
    ("adam", False, True),
    ("adam", True, True),
]
SHAPES = [(1, 1, 37), (3, 4, 37), (4, 8, 64)]


def _check_result(res, ref, dtype, name=""):
    new, norm, state = ref
    assert isinstance(res, UpdateResult)
    assert res.memory.dtype == dtype and res.memory.shape == new.shape
    assert_close(res.memory, new, dtype=dtype, name=f"{name} memory")
    stat_dtype = F64 if dtype == F64 else torch.float32
    assert res.grad_norm.dtype == stat_dtype and res.grad_norm.shape == norm.shape
    assert_close(res.grad_norm, norm, dtype=stat_dtype, name=f"{name} grad_norm")
    if state is None:
        assert res.state is None
    else:
        assert isinstance(res.state, AdamState)
        for got, want, field in zip(res.state, state, AdamState._fields):
            assert got.dtype == stat_dtype
            # Against the reference as stored: 1e-3 * (1e-30)^2 has no fp32 value but 0.
            assert_close(got, want.to(stat_dtype), dtype=stat_dtype, name=f"{name} {field}")


# ------------------------------------------------------------------------------------------ formula


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("optimizer,clip_value,clip_norm", CASES)
@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)], ids=["torch64", "triton32"])
def test_formula(backend, dtype, optimizer, clip_value, clip_norm, shape):
    M, G, M64, G64 = make_inputs(*shape, dtype)
    cv, cn = clips_for(G64, clip_value, clip_norm)
    step = 3 if optimizer == "adam" else 1
    res = memory_update(M, G, lr=0.7, optimizer=optimizer, clip_value=cv, clip_norm=cn, step=step, backend=backend)
    _check_result(res, ref_update(M64, G64, 0.7, optimizer, cv, cn, step=step), dtype)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision(backend, dtype, optimizer):
    """16-bit memories: fp32 math, result rounded once to the memory dtype."""
    M, G, M64, G64 = make_inputs(3, 4, 37, dtype)
    cv, cn = clips_for(G64, True, True)
    res = memory_update(M, G, lr=0.7, optimizer=optimizer, clip_value=cv, clip_norm=cn, step=2, backend=backend)
    _check_result(res, ref_update(M64, G64, 0.7, optimizer, cv, cn, step=2), dtype)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
@pytest.mark.parametrize(
    "optimizer,clip_value,clip_norm",
    [
        ("sgd", False, False),
        ("sgd", False, True),
        ("sgd", True, True),
        ("adam", False, False),
        ("adam", False, True),
    ],
)
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", F64), ("torch", torch.float32), ("triton", torch.float32)],
    ids=["torch64", "torch32", "triton32"],
)
def test_gradient_magnitudes(backend, dtype, optimizer, clip_value, clip_norm, scale):
    """Zero, tiny and huge gradients; zero memory so the result is the update itself."""
    _, G, _, G64 = make_inputs(3, 2, 37, dtype, grad_scale=scale)
    M = torch.zeros_like(G)
    cv = 0.8 if clip_value else None
    cn = 0.5 if clip_norm else None
    res = memory_update(M, G, lr=0.7, optimizer=optimizer, clip_value=cv, clip_norm=cn, backend=backend)
    _check_result(res, ref_update(M.cpu(), G64, 0.7, optimizer, cv, cn), dtype, name=f"scale={scale}")


@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)], ids=["torch64", "triton32"])
def test_adam_steps_with_state(backend, dtype):
    """Four Adam steps, the state carried over, a fresh gradient each step, betas non-default once."""
    M, _, M64, _ = make_inputs(3, 4, 37, dtype)
    state = ref_state = None
    for k in range(1, 5):
        _, G, _, G64 = make_inputs(3, 4, 37, dtype)
        G, G64 = G * 3, G64 * 3  # part of it beyond the default clamp of 10
        betas = (0.8, 0.99) if k == 3 else (0.9, 0.999)
        res = memory_update(
            M, G, lr=0.05, optimizer="adam", clip_norm=40.0, state=state, step=k, betas=betas, backend=backend
        )
        ref = ref_update(M64, G64, 0.05, "adam", None, 40.0, ref_state, k, betas)
        _check_result(res, ref, dtype, name=f"step {k}")
        M, state = res.memory, res.state
        M64, ref_state = ref[0], ref[2]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lr_step_as_tensors(backend, optimizer):
    """0-d / 1-element tensor lr and step give the same numbers as Python ones."""
    M, G, _, G64 = make_inputs(2, 3, 37, torch.float32)
    _, state_G, _, _ = make_inputs(2, 3, 37, torch.float32)
    state = AdamState(state_G.abs(), state_G**2) if optimizer == "adam" else None
    kw = dict(optimizer=optimizer, clip_value=0.8, clip_norm=3.0, state=state, backend=backend)
    want = memory_update(M, G, lr=0.3, step=5, **kw)
    for lr, step in [
        (torch.tensor(0.3, device=DEVICE), 5),
        (0.3, torch.tensor(5, device=DEVICE)),
        (torch.tensor([0.3], device=DEVICE, dtype=F64), torch.tensor([5.0], device=DEVICE)),
    ]:
        got = memory_update(M, G, lr=lr, step=step, **kw)
        assert_close(got.memory, want.memory, name="memory")
        assert_close(got.grad_norm, want.grad_norm, name="grad_norm")
        if optimizer == "adam":
            assert_close(got.state.exp_avg, want.state.exp_avg, name="exp_avg")


def test_lr_and_step_are_runtime_kernel_arguments():
    """A new lr or step value must not compile a new kernel: neither is a constexpr or specialised."""
    import triton.language as tl

    from gradmem_fast.kernels import update as K

    kernel = K._memory_update_kernel
    params = inspect.signature(kernel.fn).parameters  # .fn: the Python function, compiled or interpreted
    for name in ("lr", "step", "clip_value", "clip_norm", "beta1", "beta2", "log_beta1", "log_beta2"):
        assert params[name].annotation is not tl.constexpr, name
    # Integers are specialised on ==1 and %16 unless told not to: step must not be.
    no_spec = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    assert "step" in no_spec


# ------------------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize(
    "optimizer,clip_value,clip_norm",
    [
        ("sgd", False, False),
        ("sgd", True, True),
        ("adam", False, False),
        ("adam", True, True),
    ],
)
@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)], ids=["torch64", "triton32"])
def test_nan_propagates_to_its_sample_only(backend, dtype, optimizer, clip_value, clip_norm):
    M, G, M64, G64 = make_inputs(3, 4, 37, dtype)
    cv, cn = clips_for(G64, clip_value, clip_norm)
    G[1, 2, 5] = float("nan")
    G64[1, 2, 5] = float("nan")
    res = memory_update(M, G, lr=0.7, optimizer=optimizer, clip_value=cv, clip_norm=cn, backend=backend)
    new, norm, state = ref_update(M64, G64, 0.7, optimizer, cv, cn)
    assert torch.isnan(res.grad_norm[1]) and torch.isnan(norm[1])
    assert torch.isnan(res.memory[1, 2, 5])
    # Elements of sample 1 without NaN follow the formula (the NaN norm leaves the sample unscaled).
    keep = ~torch.isnan(new[1])
    assert torch.equal(keep.to(res.memory.device), ~torch.isnan(res.memory[1]))
    assert_close(res.memory[1][keep.to(res.memory.device)], new[1][keep], dtype=dtype, name="sample 1")
    for b in (0, 2):
        assert_close(res.memory[b], new[b], dtype=dtype, name=f"sample {b}")
        assert_close(res.grad_norm[b], norm[b], dtype=F64 if dtype == F64 else torch.float32)
    if optimizer == "adam":
        assert torch.isnan(res.state.exp_avg[1, 2, 5]) and torch.isnan(res.state.exp_avg_sq[1, 2, 5])
        assert torch.isfinite(res.state.exp_avg[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inf_gradient_is_not_made_finite(backend):
    """An inf entry without clamp makes the clipped sample non-finite, never silently finite."""
    M, G, M64, G64 = make_inputs(2, 2, 37, torch.float32)
    G[0, 1, 3] = float("inf")
    G64[0, 1, 3] = float("inf")
    res = memory_update(M, G, lr=0.5, clip_norm=1.0, backend=backend)
    assert torch.isinf(res.grad_norm[0])
    assert not torch.isfinite(res.memory[0]).all()
    new, _, _ = ref_update(M64, G64, 0.5, "sgd", None, 1.0)
    assert torch.equal(torch.isnan(res.memory[0]).cpu(), torch.isnan(new[0]))
    assert_close(res.memory[1], new[1], dtype=torch.float32)


# ------------------------------------------------------------------------------------------ kernel launcher


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_launcher_nan_filled_buffers(nan_empty, adam, num_splits):
    """Every output element is written, by one program per sample and by the split reduction
    (m*d = 3093: four chunks of 1024, the last partial)."""
    from gradmem_fast.kernels import update as K

    B, m, d = 2, 3, 1031
    M, G, M64, G64 = make_inputs(B, m, d, torch.float32)
    cv, cn = clips_for(G64, True, True)
    G[1, 0, 1030] = float("nan")
    G64[1, 0, 1030] = float("nan")
    m0 = torch.rand(B, m, d, device=DEVICE) if adam else None
    v0 = torch.rand(B, m, d, device=DEVICE) if adam else None
    out, norm_out = nan_empty(B, m, d), nan_empty(B)
    m_out, v_out = (nan_empty(B, m, d), nan_empty(B, m, d)) if adam else (None, None)
    res = K.launch_update(
        M,
        G,
        lr=0.7,
        adam=adam,
        step=2,
        clip_value=cv,
        clip_norm=cn,
        exp_avg=m0,
        exp_avg_sq=v0,
        out=out,
        norm_out=norm_out,
        exp_avg_out=m_out,
        exp_avg_sq_out=v_out,
        num_splits=num_splits,
    )
    assert res[0] is out and res[1] is norm_out
    state = (m0.cpu(), v0.cpu()) if adam else None
    new, norm, ref_state = ref_update(M64, G64, 0.7, "adam" if adam else "sgd", cv, cn, state, 2)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(new))
    assert_close(out[~torch.isnan(out)], new[~torch.isnan(new)].to(DEVICE), name="memory")
    assert torch.isnan(norm_out[1]) and not torch.isnan(norm_out[0])
    assert_close(norm_out[0], norm[0], name="norm")
    if adam:
        finite = ~torch.isnan(ref_state[0])
        assert torch.equal(torch.isnan(m_out).cpu(), ~finite)
        assert_close(m_out.cpu()[finite], ref_state[0][finite], name="exp_avg")
        assert_close(v_out.cpu()[finite], ref_state[1][finite], name="exp_avg_sq")


def test_launcher_in_place_and_non_contiguous():
    """``out=memory`` (and the moments in place) is allowed; a non-contiguous grad is handled."""
    from gradmem_fast.kernels import update as K

    M, _, M64, _ = make_inputs(3, 5, 37, torch.float32)
    Gt = torch.randn(3, 37, 5, dtype=F64)
    G64 = Gt.transpose(1, 2).float().double()
    G = Gt.float().to(DEVICE).transpose(1, 2)
    assert not G.is_contiguous()
    m0, v0 = torch.rand(3, 5, 37, device=DEVICE), torch.rand(3, 5, 37, device=DEVICE)
    state = (m0.cpu().clone(), v0.cpu().clone())
    out, norm, m1, v1 = K.launch_update(
        M,
        G,
        lr=0.2,
        adam=True,
        step=4,
        clip_value=1.0,
        exp_avg=m0,
        exp_avg_sq=v0,
        out=M,
        exp_avg_out=m0,
        exp_avg_sq_out=v0,
    )
    assert out is M and m1 is m0 and v1 is v0
    new, ref_norm, ref_state = ref_update(M64, G64, 0.2, "adam", 1.0, None, state, 4)
    assert_close(M, new)
    assert_close(norm, ref_norm)
    assert_close(m0, ref_state[0])
    assert_close(v0, ref_state[1])


def test_launcher_split_heuristic(monkeypatch):
    """One program per sample off the GPU, for small samples and for large batches; a split reduction
    for few large samples (an H100 has 132 SMs)."""
    from gradmem_fast.kernels import update as K

    assert K.pick_num_splits(1, 32 * 4096, "cpu") == 1
    monkeypatch.setattr(K, "_sm_count", lambda index: 132)
    assert K.pick_num_splits(64, 8 * 768, "cuda:0") == 1
    assert K.pick_num_splits(8, 8 * 768, "cuda:0") == 1
    assert K.pick_num_splits(256, 32 * 4096, "cuda:0") == 1
    assert K.pick_num_splits(1, 32 * 4096, "cuda:0") == 32
    assert K.pick_num_splits(4, 8 * 4096, "cuda:0") == 8
    assert K.pick_num_splits(1, 1 << 24, "cuda:0") == K.MAX_SPLITS


def test_compile_specs_cover_every_launch_configuration():
    from gradmem_fast.kernels import update as K

    names = {s.name for s in K.compile_specs()}
    for t in ("fp32", "fp16", "bf16"):
        assert f"update.grad_sumsq[{t}]" in names
        for opt in ("sgd", "adam"):
            for cn in (0, 1):
                for ptrs in ("0", "1", "B"):  # scalar arguments, 1-element tensors, per-sample [B] tensors
                    for split in (0, 1):
                        assert f"update.memory_update[{t},{opt},clip_norm={cn},ptrs={ptrs},split={split}]" in names
    assert len(names) == 3 * (1 + 24)


@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 0, 3), (2, 3, 0)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty(backend, shape):
    M = torch.randn(shape, device=DEVICE)
    res = memory_update(M, torch.randn_like(M), lr=0.1, optimizer="adam", backend=backend)
    assert res.memory.shape == shape and res.grad_norm.shape == (shape[0],)
    assert (res.grad_norm == 0).all()


# ------------------------------------------------------------------------------------------ autograd

GRAD_CASES = [(None, None), (0.8, None), (None, "mixed"), (0.8, "mixed"), (None, "all"), (0.8, "all")]


def _grad_inputs(clip_value, clip_norm):
    """fp64 inputs away from the clamp's kinks; clip_norm 'mixed' clips sample 0 only, 'all' both."""
    G = torch.randn(2, 2, 5, dtype=F64)
    G = torch.where((G.abs() - 0.8).abs() < 1e-3, G + 0.01, G)
    G[1] *= 0.2
    g0 = G[0] if clip_value is None else _clamp(G[0], clip_value)
    cn = {None: None, "mixed": 0.7 * float(g0.norm()), "all": 0.1}[clip_norm]
    M = torch.randn(2, 2, 5, dtype=F64)
    lr = torch.tensor(0.7, dtype=F64)
    return [t.to(DEVICE).requires_grad_() for t in (M, G, lr)], cn


@pytest.mark.parametrize("clip_value,clip_norm", GRAD_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sgd_gradcheck(backend, clip_value, clip_norm):
    """First and second derivatives in memory, grad and a tensor lr (fp64; the triton backend's
    autograd.Function takes the torch forward in fp64 and its own analytic, differentiable backward)."""
    (M, G, lr), cn = _grad_inputs(clip_value, clip_norm)

    def f(M, G, lr):
        return memory_update(M, G, lr=lr, clip_value=clip_value, clip_norm=cn, backend=backend).memory

    assert torch.autograd.gradcheck(f, (M, G, lr))
    assert torch.autograd.gradgradcheck(f, (M, G, lr))


@pytest.mark.parametrize("clip_value,clip_norm", GRAD_CASES[1:])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sgd_second_order_matches_formula_fp32(backend, clip_value, clip_norm):
    """fp32 (the kernel forward on triton): first- and second-order gradients with random cotangents
    against autograd of the fp64 reference formula."""
    (M64, G64, lr64), cn = _grad_inputs(clip_value, clip_norm)
    w, v = torch.randn(2, 2, 5, dtype=F64), torch.randn(2, 2, 5, dtype=F64)
    c = 0.37

    def grads(M, G, lr, fn):
        new = fn(M, G, lr)
        dM, dG, dlr = torch.autograd.grad((new * w.to(new)).sum(), (M, G, lr), create_graph=True)
        second = (dG * v.to(dG)).sum() + c * dlr
        d2G, d2lr = torch.autograd.grad(second, (G, lr))
        return dM, dG, dlr, d2G, d2lr

    ref = grads(M64, G64, lr64, lambda M, G, lr: ref_update(M, G, lr, "sgd", clip_value, cn)[0])
    M, G, lr = (t.detach().float().requires_grad_() for t in (M64, G64, lr64))
    got = grads(
        M,
        G,
        lr,
        lambda M, G, lr: memory_update(M, G, lr=lr, clip_value=clip_value, clip_norm=cn, backend=backend).memory,
    )
    for name, a, b in zip(("dM", "dG", "dlr", "d2G", "d2lr"), got, ref):
        assert a.dtype == torch.float32
        assert_close(a, b, dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_order_mode_constant_gradient(backend):
    """grad_mode 'first': memory on the graph, g a constant: d new / d memory is the identity."""
    M = torch.randn(2, 3, 37, device=DEVICE, requires_grad=True)
    G = torch.randn(2, 3, 37, device=DEVICE)
    w = torch.randn(2, 3, 37, device=DEVICE)
    for optimizer in ("sgd", "adam"):
        res = memory_update(M, G, lr=0.3, optimizer=optimizer, clip_norm=1.0, backend=backend)
        assert res.grad_norm.grad_fn is None and not res.grad_norm.requires_grad
        (dM,) = torch.autograd.grad((res.memory * w).sum(), M)
        assert torch.equal(dM, w)
        if optimizer == "adam":
            assert not res.state.exp_avg.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adam_is_first_order_only(backend):
    M = torch.randn(2, 3, 7, requires_grad=True)
    G = torch.randn(2, 3, 7, requires_grad=True)
    with pytest.raises(ValueError, match="grad: Adam is first-order only"):
        memory_update(M, G, lr=0.1, optimizer="adam", backend=backend)
    with torch.no_grad():  # no graph requested: fine
        memory_update(M, G, lr=0.1, optimizer="adam", backend=backend)
    # A tensor lr is differentiable through Adam's (constant) direction.
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    M64, G64 = M.detach().double(), G.detach().double()
    new = memory_update(M64, G64, lr=lr, optimizer="adam", step=2, backend=backend).memory
    w = torch.randn_like(new)
    (dlr,) = torch.autograd.grad((new * w).sum(), lr)
    lr_ref = lr.detach().clone().requires_grad_()
    (dlr_ref,) = torch.autograd.grad((ref_update(M64, G64, lr_ref, "adam", step=2)[0] * w).sum(), lr_ref)
    assert rel_error(dlr, dlr_ref) <= tolerance(F64)


# ------------------------------------------------------------------------------------------ bad input


def _bad(**over):
    M = torch.randn(2, 3, 5)
    kw = dict(memory=M, grad=torch.randn(2, 3, 5), lr=0.1)
    kw.update(over)
    return kw


BAD = [
    (_bad(memory=torch.randn(3, 5), grad=torch.randn(3, 5)), ValueError, "memory: expected a 3-D"),
    (_bad(memory=torch.randn(1, 2, 3, 5), grad=torch.randn(1, 2, 3, 5)), ValueError, "memory: expected a 3-D"),
    (_bad(memory=[[[1.0]]]), TypeError, "memory: expected a torch.Tensor"),
    (_bad(grad=torch.randn(2, 3, 6)), ValueError, "grad: expected the shape"),
    (_bad(memory=torch.ones(2, 3, 5, dtype=torch.int32)), TypeError, "memory: expected a floating"),
    (_bad(grad=torch.ones(2, 3, 5, dtype=torch.int64)), TypeError, "grad: expected a floating"),
    (_bad(grad=torch.randn(2, 3, 5, dtype=F64)), TypeError, "grad: expected the dtype"),
    (_bad(lr=-0.1), ValueError, "lr: expected a finite number >= 0"),
    (_bad(lr=float("nan")), ValueError, "lr"),
    (_bad(lr="0.1"), TypeError, "lr"),
    (_bad(lr=True), TypeError, "lr"),
    (_bad(lr=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"lr: expected .* shape \[B\] = \[2\], got shape \(3,\)"),
    (_bad(lr=torch.tensor(1)), TypeError, "lr: expected a floating"),
    (_bad(clip_value=-1.0), ValueError, "clip_value"),
    (_bad(clip_value=float("nan")), ValueError, "clip_value"),
    (_bad(clip_norm=-0.5), ValueError, "clip_norm"),
    (_bad(clip_norm="1"), TypeError, "clip_norm"),
    (_bad(optimizer="rmsprop"), ValueError, "optimizer must be one of"),
    (_bad(optimizer="adam", step=0), ValueError, "step"),
    (_bad(optimizer="adam", step=1.5), TypeError, "step"),
    (_bad(optimizer="adam", step=torch.tensor([1, 2, 3])), ValueError, r"step: expected .* shape \[B\] = \[2\]"),
    (_bad(optimizer="adam", betas=(1.0, 0.9)), ValueError, "betas"),
    (_bad(optimizer="adam", betas=0.9), TypeError, "betas"),
    (_bad(state=(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))), ValueError, "state: only optimizer='adam'"),
    (_bad(optimizer="adam", state=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))), ValueError, "state.exp_avg"),
    (_bad(optimizer="adam", state=torch.zeros(2, 3, 5)), TypeError, "state"),
    (
        _bad(optimizer="adam", state=(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5, dtype=torch.int32))),
        TypeError,
        "state.exp_avg_sq",
    ),
    (_bad(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        memory_update(kwargs.pop("memory"), kwargs.pop("grad"), **kwargs)


def test_launcher_rejects_wrong_buffers():
    from gradmem_fast.kernels import update as K

    M = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="out: expected"):
        K.launch_update(M, torch.randn_like(M), lr=0.1, out=torch.empty(2, 3, 4))
    with pytest.raises(TypeError, match="memory: the update kernel takes"):
        K.launch_update(M.double(), M.double(), lr=0.1)


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs GRADMEM_TEST_DEVICE=cuda")
def test_no_host_sync_and_no_recompile_on_gpu():
    from gradmem_fast.kernels import update as K

    M, G, _, _ = make_inputs(4, 8, 768, torch.bfloat16)
    lr, step = torch.tensor(0.1, device="cuda"), torch.tensor(1, device="cuda")
    res = memory_update(M, G, lr=lr, optimizer="adam", step=step, clip_norm=1.0, backend="triton")
    memory_update(M, G, lr=0.1, optimizer="sgd", clip_norm=1.0, backend="triton")
    torch.cuda.synchronize()

    def n_compiled():  # Triton 3.x: device_caches[device] = (kernel_cache, ...)
        caches = getattr(K._memory_update_kernel, "device_caches", None)
        return None if caches is None else sum(len(c[0]) for c in caches.values())

    before = n_compiled()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = res.state
        for k in range(2, 6):
            lr.fill_(0.1 / k)
            step.fill_(k)
            state = memory_update(
                M, G, lr=lr, optimizer="adam", step=step, clip_norm=1.0, state=state, backend="triton"
            ).state
            memory_update(M, G, lr=0.1 / k, optimizer="sgd", clip_norm=1.0, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n_compiled() == before  # new lr/step values reused the compiled kernels
    assert math.isfinite(float(state.exp_avg.float().norm()))
