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
