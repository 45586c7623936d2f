"""``gradmem-fast write``: round trip on a tiny local model, resume after a kill, and every bad input."""

import json
import os

import pytest
import torch

from gradmem_fast import cli, fileio
from gradmem_fast.config import WriteConfig
from gradmem_fast.writer import MemoryWriter
from helpers import assert_close
from tiny_local import save_tiny, sentence


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model and tokenizer saved once for this module."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _jsonl(path, rows):
    """Write rows (dicts, or raw strings for broken lines) as JSON lines."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def model_params(model_dir):
    """Parameter names of the saved tiny model."""
    from transformers import AutoModelForCausalLM

    return [name for name, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()]


def _docs(n=5):
    # Mixed ids: explicit strings and the default (0-based line number).
    """Documents with mixed ids: explicit strings and the default line numbers."""
    return [{"text": sentence(3 + 2 * i, i), **({"id": f"doc-{i}"} if i % 2 else {})} for i in range(n)]


def _write(model_dir, inp, out, *extra):
    """Run `gradmem-fast write` in-process with small settings."""
    return cli.main(
        [
            "write",
            "--model",
            model_dir,
            "--input",
            inp,
            "--output",
            out,
            "--steps",
            "3",
            "--memory-tokens",
            "3",
            "--lr",
            "0.05",
            "--quiet",
            *extra,
        ]
    )


@pytest.mark.parametrize("stop", ["exact", "none"])
def test_write_round_trip_matches_the_api(model_dir, tmp_path, capsys, stop):
    """Memory file contents (ids, shape, metadata) and values equal the Python API, with the default stop
    rule (continuous batching, a bar of documents) and with a fixed step count (a bar of steps)."""
    inp = _jsonl(tmp_path / "docs.jsonl", _docs())
    out = str(tmp_path / "mem.safetensors")
    args = ["write", "--model", model_dir, "--input", inp, "--output", out, "--steps", "3", "--memory-tokens", "3"]
    assert cli.main([*args, "--lr", "0.05", "--shard-size", "2", "--stop", stop]) == 0
    err = capsys.readouterr().err
    if stop == "none":
        # The progress bar advances per optimisation step (3 shards of one batch, 3 steps each) with the loss.
        assert "9/9" in err and "step 3/3, loss " in err and "tok/s" in err and " 0 tok/s" not in err
    else:
        # One bar of documents per shard (2 + 2 + 1 documents), with in-flight/waiting counts and a rate.
        assert "2/2" in err and "1/1" in err and "in flight" in err and "doc-steps/s" in err
    assert "of 5 document(s) below 100%" in err and "steps per document 3-3" in err  # the summary line
    f = fileio.MemoryFile(out)
    assert f.ids == [0, "doc-1", 2, "doc-3", 4]
    assert f.shape == (5, 3, 32)
    meta = f.metadata
    assert meta["model"] == model_dir and meta["hidden_size"] == "32" and json.loads(meta["versions"])["torch"]
    config = json.loads(meta["config"])
    assert config["steps"] == 3 and json.loads(meta["tokenizer"])["vocab_size"] > 0
    # On a CPU the default checks every step (a check reuses the step's forward; its host read costs nothing).
    assert config["stop"] == (None if stop == "none" else dict(loss=None, accuracy=None, exact=True, check_every=1))
    assert not os.path.exists(fileio.checkpoint_dir(out))  # shards removed once merged

    assert meta["append_eos"] == "1" and json.loads(meta["model_config"])["hidden_size"] == 32
    assert len(json.loads(meta["weights_signature"])) == len(list(model_params(model_dir)))

    # The same memories as the Python API (each document written on its own, ending with [EOS]), and
    # the per-document evidence: loss before/after, teacher-forced accuracy, steps, tokens, exactness,
    # exact prefix and information gain.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmem_fast.config import StopRule
    from gradmem_fast.reader import teacher_forced

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rule = None if stop == "none" else StopRule(check_every=1)
    config = WriteConfig(num_memory_tokens=3, steps=3, lr=0.05, optimizer="adam", stop=rule)
    writer = MemoryWriter(model, config, backend="torch")
    stats = f.stats()
    assert sorted(stats) == sorted(fileio.DOC_STATS)
    for row, doc in enumerate(_docs()):
        ids = torch.tensor([tok(doc["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]])
        result = writer.write(ids)
        assert_close(f.rows([row])[0], result.memory[0], name=f"memory {row}")
        loss, correct = teacher_forced(model, result.memory, [ids[0]])
        assert_close(stats["loss_before"][row], result.losses[0, 0], name="loss before")
        assert_close(stats["loss_after"][row], loss[0].float(), name="loss after")
        assert float(stats["accuracy"][row]) == pytest.approx(float(correct[0]) / ids.shape[1], rel=1e-6)
        assert stats["steps"][row] == 3 and stats["tokens"][row] == ids.shape[1]
        assert stats["exact"][row] == int(correct[0] == ids.shape[1])
        assert 0 <= int(stats["prefix"][row]) <= int(correct[0])
        if rule is not None:
            assert float(stats["info_gain_bits"][row]) == pytest.approx(float(result.stats.info_gain_bits[0]), rel=1e-5)


@pytest.mark.parametrize("stop", ["exact", "none"])
def test_given_tokens_are_read_not_scored(model_dir, tmp_path, stop):
    """``--given-tokens 1``: stored in the config; the per-document stats count the tokens after the first
    one and describe the stored memory (teacher forcing with one given token), on both stat paths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmem_fast.reader import teacher_forced

    docs = _docs(3)
    inp = _jsonl(tmp_path / "docs.jsonl", docs)
    out = str(tmp_path / "mem.safetensors")
    assert _write(model_dir, inp, out, "--given-tokens", "1", "--stop", stop) == 0
    f = fileio.MemoryFile(out)
    assert json.loads(f.metadata["config"])["given_tokens"] == 1
    stats = f.stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [torch.tensor(tok(d["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]) for d in docs]
    memory = f.rows(list(range(len(docs))))
    loss, correct = teacher_forced(model, memory, ids, given_tokens=1)
    for row, doc in enumerate(ids):
        assert int(stats["tokens"][row]) == len(doc) - 1
        assert float(stats["accuracy"][row]) == pytest.approx(float(correct[row]) / (len(doc) - 1), rel=1e-6)
        assert float(stats["loss_after"][row]) == pytest.approx(float(loss[row]), rel=1e-4)
        assert stats["exact"][row] == int(correct[row] == len(doc) - 1)


def test_resume_after_a_kill_gives_the_identical_file(model_dir, tmp_path, monkeypatch):
    """Interrupted after one shard, rerun: the same bytes as an uninterrupted run."""
    inp = _jsonl(tmp_path / "docs.jsonl", _docs(5))
    whole = str(tmp_path / "whole.safetensors")
    assert _write(model_dir, inp, whole, "--shard-size", "2") == 0

    out = str(tmp_path / "resumed.safetensors")
    real_save = fileio.save_shard
    calls = []

    def killed_after_one_shard(*args, **kwargs):
        """Let the first shard be saved, then interrupt."""
        if calls:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between shards) does to the run
        calls.append(args[1])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fileio, "save_shard", killed_after_one_shard)
    assert _write(model_dir, inp, out, "--shard-size", "2") == 130
    assert not os.path.exists(out)
    assert os.listdir(fileio.checkpoint_dir(out)) == ["shard-000000.safetensors"]

    computed = []
    monkeypatch.setattr(fileio, "save_shard", lambda *a, **k: (computed.append(a[1]), real_save(*a, **k)))
    assert _write(model_dir, inp, out, "--shard-size", "2") == 0
    assert computed == [1, 2]  # shard 0 was reused, not recomputed
    with open(whole, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_shards_of_another_run_are_not_reused(model_dir, tmp_path):
    """A shard with another fingerprint is recomputed."""
    inp = _jsonl(tmp_path / "docs.jsonl", _docs(3))
    out = str(tmp_path / "mem.safetensors")
    ckpt = fileio.checkpoint_dir(out)
    os.makedirs(ckpt)
    # A finished shard 0 of a different run (other memories) lies in the checkpoint directory.
    fileio.save_shard(ckpt, 0, torch.zeros(2, 3, 32), fingerprint="another run")
    assert _write(model_dir, inp, out, "--shard-size", "2") == 0
    assert fileio.MemoryFile(out).rows([0]).abs().sum() > 0


def _assert_clean_failure(rc, capsys, out, *needles):
    """Exit 2, one error message, no traceback, no output and no checkpoint left."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(out)
    assert not os.path.exists(fileio.checkpoint_dir(out))


def test_missing_input(model_dir, tmp_path, capsys):
    """A missing input file."""
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(model_dir, str(tmp_path / "nope.jsonl"), out), capsys, out, "does not exist")


def test_invalid_json_line_names_the_line(model_dir, tmp_path, capsys):
    """An invalid JSON line is reported with its line number."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, '{"text": "the dog"', {"text": "a"}])
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "d.jsonl:2", "invalid JSON")


def test_line_without_text_field(model_dir, tmp_path, capsys):
    """A line without the text field; --text-field picks another field."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"body": "the dog"}])
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "d.jsonl:2", "'text'", "--text-field")
    # ... which --text-field fixes.
    inp2 = _jsonl(tmp_path / "d2.jsonl", [{"body": "the cat"}, {"body": "the dog"}])
    assert _write(model_dir, inp2, out, "--text-field", "body") == 0


def test_empty_text_is_rejected_or_skipped(model_dir, tmp_path, capsys):
    """Empty text is an error, or skipped with --skip-empty."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"text": "   "}, {"text": "a dog"}])
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "d.jsonl:2", "empty document", "--skip-empty")
    assert _write(model_dir, inp, out, "--skip-empty") == 0
    assert "skipped" in capsys.readouterr().err
    assert fileio.MemoryFile(out).ids == [0, 2]


def test_too_long_text_is_rejected_with_max_length_advice(model_dir, tmp_path, capsys):
    # The tiny model has 128 positions; with 3 memory vectors and [EOS] a document may have 124 tokens.
    """Too long for the model: error with --max-length advice; --max-length truncates."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"text": sentence(130)}])
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "d.jsonl:2", "130 tokens", "--max-length 124")
    _assert_clean_failure(_write(model_dir, inp, out, "--no-append-eos"), capsys, out, "--max-length 125")
    assert _write(model_dir, inp, out, "--max-length", "20") == 0
    assert "truncated" in capsys.readouterr().err
    out2 = str(tmp_path / "m2.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out2, "--max-length", "126"), capsys, out2, "--max-length 126")


def test_unknown_model(tmp_path, capsys):
    """A missing model directory, and a directory holding no model."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    out = str(tmp_path / "m.safetensors")
    _assert_clean_failure(_write(str(tmp_path / "no-such-model"), inp, out), capsys, out, "no-such-model")
    os.makedirs(tmp_path / "empty-dir")
    _assert_clean_failure(_write(str(tmp_path / "empty-dir"), inp, out), capsys, out, "cannot load model")


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--lr", "-0.1", "--lr"),
        ("--steps", "-2", "--steps"),
        ("--steps", "0", "--steps"),
        ("--memory-tokens", "0", "--memory-tokens"),
        ("--clip-norm", "-1", "--clip-norm"),
        ("--batch-tokens", "0", "--batch-tokens"),
        ("--given-tokens", "-1", "--given-tokens"),
    ],
)
def test_bad_numbers(model_dir, tmp_path, capsys, flag, value, needle):
    """Negative or zero counts and step sizes."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    out = str(tmp_path / "m.safetensors")
    rc = cli.main(["write", "--model", model_dir, "--input", inp, "--output", out, flag, value])
    _assert_clean_failure(rc, capsys, out, needle)


def test_duplicate_ids_and_bad_id_types(model_dir, tmp_path, capsys):
    """Ids must be unique integers or strings."""
    out = str(tmp_path / "m.safetensors")
    inp = _jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "the cat"}, {"id": 1, "text": "a dog"}])
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "d.jsonl:2", "already used on line 1")
    inp = _jsonl(tmp_path / "e.jsonl", [{"id": 1.5, "text": "the cat"}])
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "e.jsonl:1", "integer or a string")


def test_missing_output_directory(model_dir, tmp_path, capsys):
    """The output's directory must exist."""
    inp = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    out = str(tmp_path / "no" / "m.safetensors")
    _assert_clean_failure(_write(model_dir, inp, out), capsys, out, "does not exist")


@pytest.mark.parametrize("path", ["reference", "engine"])
def test_writer_on_step_sees_every_step_loss(path):
    """The per-step callback (the CLI's progress) gets each step's [B] losses, equal to the result's."""
    from gradmem_fast import engine
    from gradmem_fast.packing import documents_from_batch, pack
    from tiny_models import tiny_model

    model = tiny_model("llama", dtype=torch.float32)
    cfg = WriteConfig(num_memory_tokens=2, steps=3, lr=0.3, optimizer="adam")
    ids = torch.randint(0, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    seen = []

    def on_step(k, losses):
        seen.append((k, losses.clone()))

    if path == "reference":
        result = MemoryWriter(model, cfg, backend="torch").write(ids, mask, on_step=on_step)
    else:
        M = torch.randn(2, 2, model.config.hidden_size) * 0.02
        head = model.get_output_embeddings()
        result = engine.write_packed(
            model, pack(documents_from_batch(ids, mask), 2, "cpu"), M, cfg, head.weight, None, "torch", on_step=on_step
        )
    assert [k for k, _ in seen] == [0, 1, 2]
    for k, losses in seen:
        assert losses.shape == (2,)
        assert_close(losses, result.losses[k], name=f"step {k} losses")


def _snapshot(directory):
    """Every file under ``directory``: relative path -> (is a symlink, bytes), to prove nothing changed."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            data = open(path, "rb").read() if os.path.exists(path) and not os.path.isdir(path) else None
            found[os.path.relpath(path, directory)] = (os.path.islink(path), data)
    return found


def assert_refused(argv, capsys, directory, *needles):
    """Exit 2, exactly one ``error:`` line on stderr, no traceback, and no file in ``directory`` created,
    changed or removed (inputs intact, nothing left behind)."""
    before = _snapshot(directory)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert _snapshot(directory) == before


def _output_cases(tmp_path, inp):
    """(name, output path, extra flags, message) of each output that would destroy data."""
    os.symlink(inp, tmp_path / "link.jsonl")
    os.link(inp, tmp_path / "hard.jsonl")
    (tmp_path / "old.safetensors").write_bytes(b"precious")
    rel = os.path.relpath(inp)
    return [
        ("same path", inp, [], "same file as --input"),
        ("same path, --force", inp, ["--force"], "same file as --input"),
        ("relative spelling", rel, ["--force"], "same file as --input"),
        ("symlink to the input", str(tmp_path / "link.jsonl"), ["--force"], "same file as --input"),
        ("hard link to the input", str(tmp_path / "hard.jsonl"), ["--force"], "same file as --input"),
        ("existing output", str(tmp_path / "old.safetensors"), [], "--force"),
    ]


def test_write_never_destroys_an_input_or_an_existing_output(model_dir, tmp_path, capsys):
    """The data-loss table: each case exits 2 with one line and leaves every file as it was."""
    inp = _jsonl(tmp_path / "docs.jsonl", _docs(2))
    for _case, out, extra, needle in _output_cases(tmp_path, inp):
        assert_refused(
            ["write", "--model", model_dir, "--input", inp, "--output", out, "--steps", "1", "--quiet", *extra],
            capsys,
            tmp_path,
            needle,
        )
    # --force replaces an existing output that is no input.
    old = str(tmp_path / "old.safetensors")
    assert _write(model_dir, inp, old, "--force") == 0
    assert fileio.MemoryFile(old).shape[0] == 2


def test_stop_rule_and_schedule_options_reach_the_writer(model_dir, tmp_path):
    """--stop loss=L,accuracy=A --check-every --slots --schedule --warmup --final-lr: the file's config says so,
    and the memories are the API's with the same WriteConfig (continuous batching = each document alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmem_fast.config import Schedule, StopRule

    inp = _jsonl(tmp_path / "docs.jsonl", _docs(3))
    out = str(tmp_path / "mem.safetensors")
    extra = ["--stop", "loss=3.5,accuracy=0.9", "--check-every", "2", "--slots", "2", "--schedule", "cosine"]
    assert _write(model_dir, inp, out, *extra, "--warmup", "1", "--final-lr", "0.1", "--steps", "5") == 0
    f = fileio.MemoryFile(out)
    config = json.loads(f.metadata["config"])
    assert config["stop"] == dict(loss=3.5, accuracy=0.9, exact=False, check_every=2)
    assert config["schedule"] == dict(kind="cosine", warmup=1, final=0.1) and config["steps"] == 5
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    write_config = WriteConfig(
        num_memory_tokens=3,
        steps=5,
        lr=0.05,
        optimizer="adam",
        stop=StopRule(loss=3.5, accuracy=0.9, exact=False, check_every=2),
        schedule=Schedule("cosine", warmup=1, final=0.1),
    )
    writer = MemoryWriter(model, write_config, backend="torch")
    for row, doc in enumerate(_docs(3)):
        ids = torch.tensor([tok(doc["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]])
        result = writer.write(ids)
        assert_close(f.rows([row])[0], result.memory[0], name=f"memory {row}")
        assert f.stats()["steps"][row] == result.stats.steps[0]


def _no_weights(*args, **kwargs):
    """Stands in for ``models.load_model`` where an input must be refused before any weights load."""
    raise AssertionError("the weights were loaded before the bad input was noticed")


@pytest.mark.parametrize(
    "rows,extra,needle",
    [
        ([{"text": "the cat"}, {"text": " "}], [], "empty document"),
        ([{"text": sentence(130)}], [], "--max-length 119"),  # 128 positions - 8 memory - [EOS]
        ([{"text": "the cat"}], ["--max-length", "120"], "--max-length 120"),
        ([{"text": "the cat"}], ["--memory-tokens", "127"], "no room"),
        ([{"text": "the cat"}], ["--device", "tpu"], "--device must be"),
        ([{"text": "the cat"}], ["--device", "cuda:3"], "--device"),
        ([{"text": "the cat"}], ["--dtype", "float8"], "--dtype"),
        ([{"text": "the cat"}], ["--stop", "exactly"], "--stop must be"),
        ([{"text": "the cat"}], ["--stop", "loss=low"], "--stop loss= needs a number"),
        ([{"text": "the cat"}], ["--stop", "accuracy=1.5"], "accuracy must be in (0, 1]"),
        ([{"text": "the cat"}], ["--check-every", "0"], "--check-every must be >= 1"),
        ([{"text": "the cat"}], ["--stop", "none", "--slots", "4"], "--slots needs a stop rule"),
        ([{"text": "the cat"}], ["--slots", "0"], "--slots must be >= 1"),
        ([{"text": "the cat"}], ["--final-lr", "2"], "--final-lr must be"),
        ([{"text": "the cat"}], ["--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_inputs_are_refused_before_the_weights_load(model_dir, tmp_path, capsys, monkeypatch, rows, extra, needle):
    """Documents (with the tokenizer), devices and dtypes: one error line, no weights loaded, nothing left."""
    from gradmem_fast import models

    monkeypatch.setattr(models, "load_model", _no_weights)
    inp = _jsonl(tmp_path / "d.jsonl", rows)
    assert_refused(
        [
            "write",
            "--model",
            model_dir,
            "--input",
            inp,
            "--output",
            str(tmp_path / "m.safetensors"),
            "--steps",
            "1",
            *extra,
        ],
        capsys,
        tmp_path,
        needle,
    )


def test_resume_says_when_it_discards_stale_shards(model_dir, tmp_path, capsys):
    """A shard of another run in OUTPUT.partial is announced as discarded."""
    inp = _jsonl(tmp_path / "docs.jsonl", _docs(3))
    out = str(tmp_path / "mem.safetensors")
    os.makedirs(fileio.checkpoint_dir(out))
    fileio.save_shard(fileio.checkpoint_dir(out), 1, torch.zeros(1, 3, 32), fingerprint="another run")
    assert _write(model_dir, inp, out, "--shard-size", "2") == 0
    assert "discarding 1 stale shard(s)" in capsys.readouterr().err


def test_version(capsys):
    """--version prints the package and library versions."""
    from gradmem_fast import __version__

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gradmem-fast {__version__} (torch ") and "transformers" in out


# Ten short paragraphs (the demo's four and six more of the same kind) for the opt-in real-model test.
PARAGRAPHS = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp for passing ships.",
    "Plants use photosynthesis to turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Maria baked bread on Sunday mornings, and the whole street woke up to the smell of warm crust.",
    "The night train to Lisbon left at seven, crossed two rivers and arrived just before noon.",
    "A small red kite drifted over the harbour while fishermen mended their nets on the pier.",
    "Honeybees dance in figure eights to tell the rest of the hive where the best flowers grow.",
    "After the storm, the children collected shells and smooth green glass along the empty beach.",
    "The library on Elm Street stays open late on Thursdays so students can study for their exams.",
    "Volcanic ash makes the soil around the mountain rich, so farmers grow grapes on its slopes.",
    "Grandfather kept a notebook of every bird he saw, with the date, the weather and a tiny sketch.",
)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GRADMEM_TEST_REAL_DEMO") != "1",
    reason="writes 10 paragraphs into the embedded 135M model with default options (minutes on "
    "a CPU); set GRADMEM_TEST_REAL_DEMO=1",
)
def test_default_options_on_the_embedded_model_decode_back(tmp_path, capsys):
    """Opt-in: `write` with default options on the embedded SmolLM2; `read --verify` decodes each memory
    greedily from the memory alone: at least 90% of the paragraphs come back exactly, and the accuracy the
    file stores says which."""
    from gradmem_fast.models import EMBEDDED_MODEL

    inp = _jsonl(tmp_path / "paragraphs.jsonl", [{"id": f"p{i}", "text": t} for i, t in enumerate(PARAGRAPHS)])
    out, answers = str(tmp_path / "mem.safetensors"), str(tmp_path / "answers.jsonl")
    assert cli.main(["write", "--model", EMBEDDED_MODEL, "--input", inp, "--output", out, "--device", "cpu"]) == 0
    queries = _jsonl(tmp_path / "q.jsonl", [{"id": f"p{i}", "text": ""} for i in range(len(PARAGRAPHS))])
    assert (
        cli.main(
            [
                "read",
                "--model",
                EMBEDDED_MODEL,
                "--memories",
                out,
                "--queries",
                queries,
                "--output",
                answers,
                "--verify",
                inp,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in open(answers, encoding="utf-8")]
    exact = [line["reproduces"] for line in lines]
    stored = fileio.MemoryFile(out).stats()["accuracy"].tolist()
    with capsys.disabled():
        print(
            f"\nembedded SmolLM2, default options: {sum(exact)}/{len(exact)} paragraphs decode back exactly; "
            f"stored teacher-forced accuracy {[round(a, 3) for a in stored]}"
        )
    assert [a == 1.0 for a in stored] == exact
    assert sum(exact) >= 0.9 * len(PARAGRAPHS)
    assert [line["answer"] for line, ok in zip(lines, exact) if ok] == [t for t, ok in zip(PARAGRAPHS, exact) if ok]


def test_demo_refuses_a_bad_device_before_loading(tmp_path, capsys, monkeypatch):
    """`demo --device tpu`: one error line, nothing loaded."""
    from gradmem_fast import models

    monkeypatch.setattr(models, "load_model", _no_weights)
    assert_refused(["demo", "--device", "tpu"], capsys, tmp_path, "--device must be")
