"""Run the benchmarks and write ``results.json``, ``results.csv`` and PNG plots into one results folder.

    python -m benchmarks.run --dry-run                 # CPU: tiny sizes, torch / Triton-interpreter paths
    python -m benchmarks.run                           # CUDA: full sizes, all sections
    python -m benchmarks.run --sections write,second_order --out DIR   # some sections, merged into DIR

Sections (in this order): peak, attention, cross_entropy, update, write, second_order ("kernels" means
attention, cross_entropy and update). Each has a wall-clock budget (``--budget NAME=SECONDS``, scaled by
``--budget-scale``); a case that would start after its section's budget is recorded as skipped. Every case
is its own try/except (errors are recorded in the JSON) and the files are rewritten after every case.
Results of sections not run now are kept from an existing ``results.json`` in the folder (``--no-merge``
starts afresh), so a suite split over several calls ends with one file. ``--plan first|second`` runs the
cases of one lent-GPU call of ``gpu_suite.sh`` (``PLANS``); ``--select`` keeps only matching cases; the run
exits 1 when one of our own implementations (``gradmem*``) errors, baselines may be skipped with a reason.
"""

import argparse
import os
import sys
import time

SECTIONS = ("peak", "attention", "cross_entropy", "update", "write", "second_order")
ALIASES = {"kernels": ("attention", "cross_entropy", "update"), "all": SECTIONS}
# Seconds per section on a GPU: 760 s in all (the GPU suite's bench stage allows 840 s).
GPU_BUDGETS = {"peak": 30, "attention": 150, "cross_entropy": 80, "update": 40, "write": 400, "second_order": 60}
DRY_BUDGETS = {name: 300 for name in SECTIONS}

# The lent GPU's calls (benchmarks/gpu_suite.sh first|second): sections, budgets (s) and the cases kept
# (clauses of key -> values, see common.Recorder.wants). Each bench stage's hard limit in gpu_suite.sh is
# the sum of its budgets plus PLAN_STARTUP_S (imports, report); tests/test_benchmarks.py checks that.
# flash_attn and the cross-entropy peers (benchmarks/peers.py) are measured beside ours when installed.
_OURS_VS_FLASH = ("gradmem_fast", "sdpa_flash", "flash_attn")
_WRITE_LOOPS = ("reference", "torch_sdpa", "gradmem_fast", "gradmem_fast_graphs", "gradmem_fast_eager")
PLANS = {
    # headline evidence: the peaks (for MFU), attention fwd+bwd vs SDPA flash (and flash-attn) at two shapes,
    # fused linear cross-entropy vs torch, Liger and CCE at the GPT-2 shape, whole WRITEs (GPT-2, tiny KV) vs
    # the reference and SDPA loops
    "first": {
        "budgets": {"peak": 15, "attention": 40, "cross_entropy": 40, "write": 150},
        "select": {
            "attention": [
                dict(mode=("fwd+bwd",), impl=_OURS_VS_FLASH, case=("gpt2-write varlen",)),
                dict(mode=("fwd+bwd",), impl=_OURS_VS_FLASH, case=("S=4096",), head_dim=("128",)),
            ],
            "cross_entropy": [
                dict(
                    mode=("fwd+bwd:dh",),
                    impl=("gradmem_fast", "torch", "liger", "cce"),
                    case=("gpt2 N=16384 V=50257",),
                )
            ],
            "write": [dict(case=("gpt2_124m", "tiny_kv"), impl=_WRITE_LOOPS)],
        },
    },
    # the rest that fits 5 minutes: the compiled SDPA loop and our ops in the plain loop at GPT-2 (with the
    # reference again for their error and speedup), and the second-order meta step (the suite's kernels stage,
    # pytest-benchmark with the peers, follows in the same call: write gave it 25 s)
    "second": {
        "budgets": {"write": 125, "second_order": 30},
        "select": {"write": [dict(case=("gpt2_124m",), impl=("reference", "gradmem_ops", "torch_sdpa_compiled"))]},
    },
}
PLAN_STARTUP_S = 15
# In a dry run these sections' tiny cases have other names: their selection keeps every case.
_DRY_FREE_KEYS = {"attention": ("case", "head_dim"), "cross_entropy": ("case",)}


def plan_selection(plan: dict, dry_run: bool) -> dict:
    """The plan's clauses as ``section -> [key -> set of str]`` (case names dropped where dry-run names differ)."""
    out = {}
    for section, clauses in plan.get("select", {}).items():
        free = _DRY_FREE_KEYS.get(section, ()) if dry_run else ()
        out[section] = [
            {k: {str(v) for v in values} for k, values in clause.items() if k not in free} for clause in clauses
        ]
    return out


def parse_select(items) -> dict:
    """``SECTION:key=v1|v2;key=v`` (repeatable; each item one clause) -> selection."""
    out = {}
    for item in items:
        section, _, body = item.partition(":")
        if section not in SECTIONS or not body:
            raise SystemExit(f"--select: expected SECTION:key=v1|v2;key=v with SECTION in {SECTIONS}, got {item!r}")
        clause = {}
        for part in body.split(";"):
            key, eq, values = part.partition("=")
            if not eq or not key.strip():
                raise SystemExit(f"--select: expected key=v1|v2 in {item!r}, got {part!r}")
            clause[key.strip()] = set(values.split("|"))
        out.setdefault(section, []).append(clause)
    return out


def parse_sections(text: str) -> list:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        names = ALIASES.get(part, (part,))
        for name in names:
            if name not in SECTIONS:
                raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS + tuple(ALIASES))}")
            if name not in out:
                out.append(name)
    return [s for s in SECTIONS if s in out]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU-friendly); same files")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<gpu>)")
    p.add_argument("--sections", default="all", help="comma list of sections or aliases (kernels, all)")
    p.add_argument(
        "--budget", action="append", default=[], metavar="SECTION=SECONDS", help="override one section's budget"
    )
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget")
    p.add_argument("--no-merge", action="store_true", help="do not keep other sections' earlier results")
    p.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default=None,
        help="a lent GPU call of gpu_suite.sh: its sections, budgets and cases (overrides --sections)",
    )
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="SECTION:key=v1|v2;key=v",
        help="run only the matching cases of SECTION (repeatable: clauses are alternatives)",
    )
    p.add_argument("--no-csv", action="store_true", help="write results.json only (fewer files to fetch)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--print-default-dir", action="store_true", help="print the default results folder and exit")
    return p.parse_args(argv)


def pick_device(requested):
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    device = pick_device(args.device)
    if device.type != "cuda":
        # Our kernels on CPU tensors run in the Triton interpreter, which must be on before Triton loads.
        from gradmem_fast.backend import ensure_triton_interpreter

        try:
            ensure_triton_interpreter()
        except RuntimeError:
            pass  # Triton already loaded without it: our ops fall back to their torch backend
    from . import common

    if args.print_default_dir:
        print(common.default_results_dir(device, args.dry_run))
        return 0
    if device.type != "cuda" and not args.dry_run:
        print("full-size benchmarks need a CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    sections = parse_sections(args.sections)
    budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    select = {}
    if args.plan:
        plan = PLANS[args.plan]
        sections = [s for s in SECTIONS if s in plan["budgets"]]
        if not args.dry_run:
            budgets.update(plan["budgets"])
        select = plan_selection(plan, args.dry_run)
    for section, clauses in parse_select(args.select).items():
        select.setdefault(section, []).extend(clauses)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"--budget: unknown section {name!r}")
        budgets[name] = float(seconds)
    budgets = {k: v * args.budget_scale for k, v in budgets.items()}
    if args.dry_run:
        timing = dict(warmup_ms=1, rep_ms=5, cpu_reps=1, cpu_max_s=0.0, cpu_warmup=0)
    else:
        timing = dict(warmup_ms=10, rep_ms=60)

    out_dir = os.path.abspath(args.out or common.default_results_dir(device, args.dry_run))
    meta = common.run_metadata(device, args.dry_run)
    meta["sections_requested"] = sections
    meta["budgets_s"] = budgets
    meta["plan"] = args.plan
    meta["select"] = {k: [{kk: sorted(vv) for kk, vv in c.items()} for c in v] for k, v in select.items()}
    rec = common.Recorder(
        out_dir,
        meta,
        sections_now=sections,
        merge=not args.no_merge,
        verbose=not args.quiet,
        select=select,
        write_csv=not args.no_csv,
    )
    print(
        f"results -> {out_dir}\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"commit {meta['commit'][:12]}{' (dirty)' if meta['commit_dirty'] else ''}"
        f"{' | DRY RUN' if args.dry_run else ''}",
        flush=True,
    )
    start = time.monotonic()

    import torch

    from . import bench_kernels as kernels
    from . import bench_peak as peak
    from . import bench_second_order as second_order
    from . import bench_write as write

    _raise_recompile_limits()
    threads = torch.get_num_threads()
    if args.dry_run and device.type == "cpu":
        torch.set_num_threads(1)  # a dry run measures nothing: do not fight other jobs for the cores
    try:
        _run_sections(args, rec, device, sections, budgets, timing, kernels, peak, second_order, write)
    finally:
        torch.set_num_threads(threads)
    rec.meta["total_s"] = round(time.monotonic() - start, 1)
    rec.flush()

    if not args.no_plots:
        from . import plots

        for path in plots.make_plots(out_dir):
            print(f"plot -> {path}")
    from . import report

    try:
        common.write_text(out_dir, "report.md", report.render(out_dir))
    except Exception as exc:  # noqa: BLE001 - the report is a convenience; results.json is the record
        print(f"report.md failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(report.summary(rec.records, rec.section_log))
    failures = common.own_failures(rec.records, rec.section_log, sections)
    if failures:  # baselines may be unavailable; our own implementations must run
        print(
            f"\n!! {len(failures)} failure(s) of our own implementations:\n  " + "\n  ".join(failures), file=sys.stderr
        )
        return 1
    return 0


def _raise_recompile_limits():
    """Compiled baselines see many shapes; past Dynamo's default of 8 recompiles it silently runs eager."""
    try:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    except Exception:  # noqa: BLE001 - no Dynamo: the compiled cases record their own errors
        pass


def _run_sections(args, rec, device, sections, budgets, timing, kernels, peak, second_order, write):

    runners = {
        "peak": lambda: peak.run(rec, device, args.dry_run, timing),
        "attention": lambda: kernels.run_attention(rec, device, args.dry_run, timing),
        "cross_entropy": lambda: kernels.run_cross_entropy(rec, device, args.dry_run, timing),
        "update": lambda: kernels.run_update(rec, device, args.dry_run, timing),
        "write": lambda: write.run(rec, device, args.dry_run, peak.peaks(rec.records)),
        "second_order": lambda: second_order.run(rec, device, args.dry_run),
    }
    for name in sections:
        with rec.section(name, budgets[name]):
            runners[name]()


if __name__ == "__main__":
    sys.exit(main())
