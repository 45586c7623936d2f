"""``torchrun --nproc-per-node 2 -m gradmem_fast write``: two CPU processes (gloo) shard the documents."""

import json
import os
import subprocess
import sys

import pytest

from gradmem_fast import cli, fileio
from gradmem_fast.distributed import Context
from helpers import assert_close
from tiny_local import save_tiny, sentence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_robin_shards():
    """Shards go round robin over the ranks."""
    assert Context(rank=1, world_size=3).my_shards(8) == [1, 4, 7]
    assert Context().my_shards(3) == [0, 1, 2]


def test_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    """torchrun with 2 gloo processes writes the file a single process writes."""
    model_dir = save_tiny(str(tmp_path / "model"))
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": sentence(3 + i % 4, i)}) + "\n" for i in range(7)))
    opts = [
        "--model",
        model_dir,
        "--input",
        str(inp),
        "--steps",
        "2",
        "--memory-tokens",
        "3",
        "--shard-size",
        "2",
        "--device",
        "cpu",
    ]
    single = str(tmp_path / "single.safetensors")
    assert cli.main(["write", *opts, "--output", single, "--quiet"]) == 0

    sharded = str(tmp_path / "sharded.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "gradmem_fast",
            "write",
            *opts,
            "--output",
            sharded,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 4 shards of <= 2 documents, round robin: rank 0 writes shards 0 and 2, rank 1 shards 1 and 3.
    assert "rank 0/2: wrote 2 shard(s), 4 document(s)" in proc.stderr
    assert "rank 1/2: wrote 2 shard(s), 3 document(s)" in proc.stderr
    a, b = fileio.MemoryFile(single), fileio.MemoryFile(sharded)
    assert a.ids == b.ids == list(range(7))
    assert a.metadata == b.metadata
    # Same batches in both runs; only the processes' thread counts differ (torchrun sets one thread each).
    assert_close(b.rows(range(7)), a.rows(range(7)), name="sharded memories")
    assert not os.path.exists(fileio.checkpoint_dir(sharded))


@pytest.mark.parametrize("world", [2])
def test_bad_input_fails_on_every_rank_without_output(tmp_path, world):
    """A bad input line fails every rank the same way, with no output."""
    inp = tmp_path / "docs.jsonl"
    inp.write_text('{"text": "the cat"}\n{"text": \n')
    out = str(tmp_path / "m.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(world),
            "-m",
            "gradmem_fast",
            "write",
            "--model",
            str(tmp_path / "none"),
            "--input",
            str(inp),
            "--output",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode != 0
    # Every rank fails on the same line; torchrun stops the others once the first exits, so a rank that
    # is slower to get there may be stopped before it prints.
    assert proc.stderr.count("docs.jsonl:2: invalid JSON") >= 1
    assert not os.path.exists(out)


def _torchrun(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, "-m", "gradmem_fast", *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )


def test_capacity_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    """capacity under torchrun with 2 gloo processes: texts round robin over the ranks, one merged report in
    input order equal to the single-process report (fp64: the integers exactly, the gains to rounding),
    a back-off search included; each rank logs its own texts."""
    model_dir = save_tiny(str(tmp_path / "model"), initializer_range=0.3)
    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "text": sentence(4 + 3 * i, i)}) + "\n" for i in range(5)))
    opts = ["--model", model_dir, "--input", str(inp), "--memory-tokens", "2", "--device", "cpu"]
    opts += ["--dtype", "float64", "--max-steps", "30", "--lr", "0.05", "--init-std", "0.5", "--first", "2"]
    opts += ["--backoff", "bisect"]
    single = str(tmp_path / "single.json")
    assert cli.main(["capacity", *opts, "--output", single, "--quiet"]) == 0
    sharded = str(tmp_path / "sharded.json")
    logdir = str(tmp_path / "logs")
    proc = _torchrun(["capacity", *opts, "--output", sharded, "--logdir", logdir, "--log-format", "jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: searched 3 text(s)" in proc.stderr and "rank 1/2: searched 2 text(s)" in proc.stderr
    a, b = json.load(open(single)), json.load(open(sharded))
    assert a["processes"] == 1 and b["processes"] == 2
    for report in (a, b):  # what may differ: the timing and the processes' thread counts
        for key in ("wall_seconds", "threads", "processes"):
            report.pop(key)
    gains_a = [t.pop("info_gain_bits") for t in a["texts"]]
    gains_b = [t.pop("info_gain_bits") for t in b["texts"]]
    assert [t["id"] for t in b["texts"]] == [f"t{i}" for i in range(5)]
    assert b["texts"] == a["texts"] and any(s["kind"] == "bisect" for t in a["texts"] for s in t["stages"])
    assert gains_b == pytest.approx(gains_a, rel=1e-9)
    for name in ("texts", "complete", "total_steps", "mean_capacity", "median_capacity"):
        assert b["summary"][name] == a["summary"][name]
    assert {k: v for k, v in a.items() if k not in ("summary", "texts")} == {
        k: v for k, v in b.items() if k not in ("summary", "texts")
    }
    # rank 0 logged texts 0, 2, 4; rank 1 texts 1, 3
    for name, ids in (("capacity.jsonl", {"t0", "t2", "t4"}), ("capacity.rank1.jsonl", {"t1", "t3"})):
        recs = [json.loads(line) for line in open(os.path.join(logdir, name))]
        assert {r["id"] for r in recs if r["event"] == "stage"} == ids
