"""Per-sample learning rates and Adam steps in the fused memory update (continuous batching, issue 17).

Each slot of a continuously batched WRITE holds a document of its own age, so ``lr`` and ``step`` may be
``[B]`` tensors: sample ``b`` must get exactly what the update gives it alone with the scalars ``lr[b]``,
``step[b]``. The reference is ``test_update.ref_update`` (fp64, one sample at a time) run once per sample.
"""

import pytest
import torch
from test_update import CASES, _clamp, clips_for, make_inputs, ref_update

from gradmem_fast import memory_update
from gradmem_fast.ops.update import AdamState
from helpers import DEVICE, assert_close

F64 = torch.float64
BATCHES = (1, 3, 7)


def per_sample_schedule(B, lr_dtype=F64):
    """Distinct learning rates in [0.05, 1.05) and distinct Adam steps in 1..3B, one per sample (so a kernel
    that reads another sample's entry, or the first entry for everyone, gives a different result)."""
    lr = (0.05 + torch.rand(B, dtype=F64)).to(lr_dtype)
    step = torch.randperm(3 * B)[:B] + 1
    return lr.to(DEVICE), step.to(DEVICE)


def random_state(B, m, d):
    """Nonzero moments, so the bias correction (and hence step[b]) changes every element of the update."""
    return AdamState(torch.rand(B, m, d, device=DEVICE) * 0.1, torch.rand(B, m, d, device=DEVICE) * 1e-2)


def _value_of(x, b):
    """Sample b's scalar: ``x[b]`` of a [B] tensor (0-d, keeps its graph), a shared value as it is."""
    if not isinstance(x, torch.Tensor):
        return x
    return (x[b] if x.numel() > 1 else x.reshape(())).cpu()


def ref_per_sample(M64, G64, lr, optimizer, cv, cn, state, step, betas=(0.9, 0.999)):
    """The fp64 reference run once per sample with that sample's scalar lr and step, results stacked."""
    news, norms, m1s, m2s = [], [], [], []
    for b in range(M64.shape[0]):
        st = None if state is None else tuple(s[b : b + 1].cpu() for s in state)
        lr_b, step_b = _value_of(lr, b), _value_of(step, b)
        new, norm, new_state = ref_update(M64[b : b + 1], G64[b : b + 1], lr_b, optimizer, cv, cn, st, step_b, betas)
        news.append(new)
        norms.append(norm)
        if new_state is not None:
            m1s.append(new_state[0])
            m2s.append(new_state[1])
    state_out = (torch.cat(m1s), torch.cat(m2s)) if m1s else None
    return torch.cat(news), torch.cat(norms), state_out


def _check(res, ref, dtype, name=""):
    new, norm, state = ref
    assert res.memory.shape == new.shape and res.memory.dtype == dtype
    assert_close(res.memory, new, dtype=dtype, name=f"{name} memory")
    stat_dtype = F64 if dtype == F64 else torch.float32
    assert_close(res.grad_norm, norm, dtype=stat_dtype, name=f"{name} grad_norm")
    if state is not None:
        for got, want, field in zip(res.state, state, AdamState._fields):
            assert_close(got, want, dtype=stat_dtype, name=f"{name} {field}")


# ------------------------------------------------------------------------------------------ formula


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("optimizer,clip_value,clip_norm", CASES)
@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)], ids=["torch64", "triton32"])
def test_per_sample_matches_each_sample_alone(backend, dtype, optimizer, clip_value, clip_norm, B):
    """[B] lr and step give every sample what it gets alone with lr[b], step[b].

    Catches: the kernel loading ``lr``/``step`` from ``ptr`` instead of ``ptr + b`` (distinct values per sample);
    the torch path broadcasting a [B] lr along the wrong axis or summing it; step[b] swapped for another sample's
    (distinct steps, nonzero Adam state, so the bias correction moves every element)."""
    m, d = 4, 37
    M, G, M64, G64 = make_inputs(B, m, d, dtype)
    cv, cn = clips_for(G64, clip_value, clip_norm)
    lr, step = per_sample_schedule(B)
    state = random_state(B, m, d) if optimizer == "adam" else None
    res = memory_update(
        M, G, lr=lr, optimizer=optimizer, clip_value=cv, clip_norm=cn, state=state, step=step, backend=backend
    )
    _check(res, ref_per_sample(M64, G64, lr, optimizer, cv, cn, state, step), dtype)


@pytest.mark.parametrize(
    "lr_kind,step_kind", [("B", "int"), ("float", "B"), ("1", "B"), ("B", "1"), ("B", "B")], ids=lambda k: k
)
@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)], ids=["torch64", "triton32"])
def test_shared_and_per_sample_mixed(backend, dtype, lr_kind, step_kind):
    """One of lr/step per sample, the other shared (number or 1-element tensor), fp32 lr tensors (Adam).

    Catches: the launcher not broadcasting the shared one of the pair to [B] in per-sample mode (the kernel
    would read past a 1-element tensor), or taking per-sample mode only when lr is [B]."""
    B, m, d = 3, 2, 37
    M, G, M64, G64 = make_inputs(B, m, d, dtype)
    lr_b, step_b = per_sample_schedule(B, lr_dtype=torch.float32)
    lr = {"B": lr_b, "float": 0.3, "1": torch.tensor([0.3], device=DEVICE)}[lr_kind]
    step = {"B": step_b, "int": 4, "1": torch.tensor(4, device=DEVICE)}[step_kind]
    state = random_state(B, m, d)
    res = memory_update(M, G, lr=lr, optimizer="adam", clip_norm=2.0, state=state, step=step, backend=backend)
    _check(res, ref_per_sample(M64, G64, lr, "adam", None, 2.0, state, step), dtype)


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_launcher_per_sample_split_nan_filled(nan_empty, adam, num_splits):
    """Both launch shapes with [B] lr/step, NaN-filled outputs (m*d = 3093: four chunks, the last partial), and
    lr[1] = 0 leaving sample 1 bit-identical.

    Catches: a split program ``(b, s)`` reading ``lr[s]`` or ``lr[b * num_splits + s]`` instead of ``lr[b]``
    (chunks of one sample with different learning rates); a chunk left unwritten (NaN stays)."""
    from gradmem_fast.kernels import update as K

    B, m, d = 3, 3, 1031
    M, G, M64, G64 = make_inputs(B, m, d, torch.float32)
    cv, cn = clips_for(G64, True, True)
    lr = torch.tensor([0.7, 0.0, 0.3], device=DEVICE)
    step = torch.tensor([5, 2, 11], device=DEVICE)
    state = random_state(B, m, d) if adam else None
    outs = dict(out=nan_empty(B, m, d), norm_out=nan_empty(B))
    if adam:
        outs.update(exp_avg_out=nan_empty(B, m, d), exp_avg_sq_out=nan_empty(B, m, d))
    new, norm, m1, m2 = K.launch_update(
        M,
        G,
        lr=lr,
        adam=adam,
        step=step,
        clip_value=cv,
        clip_norm=cn,
        exp_avg=None if state is None else state.exp_avg,
        exp_avg_sq=None if state is None else state.exp_avg_sq,
        num_splits=num_splits,
        **outs,
    )
    ref_new, ref_norm, ref_state = ref_per_sample(M64, G64, lr, "adam" if adam else "sgd", cv, cn, state, step)
    assert_close(new.double().cpu() - M64, ref_new - M64, dtype=torch.float32, name="M - M0")
    assert torch.equal(new[1], M[1])
    assert_close(norm, ref_norm, dtype=torch.float32, name="raw norm")
    if adam:
        assert_close(m1, ref_state[0], name="exp_avg")
        assert_close(m2, ref_state[1], name="exp_avg_sq")


# ------------------------------------------------------------------------------------------ frozen slots


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", F64), ("torch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)],
    ids=["torch64", "torch32", "triton32", "tritonbf16"],
)
def test_zero_lr_leaves_sample_bit_identical(backend, dtype, optimizer):
    """lr[b] = 0 (a finished slot) returns M_b bit for bit, at the first, a middle and the last sample; the other
    samples move.

    Catches: any form of the update that is not exactly ``M - lr * u`` (e.g. ``M * (1 - lr) + ...`` or an lr
    floor), a frozen sample picking up its neighbour's lr (off-by-one index), and a rounding of M through a
    different dtype on the way."""
    B, m, d = 7, 3, 37
    M, G, _, _ = make_inputs(B, m, d, dtype)
    lr, step = per_sample_schedule(B)
    frozen = [0, 3, 6]
    lr[frozen] = 0.0
    state = random_state(B, m, d) if optimizer == "adam" else None
    res = memory_update(
        M, G, lr=lr, optimizer=optimizer, clip_value=0.8, clip_norm=1.0, state=state, step=step, backend=backend
    )
    for b in range(B):
        if b in frozen:
            assert torch.equal(res.memory[b], M[b]), f"sample {b} with lr 0 changed"
        else:
            assert not torch.equal(res.memory[b], M[b]), f"sample {b} did not move"


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("lr", torch.full((2,), 0.1), r"lr: expected .*1-D tensor of shape \[B\] = \[3\], got shape \(2,\)"),
        ("lr", torch.full((4,), 0.1), r"lr: expected .*shape \[B\] = \[3\], got shape \(4,\)"),
        ("lr", torch.full((3, 1), 0.1), r"lr: expected .*shape \[B\] = \[3\], got shape \(3, 1\)"),
        ("lr", torch.full((3,), 0.1, device="meta"), r"lr: expected the \[B\] tensor on the device of memory"),
        ("step", torch.ones(2, dtype=torch.long), r"step: expected .*shape \[B\] = \[3\], got shape \(2,\)"),
        ("step", torch.ones(1, 3, dtype=torch.long), r"step: expected .*shape \[B\] = \[3\], got shape \(1, 3\)"),
        ("step", torch.ones(3, dtype=torch.long, device="meta"), r"step: expected the \[B\] tensor on the device"),
    ],
    ids=["lr-short", "lr-long", "lr-2d", "lr-device", "step-short", "step-2d", "step-device"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wrong_length_raises(backend, name, value, match):
    """A tensor that is neither 1-element nor [B] on the memory's device is refused by name (the kernel would
    read out of bounds). Catches: a check of ``numel() == B`` only (accepts [3, 1] and [1, 3])."""
    M = torch.randn(3, 2, 5, device=DEVICE)
    kw = dict(lr=0.1, step=2, optimizer="adam", backend=backend)
    kw[name] = value
    with pytest.raises(ValueError, match=match):
        memory_update(M, torch.randn_like(M), **kw)


def test_launcher_rejects_wrong_length():
    """The launcher checks too (it is callable on its own): a [B+1] or [B, 1] lr or a [B-1] step never reaches the
    kernel. Catches a check of ``numel() == B`` only."""
    from gradmem_fast.kernels import update as K

    M = torch.randn(3, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"lr: expected .*\[B\] = \[3\]"):
        K.launch_update(M, torch.randn_like(M), lr=torch.full((4,), 0.1, device=DEVICE))
    with pytest.raises(ValueError, match=r"step: expected .*\[B\] = \[3\]"):
        K.launch_update(M, torch.randn_like(M), lr=0.1, adam=True, step=torch.ones(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"lr: expected .*got shape \(3, 1\)"):  # 3 elements, not 1-D
        K.launch_update(M, torch.randn_like(M), lr=torch.full((3, 1), 0.1, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_element_tensors_stay_shared(backend):
    """[1] and [1, 1] tensors keep meaning one value for the whole batch (B = 3). Catches: treating any
    tensor as per-sample (sample 1 and 2 would read past the end)."""
    M, G, M64, G64 = make_inputs(3, 2, 37, torch.float32)
    lr, step = torch.tensor([[0.4]], device=DEVICE), torch.tensor([3], device=DEVICE)
    res = memory_update(M, G, lr=lr, optimizer="adam", clip_norm=2.0, step=step, backend=backend)
    _check(res, ref_update(M64, G64, 0.4, "adam", None, 2.0, None, 3), torch.float32)


# ------------------------------------------------------------------------------------------ autograd


def _grad_inputs(B, clip_value, clip_norm):
    """fp64 inputs away from the clamp's kinks, distinct per-sample lr; 'mixed' clips sample 0 only."""
    G = torch.randn(B, 2, 5, dtype=F64)
    G = torch.where((G.abs() - 0.8).abs() < 1e-3, G + 0.01, G)
    G[1:] *= 0.2
    g0 = G[0] if clip_value is None else _clamp(G[0], clip_value)
    cn = {None: None, "mixed": 0.7 * float(g0.norm())}[clip_norm]
    M = torch.randn(B, 2, 5, dtype=F64)
    lr = 0.2 + torch.rand(B, dtype=F64)
    return [t.to(DEVICE).requires_grad_() for t in (M, G, lr)], cn


@pytest.mark.parametrize("clip_value,clip_norm", [(None, None), (0.8, "mixed")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sgd_per_sample_lr_gradcheck(backend, clip_value, clip_norm):
    """First and second derivatives of SGD in memory, grad and a [B] lr (fp64, B = 3).

    Catches: dlr summed over the whole batch instead of per sample; the backward's ``du = -lr * w`` using a
    [B] lr broadcast along the wrong axis or only lr[0]."""
    (M, G, lr), cn = _grad_inputs(3, clip_value, clip_norm)

    def f(M, G, lr):
        return memory_update(M, G, lr=lr, clip_value=clip_value, clip_norm=cn, backend=backend).memory

    assert torch.autograd.gradcheck(f, (M, G, lr))
    assert torch.autograd.gradgradcheck(f, (M, G, lr))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sgd_per_sample_lr_fp32_matches_formula(backend):
    """fp32 (the kernel forward on triton) with a [B] lr: dM, dG, dlr and second-order terms with random
    cotangents against autograd of the fp64 per-sample reference. Catches a backward that ignores per-sample
    lr on the kernel path (where the forward gives no autograd graph to fall back on)."""
    B = 3
    (M64, G64, lr64), cn = _grad_inputs(B, 0.8, "mixed")
    w, v = torch.randn(B, 2, 5, dtype=F64), torch.randn(B, 2, 5, dtype=F64)
    c = torch.randn(B, dtype=F64)

    def grads(M, G, lr, fn):
        new = fn(M, G, lr)
        dM, dG, dlr = torch.autograd.grad((new * w.to(new)).sum(), (M, G, lr), create_graph=True)
        second = (dG * v.to(dG)).sum() + (c.to(dlr) * dlr).sum()
        d2G, d2lr = torch.autograd.grad(second, (G, lr))
        return dM, dG, dlr, d2G, d2lr

    def ref(M, G, lr):
        return torch.cat([ref_update(M[b : b + 1], G[b : b + 1], lr[b], "sgd", 0.8, cn)[0] for b in range(B)])

    want = grads(M64, G64, lr64, ref)
    M, G, lr = (t.detach().float().requires_grad_() for t in (M64, G64, lr64))
    got = grads(
        M, G, lr, lambda M, G, lr: memory_update(M, G, lr=lr, clip_value=0.8, clip_norm=cn, backend=backend).memory
    )
    for name, a, b in zip(("dM", "dG", "dlr", "d2G", "d2lr"), got, want):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert_close(a, b, dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adam_per_sample_lr_gradient(backend):
    """Adam is differentiable in a [B] lr (direction constant), with [B] steps: gradcheck in fp64, and the
    gradient equals the per-sample reference's. Catches dlr_b taken with another sample's step."""
    B = 3
    M = torch.randn(B, 2, 5, dtype=F64, device=DEVICE)
    G = torch.randn(B, 2, 5, dtype=F64, device=DEVICE)
    state = AdamState(torch.rand_like(M) * 0.1, torch.rand_like(M) * 1e-2)
    lr = (0.2 + torch.rand(B, dtype=F64, device=DEVICE)).requires_grad_()
    step = torch.tensor([1, 7, 3], device=DEVICE)

    def f(lr):
        return memory_update(M, G, lr=lr, optimizer="adam", state=state, step=step, backend=backend).memory

    assert torch.autograd.gradcheck(f, (lr,))
    w = torch.randn_like(M)
    (dlr,) = torch.autograd.grad((f(lr) * w).sum(), lr)
    lr_ref = lr.detach().clone().requires_grad_()
    new_ref = ref_per_sample(M.cpu(), G.cpu(), lr_ref, "adam", None, None, state, step)[0]
    (dlr_ref,) = torch.autograd.grad((new_ref * w.cpu()).sum(), lr_ref)
    assert_close(dlr, dlr_ref, dtype=F64, name="dlr")


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs GRADMEM_TEST_DEVICE=cuda")
@pytest.mark.parametrize("num_splits", [1, 8])
def test_per_sample_cuda_graph_replay(num_splits):
    """[B] lr and step refilled between replays of one captured update (both launch shapes): each replay equals
    an eager update with the new values, and nothing synchronises with the host."""
    from gradmem_fast.kernels import update as K

    B, m, d = 3, 8, 4096
    M, G, _, _ = make_inputs(B, m, d, torch.bfloat16)
    lr = torch.tensor([0.1, 0.0, 0.2], device="cuda")
    step = torch.tensor([1, 2, 3], device="cuda")
    m0, v0 = torch.rand(B, m, d, device="cuda") * 0.1, torch.rand(B, m, d, device="cuda") * 1e-2
    outs = dict(
        out=torch.empty_like(M),
        norm_out=torch.empty(B, device="cuda"),
        exp_avg_out=torch.empty_like(m0),
        exp_avg_sq_out=torch.empty_like(v0),
    )

    def run():
        K.launch_update(
            M, G, lr=lr, adam=True, step=step, clip_norm=1.0, exp_avg=m0, exp_avg_sq=v0, num_splits=num_splits, **outs
        )

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k in range(3):
        lr.copy_(torch.tensor([0.05 * k, 0.3, 0.0], device="cuda"))
        step.copy_(torch.tensor([k + 1, 10 + k, 1], device="cuda"))
        graph.replay()
        got = {n: t.clone() for n, t in outs.items()}
        want = K.launch_update(
            M, G, lr=lr, adam=True, step=step, clip_norm=1.0, exp_avg=m0, exp_avg_sq=v0, num_splits=num_splits
        )
        assert torch.equal(got["out"], want[0]) and torch.equal(got["exp_avg_out"], want[2])
        assert torch.equal(got["out"][2], M[2])  # lr 0: frozen
