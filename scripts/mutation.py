"""Mutation testing by a tool: mutmut 2.x's mutation operators over the files where a one-line bug is silent.

    python scripts/mutation.py                       # every target file, sampled, within --budget seconds
    python scripts/mutation.py --file gradmem_fast/scoring.py --max 10
    python scripts/mutation.py --report              # rebuild the summary from the stored per-file results
    python scripts/mutation.py --list                # how many mutants each file has, and its tests

mutmut (pinned in requirements-cpu.txt) generates the mutants: ``mutmut.list_mutations`` enumerates every
mutation of a file (numbers +1, swapped operators and comparisons, flipped keywords, assignments to None,
dropped decorators, ...) and ``mutmut.mutate`` applies one. This script does the rest, like
scripts/mutants.py: it copies the working tree into a scratch folder (the checkout is never touched: other
agents work in it), runs each file's focused test selection on the unmutated copy (it must pass), then for
each sampled mutant writes the mutated file into the copy, runs the selection (``pytest -x``) and restores
the file. Killed = the tests fail (or time out); survived = they pass. ``mutmut run`` itself is not used:
it runs one test command for every file and keeps a cache database; per-file selections are what make this
affordable under the Triton interpreter.

Sampling is deterministic: a file's mutants are ordered by a hash of (file, line text, index on the line),
so adding a mutant elsewhere does not reshuffle the sample, and the first ``--max`` are run. Not generated:
mutants of exception message texts (a wrong message is not a silent wrong result), of lines outside a file's
``lines`` filter (the cross-entropy kernels: only masking lines), and of ``# pragma: no mutate`` lines.

Results go to benchmarks/results/mutation/<file>.json (one per target; a later run of the same file
replaces it) and benchmarks/results/mutation/README.md (summary, kill rate and every survivor with its
triage from TRIAGE below: the test that now kills it, or the reason it is equivalent).
"""

import argparse
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "mutation")

_spec = importlib.util.spec_from_file_location("_hand_mutants", os.path.join(ROOT, "scripts", "mutants.py"))
_mutants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mutants)

# Lines of the fused cross-entropy kernels whose job is masking (ignored targets, row/column tails, padded
# loads); the launchers' compile specifications are the compile check's business.
_CE_MASK = (
    re.compile(r"mask|valid|ignore_index|rows_ok|n_ok|cols_ok|n_load|other=|-inf"),
    ("_grad_tile", "_row_scale", "_grad_sweep", "ce_forward_kernel", "ce_grad_kernel", "ce_dh_kernel", "ce_dw_kernel"),
)

# file -> (pytest arguments of its focused selection, line filter or None)
TARGETS = {
    "kernels/attention_common.py": (
        (
            "tests/test_attention_boundaries.py",
            "tests/test_attention.py",
            "-k",
            "16x16 or 32x16 or varlen_ragged or key_padding_left_right or dropout_same_mask",
        ),
        None,
    ),
    "kernels/update.py": (
        ("tests/test_option_matrix.py", "tests/test_update.py", "-k", "update_op and triton32 or epsilon or formula"),
        None,
    ),
    "gradmem_fast/ops/update.py": (
        ("tests/test_option_matrix.py", "tests/test_update_per_sample.py", "-k", "update_op or epsilon or torch"),
        None,
    ),
    "gradmem_fast/packing.py": (
        (
            "tests/test_packing.py",
            "tests/test_packing_plan.py",
            "tests/test_given_tokens.py",
            "-k",
            "pack or engine_write",
        ),
        None,
    ),
    "gradmem_fast/reference.py": (
        (
            "tests/test_option_matrix.py",
            "tests/test_reference.py",
            "-k",
            "write_matrix and reference or sgd_matches_eager_all_families and gpt2 or left_padding or read_logits",
        ),
        None,
    ),
    "kernels/cross_entropy.py": (
        ("tests/test_cross_entropy.py", "-k", "triton and (packed_all or ignored or single_token or kernels_directly)"),
        _CE_MASK,
    ),
    "gradmem_fast/scoring.py": (
        (
            "tests/test_scoring.py",
            "tests/test_cramming.py",
            "tests/test_given_tokens.py",
            "-k",
            "scor or ignored or no_memory or rules",
        ),
        None,
    ),
}

# Survivors triaged by hand: key "file:line text|index" -> why the mutant is equivalent, or the test that kills
# it now. Keys come from the report (`key` of each survivor).
TRIAGE: dict = {}


def _key(mid) -> str:
    return f"{mid.filename}:{mid.line.strip()}|{mid.index}"


def _order(mid) -> str:
    return hashlib.sha1(_key(mid).encode()).hexdigest()


def _is_message(mid, source_lines, diff) -> bool:
    """A string mutant (mutmut wraps the text in "XX") of an error or warning message: not a computed value."""
    if len(diff) != 2 or diff[1][1:].replace("XX", "") != diff[0][1:].replace("XX", ""):
        return False
    window = "".join(source_lines[max(0, mid.line_number - 3) : mid.line_number + 1])
    return bool(re.search(r"raise |Error\(|warn\(|SystemExit\(", window))


def _function_lines(source: str, names) -> set:
    import ast

    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def enumerate_mutants(root: str, path: str, line_filter=None) -> list:
    """(mutation id, mutated source, one-line diff) for every kept mutant of ``path``, in sampling order.
    ``line_filter``: None, or (regex a mutated line must match, names of the functions it must lie in)."""
    from mutmut import Context, list_mutations, mutate

    with open(os.path.join(root, path)) as f:
        source = f.read()
    lines = source.splitlines(True)
    inside = _function_lines(source, line_filter[1]) if line_filter else None
    kept = []
    for mid in list_mutations(Context(source=source, filename=path)):
        if "pragma: no mutate" in mid.line:
            continue
        if line_filter is not None and (not line_filter[0].search(mid.line) or mid.line_number + 1 not in inside):
            continue
        mutated, n = mutate(Context(source=source, filename=path, mutation_id=mid))
        if n != 1 or mutated == source:
            continue
        diff = [
            ln.rstrip("\n")
            for ln in difflib.unified_diff(lines, mutated.splitlines(True), n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
        ]
        if _is_message(mid, lines, diff):
            continue
        kept.append((mid, mutated, diff))
    kept.sort(key=lambda t: _order(t[0]))
    return kept


def _run_file(scratch: str, path: str, max_n: int, deadline: float, timeout: float, keys=()) -> dict:
    tests, line_filter = TARGETS[path]
    everything = enumerate_mutants(scratch, path, line_filter)
    sample = [m for m in everything if _key(m[0]) in keys] if keys else everything[:max_n]
    record = {"file": path, "tests": list(tests), "generated": len(everything), "sampled": len(sample), "rows": []}
    rc, out, secs = _mutants._pytest(scratch, tests, timeout)
    record["baseline_s"] = round(secs, 1)
    print(f"{path}: {len(everything)} mutants, sample {len(sample)}; baseline {rc} in {secs:.0f}s", flush=True)
    if rc != 0:
        record["baseline_error"] = out[-3000:]
        print(out[-3000:], file=sys.stderr)
        return record
    target = os.path.join(scratch, path)
    with open(target) as f:
        original = f.read()
    # A mutant that hangs the interpreter counts as killed after a few times the baseline.
    per_mutant = min(timeout, max(120.0, 4 * secs))
    for mid, mutated, diff in sample:
        if time.monotonic() > deadline:
            record["stopped_at_budget"] = True
            break
        with open(target, "w") as f:
            f.write(mutated)
        try:
            rc, out, secs = _mutants._pytest(scratch, tests, per_mutant)
        finally:
            with open(target, "w") as f:
                f.write(original)
        verdict = {0: "survived", 1: "killed", "timeout": "timeout"}.get(rc, f"error {rc}")
        if isinstance(rc, int) and rc < 0:
            verdict = f"crash (signal {-rc})"  # the interpreter died on the mutant (e.g. a dropped load mask)
        failed = next((ln[7:140] for ln in out.splitlines() if ln.startswith("FAILED")), "")
        row = {"key": _key(mid), "line": mid.line_number + 1, "diff": diff, "verdict": verdict, "s": round(secs, 1)}
        row["first_failure"] = failed
        record["rows"].append(row)
        print(f"  {verdict:8s} {secs:5.0f}s {path}:{mid.line_number + 1} {' / '.join(diff)[:150]}", flush=True)
    return record


def _crashed(verdict: str) -> bool:
    return verdict.startswith("crash") or verdict.startswith("error -")


def write_report(out_dir: str = OUT) -> str:
    """Merge the per-file results into README.md (kill rate, survivors with their triage); returns its text."""
    records = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                records.append(json.load(f))
    lines = [
        "# Mutation testing (scripts/mutation.py, mutmut 2.5.1 operators)",
        "",
        "Generated by `python scripts/mutation.py --report` from the per-file JSON files beside it.",
        "Killed includes timeouts (a mutant that hangs the tests) and crashes of the test process.",
        "Equivalent survivors are triaged in scripts/mutation.py's TRIAGE (reason) and excluded from the",
        "denominator of the rate.",
        "",
        "Kill rate: killed / (run - equivalent - errors), as run / after triage (survivors that a test added",
        "since kills, each checked by re-running the mutant: TRIAGE entries starting with 'killed').",
        "",
        "| file | generated | run | killed | survived | equivalent | errors | kill rate (as run / triaged) | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tot = dict(run=0, killed=0, survived=0, equivalent=0, errors=0, later=0)
    survivors = []
    for r in records:
        rows = r["rows"]
        killed = sum(x["verdict"] in ("killed", "timeout") or _crashed(x["verdict"]) for x in rows)
        surv = [x for x in rows if x["verdict"] == "survived"]
        equiv = [x for x in surv if TRIAGE.get(x["key"], "").startswith("equivalent")]
        errors = sum(x["verdict"].startswith("error") and not _crashed(x["verdict"]) for x in rows)
        later = [x for x in surv if TRIAGE.get(x["key"], "").startswith("killed")]
        live = len(rows) - len(equiv) - errors
        rate = f"{100 * killed / live:.1f}% / {100 * (killed + len(later)) / live:.1f}%" if live else "-"
        lines.append(
            f"| {r['file']} | {r['generated']} | {len(rows)} | {killed} | {len(surv)} | {len(equiv)} | {errors} | "
            f"{rate} | {r.get('date', '')} |"
        )
        tot["later"] += len(later)
        for k, v in (("run", len(rows)), ("killed", killed), ("survived", len(surv)), ("equivalent", len(equiv))):
            tot[k] += v
        tot["errors"] += errors
        survivors += [(r["file"], x) for x in surv]
    live = tot["run"] - tot["equivalent"] - tot["errors"]
    rate = f"{100 * tot['killed'] / live:.1f}% / {100 * (tot['killed'] + tot['later']) / live:.1f}%" if live else "-"
    lines.append(
        f"| **all** | | {tot['run']} | {tot['killed']} | {tot['survived']} | {tot['equivalent']} | {tot['errors']} | "
        f"**{rate}** | |"
    )
    lines += ["", "## Survivors and their triage", ""]
    if not survivors:
        lines.append("None.")
    for path, x in survivors:
        lines.append(f"- `{path}:{x['line']}` `{' / '.join(x['diff'])[:200]}`")
        lines.append(f"  - {TRIAGE.get(x['key'], 'NOT TRIAGED')}")
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file", action="append", default=[], help="target file (repeatable; default: all)")
    p.add_argument("--max", type=int, default=40, help="mutants sampled per file (default 40)")
    p.add_argument("--budget", type=float, default=3600, help="seconds for the whole run (default 3600)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run at most")
    p.add_argument("--tests", default=None, help="pytest arguments replacing the files' selections (one string)")
    p.add_argument("--out", default=OUT, help="results folder (default benchmarks/results/mutation)")
    p.add_argument("--list", action="store_true", help="count each file's mutants and print its selection")
    p.add_argument("--report", action="store_true", help="only rebuild the summary from stored results")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        help="re-run only this mutant (its report key, repeatable): a triage check that a new test kills it; "
        "use with --out elsewhere so the sampled results are kept",
    )
    p.add_argument(
        "--rev",
        default=None,
        help="mutate this commit's tree (e.g. HEAD) instead of the working tree, which other "
        "agents may have left half-edited",
    )
    args = p.parse_args(argv)
    files = args.file or list(TARGETS)
    unknown = [f for f in files if f not in TARGETS]
    if unknown:
        raise SystemExit(f"mutation: unknown target(s) {unknown}; known: {list(TARGETS)}")
    if args.tests:
        import shlex

        for f in files:
            TARGETS[f] = (tuple(shlex.split(args.tests)), TARGETS[f][1])
    if args.report:
        print(write_report(args.out))
        return 0
    if args.list:
        for f in files:
            print(f"{f}: {len(enumerate_mutants(ROOT, f, TARGETS[f][1]))} mutants; tests {' '.join(TARGETS[f][0])}")
        return 0

    deadline = time.monotonic() + args.budget
    scratch = tempfile.mkdtemp(prefix="gradmem-mutation-")
    try:
        _mutants._scratch_copy(scratch, args.rev)
        _mutants._check_imports(scratch)
        os.makedirs(args.out, exist_ok=True)
        survived = 0
        for f in files:
            keys = [k for k in args.key if k.startswith(f + ":")]
            if args.key and not keys:
                continue
            record = _run_file(scratch, f, args.max, deadline, args.timeout, keys)
            record["date"] = time.strftime("%Y-%m-%d", time.gmtime())
            name = f.replace("/", "__").removesuffix(".py") + ".json"
            with open(os.path.join(args.out, name), "w") as fh:
                json.dump(record, fh, indent=1)
            survived += sum(r["verdict"] == "survived" for r in record["rows"])
        print(write_report(args.out))
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
