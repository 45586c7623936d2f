"""Shared plumbing of the benchmarks: results recorder, time budgets, timers, peak memory, run metadata.

Every benchmark case runs through ``Recorder.case``: it is timed against its section's budget, its
exceptions are caught and recorded (``status`` = ``ok`` | ``skipped`` | ``error``), and the results files
(``results.json``, ``results.csv``) are rewritten after every case, so a crash or a timeout later in the
run loses nothing already measured.
"""

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

import torch

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SCHEMA_VERSION = 1
LEADING_COLUMNS = (
    "section",
    "bench",
    "impl",
    "mode",
    "case",
    "dtype",
    "status",
    "ms",
    "tflops",
    "gbps",
    "peak_mem_mb",
    "docs_per_s",
    "tokens_per_s",
    "mfu",
    "reason",
)
MB = 1024.0 * 1024.0
# Errors that mean "this implementation does not support this case" (recorded as skipped, not as errors):
# SDPA backends that refuse a dtype/shape/device, ops without a double backward.
UNSUPPORTED_PATTERNS = (
    "No available kernel",
    "No viable backend for scaled_dot_product_attention",
    "derivative for",
    "no autograd formula was registered",
)


# Our own implementations (every other impl is a baseline or the peak measurement).
OWN_IMPL_PREFIX = "gradmem"
# Skip reasons that mean our own code failed to import or run rather than "not applicable here".
OWN_FAILURE_SKIPS = ("not available yet", "not implemented", "gradmem_fast.")


def own_failures(records, section_log=None, sections=None) -> list:
    """One line per failure of our own code in ``sections`` (all when None): a record of an impl named
    ``gradmem*`` (or the shared model build, impl ``model``) with status ``error``, or skipped because our
    code could not be imported; a section that crashed. Baselines may error or skip (recorded, not failed);
    time-budget skips and documented refusals ("unsupported here") are not failures."""
    out = []
    for r in records:
        if sections is not None and r.get("section") not in sections:
            continue
        impl = str(r.get("impl"))
        if not (impl.startswith(OWN_IMPL_PREFIX) or impl == "model"):
            continue
        reason = str(r.get("reason", ""))
        if r.get("status") == "error" or (r.get("status") == "skipped" and reason.startswith(OWN_FAILURE_SKIPS)):
            where = " ".join(str(r.get(k)) for k in ("section", "bench", "mode", "case") if r.get(k) is not None)
            out.append(f"{where} {impl}: {r.get('status')}: {reason[:300]}")
    for name, info in (section_log or {}).items():
        if (sections is None or name in sections) and info.get("status") == "error":
            out.append(f"section {name} crashed: {info.get('error')}")
    return out


class Skip(Exception):
    """Raised by a case that cannot run here (missing op, unsupported shape); recorded as ``skipped``."""


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ metadata


def _git(*args) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_results_dir(device, dry_run: bool) -> str:
    date = datetime.date.today().isoformat()
    name = f"{date}-{slug(gpu_name(device))}" + ("-dryrun" if dry_run else "")
    return os.path.join(repo_root(), "benchmarks", "results", name)


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
        return str(getattr(module, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - a missing optional package is recorded, not fatal
        return f"unavailable ({type(exc).__name__})"


def run_metadata(device, dry_run: bool) -> dict:
    device = torch.device(device)
    # A copied working tree may have no .git: GRADMEM_COMMIT (set by whoever starts the run) then names it.
    commit = os.environ.get("GRADMEM_COMMIT", "").strip() or _git("rev-parse", "HEAD")
    dirty = None
    if not os.environ.get("GRADMEM_COMMIT"):
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    meta = {
        "schema": SCHEMA_VERSION,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "commit_dirty": dirty,
        "device": str(device),
        "gpu": gpu_name(device),
        "dry_run": bool(dry_run),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "host_cpu": platform.processor() or platform.machine(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    from .peers import versions  # here, not at import: peers imports this module

    # The peers measured beside ours (benchmarks/peers.py): distribution -> version or "not installed".
    meta["peers"] = versions()
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        meta.update(
            {
                "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_sm_count": props.multi_processor_count,
            }
        )
    return meta


# ------------------------------------------------------------------------------------------ budgets


class Budget:
    """Wall-clock allowance of one section."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.left() <= 0


# ------------------------------------------------------------------------------------------ recorder


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return str(value)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Recorder:
    """Collects result records and rewrites ``results.json``/``results.csv`` after each one.

    With ``merge=True`` an existing ``results.json`` in ``out_dir`` is loaded and the records of the
    sections run now replace its records of those sections (a suite split over several calls builds one
    results file).
    """

    def __init__(
        self,
        out_dir: str,
        meta: dict,
        sections_now=(),
        merge: bool = True,
        verbose: bool = True,
        select=None,
        write_csv: bool = True,
    ):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.meta = dict(meta)
        self.records = []
        self.verbose = verbose
        self.budget = None
        self.section_name = None
        self.section_log = {}
        self.select = dict(select or {})  # section -> clauses (see wants); sections not named run every case
        self.write_csv = write_csv
        path = os.path.join(out_dir, RESULTS_JSON)
        if merge and os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
                # A section run now replaces its old records, except those its selection leaves out (a
                # suite split over calls may run different cases of one section).
                self.records = [r for r in old.get("records", []) if not self._reruns(r, sections_now)]
                self.section_log = {
                    k: v for k, v in old.get("sections", {}).items() if k not in set(sections_now) or k in self.select
                }
                self.meta["previous_runs"] = old.get("meta", {}).get("previous_runs", []) + [
                    {k: old.get("meta", {}).get(k) for k in ("timestamp", "commit", "gpu")}
                ]
            except (OSError, ValueError):
                pass
        self.flush()

    # -- sections and cases

    @contextlib.contextmanager
    def section(self, name: str, seconds: float):
        """Run the cases of section ``name`` within ``seconds`` of wall clock."""
        self.section_name, self.budget = name, Budget(seconds)
        info = {"budget_s": seconds, "status": "running"}
        self.section_log[name] = info
        self.flush()
        if self.verbose:
            print(f"== section {name} (budget {seconds:.0f} s)", flush=True)
        try:
            yield self
            info["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - a broken section must not stop the suite
            info["status"] = "error"
            info["error"] = f"{type(exc).__name__}: {exc}"
            info["traceback"] = traceback.format_exc(limit=8)
            if self.verbose:
                print(f"!! section {name} failed: {info['error']}", flush=True)
        finally:
            info["elapsed_s"] = round(self.budget.elapsed(), 2)
            self.flush()
            self.section_name, self.budget = None, None

    def _reruns(self, record, sections_now) -> bool:
        section = record.get("section")
        if section not in set(sections_now):
            return False
        name, self.section_name = self.section_name, section
        try:
            return self.wants(**{k: v for k, v in record.items() if k not in ("section", "status", "reason")})
        finally:
            self.section_name = name

    def wants(self, **params) -> bool:
        """Whether the current section's selection keeps a case with these parameters.

        A selection is a list of clauses, each a dict ``key -> set of str values``; a case is kept when some
        clause matches every one of its keys that ``params`` names (keys not given are not checked, so a
        runner can ask with the case name alone before it builds a model)."""
        clauses = self.select.get(self.section_name)
        if not clauses:
            return True
        return any(all(str(params[k]) in values for k, values in clause.items() if k in params) for clause in clauses)

    def time_left(self) -> float:
        return math.inf if self.budget is None else self.budget.left()

    def case(self, bench: str, impl: str, fn, *, min_seconds: float = 0.0, device=None, **params):
        """Run ``fn()`` -> dict of metrics as one record (never raises); None for a case not selected.

        ``min_seconds``: skip the case unless at least that much of the section budget is left.
        ``params`` (mode, case, dtype and any shape parameters) are stored with the record.
        """
        if not self.wants(bench=bench, impl=impl, **params):
            return None  # not selected for this run (benchmarks.run --plan): no record
        record = {"section": self.section_name, "bench": bench, "impl": impl}
        record.update(params)
        start = time.monotonic()
        if self.budget is not None and self.budget.left() <= min_seconds:
            record.update(status="skipped", reason=f"time budget of section {self.section_name} exhausted")
        else:
            try:
                metrics = fn() or {}
                record.update(metrics)
                record["status"] = "ok"
            except Skip as exc:
                record.update(status="skipped", reason=str(exc))
            except NotImplementedError as exc:
                record.update(status="skipped", reason=f"not implemented: {exc}")
            except ImportError as exc:  # a piece another issue has not landed yet
                record.update(status="skipped", reason=f"not available yet: {type(exc).__name__}: {exc}")
            except torch.cuda.OutOfMemoryError as exc:
                record.update(status="error", reason=f"out of memory: {str(exc).splitlines()[0][:300]}")
            except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
                message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
                if any(p in str(exc) for p in UNSUPPORTED_PATTERNS):
                    record.update(status="skipped", reason=f"unsupported here: {message}")
                else:
                    record.update(status="error", reason=message, traceback=traceback.format_exc(limit=6)[-3000:])
            finally:
                cleanup(device)
        record["wall_s"] = round(time.monotonic() - start, 3)
        self.add(record)
        return record

    def add(self, record: dict) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        if self.verbose:
            print(format_record(record), flush=True)
        self.flush()

    def find(self, **match) -> list:
        return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]

    # -- files

    def flush(self) -> None:
        doc = {"meta": self.meta, "sections": self.section_log, "records": self.records}
        _atomic_write(os.path.join(self.out_dir, RESULTS_JSON), json.dumps(_jsonable(doc), indent=1) + "\n")
        if not self.write_csv:
            return
        columns = list(LEADING_COLUMNS)
        for r in self.records:
            for key in r:
                if key not in columns and key != "traceback":
                    columns.append(key)
        path = os.path.join(self.out_dir, RESULTS_CSV)
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in self.records:
                writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        os.replace(path + ".tmp", path)


def format_record(r: dict) -> str:
    head = f"[{r.get('section')}] {r.get('bench')} {r.get('mode', '')} {r.get('case', '')} {r.get('impl')}"
    head = " ".join(head.split())
    if r.get("status") != "ok":
        return f"{head}: {r.get('status').upper()} {r.get('reason', '')}"
    parts = []
    for key, fmt in (
        ("ms", "{:.4g} ms"),
        ("tflops", "{:.4g} TFLOP/s"),
        ("gbps", "{:.4g} GB/s"),
        ("docs_per_s", "{:.4g} docs/s"),
        ("tokens_per_s", "{:.4g} tok/s"),
        ("mfu", "MFU {:.3f}"),
        ("peak_mem_mb", "peak {:.5g} MiB"),
        ("rel_err", "rel.err {:.2e}"),
    ):
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    return f"{head}: " + ", ".join(parts)


# ------------------------------------------------------------------------------------------ device helpers


def is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def cleanup(device) -> None:
    """Free cached memory after a case (and surface a sticky CUDA error as early as possible)."""
    if is_cuda(device):
        import gc

        gc.collect()
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a broken context is reported by the next case
            pass
        torch.cuda.empty_cache()


def bench_ms(
    fn,
    device,
    *,
    cudagraph: bool = False,
    warmup_ms: float = 10,
    rep_ms: float = 60,
    cpu_reps: int = 3,
    cpu_max_s: float = 2.0,
    cpu_warmup: int = 1,
) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (its L2 flush between runs, median) or, for tiny ops,
    ``do_bench_cudagraph`` (launch overhead removed; falls back to ``do_bench`` if capture fails).
    CPU (dry run): ``cpu_warmup`` untimed calls, then at least ``cpu_reps`` timed calls (more while
    under ``cpu_max_s``, at most 20), median.
    """
    if is_cuda(device):
        import triton.testing

        if cudagraph:
            fn()  # compile / autotune outside the capture
            torch.cuda.synchronize(device)
            try:
                with torch.cuda.device(torch.device(device)):
                    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
            except Exception:  # noqa: BLE001 - not capturable: time it without a graph
                torch.cuda.synchronize(device)
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(cpu_warmup):
        fn()
    times = []
    begin = time.perf_counter()
    while len(times) < cpu_reps or (time.perf_counter() - begin < cpu_max_s and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def time_calls_ms(
    fn, device, *, warmup: int = 1, min_runs: int = 3, max_runs: int = 10, max_seconds: float = 10.0
) -> dict:
    """Median / min milliseconds of a long call (a whole WRITE) timed one call at a time.

    Uses CUDA events on a GPU (perf_counter on CPU). Runs ``warmup`` untimed calls, then between
    ``min_runs`` and ``max_runs`` timed calls, stopping once ``max_seconds`` have been spent timing.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    begin = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - begin < max_seconds):
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": float(statistics.median(times)), "ms_min": float(min(times)), "runs": len(times)}


def peak_memory_mb(fn, device):
    """Peak memory allocated by ``fn()`` above what was allocated before it (MiB); None off CUDA."""
    if not is_cuda(device):
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MB


def tflops(flop_count, ms):
    if flop_count is None or not ms:
        return None
    return flop_count / (ms * 1e-3) / 1e12


def write_text(out_dir: str, name: str, text: str) -> str:
    path = os.path.join(out_dir, name)
    _atomic_write(path, text)
    return path


def python_executable() -> str:
    return sys.executable
