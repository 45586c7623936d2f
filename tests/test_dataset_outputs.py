"""``--output-format dataset``: write's rows equal its safetensors file, read accepts the folder, capacity's
rows are its stages, and a failing or refused command leaves nothing behind."""

import json
import os

import pytest
import torch

datasets = pytest.importorskip("datasets")

from gradmem_fast import cli, dataset_files, fileio  # noqa: E402
from tiny_local import save_tiny, sentence  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Mixed ids (strings and the default line numbers) take the JSON id format.
DOCS = [{"text": sentence(3 + 2 * i, i), **({"id": f"doc-{i}"} if i % 2 else {})} for i in range(4)]


def _write(model_dir, inp, out, *extra):
    base = ["write", "--model", model_dir, "--input", inp, "--output", out, "--steps", "3", "--memory-tokens", "2"]
    return cli.main([*base, "--lr", "0.05", "--quiet", "--shard-size", "3", *extra])


@pytest.mark.parametrize("stop", ["exact", "none"])
def test_dataset_rows_equal_the_memory_file(model_dir, tmp_path, stop):
    inp = _jsonl(tmp_path / "d.jsonl", DOCS)
    st, folder = str(tmp_path / "m.safetensors"), str(tmp_path / "m_ds")
    assert _write(model_dir, inp, st, "--stop", stop) == 0
    assert _write(model_dir, inp, folder, "--stop", stop, "--output-format", "dataset") == 0
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "m.safetensors", "m_ds"]  # no temporary left
    a, b = fileio.MemoryFile(st), dataset_files.open_memories(folder)
    assert isinstance(b, dataset_files.MemoryDataset)
    assert a.ids == b.ids == [0, "doc-1", 2, "doc-3"] and a.shape == b.shape
    assert torch.equal(a.rows(range(4)), b.rows(range(4)))
    sa, sb = a.stats(), b.stats()
    assert sa.keys() == sb.keys() == set(fileio.DOC_STATS)
    for name in fileio.DOC_STATS:
        assert torch.equal(sa[name], sb[name]), name
    assert b.config() == a.config() and b.metadata["weights_signature"] == a.metadata["weights_signature"]
    # An ordinary dataset for anyone else: texts and the token ids that were written.
    ds = datasets.load_from_disk(folder)
    assert ds["text"] == [d["text"] for d in DOCS]
    assert [len(t) for t in ds["token_ids"]] == [len(d["text"].split()) + 1 for d in DOCS]  # + end-of-text


def test_read_accepts_the_dataset_folder(model_dir, tmp_path):
    inp = _jsonl(tmp_path / "d.jsonl", DOCS)
    st, folder = str(tmp_path / "m.safetensors"), str(tmp_path / "m_ds")
    assert _write(model_dir, inp, st) == 0
    assert _write(model_dir, inp, folder, "--output-format", "dataset") == 0
    queries = _jsonl(tmp_path / "q.jsonl", [{"id": "doc-1", "text": ""}, {"id": 2, "text": "the cat"}])
    answers = []
    for mem, name in ((st, "a1.jsonl"), (folder, "a2.jsonl")):
        out = str(tmp_path / name)
        argv = ["read", "--model", model_dir, "--memories", mem, "--queries", queries, "--output", out]
        assert cli.main([*argv, "--quiet", "--max-new-tokens", "4", "--verify", inp]) == 0
        answers.append(open(out).read())
    assert answers[0] == answers[1]


def test_a_failing_write_leaves_no_folder(model_dir, tmp_path, monkeypatch):
    inp = _jsonl(tmp_path / "d.jsonl", DOCS)
    original = datasets.Dataset.save_to_disk

    def broken(self, *args, **kwargs):
        original(self, *args, **kwargs)  # the folder is complete: the failure comes before the rename
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(model_dir, inp, str(tmp_path / "out"), "--output-format", "dataset")
    # no output and no temporary folder; the finished shards stay for a rerun to resume (as with safetensors)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "out.partial"]


def test_only_our_folders_are_replaced(model_dir, tmp_path, capsys):
    inp = _jsonl(tmp_path / "d.jsonl", DOCS[:1])
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    assert _write(model_dir, inp, str(other), "--output-format", "dataset", "--force") == 2
    assert "not a gradmem-fast dataset folder" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "precious"
    ours = str(tmp_path / "ours")
    assert _write(model_dir, inp, ours, "--output-format", "dataset") == 0
    assert _write(model_dir, inp, ours, "--output-format", "dataset") == 2
    assert "--force" in capsys.readouterr().err
    assert _write(model_dir, inp, ours, "--output-format", "dataset", "--force", "--steps", "1") == 0
    assert dataset_files.open_memories(ours).stats()["steps"].tolist() == [1]


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory):
    """A tiny model whose memories learn a few tokens in a few steps (as in test_capacity)."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "learnable"), initializer_range=0.3)


def test_capacity_dataset_has_a_row_per_stage(learnable_dir, tmp_path):
    model_dir = learnable_dir
    inp = _jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": sentence(9)}, {"id": "b", "text": sentence(5, 2)}])
    folder = str(tmp_path / "cap")
    argv = ["capacity", "--model", model_dir, "--memory-tokens", "2", "--input", inp, "--quiet", "--lr", "0.05"]
    argv += ["--max-steps", "40", "--first", "2", "--init-std", "0.5", "--output", folder]
    assert cli.main([*argv, "--output-format", "dataset"]) == 0
    ds = datasets.load_from_disk(folder)
    report = json.loads(json.load(open(os.path.join(folder, dataset_files.MARKER)))["report"])
    expected = [
        (t["id"], s, st["target"], st["steps"], st["exact"], st["prefix"], st["kind"])
        for t in report["texts"]
        for s, st in enumerate(t["stages"])
    ]
    got = list(zip(ds["id"], ds["stage"], ds["target"], ds["steps"], ds["converged"], ds["prefix"], ds["kind"]))
    assert got == expected and len(expected) >= 3
    memories = ds.with_format("torch")[:]["memory"]
    assert memories.shape == (len(expected), 2, 32) and torch.isfinite(memories).all()
    # consecutive stages of a text differ (each stage moved its memory) unless it took no step
    assert all(not torch.equal(memories[r], memories[r + 1]) for r in range(len(expected) - 1) if got[r + 1][3] > 0)
