"""The type check of the public API catches a wrong argument type at a call site (issue 18).

mypy runs once (tens of seconds cold) on a small user script written with ``mypy.ini``: every line marked
``# error`` must be reported, and the correct calls next to them must not be. A check that stopped seeing
the real signatures (a lazy ``__getattr__`` export typed ``Any``, a lost annotation) fails here.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = """\
import torch

from gradmem_fast import (
    MemoryReader,
    MemoryWriter,
    WriteConfig,
    linear_cross_entropy,
    memory_update,
    prefix_attention,
)

model = torch.nn.Linear(2, 2)
x = torch.zeros(1)
writer = MemoryWriter(model, WriteConfig(num_memory_tokens=4, steps=2), backend="torch")
memory: torch.Tensor = writer.write(x).memory
out: torch.Tensor = prefix_attention(x, x, x)
out_lse: tuple[torch.Tensor, torch.Tensor] = prefix_attention(x, x, x, return_lse=True)
loss: torch.Tensor = linear_cross_entropy(x, x, x, reduction="sum")
answers: list[str] = MemoryReader(model).answer(memory, [(0, "question")])
MemoryWriter(model, config="x")  # error
WriteConfig(steps="5")  # error
MemoryWriter(model, compile="yes")  # error
writer.write(x, attention_mask=[1, 1])  # error
memory_update(x, x, lr=1e-2, clip_norm="big")  # error
wrong: torch.Tensor = prefix_attention(x, x, x, return_lse=True)  # error
linear_cross_entropy(x, x, x, ignore_index="none")  # error
MemoryReader(model).generate(MemoryReader(model).prefix(memory), [0], ["text"])  # error
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (requirements-cpu.txt)")
def test_mypy_reports_wrong_argument_types_at_public_call_sites(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    expected = {i for i, line in enumerate(SCRIPT.splitlines(), 1) if line.endswith("# error")}
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini"), "--no-error-summary", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = run.stdout + run.stderr
    reported = {int(m.group(1)) for m in re.finditer(r"user_script\.py:(\d+): error:", report)}
    assert run.returncode == 1, report
    assert reported == expected, (
        f"missed lines {sorted(expected - reported)}, extra {sorted(reported - expected)}\n{report}"
    )
