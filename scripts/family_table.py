"""Run the family matrix (tests/families.py) over every causal LM transformers ships; write the results.

    .venv/bin/python scripts/family_table.py                 # every family (about 15 CPU minutes)
    .venv/bin/python scripts/family_table.py llama gemma2    # some families (prints; writes nothing unless --write)

Writes benchmarks/results/families.json (one record per family) and FAMILIES.md (the table) at the
repository root. The kernels run in the Triton interpreter (CPU), so the engine column is what the
interpreter computes; each family gets a time limit so one slow family cannot stall the run.
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, os.path.join(ROOT, "tests"))

import families  # noqa: E402
import torch  # noqa: E402

JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "families.json")
TABLE_PATH = os.path.join(ROOT, "FAMILIES.md")
COLUMNS = ("torch", "triton", "dropin", "second")


class FamilyTimeout(BaseException):
    """A family ran past its limit (a BaseException: the per-path handlers, which record every Exception,
    must not swallow it and go on with the next path)."""


def _timeout(signum, frame):
    raise FamilyTimeout("time limit of the family reached")


def run(names: list[str], limit_s: int) -> list[dict]:
    signal.signal(signal.SIGALRM, _timeout)
    records = []
    for name in names:
        start = time.time()
        signal.alarm(limit_s)
        try:
            record = families.check_family(name).as_dict()
        except (Exception, FamilyTimeout) as exc:  # a harness failure is recorded, not fatal
            record = families.FamilyResult(name, families.causal_lm_families().get(name, "?")).as_dict()
            record["build"] = f"harness: {families._first_line(exc)}"
        finally:
            signal.alarm(0)
        record["seconds"] = round(time.time() - start, 1)
        records.append(record)
        states = " ".join(f"{c}={record['states'].get(c, '-')}" for c in COLUMNS)
        print(f"{name:28s} {record['seconds']:6.1f}s build={record['build'][:40]} {states}", flush=True)
    return records


def header_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _code_version() -> str:
    """The commit the run measured (GRADMEM_FAMILIES_COMMIT for a copy without .git, e.g. a git archive)."""
    if os.environ.get("GRADMEM_FAMILIES_COMMIT"):
        return os.environ["GRADMEM_FAMILIES_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "gradmem_fast", "kernels"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + (
        " with uncommitted changes in gradmem_fast/ or kernels/" if dirty.stdout.strip() else ""
    )


def _cell(record: dict, column: str) -> str:
    state = record["states"].get(column, "")
    return f"**{state}**" if state in ("WRONG", "crash") else state


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(records: list[dict], header: dict) -> str:
    counts: dict[str, int] = {}
    for r in records:
        for c in COLUMNS:
            s = r["states"].get(c)
            if s:
                counts[f"{c}:{s}"] = counts.get(f"{c}:{s}", 0) + 1
    wrong = [r["model_type"] for r in records if any(s == "WRONG" for s in r["states"].values())]
    lines = [
        "# Hugging Face causal-LM families: computed exactly or refused",
        "",
        f"Generated {header['date']} by `{header['command']}` with transformers {header['transformers']}, "
        f"torch {header['torch']}, gradmem_fast at {header['code']} (CPU; Triton kernels in the interpreter). "
        "Each family of "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built tiny and random (tests/families.py: 2 layers, hidden 32, "
        f"vocabulary {families.VOCAB}, fp64 where the model runs in fp64) and written with m={families.M_TOKENS}, "
        f"documents of {families.LENGTHS[0]} and {families.LENGTHS[1]} tokens, K={families.STEPS} SGD steps, "
        f"lr {families.LR}.",
        "",
        "- oracle: each document alone through the model's own eager forward (`model(inputs_embeds=..., "
        "attention_mask=ones).logits`), gradients by torch.autograd (second order: create_graph).",
        "- torch: `MemoryWriter(backend='torch')` (the reference) against the oracle; triton: the packed engine "
        "against the oracle; dropin: `attn_implementation='gradmem_fast'` against eager (logits and "
        "d/d inputs_embeds, right-padded batch); second: grad_mode='second', d<R, M_K>/dM0, engine against the "
        "reference and the reference against the oracle.",
        f"- match: relative error within {families.TOL:g}; refused: gradmem_fast raised a ValueError/TypeError/"
        "NotImplementedError; **WRONG**: numbers differ (a silently wrong result); **crash**: any other exception.",
        "",
        *([f"Rerun: {header['rerun']}.", ""] if header.get("rerun") else []),
        f"Silently wrong families ({len(wrong)}): {', '.join(wrong) if wrong else 'none'}.",
        f"Counts: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}.",
        "",
        "| family | class | dtype | " + " | ".join(COLUMNS) + " | detail |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for r in records:
        if r["build"] != "ok":
            detail = f"not built: {r['build']}"
        else:
            parts = [f"{c}: {r['details'][c]}" for c in COLUMNS if c in r["details"]]
            if r["oracle"] != "ok":
                parts.insert(0, f"oracle: {r['oracle']}")
            detail = "; ".join(parts)
        cells = [_cell(r, c) for c in COLUMNS]
        lines.append(
            f"| {r['model_type']} | {r['class_name']} | {r['dtype']} | "
            + " | ".join(cells)
            + f" | {_escape(detail)[:600]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types (default: every causal-LM family)")
    parser.add_argument("--limit", type=int, default=240, help="seconds per family before it counts as a crash")
    parser.add_argument("--write", action="store_true", help="write the files even for a subset of families")
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun the named families and replace their records in the existing JSON (header notes the rerun)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    names = args.families or list(families.causal_lm_families())
    records = run(names, args.limit)
    if args.families and not (args.write or args.update):
        return 0
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code": _code_version(),
        "command": "python scripts/family_table.py" + (" " + " ".join(args.families) if args.families else ""),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    if args.update:
        with open(JSON_PATH) as f:
            previous = json.load(f)
        rerun = {r["model_type"]: r for r in records}
        records = [rerun.get(r["model_type"], r) for r in previous["families"]]
        header = dict(previous["header"])
        note = f"{', '.join(sorted(rerun))} on {header_now()} at {_code_version()}"
        header["rerun"] = f"{header['rerun']}; {note}" if header.get("rerun") else note
    os.makedirs(os.path.dirname(JSON_PATH), exist_ok=True)
    with open(JSON_PATH, "w") as f:
        json.dump({"header": header, "families": records}, f, indent=1)
        f.write("\n")
    with open(TABLE_PATH, "w") as f:
        f.write(table(records, header))
    print(f"wrote {JSON_PATH} and {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
