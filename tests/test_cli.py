"""Command line entry points."""
import subprocess
import sys

from gradmem_fast import cli


def test_demo_runs_and_loss_falls(capsys):
    from gradmem_fast import demo

    result = demo.run(steps=3, docs=2, length=6, backend="torch")
    assert result.losses.shape == (3, 2)
    assert (result.losses[-1] < result.losses[0]).all()
    assert "memory vectors" in capsys.readouterr().out


def test_unknown_command_fails_cleanly(capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gradmem_fast", "demo", "--steps", "0"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "--steps" in out.stderr and "Traceback" not in out.stderr
