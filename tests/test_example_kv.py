"""Smoke test of examples/train_kv_retrieval.py: the task generator, the tokenizer, two meta-training steps.

The example is not a package, so it is imported by path."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from gradmem_fast import MemoryWriter, WriteConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_kv_retrieval.py"


@pytest.fixture(scope="module")
def kv():
    spec = importlib.util.spec_from_file_location("train_kv_retrieval", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "pairs,key_len,value_len,alphabet", [(1, 2, 2, "abc"), (2, 2, 3, "abcdef"), (16, 3, 3, "abcdefghij")]
)
def test_generator_format(kv, pairs, key_len, value_len, alphabet):
    """Keys are unique, the context holds exactly the pairs, the answer is the queried key's value."""
    task = kv.TaskConfig(pairs=pairs, key_len=key_len, value_len=value_len, alphabet=alphabet, filler=3)
    rng = random.Random(1)
    for _ in range(200):
        s = kv.generate_sample(rng, task)
        found = kv.parse_pairs(s.context)
        assert s.context.count("!") == 2 * pairs
        assert len(found) == pairs  # a repeated key would collapse in the dict
        assert all(len(k) == key_len and len(v) == value_len for k, v in found.items())
        assert found[s.key] == s.value
        assert s.query == f"!{s.key}:" and s.answer == f"{s.value}!"
        assert set(s.context) <= set(alphabet) | {"!", ":"}


def test_tokenizer_round_trip(kv):
    tok = kv.CharTokenizer("abcdef")
    s = kv.generate_sample(random.Random(0), kv.TaskConfig())
    for text in (s.context, s.query + s.answer, "_!:abcdef"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert len(tok) == 9 and len(set(tok.chars)) == len(tok)
    with pytest.raises(ValueError):
        kv.CharTokenizer("ab!")


def test_held_out_contexts_excluded(kv):
    task = kv.TaskConfig(pairs=1, key_len=1, value_len=1, alphabet="ab", filler=0)
    held = {s.context for s in kv.SampleStream(task, seed=1).batch(3)}
    assert all(s.context not in held for s in kv.SampleStream(task, seed=2, exclude=held).batch(50))


def test_two_meta_steps(kv):
    """Two outer steps run end to end: finite losses, gradients reach M0 and every weight, and the
    evaluation and greedy decoding run on memories written from held-out contexts."""
    torch.manual_seed(0)
    task = kv.TaskConfig(pairs=2)
    tok = kv.CharTokenizer(task.alphabet)
    model = kv.build_model(len(tok), layers=2, hidden=32, heads=2, max_positions=64)
    m0 = torch.nn.Parameter(0.02 * torch.randn(4, 32))
    cfg = dict(num_memory_tokens=4, steps=2, lr=1.0)
    writer = MemoryWriter(model, WriteConfig(grad_mode="second", **cfg), backend="torch")
    optimizer = torch.optim.AdamW([m0, *model.parameters()], lr=1e-3)
    stream = kv.SampleStream(task, seed=0)
    before = m0.detach().clone()
    for _ in range(2):
        loss, inner = kv.meta_step(model, m0, writer, optimizer, stream.batch(4), tok, "cpu")
        assert torch.isfinite(torch.tensor([loss, *inner])).all() and len(inner) == 2
        assert m0.grad is not None and torch.isfinite(m0.grad).all() and m0.grad.abs().sum() > 0
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert not torch.equal(before, m0.detach())
    eval_writer = MemoryWriter(model, WriteConfig(grad_mode="none", **cfg), backend="torch")
    samples = kv.SampleStream(task, seed=5).batch(3)
    em = kv.evaluate(model, m0, eval_writer, samples, tok, "cpu")
    ids, mask, _ = kv.encode_batch(samples, tok, "cpu")
    model.eval()  # as evaluate() decodes (no dropout in this model, but the mode must match)
    values = kv.greedy_values(model, eval_writer.write(ids, mask, memory=m0.detach()).memory, samples, tok, "cpu")
    assert len(values) == 3 and all(isinstance(v, str) for v in values)
    assert all(len(v) <= task.value_len + 1 for v in values)  # the value and at most its closing delimiter
    assert em == sum(v == s.value for v, s in zip(values, samples)) / 3  # the rate of exact values decoded


def test_main_runs(kv, capsys):
    """The command line runs a couple of steps with a tiny model and prints its log."""
    curve = kv.main(
        [
            "--steps",
            "2",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--memory",
            "2",
            "--batch",
            "2",
            "--eval-size",
            "4",
            "--eval-every",
            "2",
            "--log-every",
            "1",
            "--device",
            "cpu",
            "--time-limit",
            "0",
            "--target",
            "1.01",
        ]
    )
    assert [c[0] for c in curve] == [0, 2]
    out = capsys.readouterr().out
    assert "step     2 | outer" in out and "eval exact match" in out
