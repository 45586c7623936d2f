"""Dry run of ``make mutation`` (scripts/mutation.py): the tool's mutants of one small file, run against its
tests, come back killed where a test notices and survived where none does, and the report counts them.

A throwaway module in a temporary folder (never the checkout): ``double`` has a test, ``LIMIT`` has none.
"""

import importlib.util
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE = """def double(x):
    return x * 2


LIMIT = 3
"""

TESTS = """from mod import double


def test_double():
    assert double(3) == 6
"""


def _script():
    spec = importlib.util.spec_from_file_location("_mutation_script", os.path.join(ROOT, "scripts", "mutation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutation_tool_dry_run(tmp_path, monkeypatch):
    script = _script()
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "test_mod.py").write_text(TESTS)
    monkeypatch.setitem(script.TARGETS, "mod.py", (("test_mod.py",), None))

    mutants = script.enumerate_mutants(str(tmp_path), "mod.py")
    lines = {m[0].line.strip() for m in mutants}
    assert lines == {"return x * 2", "LIMIT = 3"}, "the tool mutates the call and the constant"

    record = script._run_file(str(tmp_path), "mod.py", max_n=len(mutants), deadline=time.monotonic() + 120, timeout=60)
    verdicts = {row["key"].split(":", 1)[1].rsplit("|", 1)[0]: row["verdict"] for row in record["rows"]}
    assert verdicts == {"return x * 2": "killed", "LIMIT = 3": "survived"}, record["rows"]
    assert (tmp_path / "mod.py").read_text() == MODULE, "every mutant is restored"

    out = tmp_path / "report"
    out.mkdir()
    (out / "mod.json").write_text(json.dumps(dict(record, date="today")))
    text = script.write_report(str(out))
    assert "| mod.py |" in text and "NOT TRIAGED" in text
    killed = sum(v == "killed" for v in verdicts.values())
    rate = f"{100 * killed / len(verdicts):.1f}%"
    assert f"**{rate} / {rate}**" in text, text  # as run / after triage (nothing triaged here)
