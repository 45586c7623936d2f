"""Smoke test of examples/train_kv_retrieval.py: the task generator, the tokenizer, two meta-training steps of
GradMemModel, the command line and the curriculum (a stage-1 checkpoint loads into stage 2).

The example is not a package, so it is imported by path."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

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


def _tiny_args(kv, *extra):
    return kv.parse_args(["--layers", "2", "--hidden", "32", "--heads", "2", "--memory", "4", *extra])


def test_two_meta_steps(kv):
    """Two outer steps of GradMemModel (write head, inner loss in the outer loss) run end to end: finite
    losses, gradients reach M0, the write head and every weight, and the evaluation and greedy decoding run
    on memories written from held-out contexts without touching the training configuration."""
    torch.manual_seed(0)
    task = kv.TaskConfig(pairs=2)
    tok = kv.CharTokenizer(task.alphabet)
    args = _tiny_args(kv)
    args.backend = "torch"
    model = kv.build_model(args, len(tok), "cpu")
    assert model.config.use_write_head and model.config.outer_inner_weight == 0.5
    assert model.config.K == 2 and model.config.lr == 0.04 and model.config.grad_mode == "second"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = kv.SampleStream(task, seed=0)
    before = model.mem.detach().clone()
    for _ in range(2):
        loss, read_loss, inner = kv.meta_step(model, optimizer, stream.batch(4), tok, "cpu")
        assert torch.isfinite(torch.tensor([loss, read_loss, *inner])).all() and len(inner) == 2
        assert loss > read_loss  # the weighted inner loss is added
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert not torch.equal(before, model.mem.detach())
    samples = kv.SampleStream(task, seed=5).batch(3)
    em = kv.evaluate(model, samples, tok, "cpu")
    assert model.config.grad_mode == "second" and model.config.add_inner_loss_to_outer  # restored
    ids, mask, _ = kv.encode_batch(samples, tok, "cpu")
    with kv.inference_write(model):
        memory = model.write(ids, mask).memory
    assert not memory.requires_grad  # grad_mode "none": no graph into the weights
    model.eval()  # as evaluate() decodes (no dropout in this model, but the mode must match)
    values = kv.greedy_values(model, memory, samples, tok, "cpu")
    assert len(values) == 3 and all(isinstance(v, str) for v in values)
    assert all(len(v) <= task.value_len + 1 for v in values)  # the value and at most its closing delimiter
    assert em == sum(v == s.value for v, s in zip(values, samples)) / 3  # the rate of exact values decoded


def test_model_batch_labels(kv):
    """Labels cover the answer only, aligned with the READ input (label j is predicted by READ row j)."""
    tok = kv.CharTokenizer("abcdef")
    samples = kv.SampleStream(kv.TaskConfig(pairs=2), seed=3).batch(2)
    batch = kv.model_batch(samples, tok, "cpu")
    q = len(samples[0].query)
    assert (batch["labels"][:, :q] == -100).all()
    assert torch.equal(batch["labels"][:, q:], batch["query_input_ids"][:, q:])
    assert tok.decode(batch["labels"][0, q:]) == samples[0].answer


TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--memory", "2", "--batch", "2", "--eval-size", "4",
        "--log-every", "1", "--device", "cpu", "--time-limit", "0", "--target", "1.01"]  # fmt: skip


def test_curriculum_checkpoint(kv, tmp_path):
    """Stage 1 (1 pair) saves a GradMemModel; stage 2 (2 pairs, other K and inner lr) starts from exactly
    those weights, takes the stage's memory options and trains on; its curve file is written."""
    stage1 = tmp_path / "stage1"
    kv.main([*TINY, "--steps", "1", "--eval-every", "1", "--save", str(stage1)])
    saved = kv.GradMemModel.from_pretrained(stage1).state_dict()
    args = kv.parse_args(["--pairs", "2", "--init-from", str(stage1), "--inner-steps", "3", "--inner-lr", "0.1"])
    args.backend = "torch"
    model = kv.build_model(args, len(kv.CharTokenizer("abcdef")), "cpu")
    assert model.config.K == 3 and model.config.lr == 0.1 and model.config.last_K_second_order == 3
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    curve_file = tmp_path / "curve.json"
    curve = kv.main(
        [
            *TINY,
            "--pairs",
            "2",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--init-from",
            str(stage1),
            "--save",
            str(tmp_path / "stage2"),
            "--curve-out",
            str(curve_file),
        ]  # fmt: skip
    )
    assert [c[0] for c in curve] == [0, 2]
    stage2 = kv.GradMemModel.from_pretrained(tmp_path / "stage2").state_dict()
    assert not torch.equal(stage2["mem"], saved["mem"])  # trained on from the stage-1 weights
    data = json.loads(curve_file.read_text())
    assert data["settings"]["pairs"] == 2 and [row[0] for row in data["curve"]] == [0, 2]
    with pytest.raises(ValueError, match="vocabulary"):
        kv.main([*TINY, "--steps", "1", "--alphabet", "abcdefg", "--init-from", str(stage1)])


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
    assert [c[0] for c in curve] == [0, 2] and all(len(c) == 4 for c in curve)
    out = capsys.readouterr().out
    assert "step     2 | outer" in out and "eval exact match" in out
