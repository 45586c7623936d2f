"""``gradmem-fast read``: answers from a memory file, and every bad input."""
import json
import os
import pickle

import pytest
import torch

from gradmem_fast import cli, fileio
from gradmem_fast.reader import MemoryReader
from tiny_local import save_tiny, sentence


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, and a memory file of three documents written with it."""
    root = tmp_path_factory.mktemp("read")
    model_dir = save_tiny(str(root / "model"))
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(4 + i, i)}) + "\n" for i in range(3)))
    mem = str(root / "mem.safetensors")
    assert cli.main(["write", "--model", model_dir, "--input", str(docs), "--output", mem, "--steps", "2",
                     "--memory-tokens", "3", "--quiet"]) == 0
    return model_dir, mem


def _queries(path, rows):
    """Write query rows (dicts, or raw strings for broken lines) as JSON lines."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _read(model_dir, mem, queries, out, *extra):
    """Run `gradmem-fast read` in-process with 4 new tokens per query."""
    return cli.main(["read", "--model", model_dir, "--memories", mem, "--queries", queries, "--output", out,
                     "--max-new-tokens", "4", "--quiet", *extra])


def test_read_answers_every_query_in_order(setup, tmp_path):
    """One answer per query, in input order, equal to the Python API's."""
    model_dir, mem = setup
    rows = [{"id": "d2", "text": "the cat"}, {"id": "d0", "text": ""}, {"id": "d2", "text": "dog ran"},
            {"id": "d1", "text": "a"}]
    q = _queries(tmp_path / "q.jsonl", rows)
    out = str(tmp_path / "answers.jsonl")
    assert _read(model_dir, mem, q, out, "--batch-size", "2", "--doc-batch", "2") == 0
    answers = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [(a["id"], a["query"]) for a in answers] == [(r["id"], r["text"]) for r in rows]

    # The same answers as the Python API on the same memories.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    memfile = fileio.MemoryFile(mem)
    memories = memfile.rows(range(3))
    expect = MemoryReader(model, tok).answer(memories, [(memfile.ids.index(r["id"]), r["text"]) for r in rows],
                                             max_new_tokens=4)
    assert [a["answer"] for a in answers] == expect


def test_sampling_options_are_seeded(setup, tmp_path):
    """Sampling with a seed is reproducible."""
    model_dir, mem = setup
    q = _queries(tmp_path / "q.jsonl", [{"id": "d1", "text": "the"}] * 3)
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.jsonl")
        assert _read(model_dir, mem, q, out, "--do-sample", "--temperature", "2", "--top-k", "10", "--top-p",
                     "0.9", "--seed", "5") == 0
        outs.append(open(out).read())
    assert outs[0] == outs[1]


def _assert_clean_failure(rc, capsys, out, *needles):
    """Exit 2, one error message, no traceback, no output."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(out)


def test_memories_of_a_different_model_width(setup, tmp_path, capsys):
    """Memories of a 32-wide model read with a 48-wide model."""
    _, mem = setup
    wide = save_tiny(str(tmp_path / "wide"), hidden_size=48)
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    out = str(tmp_path / "a.jsonl")
    _assert_clean_failure(_read(wide, mem, q, out), capsys, out, "width 32", "width 48")


class _Boom:
    """Unpickling this would create a marker file: proof that a memory file is never unpickled."""

    def __init__(self, marker):
        """Remember the marker path."""
        self.marker = marker

    def __reduce__(self):
        """What unpickling would call: create the marker file."""
        return (open, (self.marker, "w"))


def test_a_pickle_is_never_unpickled(setup, tmp_path, capsys):
    """A pickle (or another safetensors file) given as memories is refused unread."""
    model_dir, _ = setup
    marker = tmp_path / "unpickled"
    bad = tmp_path / "mem.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"memories": _Boom(str(marker))}, fh)
    q = _queries(tmp_path / "q.jsonl", [{"id": 0, "text": "the"}])
    out = str(tmp_path / "a.jsonl")
    _assert_clean_failure(_read(model_dir, str(bad), q, out), capsys, out, "not a readable safetensors")
    assert not marker.exists()
    # A safetensors file of something else is refused too.
    from safetensors.torch import save_file

    other = str(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(2)}, other)
    _assert_clean_failure(_read(model_dir, other, q, out), capsys, out, "not a gradmem-fast memory file")


def test_query_problems(setup, tmp_path, capsys):
    """Unknown document ids, missing ids, invalid JSON, a missing memory file."""
    model_dir, mem = setup
    out = str(tmp_path / "a.jsonl")
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}, {"id": "nope", "text": "the"}])
    _assert_clean_failure(_read(model_dir, mem, q, out), capsys, out, "line 2", '"nope"')
    q = _queries(tmp_path / "q2.jsonl", [{"text": "the"}])
    _assert_clean_failure(_read(model_dir, mem, q, out), capsys, out, "q2.jsonl:1", "'id'")
    q = _queries(tmp_path / "q3.jsonl", ["not json"])
    _assert_clean_failure(_read(model_dir, mem, q, out), capsys, out, "q3.jsonl:1", "invalid JSON")
    _assert_clean_failure(_read(model_dir, str(tmp_path / "missing.safetensors"), q, out), capsys, out,
                          "does not exist")


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "-1"), ("--top-p", "0"), ("--temperature", "0"),
                                        ("--top-k", "-3"), ("--batch-size", "0")])
def test_bad_numbers(setup, tmp_path, capsys, flag, value):
    """Out-of-range generation options."""
    model_dir, mem = setup
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    out = str(tmp_path / "a.jsonl")
    _assert_clean_failure(_read(model_dir, mem, q, out, flag, value), capsys, out, flag)


def test_read_never_destroys_an_input_or_an_existing_output(setup, tmp_path, capsys):
    """The data-loss table of read: output = memories or queries (any spelling or link), or existing."""
    from test_cli_write import assert_refused

    model_dir, mem_src = setup
    mem = str(tmp_path / "mem.safetensors")
    with open(mem_src, "rb") as src, open(mem, "wb") as dst:
        dst.write(src.read())
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    os.symlink(mem, tmp_path / "mem-link.safetensors")
    os.link(q, tmp_path / "q-hard.jsonl")
    (tmp_path / "old.jsonl").write_text("precious\n")
    cases = [(mem, [], "same file as --memories"), (mem, ["--force"], "same file as --memories"),
             (q, ["--force"], "same file as --queries"), (os.path.relpath(q), ["--force"], "same file as --queries"),
             (str(tmp_path / "mem-link.safetensors"), ["--force"], "same file as --memories"),
             (str(tmp_path / "q-hard.jsonl"), ["--force"], "same file as --queries"),
             (str(tmp_path / "old.jsonl"), [], "--force")]
    for out, extra, needle in cases:
        assert_refused(["read", "--model", model_dir, "--memories", mem, "--queries", q, "--output", out,
                        "--quiet", *extra], capsys, tmp_path, needle)
    assert _read(model_dir, mem, q, str(tmp_path / "old.jsonl"), "--force") == 0
    assert json.loads(open(tmp_path / "old.jsonl").read())["id"] == "d0"
