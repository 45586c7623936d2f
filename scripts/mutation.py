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

_SUMSQ_SPEC = (
    'kernels/update.py:{"grad_ptr": ptr, "part_ptr": "*fp64", "clip_value": "fp32", "N": "i32", "ITERS": "i32"},'
)

# Survivors triaged by hand: key "file:line text|index" -> why the mutant is equivalent, or the test that kills
# it now. Keys come from the report (`key` of each survivor).
TRIAGE: dict = {
    # kernels/attention_common.py
    "kernels/attention_common.py:rescale = tl.load(Params + 2)|1": "killed by tests/test_attention_boundaries.py::"
    "test_sample_fp64_dropout_reads_its_rescale (added; no fp64 dropout call ran before; re-run: killed; hand "
    "mutant attn_fp64_rescale_wrong_slot)",
    "kernels/attention_common.py:c = lo + tl.maximum(full_hi - lo, 0) // BLOCK * BLOCK|0": "equivalent: c falls "
    "below a and is clamped to it, so the unmasked middle range is empty and every block takes the masked path "
    "(same values, slower); the opposite direction (a partly visible block unmasked) is hand mutant "
    "attn_unmasked_blocks_rounded_up, killed",
    "kernels/attention_common.py:c = lo + tl.maximum(full_hi - lo, 0) // BLOCK * BLOCK|4": "equivalent in "
    "every value the interpreter shows: c becomes lo + k / BLOCK (fp32; k the fully visible blocks), less than "
    "a block past lo, so the unmasked range shrinks to at most the first, fully visible block and the masked "
    "loops cover the rest (re-run on every causal shape, fp64 dropout and soft-capping: survived); how a GPU "
    "compile treats the fp32 loop bound only the compile check or a GPU run can show",
    "kernels/attention_common.py:return (b * num_heads + h).to(tl.int64) * 4294967296 + seed|3": "equivalent: "
    "another dropout stream per (batch, head), still distinct for seeds below 2^32; the forward, the backward "
    "and dropout_keep_mask all draw from rng_key, so nothing can tell one valid stream from another",
    "kernels/attention_common.py:s2 = (SOFTCAP * 1.4426950408889634) * (1.0 - 2.0 / (e + 1.0))|4": "killed by "
    "tests/test_attention_softcap_sinks.py (re-run: killed); soft-capping is outside the default options this "
    "file's selection runs (it was added by another change while the tool ran)",
    # kernels/update.py (launcher and compile specifications; the kernel's formulas were all killed)
    'kernels/update.py:scalar_ptrs, per_sample = ptrs != "0", ptrs == "B"|3': "killed by tests/test_option_matrix.py"
    "::test_update_kernel_compile_specs_hold_every_lr_step_kind (added: the per-document specialisation was "
    "never compiled; re-run: killed)",
    'kernels/update.py:if device.type != "cuda" or numel < _MIN_SPLIT_NUMEL:|3': "killed by tests/test_update.py "
    "(split heuristic test; outside the as-run selection; re-run: killed)",
    'kernels/update.py:_check_per_sample("lr", lr, B)|0': "killed by tests/test_update_per_sample.py (error message "
    "matched; outside the as-run selection; re-run: killed)",
    "kernels/update.py:_MIN_CHUNK = 4 * BLOCK  # smallest split chunk|0": "killed by tests/test_update.py (split "
    "heuristic; outside the as-run selection; re-run: killed)",
    "kernels/update.py:if batch >= sms:|0": "equivalent: at batch == SM count the launcher splits each sample in 2 "
    "instead of 1; every split count gives the same values (test_update.py runs 1 and 4 splits), only speed "
    "changes",
    "kernels/update.py:step_arg = _scalar_tensor(step, torch.int64, device) if adam else 1|1": "killed by "
    "tests/test_update.py (outside the as-run selection; re-run: killed)",
    _SUMSQ_SPEC + "|0": "killed by the compile check that make test runs beside pytest (a compile "
    "specification naming an argument the kernel lacks fails: checked, compile_check --match grad_sumsq exit 1); "
    "not a pytest test",
    _SUMSQ_SPEC + "|1": "killed by the compile check that make test runs beside pytest (the same check as the "
    "mutant above; not a pytest test)",
    "kernels/update.py:f\"update.memory_update[{tname},{'adam' if adam else 'sgd'},\"|2": "killed by "
    "tests/test_update.py::test_compile_specs_cover_every_launch_configuration (names; re-run: killed)",
    # gradmem_fast/ops/update.py
    "gradmem_fast/ops/update.py:if step.dtype == torch.bool or step.is_complex():|1": "killed by "
    "tests/test_option_matrix.py::test_update_op_refuses_bool_and_complex_steps (added; re-run: killed)",
    "gradmem_fast/ops/update.py:inside = (g >= -clip_value) & (g <= clip_value)|4": "killed by the option matrix "
    "now that make test runs every update-op combination (triton x second order x clamp: pairs alone missed it; "
    "re-run: killed; hand mutant update_sgd_backward_clamp_passes_gradient)",
    "gradmem_fast/ops/update.py:@staticmethod|0": "equivalent: torch.autograd.Function calls forward/backward "
    "through the class, where a plain function behaves exactly as a staticmethod",
    # gradmem_fast/reference.py
    'gradmem_fast/reference.py:mask_name="query_mask",|0': "equivalent: the argument's name in error messages only",
    # gradmem_fast/scoring.py
    "gradmem_fast/scoring.py:LN2 = math.log(2.0)|0": "killed by tests/test_scoring.py::test_nats_to_bits (added; "
    "the selection now runs all of test_scoring.py; re-run: killed)",
    "gradmem_fast/scoring.py:while stop < len(order) and (stop + 1 - start) * len(documents[order[stop]]) <= "
    "batch_tokens:|3": "equivalent: groups of the no-memory baseline come out smaller than the token budget; each "
    "document's tail does not depend on its group (test_scoring.py checks budgets of 1, 12 and 10^6)",
    # gradmem_fast/packing.py
    "gradmem_fast/packing.py:MIN_BUCKET_ROWS = 64|0": "equivalent: a bucket of 65 filler-padded rows instead of 64 "
    "(filler rows are ignored targets; only graph reuse and alignment change)",
    "gradmem_fast/packing.py:used += need|1": "killed by tests/test_packing_plan.py (added: plan_batches against "
    "its token budget; re-run: killed)",
    # kernels/cross_entropy.py (masking lines)
    "kernels/cross_entropy.py:g = tl.where(valid, tl.load(scale_ptr + rows, mask=rows_ok, other=0.0).to(lse.dtype), "
    "0.0)|1": "equivalent: the load's fill value is read only on rows past the end, which valid (rows_ok & target "
    "!= ignore_index) already sends to 0.0",
}


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
    lines += [
        "",
        "Runs of 2026-12-07 on the shared 2-core machine: `scripts/mutation.py --rev HEAD --max 12` (8 for",
        "reference, scoring and the cross-entropy masking, 10 for packing; each file against the HEAD of its run),",
        "triage re-runs with `--key KEY --tests '...'`. A first scoring run (same sample) found `score_memories` and",
        "`no_memory_tail`'s grouping reached only through the command line: tests/test_scoring.py since.",
        "",
        "## Survivors and their triage",
        "",
    ]
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
