"""gradmem_fast.reference against an independent naive implementation (tests/eager_gradmem.py), fp64."""

import pytest
import torch

import eager_gradmem as eager
from gradmem_fast import MemoryWriter, WriteConfig, reference
from helpers import assert_close
from tiny_models import FAMILIES, VOCAB, tiny_model

M_TOKENS = 3


def ragged_batch(lengths, pad_side="right", pad_id=-100):
    """Token ids [B, max_len] with a 0/1 mask; padding filled with an id that is not a token."""
    B, S = len(lengths), max(lengths)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    docs = []
    for b, n in enumerate(lengths):
        doc = torch.randint(0, VOCAB, (n,))
        docs.append(doc)
        sl = slice(0, n) if pad_side == "right" else slice(S - n, S)
        ids[b, sl] = doc
        mask[b, sl] = 1
    return ids, mask, docs


def check_against_eager(model, cfg, lengths, memory=None, write_head=None, pad_side="right"):
    ids, mask, docs = ragged_batch(lengths, pad_side)
    d = model.config.hidden_size
    M0 = torch.randn(cfg.num_memory_tokens, d, dtype=torch.float64) * 0.5 if memory is None else memory
    result = reference.write(model, ids, mask, M0, cfg, write_head=write_head)
    head = None if write_head is None else (write_head.weight, write_head.bias)
    for b, doc in enumerate(docs):
        M, losses, norms = eager.write_one(
            model,
            doc,
            M0,
            cfg.steps,
            cfg.lr,
            cfg.optimizer,
            cfg.clip_value,
            cfg.clip_norm,
            write_head=head,
        )
        assert_close(result.memory[b], M, name=f"memory[{b}]")
        assert_close(result.losses[:, b], torch.tensor(losses), torch.float32, name=f"losses[{b}]")
        assert_close(result.grad_norms[:, b], torch.tensor(norms), torch.float32, name=f"grad_norms[{b}]")
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_sgd_matches_eager_all_families(family):
    model = tiny_model(family)
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=3, lr=0.5, clip_value=0.05, clip_norm=0.08)
    result = check_against_eager(model, cfg, [5, 1, 9])
    assert result.memory.shape == (3, M_TOKENS, model.config.hidden_size)
    assert result.losses.shape == result.grad_norms.shape == (3, 3)
    assert result.losses.dtype == torch.float32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adam_matches_eager(family):
    model = tiny_model(family)
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=4, lr=0.01, optimizer="adam", clip_value=0.01)
    check_against_eager(model, cfg, [7, 2])
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=3, lr=0.01, optimizer="adam")  # default clamp 10
    check_against_eager(model, cfg, [4, 6])


def test_clip_norm_active_and_inactive():
    model = tiny_model("qwen2")
    big = WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, clip_norm=1e3)  # never clips
    small = WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, clip_norm=1e-3)  # always clips
    r_big = check_against_eager(model, big, [6, 3])
    r_small = check_against_eager(model, small, [6, 3])
    assert (r_small.grad_norms > 1e-3).all() and (r_big.grad_norms < 1e3).all()


def test_left_padding_equals_right_padding():
    model = tiny_model("llama")
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=2, lr=0.3)
    torch.manual_seed(1)
    right = check_against_eager(model, cfg, [4, 8, 1], pad_side="right")
    torch.manual_seed(1)
    left = check_against_eager(model, cfg, [4, 8, 1], pad_side="left")
    assert_close(left.memory, right.memory)


def test_extra_padding_and_batch_neighbours_do_not_change_a_document():
    model = tiny_model("gpt_neox")
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=2, lr=0.3)
    doc = torch.randint(0, VOCAB, (5,))
    alone = reference.write(model, doc[None], None, None, cfg)
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    ids[0, :5], mask[0, :5] = doc, 1
    ids[1], mask[1] = torch.randint(0, VOCAB, (11,)), 1
    batched = reference.write(model, ids, mask, None, cfg)
    assert_close(batched.memory[0], alone.memory[0])
    assert_close(batched.losses[:, 0], alone.losses[:, 0])


def test_write_head():
    model = tiny_model("gpt2")
    head = torch.nn.Linear(model.config.hidden_size, 23, bias=True).double()
    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=2, lr=0.3)
    ids, mask, docs = ragged_batch([5, 3])
    ids = torch.where(mask.bool(), ids % 23, ids)
    M0 = torch.randn(M_TOKENS, model.config.hidden_size, dtype=torch.float64)
    result = reference.write(model, ids, mask, M0, cfg, write_head=head)
    for b, doc in enumerate(docs):
        M, losses, _ = eager.write_one(model, doc % 23, M0, 2, 0.3, write_head=(head.weight, head.bias))
        assert_close(result.memory[b], M)
        assert_close(result.losses[:, b], torch.tensor(losses), torch.float32)


def test_default_memory_is_seeded_and_shared():
    model = tiny_model("gpt2")
    cfg = WriteConfig(num_memory_tokens=2, steps=1, lr=0.0, seed=7)
    ids = torch.randint(0, VOCAB, (2, 4))
    a = MemoryWriter(model, cfg, backend="torch").write(ids).memory
    b = MemoryWriter(model, cfg, backend="torch").write(ids).memory
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])  # lr=0: the shared initial memory comes back unchanged
    gen = torch.Generator().manual_seed(7)
    expected = torch.randn(2, model.config.hidden_size, generator=gen, dtype=torch.float64) * 0.02
    assert_close(a[0], expected)
    other = MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1, lr=0.0, seed=8)).write(ids).memory
    assert not torch.equal(a, other)


def test_per_sample_memory_and_shared_memory_agree():
    model = tiny_model("mistral")
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.2)
    ids = torch.randint(0, VOCAB, (3, 6))
    M0 = torch.randn(2, model.config.hidden_size, dtype=torch.float64)
    shared = reference.write(model, ids, None, M0, cfg)
    per = reference.write(model, ids, None, M0.expand(3, -1, -1).clone(), cfg)
    assert_close(per.memory, shared.memory)


# --- meta-gradients (grad_mode first / second) --------------------------------------------------


def _outer_loss_eager(model, docs, M0, queries, targets, weights, cfg):
    total = 0.0
    for b, doc in enumerate(docs):
        M, _, _ = eager.write_one(
            model,
            doc,
            M0,
            cfg.steps,
            cfg.lr,
            cfg.optimizer,
            cfg.clip_value,
            cfg.clip_norm,
            grad_mode=cfg.grad_mode,
            last_k=cfg.last_k_second_order,
        )
        logits = eager.read_logits_one(model, M, queries[b])
        logp = logits.log_softmax(-1)
        total = total + (weights[b] * logp[torch.arange(logits.shape[0]), targets[b]]).sum()
    return total


def _outer_loss_reference(model, ids, mask, M0, queries, targets, weights, cfg):
    result = reference.write(model, ids, mask, M0, cfg)
    logits = reference.read_logits(model, result.memory, queries)
    logp = logits.log_softmax(-1)
    picked = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
    return (weights * picked).sum()


@pytest.mark.parametrize(
    "family,grad_mode,last_k,clip_norm",
    [
        ("gpt2", "first", None, None),
        ("gpt2", "second", None, 0.05),
        ("llama", "second", 1, None),
        ("gpt_neox", "second", None, None),
        ("qwen2", "first", None, 0.05),
        ("qwen2", "second", None, None),
    ],
)
def test_meta_gradients_match_eager(family, grad_mode, last_k, clip_norm):
    model = tiny_model(family)
    cfg = WriteConfig(
        num_memory_tokens=2, steps=2, lr=0.5, clip_norm=clip_norm, grad_mode=grad_mode, last_k_second_order=last_k
    )
    ids, mask, docs = ragged_batch([4, 2])
    queries = torch.randint(0, VOCAB, (2, 3))
    targets = torch.randint(0, VOCAB, (2, 4))
    weights = torch.rand(2, 4, dtype=torch.float64)
    M0 = (torch.randn(2, model.config.hidden_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    params = [p for p in model.parameters()]
    ref = _outer_loss_reference(model, ids, mask, M0, queries, targets, weights, cfg)
    g_ref = torch.autograd.grad(ref, [M0] + params, allow_unused=True)
    eag = _outer_loss_eager(model, docs, M0, queries, targets, weights, cfg)
    g_eag = torch.autograd.grad(eag, [M0] + params, allow_unused=True)
    assert_close(ref.detach(), eag.detach(), name="outer loss")
    names = ["M0"] + [n for n, _ in model.named_parameters()]
    checked = 0
    for name, a, b in zip(names, g_ref, g_eag):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert_close(a, b, name=f"d outer / d {name}")
        checked += 1
    assert checked == len(names)


def test_second_order_differs_from_first_order():
    """The second-order terms are really there: FOMAML and full second order give different gradients."""
    model = tiny_model("gpt2")
    ids, mask, _ = ragged_batch([5, 3])
    queries, targets = torch.randint(0, VOCAB, (2, 2)), torch.randint(0, VOCAB, (2, 3))
    weights = torch.rand(2, 3, dtype=torch.float64)
    M0 = torch.randn(2, model.config.hidden_size, dtype=torch.float64).requires_grad_(True)
    grads = {}
    for mode in ("first", "second"):
        cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=1.0, grad_mode=mode)
        loss = _outer_loss_reference(model, ids, mask, M0, queries, targets, weights, cfg)
        grads[mode] = torch.autograd.grad(loss, M0)[0]
    assert (grads["first"] - grads["second"]).norm() > 1e-3 * grads["second"].norm()


def test_grad_mode_none_returns_detached_memory_and_no_weight_grads():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    M0 = torch.randn(2, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    result = reference.write(
        model, torch.randint(0, VOCAB, (2, 5)), None, M0, WriteConfig(num_memory_tokens=2, steps=2, lr=0.1)
    )
    assert not result.memory.requires_grad
    assert all(p.grad is None for p in model.parameters()) and M0.grad is None


def test_write_runs_under_no_grad():
    model = tiny_model("gpt2")
    with torch.no_grad():
        result = reference.write(
            model, torch.randint(0, VOCAB, (2, 5)), None, None, WriteConfig(num_memory_tokens=2, steps=2, lr=0.1)
        )
    assert torch.isfinite(result.memory).all() and (result.grad_norms > 0).all()


# --- READ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_read_logits_match_eager(family):
    model = tiny_model(family)
    memory = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    queries = torch.randint(0, VOCAB, (2, 4))
    logits = reference.read_logits(model, memory, queries)
    assert logits.shape == (2, 5, VOCAB)
    for b in range(2):
        assert_close(logits[b], eager.read_logits_one(model, memory[b], queries[b]))


def test_read_logits_with_padded_queries():
    model = tiny_model("qwen2")
    memory = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    q = torch.randint(0, VOCAB, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    logits = reference.read_logits(model, memory, q, mask)
    assert_close(logits[1, :4], eager.read_logits_one(model, memory[1], q[1, 2:]))
