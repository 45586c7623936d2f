"""Run the benchmarks and write ``results.json``, ``results.csv`` and PNG plots into one results folder.

    python -m benchmarks.run --dry-run                 # CPU: tiny sizes, torch / Triton-interpreter paths
    python -m benchmarks.run                           # CUDA: full sizes, all sections
    python -m benchmarks.run --sections write,second_order --out DIR   # some sections, merged into DIR

Sections (in this order): peak, attention, cross_entropy, update, write, second_order ("kernels" means
attention, cross_entropy and update). Each has a wall-clock budget (``--budget NAME=SECONDS``, scaled by
``--budget-scale``); a case that would start after its section's budget is recorded as skipped. Every case
is its own try/except (errors are recorded in the JSON) and the files are rewritten after every case.
Results of sections not run now are kept from an existing ``results.json`` in the folder (``--no-merge``
starts afresh), so a suite split over several calls ends with one file.
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
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's budget")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget")
    p.add_argument("--no-merge", action="store_true", help="do not keep other sections' earlier results")
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
    rec = common.Recorder(out_dir, meta, sections_now=sections, merge=not args.no_merge, verbose=not args.quiet)
    print(f"results -> {out_dir}\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['commit'][:12]}{' (dirty)' if meta['commit_dirty'] else ''}"
          f"{' | DRY RUN' if args.dry_run else ''}", flush=True)
    start = time.monotonic()

    from . import bench_kernels as kernels, bench_peak as peak, bench_second_order as second_order, bench_write as write

    import torch

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
