"""``--logdir``: the JSON-lines log of write (checks, steps) and capacity (stages) agrees with what the run
stored, documents keep their ids across windows, and reruns append."""

import json
import os

import pytest
import torch

from gradmem_fast import cli, fileio
from gradmem_fast.config import StopRule, WriteConfig
from gradmem_fast.writer import MemoryWriter
from helpers import random_documents
from tiny_local import save_tiny, sentence
from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), initializer_range=0.3)


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _inp(tmp_path, n=3):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(3 + 2 * i, i)}) + "\n" for i in range(n)))
    return str(path)


def _write(model_dir, inp, out, logdir, *extra):
    base = ["write", "--model", model_dir, "--input", inp, "--output", out, "--memory-tokens", "2", "--quiet"]
    return cli.main([*base, "--steps", "30", "--lr", "0.1", "--init-std", "0.5", "--logdir", logdir, *extra])


def test_write_checks_match_the_stored_stats(model_dir, tmp_path):
    inp, out, logdir = _inp(tmp_path), str(tmp_path / "m"), str(tmp_path / "logs")
    assert _write(model_dir, inp, out, logdir, "--check-every", "3", "--shard-size", "2") == 0
    recs = _records(os.path.join(logdir, "write.jsonl"))
    assert recs[0]["event"] == "start" and recs[0]["options"]["check_every"] == 3 and recs[-1]["event"] == "end"
    checks = [r for r in recs if r["event"] == "check"]
    f = fileio.MemoryFile(out)
    stats = f.stats()
    for row, doc_id in enumerate(f.ids):
        mine = [r for r in checks if r["id"] == doc_id]
        # checks after 2, 5, 8, ... updates (every 3rd step's forward); a document out of steps reports 30
        assert [r["step"] for r in mine[:-1]] == [2 + 3 * j for j in range(len(mine) - 1)]
        assert mine[-1]["step"] in (2 + 3 * (len(mine) - 1), 30)
        last = mine[-1]
        assert last["step"] == int(stats["steps"][row]) and last["exact"] == bool(stats["exact"][row])
        assert last["prefix"] == int(stats["prefix"][row])
        assert last["loss"] == pytest.approx(float(stats["loss_after"][row]), rel=1e-6)
        assert last["accuracy"] == pytest.approx(float(stats["accuracy"][row]), rel=1e-6)
        assert all(not r["exact"] for r in mine[:-1])  # a document stops at its first exact check
    # a rerun appends: two starts
    assert _write(model_dir, inp, out, logdir, "--force") == 0
    assert [r["event"] for r in _records(os.path.join(logdir, "write.jsonl"))].count("start") == 2


def test_write_fixed_steps_logs_every_step(model_dir, tmp_path):
    inp, out, logdir = _inp(tmp_path), str(tmp_path / "m"), str(tmp_path / "logs")
    assert _write(model_dir, inp, out, logdir, "--stop", "none", "--steps", "4") == 0
    steps = [r for r in _records(os.path.join(logdir, "write.jsonl")) if r["event"] == "step"]
    f = fileio.MemoryFile(out)
    assert sorted((r["id"], r["step"]) for r in steps) == sorted((i, k) for i in f.ids for k in range(4))
    before = f.stats()["loss_before"]
    for row, doc_id in enumerate(f.ids):
        first = next(r for r in steps if r["id"] == doc_id and r["step"] == 0)
        assert first["loss"] == pytest.approx(float(before[row]), rel=1e-6)


def test_capacity_stages_match_the_report(model_dir, tmp_path):
    inp, out, logdir = _inp(tmp_path, 2), str(tmp_path / "r.json"), str(tmp_path / "logs")
    argv = ["capacity", "--model", model_dir, "--memory-tokens", "2", "--input", inp, "--quiet", "--lr", "0.05"]
    argv += ["--max-steps", "30", "--first", "2", "--init-std", "0.5", "--output", out, "--logdir", logdir]
    assert cli.main(argv) == 0
    stages = [r for r in _records(os.path.join(logdir, "capacity.jsonl")) if r["event"] == "stage"]
    report = json.load(open(out))
    expected = sorted(
        (t["id"], s, st["target"], st["steps"], st["exact"], st["prefix"])
        for t in report["texts"]
        for s, st in enumerate(t["stages"])
    )
    got = sorted((r["id"], r["stage"], r["target"], r["steps"], r["exact"], r["prefix"]) for r in stages)
    assert got == expected and len(got) >= 3


def test_logdir_that_is_a_file_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert _write(model_dir, _inp(tmp_path), str(tmp_path / "m"), str(tmp_path / "f")) == 2
    assert "--logdir" in capsys.readouterr().err and not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("per_document", [False, True])
def test_write_many_reports_every_document_at_every_check_across_windows(per_document):
    model = tiny_model("llama", dtype=torch.float64, initializer_range=0.3)
    config = WriteConfig(
        num_memory_tokens=2, steps=12, lr=0.1, optimizer="adam", init_std=0.5, stop=StopRule(check_every=4)
    )
    docs = random_documents([4, 1, 7, 3, 5], VOCAB, seed=2)
    memory = torch.randn(5, 2, 32, dtype=torch.float64) * 0.5 if per_document else None
    seen = []
    results = list(
        MemoryWriter(model, config, backend="torch").write_many(
            docs, window=2, memory=memory, stats=True, on_document_check=lambda *a: seen.append(a)
        )
    )
    for index, result in enumerate(results):
        mine = [s for s in seen if s[0] == index]
        _, step, loss, accuracy, exact, prefix = mine[-1]
        assert (step, exact, prefix) == (result.steps, result.exact, result.prefix)
        assert loss == pytest.approx(result.loss) and accuracy == pytest.approx(result.accuracy)
    with pytest.raises(ValueError, match="on_document_check need a StopRule"):
        list(MemoryWriter(model, WriteConfig(), backend="torch").write_many(docs, on_document_check=print))
