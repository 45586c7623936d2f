"""Capacity search (gradmem_fast.capacity): progressive targets with warm starts, and its command line."""

import json
import os

import pytest
import torch
from test_cli_write import _jsonl, _no_weights, assert_refused

from gradmem_fast import MemoryReader, MemoryWriter, WriteConfig, cli
from gradmem_fast.capacity import next_target, progressive_capacity
from gradmem_fast.config import StopRule
from gradmem_fast.reader import teacher_forced
from tiny_local import save_tiny, sentence
from tiny_models import VOCAB, tiny_model

# The learnable setting of test_cramming: large random weights and a large initial memory, so 4 memory
# vectors learn random texts of a few tokens in tens of Adam steps and fail at about ten (fp64, torch).
LEARNABLE = dict(initializer_range=0.3)
FIRST, GROW = 4, 1.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hundreds of tiny steps: with a second thread on a busy 2-core machine each op waits for a core
    (over 20x slower here); one thread keeps the file within its time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, **LEARNABLE)


def writer(model, steps=100):
    config = WriteConfig(
        num_memory_tokens=4, steps=steps, lr=0.05, init_std=0.5, optimizer="adam", stop=StopRule(check_every=5)
    )
    return MemoryWriter(model, config, backend="torch")


def texts(lengths=(40, 3, 25), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


@pytest.fixture(scope="module")
def measured(model64):
    docs = texts()
    return docs, progressive_capacity(writer(model64), docs, first=FIRST, grow=GROW)


def test_targets_grow_by_the_factor():
    assert [next_target(t, 1.5) for t in (1, 2, 4, 16, 24)] == [2, 3, 6, 24, 36]
    assert next_target(10, 1.01) == 11  # always at least one token more


def test_capacity_decodes_exactly_and_the_next_stage_failed(model64, measured):
    docs, results = measured
    reader = MemoryReader(model64)
    incomplete = [(d, r) for d, r in zip(docs, results) if not r.complete]
    assert incomplete, "the setting must leave some text longer than the capacity"
    for doc, r in zip(docs, results):
        cap = r.capacity
        assert 1 <= cap <= len(doc) and r.tokens == len(doc)
        assert r.tokens_per_vector == cap / 4
        assert r.steps == sum(s.steps for s in r.stages)
        # The memory reported decodes the capacity prefix: teacher forcing and real greedy decoding agree.
        _, correct = teacher_forced(model64, r.memory[None], [doc[:cap]])
        assert int(correct[0]) == cap
        out = reader.generate(reader.prefix(r.memory[None]), [0], [[]], max_new_tokens=cap)
        assert out[0] == doc[:cap].tolist()
        # Every stage but the last ended exact, and targets follow the growth rule (cut at the text's end).
        target = FIRST
        for stage in r.stages[:-1]:
            assert stage.exact and stage.target == min(target, len(doc)) and stage.prefix == stage.target
            target = next_target(target, GROW)
        last = r.stages[-1]
        assert last.target == min(target, len(doc))
        if r.complete:
            assert last.exact and cap == len(doc) == last.target
        else:
            # The growth stage failed within its budget; the capacity is the better of the last exact
            # target and how far that failed stage's memory decodes.
            assert not last.exact and last.steps == 100 and last.prefix < last.target
            previous = r.stages[-2].target if len(r.stages) > 1 else 0
            assert cap == max(previous, last.prefix) < last.target
            assert r.info_gain_bits > 0


def test_text_shorter_than_the_first_target(model64, measured):
    docs, results = measured
    short = results[1]
    assert len(docs[1]) == 3 < FIRST
    assert len(short.stages) == 1 and short.stages[0].target == 3
    assert short.complete and short.capacity == 3 and short.tokens_per_vector == 0.75


def test_each_stage_starts_from_the_previous_memory(model64):
    """The search equals chaining writes by hand, each from the last exact memory (Adam restarting), and
    differs from writing the last target from a cold start."""
    doc = texts((25,))[0]
    w = writer(model64)
    (r,) = progressive_capacity(w, [doc], first=FIRST, grow=GROW)
    assert len(r.stages) >= 3 and not r.complete
    memory = None
    for stage in r.stages:
        result = w.write(doc[None, : stage.target], memory=memory)
        assert int(result.stats.steps[0]) == stage.steps and bool(result.stats.exact[0]) == stage.exact
        if stage.exact:
            memory, last_exact = result.memory, result.memory
    failed = result  # the last stage
    expected = failed.memory if int(failed.stats.prefix[0]) > r.stages[-2].target else last_exact
    torch.testing.assert_close(r.memory, expected[0], rtol=0, atol=0)
    # A cold start of the second stage's target is another computation (other steps or another memory).
    cold = w.write(doc[None, : r.stages[1].target])
    warm = w.write(doc[None, : r.stages[1].target], memory=w.write(doc[None, : r.stages[0].target]).memory)
    assert int(cold.stats.steps[0]) != int(warm.stats.steps[0]) or not torch.equal(cold.memory, warm.memory)


def test_search_refuses_a_writer_without_the_exact_rule(model64):
    config = WriteConfig(num_memory_tokens=2, steps=3, stop=StopRule(loss=1.0, exact=False))
    with pytest.raises(ValueError, match="exact"):
        progressive_capacity(MemoryWriter(model64, config, backend="torch"), texts((5,)))
    with pytest.raises(ValueError, match="grow"):
        progressive_capacity(writer(model64), texts((5,)), grow=1.0)


# ---------------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), **LEARNABLE)


def _args(model_dir, inp, *extra):
    base = ["capacity", "--model", model_dir, "--memory-tokens", "4", "--input", inp, "--quiet"]
    return [*base, "--max-steps", "30", "--lr", "0.05", "--init-std", "0.5", "--first", "4", *extra]


def test_cli_reports_every_text(model_dir, tmp_path, capsys):
    inp = _jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": sentence(12)}, {"text": sentence(2, 3)}, {"text": "x"}])
    out = str(tmp_path / "r.json")
    assert cli.main(_args(model_dir, inp, "--output", out, "--limit", "2", "--device", "cpu")) == 0
    report = json.load(open(out))
    assert [t["id"] for t in report["texts"]] == ["a", 1]
    assert report["memory_tokens"] == 4 and report["method"] == "progressive"
    assert report["settings"]["max_steps_per_stage"] == 30 and report["settings"]["grow"] == 1.5
    for t in report["texts"]:
        assert 0 <= t["capacity"] <= t["tokens"] and t["tokens_per_vector"] == t["capacity"] / 4
        assert t["steps"] == sum(s["steps"] for s in t["stages"]) and t["stages"][0]["target"] <= 4
    tpv = sorted(t["tokens_per_vector"] for t in report["texts"])
    assert report["summary"]["median_tokens_per_vector"] == pytest.approx(sum(tpv) / 2)
    printed = capsys.readouterr().out
    assert "tokens per vector: mean" in printed and " a " in printed


def test_cli_output_is_written_only_when_complete(model_dir, tmp_path, capsys, monkeypatch):
    from gradmem_fast import capacity

    def broken(results):
        raise RuntimeError("boom")

    monkeypatch.setattr(capacity, "summary", broken)
    inp = _jsonl(tmp_path / "t.jsonl", [{"text": sentence(5)}])
    out = str(tmp_path / "r.json")
    with pytest.raises(RuntimeError):
        cli.main(_args(model_dir, inp, "--output", out, "--max-steps", "2"))
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]


@pytest.mark.parametrize(
    "extra,rows,needle",
    [
        (["--grow", "1"], None, "--grow must be"),
        (["--grow", "nan"], None, "--grow must be"),
        (["--max-steps", "0"], None, "--max-steps must be >= 1"),
        (["--check-every", "0"], None, "--check-every must be >= 1"),
        (["--lr", "0"], None, "--lr must be"),
        (["--limit", "0"], None, "--limit must be >= 1"),
        (["--first", "0"], None, "--first must be >= 1"),
        (["--given-tokens", "-1"], None, "--given-tokens must be >= 0"),
        (["--given-tokens", "2"], [{"text": "the cat"}], "nothing after --given-tokens 2"),
        (["--device", "tpu"], None, "--device must be"),
        ([], [{"text": "the cat"}, {"text": "  "}], "empty text"),
        ([], [{"txt": "the cat"}], "text"),
        (["--memory-tokens", "128"], None, "no room"),
        (["--output", "{dir}/missing/r.json"], None, "does not exist"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading_the_model(
    model_dir, tmp_path, capsys, monkeypatch, extra, rows, needle
):
    from gradmem_fast import models

    monkeypatch.setattr(models, "load_model", _no_weights)
    inp = _jsonl(tmp_path / "t.jsonl", rows or [{"text": "the cat"}])
    extra = [e.replace("{dir}", str(tmp_path)) for e in extra]
    assert_refused(_args(model_dir, inp, *extra), capsys, tmp_path, needle)


def test_cli_refuses_to_overwrite_its_input(model_dir, tmp_path, capsys, monkeypatch):
    from gradmem_fast import models

    monkeypatch.setattr(models, "load_model", _no_weights)
    inp = _jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    for force in ([], ["--force"]):
        assert_refused(_args(model_dir, inp, "--output", inp, *force), capsys, tmp_path, "same file as --input")
    old = tmp_path / "old.json"
    old.write_text("{}")
    assert_refused(_args(model_dir, inp, "--output", str(old)), capsys, tmp_path, "--force")
