"""Second-order meta-gradients on the fast path (Triton attention double backward, interpreter) against the
torch reference, and the drop-in use of the registered attention inside GradMem-style training code."""

import pytest
import torch
import torch.nn.functional as F
from test_engine import ragged

import gradmem_fast
from gradmem_fast import MemoryWriter, WriteConfig, reference
from gradmem_fast.backend import use_backend
from gradmem_fast.kernels import attention as attention_kernels
from helpers import assert_close
from tiny_models import VOCAB, tiny_model


@pytest.fixture
def dbwd_calls(monkeypatch):
    """Counts launches of the attention double backward, so a test knows the fast path really ran."""
    calls = []
    original = attention_kernels.attention_dbwd

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_kernels, "attention_dbwd", counted)
    return calls


def _outer_grads(model, write, M0, queries, cot, extra=()):
    """Gradients of a random projection of the READ logits w.r.t. M0, every weight and ``extra``."""
    memory = write().memory
    outer = (reference.read_logits(model, memory, queries) * cot.to(memory.dtype)).sum()
    return torch.autograd.grad(outer, [M0, *extra, *model.parameters()], allow_unused=True)


def _assert_same_grads(got, want, dtype, names):
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        if w is None or g is None:
            assert g is None and w is None, f"{name}: gradient present on one side only"
            continue
        assert_close(g, w, dtype=dtype, name=name)


@pytest.mark.parametrize(
    "family, dtype, last_k, with_head",
    [
        ("gpt2", torch.float64, None, False),
        ("llama", torch.float32, None, True),  # GQA 4:2, separate write head, fp32 kernels vs the fp64 reference
        ("qwen2", torch.float64, 1, False),  # GQA 4:1, second order on the last step only
    ],
)
def test_writer_second_order_matches_reference(family, dtype, last_k, with_head, dbwd_calls):
    """MemoryWriter(backend="triton", grad_mode="second"): outer-loss gradients w.r.t. the initial memory,
    the write head and every model weight equal the torch reference's."""
    model = tiny_model(family)  # fp64 weights: the reference runs in fp64
    cfg = WriteConfig(
        num_memory_tokens=2, steps=2, lr=0.5, clip_norm=0.2, grad_mode="second", last_k_second_order=last_k
    )
    ids, mask = ragged([4, 1, 6])
    queries = torch.randint(0, VOCAB, (3, 3))
    cot = torch.randn(3, 4, VOCAB, dtype=torch.float64)
    M0 = torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True, dtype=torch.float64) if with_head else None
    head_params = tuple(head.parameters()) if with_head else ()
    names = ["M0"] + [f"write_head.{n}" for n, _ in (head.named_parameters() if with_head else ())]
    names += [n for n, _ in model.named_parameters()]

    M0_ref = M0.clone().requires_grad_(True)
    want = _outer_grads(
        model,
        lambda: reference.write(model, ids, mask, M0_ref, cfg, write_head=head),
        M0_ref,
        queries,
        cot,
        head_params,
    )
    model.to(dtype)
    if with_head:
        head.to(dtype)
    M0_fast = M0.to(dtype).requires_grad_(True)
    writer = MemoryWriter(model, cfg, backend="triton", write_head=head)
    got = _outer_grads(model, lambda: writer.write(ids, mask, M0_fast), M0_fast, queries, cot, head_params)
    _assert_same_grads(got, want, dtype, names)
    # one double backward per layer and second-order step
    assert len(dbwd_calls) == model.config.num_hidden_layers * (cfg.steps if last_k is None else last_k)


# ----------------------------------------------------------------------------------------------------
# Drop-in: unmodified GradMem-style code that knows nothing of gradmem_fast's writer


def _gradmem_style_meta_loss(model, M0, ids, mask, queries, answers, steps=2, lr=0.3):
    """A minimal GradMem inner/outer loop on padded batches, written against the plain HF API.

    WRITE: K steps of M <- M - lr * dL/dM on [M ; context] (create_graph=True, second order); READ: the
    answer tokens' cross-entropy from [M ; query]."""
    emb = model.get_input_embeddings()
    B, m = ids.shape[0], M0.shape[0]
    M = M0.expand(B, -1, -1)
    full_mask = torch.cat([torch.ones(B, m, dtype=mask.dtype), mask], 1)
    for _ in range(steps):
        x = torch.cat([M, emb(ids)], 1)
        logits = model(inputs_embeds=x, attention_mask=full_mask).logits[:, m - 1 : -1]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
        loss = ((tok.view(B, -1) * mask).sum(1) / mask.sum(1)).sum()
        (g,) = torch.autograd.grad(loss, M, create_graph=True)
        M = M - lr * g
    x = torch.cat([M, emb(queries)], 1)
    logits = model(inputs_embeds=x).logits[:, -1]
    return F.cross_entropy(logits, answers)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_drop_in_second_order_matches_eager(family, dbwd_calls):
    """register_attention() + attn_implementation="gradmem_fast" gives the eager model's second-order
    gradients inside code that calls torch.autograd.grad(..., create_graph=True) itself (padded batch,
    right padding, fp64)."""
    gradmem_fast.register_attention()
    model = tiny_model(family)
    ids, mask = ragged([5, 2, 4])
    queries = torch.randint(0, VOCAB, (3, 2))
    answers = torch.randint(0, VOCAB, (3,))
    M0 = (torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    params = [M0, *model.parameters()]
    names = ["M0"] + [n for n, _ in model.named_parameters()]
    want = torch.autograd.grad(
        _gradmem_style_meta_loss(model, M0, ids, mask, queries, answers), params, allow_unused=True
    )
    model.set_attn_implementation("gradmem_fast")
    with use_backend("triton"):
        got = torch.autograd.grad(
            _gradmem_style_meta_loss(model, M0, ids, mask, queries, answers), params, allow_unused=True
        )
    _assert_same_grads(got, want, torch.float64, names)
    assert len(dbwd_calls) == 2 * model.config.num_hidden_layers  # both write steps, every layer
