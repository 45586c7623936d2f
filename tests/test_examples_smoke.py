"""Smoke tests of every script in examples/ (each in seconds), so the examples cannot rot.

* ``train_kv_retrieval.py``: tests/test_example_kv.py (generator, tokenizer, two meta steps, the command line,
  the curriculum checkpoint);
* ``plot_kv_curves.py``: plots the committed curves (one run and a chained two-stage curriculum) into a PNG;
* ``kv_gpu_curriculum.sh``: ``bash -n``, then the script itself runs with a stand-in ``python`` on PATH that
  records its arguments, and every recorded invocation must parse with train_kv_retrieval's own parser (the
  flags exist and take the values given) and chain its stages through ``--save``/``--init-from``.
"""

import importlib.util
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = EXAMPLES / "results"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_test():
    covered = {"train_kv_retrieval.py", "plot_kv_curves.py", "kv_gpu_curriculum.sh"}
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts <= covered, f"examples without a smoke test: {sorted(scripts - covered)}"


def test_plot_kv_curves(tmp_path):
    plot = load("plot_kv_curves.py")
    out = tmp_path / "curves.png"
    one = RESULTS / "A1_1pair_recipe.json"
    chained = f"{RESULTS / 'C1_1pair_ilr0.3_b32.json'}+{RESULTS / 'C2_2pairs_ilr0.3_b32.json'}"
    plot.main([str(out), f"1 pair={one}", f"2 pairs, curriculum={chained}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    label, points, bounds = plot.load(f"curriculum={chained}")
    assert label == "curriculum" and len(bounds) == 1
    steps = [p[0] for p in points]
    assert steps == sorted(steps) and bounds[0] in steps  # stage 2 continues where stage 1 ended


def test_plot_kv_curves_usage():
    with pytest.raises(SystemExit) as exc:
        load("plot_kv_curves.py").main(["only-an-output.png"])
    assert "usage" in str(exc.value).lower() or "plot_kv_curves" in str(exc.value)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_kv_gpu_curriculum_script(tmp_path):
    script = EXAMPLES / "kv_gpu_curriculum.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)

    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls"
    record.mkdir()
    fake = bindir / "python"  # one file per call: call0, call1, ... holding its arguments NUL-separated
    fake.write_text(f'#!/usr/bin/env bash\nn=$(ls "{record}" | wc -l)\nprintf "%s\\0" "$@" > "{record}/call$n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "runs"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "STAGES": "16 32 64", "K64": "5"}
    subprocess.run(["bash", str(script), str(out)], cwd=ROOT, env=env, check=True, capture_output=True)

    files = sorted(record.iterdir(), key=lambda p: int(p.name.removeprefix("call")))
    calls = [p.read_text().split("\0")[:-1] for p in files]
    assert len(calls) == 3
    kv = load("train_kv_retrieval.py")
    prev = None
    for pairs, call in zip((16, 32, 64), calls):
        assert call[0] == "examples/train_kv_retrieval.py"
        args = kv.parse_args(call[1:])  # an unknown flag or a bad value exits here
        assert args.pairs == pairs and args.save == str(out / f"p{pairs}")
        assert args.init_from == (None if prev is None else str(out / f"p{prev}"))
        assert args.inner_steps == (5 if pairs >= 64 else 2)
        prev = pairs
