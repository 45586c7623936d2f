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
    assert (
        cli.main(
            [
                "write",
                "--model",
                model_dir,
                "--input",
                str(docs),
                "--output",
                mem,
                "--steps",
                "2",
                "--memory-tokens",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    return model_dir, mem


def _queries(path, rows):
    """Write query rows (dicts, or raw strings for broken lines) as JSON lines."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _read(model_dir, mem, queries, out, *extra):
    """Run `gradmem-fast read` in-process with 4 new tokens per query."""
    return cli.main(
        [
            "read",
            "--model",
            model_dir,
            "--memories",
            mem,
            "--queries",
            queries,
            "--output",
            out,
            "--max-new-tokens",
            "4",
            "--quiet",
            *extra,
        ]
    )


def test_read_answers_every_query_in_order(setup, tmp_path):
    """One answer per query, in input order, equal to the Python API's."""
    model_dir, mem = setup
    rows = [
        {"id": "d2", "text": "the cat"},
        {"id": "d0", "text": ""},
        {"id": "d2", "text": "dog ran"},
        {"id": "d1", "text": "a"},
    ]
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
    expect = MemoryReader(model, tok).answer(
        memories, [(memfile.ids.index(r["id"]), r["text"]) for r in rows], max_new_tokens=4
    )
    assert [a["answer"] for a in answers] == expect


def test_sampling_options_are_seeded(setup, tmp_path):
    """Sampling with a seed is reproducible."""
    model_dir, mem = setup
    q = _queries(tmp_path / "q.jsonl", [{"id": "d1", "text": "the"}] * 3)
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.jsonl")
        assert (
            _read(
                model_dir,
                mem,
                q,
                out,
                "--do-sample",
                "--temperature",
                "2",
                "--top-k",
                "10",
                "--top-p",
                "0.9",
                "--seed",
                "5",
            )
            == 0
        )
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
    _assert_clean_failure(
        _read(model_dir, str(tmp_path / "missing.safetensors"), q, out), capsys, out, "does not exist"
    )


@pytest.mark.parametrize(
    "flag,value",
    [("--max-new-tokens", "-1"), ("--top-p", "0"), ("--temperature", "0"), ("--top-k", "-3"), ("--batch-size", "0")],
)
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
    cases = [
        (mem, [], "same file as --memories"),
        (mem, ["--force"], "same file as --memories"),
        (q, ["--force"], "same file as --queries"),
        (os.path.relpath(q), ["--force"], "same file as --queries"),
        (str(tmp_path / "mem-link.safetensors"), ["--force"], "same file as --memories"),
        (str(tmp_path / "q-hard.jsonl"), ["--force"], "same file as --queries"),
        (str(tmp_path / "old.jsonl"), [], "--force"),
        (str(tmp_path / "old.jsonl"), ["--force", "--verify", str(tmp_path / "old.jsonl")], "same file as --verify"),
    ]
    for out, extra, needle in cases:
        assert_refused(
            ["read", "--model", model_dir, "--memories", mem, "--queries", q, "--output", out, "--quiet", *extra],
            capsys,
            tmp_path,
            needle,
        )
    assert _read(model_dir, mem, q, str(tmp_path / "old.jsonl"), "--force") == 0
    assert json.loads(open(tmp_path / "old.jsonl").read())["id"] == "d0"


# --- memories that reproduce their documents: stop at end-of-text, --verify ------------------------------------

CRAMMED_TEXTS = [sentence(1, 0), sentence(2, 3)]


@pytest.fixture(scope="module")
def crammed(tmp_path_factory):
    """A tiny model with large weights (it can memorise), and two memory files of two short documents:
    one written with enough steps to reproduce both (documents end with [EOS]), one with a single step."""
    root = tmp_path_factory.mktemp("crammed")
    model_dir = save_tiny(str(root / "model"), initializer_range=1.0)
    docs = _queries(root / "docs.jsonl", [{"id": f"c{i}", "text": t} for i, t in enumerate(CRAMMED_TEXTS)])
    good, weak = str(root / "good.safetensors"), str(root / "weak.safetensors")
    for out, steps in ((good, "100"), (weak, "1")):
        assert (
            cli.main(
                [
                    "write",
                    "--model",
                    model_dir,
                    "--input",
                    docs,
                    "--output",
                    out,
                    "--steps",
                    steps,
                    "--lr",
                    "0.3",
                    "--memory-tokens",
                    "8",
                    "--quiet",
                ]
            )
            == 0
        )
    return model_dir, docs, good, weak


def test_written_file_says_which_memories_decode_back(crammed):
    """The stored teacher-forced accuracy: 100% for the crammed memories, below for one step."""
    _, _, good, weak = crammed
    assert fileio.MemoryFile(good).stats()["accuracy"].tolist() == [1.0, 1.0]
    assert fileio.MemoryFile(good).metadata["documents_below_100"] == "0"
    assert (fileio.MemoryFile(weak).stats()["accuracy"] < 1).any()


def test_answers_stop_at_the_end_of_the_document(crammed, tmp_path):
    """Decoding from memory alone stops at [EOS] by default; --no-stop-at-eos runs on."""
    model_dir, _, good, _ = crammed
    q = _queries(tmp_path / "q.jsonl", [{"id": "c0", "text": ""}, {"id": "c1", "text": ""}])
    out, cont = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert (
        cli.main(
            [
                "read",
                "--model",
                model_dir,
                "--memories",
                good,
                "--queries",
                q,
                "--output",
                out,
                "--max-new-tokens",
                "10",
                "--quiet",
            ]
        )
        == 0
    )
    assert [json.loads(line)["answer"] for line in open(out)] == CRAMMED_TEXTS
    assert (
        cli.main(
            [
                "read",
                "--model",
                model_dir,
                "--memories",
                good,
                "--queries",
                q,
                "--output",
                cont,
                "--max-new-tokens",
                "10",
                "--no-stop-at-eos",
                "--quiet",
            ]
        )
        == 0
    )
    for line, text in zip(open(cont), CRAMMED_TEXTS):
        answer = json.loads(line)["answer"]
        assert answer.startswith(text) and len(answer.split()) > len(text.split())


def test_verify_reports_whether_each_memory_reproduces_its_document(crammed, tmp_path, capsys):
    """--verify: per empty query, "reproduces" and "token_accuracy"; other queries are answered as usual."""
    model_dir, docs, good, weak = crammed
    q = _queries(
        tmp_path / "q.jsonl", [{"id": "c1", "text": ""}, {"id": "c0", "text": "the"}, {"id": "c0", "text": ""}]
    )
    for mem, expect in ((good, [True, True]), (weak, None)):
        out = str(tmp_path / f"v-{os.path.basename(mem)}.jsonl")
        assert (
            cli.main(
                [
                    "read",
                    "--model",
                    model_dir,
                    "--memories",
                    mem,
                    "--queries",
                    q,
                    "--output",
                    out,
                    "--verify",
                    docs,
                    "--quiet",
                ]
            )
            == 0
        )
        lines = [json.loads(line) for line in open(out)]
        assert "reproduces" not in lines[1]
        flags = [lines[0]["reproduces"], lines[2]["reproduces"]]
        if expect:
            assert flags == expect and lines[0]["token_accuracy"] == 1.0
            assert "verify: 2 of 2 memories reproduce" in capsys.readouterr().err
        else:
            assert not all(flags)


def test_verify_problems(crammed, tmp_path, capsys):
    """--verify without the asked document, or with sampling: one error line before any model loads."""
    from test_cli_write import assert_refused

    model_dir, _, good, _ = crammed
    q = _queries(tmp_path / "q.jsonl", [{"id": "c1", "text": ""}])
    other = _queries(tmp_path / "other.jsonl", [{"id": "c0", "text": "the"}])
    base = ["read", "--model", model_dir, "--memories", good, "--queries", q, "--output", str(tmp_path / "a.jsonl")]
    assert_refused(base + ["--verify", other], capsys, tmp_path, 'no document with id "c1"')
    assert_refused(base + ["--verify", other, "--do-sample"], capsys, tmp_path, "--do-sample")


# --- the model fingerprint -------------------------------------------------------------------------------------


def test_same_weights_under_another_path_or_dtype_are_accepted(setup, tmp_path, capsys):
    """A copy of the model directory, or the same weights in bfloat16: read without a warning."""
    import shutil

    model_dir, mem = setup
    copy = shutil.copytree(model_dir, tmp_path / "elsewhere")
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    assert _read(str(copy), mem, q, str(tmp_path / "a.jsonl")) == 0
    assert _read(model_dir, mem, q, str(tmp_path / "b.jsonl"), "--dtype", "bfloat16") == 0
    assert "warning" not in capsys.readouterr().err


def test_another_model_of_the_same_shape_is_refused(setup, tmp_path, capsys):
    """Other weights (same config): exit 2 unless --allow-model-mismatch, which reads with a warning."""
    from test_cli_write import assert_refused

    _, mem = setup
    other = save_tiny(str(tmp_path / "other"), seed=1)
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    out = str(tmp_path / "a.jsonl")
    assert_refused(
        ["read", "--model", other, "--memories", mem, "--queries", q, "--output", out, "--quiet"],
        capsys,
        tmp_path,
        "another model",
        "differ",
        "--allow-model-mismatch",
    )
    assert _read(other, mem, q, out, "--allow-model-mismatch") == 0
    assert "warning" in capsys.readouterr().err and os.path.exists(out)


def test_another_config_is_refused_before_the_weights_load(setup, tmp_path, capsys, monkeypatch):
    """Another architecture of the same width is caught from its config alone."""
    from test_cli_write import assert_refused

    from gradmem_fast import models

    _, mem = setup
    deeper = save_tiny(str(tmp_path / "deeper"), num_hidden_layers=3)
    monkeypatch.setattr(models, "load_model", _no_weights)
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    assert_refused(
        ["read", "--model", deeper, "--memories", mem, "--queries", q, "--output", str(tmp_path / "a.jsonl")],
        capsys,
        tmp_path,
        "num_hidden_layers",
    )


def _no_weights(*args, **kwargs):
    """Stands in for ``models.load_model`` where an input must be refused before any weights load."""
    raise AssertionError("the weights were loaded before the bad input was noticed")


@pytest.mark.parametrize(
    "extra,needle",
    [(["--device", "tpu"], "--device"), (["--device", "cuda:7"], "--device"), (["--dtype", "float8"], "--dtype")],
)
def test_bad_device_or_dtype_before_the_weights_load(setup, tmp_path, capsys, monkeypatch, extra, needle):
    """Device and dtype strings are checked before anything loads."""
    from test_cli_write import assert_refused

    from gradmem_fast import models

    model_dir, mem = setup
    monkeypatch.setattr(models, "load_model", _no_weights)
    q = _queries(tmp_path / "q.jsonl", [{"id": "d0", "text": "the"}])
    assert_refused(
        [
            "read",
            "--model",
            model_dir,
            "--memories",
            mem,
            "--queries",
            q,
            "--output",
            str(tmp_path / "a.jsonl"),
            *extra,
        ],
        capsys,
        tmp_path,
        needle,
    )
