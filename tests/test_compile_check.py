"""The sm_90 compile check really compiles, and really fails on shared memory and spills."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(case, arch=90):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "compile_check_probe.py"), case, str(arch)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_small_kernel_compiles_for_sm90_and_sm80():
    for arch in (90, 80):
        rep = probe("fits", arch)
        assert rep["ok"], rep
        assert rep["registers"] > 0  # ptxas really ran on real PTX


def test_shared_memory_over_the_limit_and_spills_fail():
    rep = probe("too_much_shared")
    assert not rep["ok"]
    assert "shared memory" in rep["problems"] and rep["shared"] > 232448
    assert rep["spills"] > 0 and "spills" in rep["problems"]


def test_cli_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "gradmem_fast.tools.compile_check"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
