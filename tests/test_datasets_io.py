"""Documents from ``datasets`` sources (save_to_disk folders, parquet, csv, arrow, json) for write and capacity:
the rows selected by --offset/--limit, ids, and every bad source named by its flag."""

import argparse
import json

import pytest
import torch

datasets = pytest.importorskip("datasets")

from gradmem_fast import cli, datasets_io, fileio  # noqa: E402
from gradmem_fast.errors import UserError  # noqa: E402
from tiny_local import save_tiny, sentence  # noqa: E402

ROWS = {"text": [sentence(3 + i, i) for i in range(5)], "key": [f"d{i}" for i in range(5)]}


def _args(**kw):
    base = dict(
        input=None,
        dataset=None,
        dataset_config=None,
        split=None,
        input_format="auto",
        offset=0,
        limit=None,
        text_field="text",
        id_field="key",
    )
    base.update(kw)
    return argparse.Namespace(**base)


def _sources(tmp_path):
    """The same rows as a save_to_disk folder and as parquet, csv, arrow and json-lines files."""
    ds = datasets.Dataset.from_dict(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    ds.to_json(str(tmp_path / "rows.json"))
    ds.data.table  # noqa: B018  (the arrow file below is written from the same table)
    import pyarrow as pa

    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    return {
        "saved": {"input": str(tmp_path / "saved")},
        "parquet": {"input": str(tmp_path / "rows.parquet")},
        "csv": {"input": str(tmp_path / "rows.csv")},
        "arrow": {"input": str(tmp_path / "rows.arrow")},
        "json": {"input": str(tmp_path / "rows.json"), "input_format": "datasets"},
    }


@pytest.mark.parametrize("kind", ["saved", "parquet", "csv", "arrow", "json"])
@pytest.mark.parametrize("offset,limit", [(0, None), (1, 3), (4, 10)])
def test_every_source_gives_the_selected_rows(tmp_path, kind, offset, limit):
    source = _sources(tmp_path)[kind]
    records = datasets_io.read_records(_args(offset=offset, limit=limit, **source))
    end = 5 if limit is None else min(5, offset + limit)
    assert [r.text for r in records] == ROWS["text"][offset:end]
    assert [r.id for r in records] == ROWS["key"][offset:end]
    # the 1-based row number of the source, whatever the offset
    assert [r.line for r in records] == list(range(offset + 1, end + 1))


def test_missing_ids_default_to_the_row_number(tmp_path):
    source = _sources(tmp_path)["parquet"]
    records = datasets_io.read_records(_args(id_field="nothing", offset=2, **source))
    assert [r.id for r in records] == [2, 3, 4]


def test_jsonl_path_keeps_line_numbers_and_takes_offset_and_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "key": k}) for t, k in zip(ROWS["text"], ROWS["key"])) + "\n")
    records = datasets_io.read_records(_args(input=str(path), offset=1, limit=2))
    assert [(r.line, r.id) for r in records] == [(2, "d1"), (3, "d2")]
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: invalid JSON"):
        datasets_io.read_records(_args(input=str(path)))


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"text_field": "body"}, "--text-field"),
        ({"offset": 5}, "--offset 5 is past the end"),
        ({"offset": -1}, "--offset must be >= 0"),
        ({"limit": 0}, "--limit must be >= 1"),
        ({"split": "train"}, "--split"),
        ({"dataset_config": "x"}, "--config"),
        ({"dataset": "someone/thing"}, "exactly one source"),
    ],
)
@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_bad_selections_name_the_flag(tmp_path, kw, needle, kind):
    source = _sources(tmp_path)[kind]
    with pytest.raises(UserError, match=needle):
        datasets_io.read_records(_args(**{**source, **kw}))


def test_bad_values_name_the_row(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"], "key": [1.5, 2.5]}).to_parquet(str(tmp_path / "f.parquet"))
    with pytest.raises(UserError, match=r"f.parquet:1: column 'key' \(--id-field\)"):
        datasets_io.read_records(_args(input=str(tmp_path / "f.parquet")))
    datasets.Dataset.from_dict({"text": ["a", None], "key": [1, 2]}).to_parquet(str(tmp_path / "g.parquet"))
    with pytest.raises(UserError, match=r"g.parquet:2: column 'text' must hold strings"):
        datasets_io.read_records(_args(input=str(tmp_path / "g.parquet")))
    datasets.Dataset.from_dict({"text": ["a", "b"], "key": [1, 1]}).to_parquet(str(tmp_path / "h.parquet"))
    with pytest.raises(UserError, match=r"h.parquet:2: id 1 was already used on row 1"):
        datasets_io.read_records(_args(input=str(tmp_path / "h.parquet")))


def test_dataset_dict_folder_needs_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS), "test": datasets.Dataset.from_dict(ROWS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"several splits \['test', 'train'\]: pick one with --split"):
        datasets_io.read_records(_args(input=str(tmp_path / "dd")))
    records = datasets_io.read_records(_args(input=str(tmp_path / "dd"), split="test", limit=2))
    assert [r.id for r in records] == ["d0", "d1"]


def test_a_plain_folder_and_an_unknown_suffix_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not one written by save_to_disk"):
        datasets_io.read_records(_args(input=str(tmp_path / "empty")))
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(UserError, match="--input-format datasets reads"):
        datasets_io.read_records(_args(input=str(tmp_path / "x.txt"), input_format="datasets"))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"--dataset 'someone/thing': cannot load it from the Hugging Face Hub"):
        datasets_io.read_records(_args(dataset="someone/thing"))


# ---------------------------------------------------------------------------------------------------------
# Through the commands


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _write(model_dir, out, *source):
    base = ["write", "--model", model_dir, "--output", out, "--steps", "3", "--memory-tokens", "2", "--quiet"]
    return cli.main([*base, "--lr", "0.05", "--id-field", "key", "--stop", "none", *source])


def test_write_from_a_saved_folder_equals_write_from_json_lines(model_dir, tmp_path):
    sources = _sources(tmp_path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "key": k}) for t, k in zip(ROWS["text"], ROWS["key"])))
    assert _write(model_dir, str(tmp_path / "a.safetensors"), "--input", str(jsonl), "--offset", "1") == 0
    assert (
        _write(model_dir, str(tmp_path / "b.safetensors"), "--input", sources["saved"]["input"], "--offset", "1") == 0
    )
    a, b = fileio.MemoryFile(str(tmp_path / "a.safetensors")), fileio.MemoryFile(str(tmp_path / "b.safetensors"))
    assert a.ids == b.ids == ROWS["key"][1:]
    assert torch.equal(a.rows(range(4)), b.rows(range(4)))


def test_write_refuses_two_sources_and_a_bad_offset(model_dir, tmp_path, capsys):
    src = _sources(tmp_path)["parquet"]["input"]
    out = str(tmp_path / "o.safetensors")
    assert _write(model_dir, out, "--input", src, "--dataset", "x/y") == 2
    assert "exactly one source" in capsys.readouterr().err
    assert _write(model_dir, out, "--input", src, "--offset", "9") == 2
    assert "--offset 9 is past the end" in capsys.readouterr().err
    assert _write(model_dir, out, "--input", src, "--text-field", "body") == 2
    assert "--text-field" in capsys.readouterr().err


def test_capacity_reads_a_parquet_file(model_dir, tmp_path, capsys):
    src = _sources(tmp_path)["parquet"]["input"]
    out = str(tmp_path / "r.json")
    argv = ["capacity", "--model", model_dir, "--memory-tokens", "2", "--input", src, "--id-field", "key"]
    argv += ["--max-steps", "2", "--first", "2", "--quiet", "--offset", "3", "--output", out]
    assert cli.main(argv) == 0
    assert [t["id"] for t in json.load(open(out))["texts"]] == ["d3", "d4"]
