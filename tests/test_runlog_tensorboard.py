"""``--logdir`` TensorBoard event files: the scalars equal the JSON-lines log (read back with tensorboard's
EventAccumulator when it is installed; through a fake SummaryWriter always), and the format choice: auto
without tensorboard says so in one line, an explicit tensorboard without it is refused before any work."""

import json
import os

import numpy as np
import pytest

from gradmem_fast import cli, runlog
from tiny_local import save_tiny, sentence


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), initializer_range=0.3)


def _inp(tmp_path, n=3):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(3 + 2 * i, i)}) + "\n" for i in range(n)))
    return str(path)


def _write(model_dir, tmp_path, *extra):
    inp, out, logdir = _inp(tmp_path), str(tmp_path / "m"), str(tmp_path / "logs")
    base = ["write", "--model", model_dir, "--input", inp, "--output", out, "--memory-tokens", "2", "--quiet"]
    code = cli.main([*base, "--steps", "30", "--lr", "0.1", "--init-std", "0.5", "--check-every", "3", *extra])
    return code, logdir


def _capacity(model_dir, tmp_path, *extra):
    inp, logdir = _inp(tmp_path, 2), str(tmp_path / "logs")
    argv = ["capacity", "--model", model_dir, "--memory-tokens", "2", "--input", inp, "--quiet", "--lr", "0.05"]
    argv += ["--max-steps", "30", "--first", "2", "--init-std", "0.5", "--backoff", "bisect", *extra]
    return cli.main(argv), logdir


def _expected(path):
    """{(tag, step): value} of the JSON-lines log, by the documented mapping."""
    out = {}
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        if rec["event"] not in runlog.SCALARS:
            continue
        step_field, names = runlog.SCALARS[rec["event"]]
        for name in names:
            out[(f"{name}/{rec['id']}", rec[step_field])] = float(rec[name])
    return out


class FakeSummaryWriter:
    """Records ``add_scalar`` calls; ``instances`` collects every writer made."""

    instances: list = []

    def __init__(self, log_dir, flush_secs):
        self.log_dir, self.scalars, self.closed = log_dir, {}, False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        assert isinstance(value, float) and isinstance(global_step, int)
        assert (tag, global_step) not in self.scalars  # one value per tag and step
        self.scalars[(tag, global_step)] = value

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeSummaryWriter.instances = []
    monkeypatch.setattr(runlog, "_summary_writer_class", lambda: FakeSummaryWriter)
    monkeypatch.setattr(runlog, "tensorboard_installed", lambda: True)
    return FakeSummaryWriter.instances


def test_fake_writer_gets_the_json_scalars(model_dir, tmp_path, fake_tensorboard):
    """write (checks) and capacity (stages): every scalar of the JSON log, at its step, nothing else."""
    code, logdir = _write(model_dir, tmp_path, "--logdir", str(tmp_path / "logs"), "--log-format", "tensorboard")
    assert code == 0
    (tb,) = fake_tensorboard
    assert tb.log_dir == os.path.join(logdir, "write") and tb.closed
    expected = _expected(os.path.join(logdir, "write.jsonl"))
    assert tb.scalars == expected and any(tag.startswith("exact/") for tag, _ in expected)
    (tmp_path / "c").mkdir()
    code, logdir = _capacity(model_dir, tmp_path / "c", "--logdir", str(tmp_path / "c" / "logs"))
    assert code == 0
    tb = fake_tensorboard[-1]
    expected = _expected(os.path.join(logdir, "capacity.jsonl"))
    assert tb.scalars == expected and any(tag.startswith("proven/") for tag, _ in expected)


def test_stage_records_carry_kind_and_the_capacity_curve(model_dir, tmp_path, fake_tensorboard):
    """``proven`` is the running longest proven prefix and ends at the reported capacity."""
    out = str(tmp_path / "r.json")
    code, logdir = _capacity(model_dir, tmp_path, "--logdir", str(tmp_path / "logs"), "--output", out)
    assert code == 0
    report = json.load(open(out))
    stages = [json.loads(x) for x in open(os.path.join(logdir, "capacity.jsonl"))]
    stages = [r for r in stages if r["event"] == "stage"]
    for text in report["texts"]:
        mine = sorted((r for r in stages if r["id"] == text["id"]), key=lambda r: r["stage"])
        assert [r["kind"] for r in mine] == [s["kind"] for s in text["stages"]]
        curve = [r["proven"] for r in mine]
        assert curve == sorted(curve) and curve[-1] == text["capacity"]


@pytest.mark.skipif(not runlog.tensorboard_installed(), reason="tensorboard is not installed")
def test_event_files_read_back_equal_the_json_log(model_dir, tmp_path):
    """The real SummaryWriter: EventAccumulator reads back every scalar of the JSON log (stored as float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for command, run in (("write", _write), ("capacity", _capacity)):
        folder = tmp_path / command
        folder.mkdir()
        code, logdir = run(model_dir, folder, "--logdir", str(folder / "logs"), "--log-format", "tensorboard")
        assert code == 0
        acc = EventAccumulator(os.path.join(logdir, command), size_guidance={"scalars": 0})
        acc.Reload()
        got = {(tag, ev.step): ev.value for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)}
        expected = _expected(os.path.join(logdir, f"{command}.jsonl"))
        assert set(got) == set(expected) and len(expected) >= 6
        for key, value in expected.items():
            assert got[key] == np.float32(value), key


def test_without_tensorboard(model_dir, tmp_path, capsys, monkeypatch):
    """auto: JSON lines only and one line saying so; --log-format tensorboard: refused before any work."""
    monkeypatch.setattr(runlog, "_summary_writer_class", lambda: None)
    monkeypatch.setattr(runlog, "tensorboard_installed", lambda: False)
    code, logdir = _write(model_dir, tmp_path, "--logdir", str(tmp_path / "logs"))
    assert code == 0 and os.listdir(logdir) == ["write.jsonl"]
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    for command in (_write, _capacity):
        extra = ["--logdir", str(tmp_path / "l2"), "--log-format", "tensorboard", "--force"]
        code, _ = command(model_dir, tmp_path, *extra)
        assert code == 2
        assert "--log-format tensorboard needs the tensorboard package" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "l2")


def test_log_format_needs_logdir(model_dir, tmp_path, capsys):
    code, _ = _write(model_dir, tmp_path, "--log-format", "jsonl")
    assert code == 2 and "--log-format jsonl needs --logdir" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")
