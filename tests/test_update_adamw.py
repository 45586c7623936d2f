"""AdamW (decoupled weight decay) in the per-document update: the op on both backends against
torch.optim.AdamW run on each document separately (fp64) and against a loop written out here (the kernel in
fp32/fp16, shared and per-sample lr and steps, split reduction, NaN-filled outputs); whole writes (reference,
engine, cramming slots) against torch.optim.AdamW driving an eager per-document loss."""

import math

import pytest
import torch

from eager_gradmem import doc_loss
from gradmem_fast.config import StopRule, WriteConfig
from gradmem_fast.ops.update import memory_update
from gradmem_fast.writer import MemoryWriter
from helpers import assert_close, random_documents, seeded_initial_memory
from tiny_models import VOCAB, tiny_model

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 4, 129)]
BETAS = (0.9, 0.999)


def _loop(M, grads, lrs, wd, clip_value=10.0, clip_norm=None, betas=BETAS):
    """AdamW written out element by element in fp64 for one sample: M (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
    with the gradient clamped to +-clip_value and norm-clipped; the decay never enters g or the moments."""
    b1, b2 = betas
    m = torch.zeros_like(M)
    v = torch.zeros_like(M)
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.clamp(-clip_value, clip_value)
        if clip_norm is not None:
            n = math.sqrt(float((g * g).sum()))
            if n > clip_norm:
                g = g * (clip_norm / (n + 1e-6))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**k)
        v_hat = (v / (1 - b2**k)).clamp(min=1e-8)
        M = M * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return M


def _data(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(*shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 for _ in range(steps)]
    lrs = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 0.2 + 0.01
    return M, grads, lrs


def _op(M, grads, lrs, wd, backend, dtype, **kw):
    """Run memory_update for every step with a per-sample lr; NaN-filled inputs would show untouched rows."""
    mem, state = M.to(dtype), None
    for k, g in enumerate(grads, start=1):
        res = memory_update(
            mem, g.to(dtype), lr=lrs.to(dtype), optimizer="adamw", weight_decay=wd, state=state, step=k,
            backend=backend, **kw,
        )  # fmt: skip
        mem, state = res.memory, res.state
    return mem


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_equals_torch_adamw_per_document(shape, backend):
    """Each document has its own torch.optim.AdamW (its own lr); gradients well inside the clamp and the
    v_hat floor, where our Adam is torch's."""
    M, grads, lrs = _data(shape, 4, seed=sum(shape))
    wd = 0.3
    ours = _op(M, grads, lrs, wd, backend, torch.float64)
    for b in range(shape[0]):
        p = torch.nn.Parameter(M[b].clone())
        opt = torch.optim.AdamW([p], lr=float(lrs[b]), betas=BETAS, eps=1e-8, weight_decay=wd)
        for g in grads:
            p.grad = g[b].clone()
            opt.step()
        assert_close(ours[b], p.detach(), name=f"document {b}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_kernel_equals_the_written_out_loop(dtype, shape, clip_norm):
    M, grads, lrs = _data(shape, 3, seed=7 + shape[2])
    wd = 0.7
    ours = _op(M, grads, lrs, wd, "triton", dtype, clip_value=1.5, clip_norm=clip_norm)
    ref = torch.stack(
        [_loop(M[b], [g[b] for g in grads], [float(lrs[b])] * 3, wd, 1.5, clip_norm) for b in range(shape[0])]
    )
    assert_close(ours.double(), ref, dtype=dtype)


@pytest.mark.parametrize("splits", [1, 3])
def test_launch_with_nan_buffers_split_and_per_sample_steps(splits):
    """Documents at different ages (per-sample steps, as in continuous batching), preallocated NaN outputs,
    one program per sample or a split reduction."""
    from gradmem_fast.kernels.update import launch_update

    B, m, d = 3, 6, 1500
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(B, m, d, generator=gen)
    g = torch.randn(B, m, d, generator=gen)
    m1 = torch.randn(B, m, d, generator=gen) * 0.1
    m2 = torch.rand(B, m, d, generator=gen) * 0.1
    lr = torch.tensor([0.1, 0.0, 0.05])
    step = torch.tensor([1, 4, 9])
    outs = [torch.full((B, m, d), math.nan) for _ in range(3)] + [torch.full((B,), math.nan)]
    new, norm, e1, e2 = launch_update(
        M, g, lr=lr, adam=True, step=step, clip_value=10.0, weight_decay=0.4, exp_avg=m1, exp_avg_sq=m2,
        out=outs[0], norm_out=outs[3], exp_avg_out=outs[1], exp_avg_sq_out=outs[2], num_splits=splits,
    )  # fmt: skip
    M64, g64 = M.double(), g.double()
    e1_ref = 0.9 * m1.double() + 0.1 * g64
    e2_ref = 0.999 * m2.double() + 0.001 * g64 * g64
    t = step.double().view(-1, 1, 1)
    v_hat = (e2_ref / (1 - 0.999**t)).clamp(min=1e-8)
    lr64 = lr.double().view(-1, 1, 1)
    ref = M64 * (1 - lr64 * 0.4) - lr64 * (e1_ref / (1 - 0.9**t)) / (v_hat.sqrt() + 1e-8)
    assert_close(new.double(), ref, dtype=torch.float32)
    assert torch.equal(new[1], M[1])  # lr 0 (a stopped document): neither decayed nor moved
    assert_close(e1.double(), e1_ref, dtype=torch.float32)
    assert_close(e2.double(), e2_ref, dtype=torch.float32)
    assert_close(norm.double(), g64.flatten(1).norm(dim=1), dtype=torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_decay_is_adam_exactly(backend):
    M, grads, lrs = _data((3, 5, 7), 3, seed=1)
    for dtype in (torch.float32, torch.float64):
        a = _op(M, grads, lrs, 0.0, backend, dtype)
        mem, state = M.to(dtype), None
        for k, g in enumerate(grads, start=1):
            res = memory_update(
                mem, g.to(dtype), lr=lrs.to(dtype), optimizer="adam", state=state, step=k, backend=backend
            )
            mem, state = res.memory, res.state
        assert torch.equal(a, mem)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_order_gradient_is_scaled_by_the_decay(backend):
    """d new / d memory = (1 - lr_b wd) I per sample (the kernel's autograd.Function and torch autograd)."""
    M, grads, lrs = _data((3, 4, 5), 1, seed=2)
    M = M.float().requires_grad_(True)
    new = memory_update(M, grads[0].float(), lr=lrs.float(), optimizer="adamw", weight_decay=0.5, backend=backend)
    w = torch.randn(new.memory.shape, generator=torch.Generator().manual_seed(9))
    (dM,) = torch.autograd.grad(new.memory, M, w)
    assert_close(dM.double(), w.double() * (1 - lrs.view(-1, 1, 1) * 0.5), dtype=torch.float32)


def test_lr_gradient_includes_the_decay():
    """A tensor lr that requires grad (torch formula): d new / d lr_b = -wd M_b - direction_b, fp64 gradcheck."""
    M, grads, lrs = _data((2, 3, 4), 1, seed=4)

    def f(lr):
        return memory_update(M, grads[0], lr=lr, optimizer="adamw", weight_decay=0.6, backend="torch").memory

    assert torch.autograd.gradcheck(f, (lrs.clone().requires_grad_(True),))


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(optimizer="adam", weight_decay=0.1), "only optimizer='adamw' decays"),
        (dict(optimizer="sgd", weight_decay=0.1), "only optimizer='adamw' decays"),
        (dict(optimizer="adamw", weight_decay=-1.0), "weight_decay: expected a finite number >= 0"),
        (dict(optimizer="adamw", weight_decay=float("nan")), "weight_decay: expected a finite number >= 0"),
    ],
)
def test_op_refuses_bad_weight_decay(kw, needle):
    M = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=needle):
        memory_update(M, M, lr=0.1, backend="torch", **kw)
    with pytest.raises(TypeError, match="weight_decay: expected a number"):
        memory_update(M, M, lr=0.1, optimizer="adamw", weight_decay="0.1", backend="torch")


def test_config_checks():
    with pytest.raises(ValueError, match="weight_decay needs optimizer='adamw'"):
        WriteConfig(optimizer="adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="not supported with optimizer='adamw'"):
        WriteConfig(optimizer="adamw", grad_mode="second")
    assert WriteConfig(optimizer="adamw").effective_clip_value == 10.0


def _eager_adamw_write(model, docs, M0, lr, wd, steps, betas=BETAS):
    """Independent loop, one document at a time: an eager loss (eager_gradmem.doc_loss), its gradient
    clamped to +-10 (Adam's default), and AdamW written out with our Adam's v_hat floor of 1e-8 (which
    torch.optim.AdamW lacks: the tiny model's memory gradients have entries below 1e-4, where the two differ
    even without decay, so torch's optimizer is the oracle of the op tests above, on O(1) gradients)."""
    b1, b2 = betas
    out = []
    for tokens in docs:
        M, m, v = M0.clone(), torch.zeros_like(M0), torch.zeros_like(M0)
        for k in range(1, steps + 1):
            P = M.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(doc_loss(model, P, tokens), P)
            g = g.clamp(-10.0, 10.0)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            v_hat = torch.clamp(v / (1 - b2**k), min=1e-8)
            M = M * (1 - lr * wd) - lr * (m / (1 - b1**k)) / (v_hat.sqrt() + 1e-8)
        out.append(M)
    return torch.stack(out)


@pytest.mark.parametrize("path", ["reference", "engine", "cramming"])
def test_whole_write_equals_an_eager_adamw_loop(path):
    model = tiny_model("llama", dtype=torch.float64)
    docs = random_documents([5, 1, 8], VOCAB, seed=5)
    # loss <= 0 never holds: every document takes every step, through the slot loop
    stop = StopRule(loss=0.0, exact=False, check_every=2) if path == "cramming" else None
    config = WriteConfig(
        num_memory_tokens=3, steps=4, lr=0.05, optimizer="adamw", weight_decay=0.8, init_std=0.5, stop=stop
    )
    writer = MemoryWriter(model, config, backend="torch" if path == "reference" else "triton")
    got = torch.stack(list(writer.write_many(docs, batch_tokens=64)))
    ref = _eager_adamw_write(model, docs, seeded_initial_memory(model, config), 0.05, 0.8, 4)
    assert_close(got, ref, name=path)
    # the decay matters at this size: without it the memories are far from these
    plain = _eager_adamw_write(model, docs, seeded_initial_memory(model, config), 0.05, 0.0, 4)
    assert (got - plain).norm() > 1e-3 * plain.norm()


def test_cli_adamw_equals_the_api(tmp_path, capsys):
    import json

    from gradmem_fast import cli, fileio
    from tiny_local import save_tiny, sentence

    model_dir = save_tiny(str(tmp_path / "model"))
    inp = tmp_path / "d.jsonl"
    inp.write_text("".join(json.dumps({"text": sentence(4 + i, i)}) + "\n" for i in range(2)))
    out = str(tmp_path / "m.safetensors")
    argv = ["write", "--model", model_dir, "--input", str(inp), "--output", out, "--memory-tokens", "2", "--quiet"]
    argv += ["--steps", "3", "--lr", "0.1", "--stop", "none", "--dtype", "float64", "--no-append-eos"]
    assert cli.main([*argv, "--optimizer", "adamw", "--weight-decay", "0.5"]) == 0
    f = fileio.MemoryFile(out)
    assert f.config()["optimizer"] == "adamw" and f.config()["weight_decay"] == 0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = WriteConfig(num_memory_tokens=2, steps=3, lr=0.1, optimizer="adamw", weight_decay=0.5)
    docs = [torch.tensor(tok(sentence(4 + i, i), add_special_tokens=False).input_ids) for i in range(2)]
    ref = torch.stack(list(MemoryWriter(model, config, backend="torch").write_many(docs)))
    assert_close(f.rows([0, 1]), ref)
    assert cli.main([*argv, "--force", "--optimizer", "adam", "--weight-decay", "0.5"]) == 2
    assert "--weight-decay is decoupled decay for --optimizer adamw" in capsys.readouterr().err
