"""Compile every Triton kernel launch configuration for real GPUs, without a GPU.

``python -m gradmem_fast.tools.compile_check [--arch 90 80] [--module NAME ...]``

For every ``CompileSpec`` that a module of ``gradmem_fast.kernels`` lists in ``compile_specs()``, this
builds real machine code with Triton's ahead-of-time compiler (``triton.compile`` on an ``ASTSource``
with a ``GPUTarget``), reads the shared memory from the compiled metadata and the registers and spills
from the bundled ``ptxas -v``, and fails on any spill or on shared memory above the architecture's limit.
It must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` yields objects the
compiler cannot take.
"""
import argparse
import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

# Largest dynamic shared memory per block (bytes), per compute capability.
SHARED_LIMIT = {90: 232448, 80: 166912}


@dataclasses.dataclass
class CompileSpec:
    """One launch configuration of one kernel.

    ``signature`` maps every non-constexpr argument to a Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives every constexpr argument's value.
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (90, 80)


@dataclasses.dataclass
class CompileReport:
    name: str
    arch: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0 and self.spill_loads == 0 and (
            self.shared <= SHARED_LIMIT[self.arch]
        )

    def problems(self) -> str:
        if self.error:
            return self.error
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > limit {SHARED_LIMIT[self.arch]} B")
        return ", ".join(out)


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's bundled ptxas was not found at {path}")
    return path


def _ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes, spill load bytes) reported by ``ptxas -v``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-2000:]}")
    log = proc.stderr + proc.stdout
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def compile_one(spec: CompileSpec, arch: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(spec.kernel, dict(spec.signature, **{k: "constexpr" for k in spec.constexprs}),
                           constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        regs, stores, loads = _ptxas_usage(compiled.asm["ptx"], arch)
        return CompileReport(spec.name, arch, int(compiled.metadata.shared), regs, stores, loads)
    except Exception as exc:  # report every failing configuration, not just the first
        return CompileReport(spec.name, arch, 0, 0, 0, 0, error=f"{type(exc).__name__}: {exc}"[:2000])


def collect_specs(modules=None) -> list:
    import gradmem_fast.kernels as kpkg

    names = modules or [m.name for m in pkgutil.iter_modules(kpkg.__path__)]
    specs = []
    for name in names:
        mod = importlib.import_module(f"gradmem_fast.kernels.{name}")
        if hasattr(mod, "compile_specs"):
            specs.extend(mod.compile_specs())
    return specs


# Filled before forking workers: a forked child reaches the kernels through this list (JIT functions do
# not pickle), and only (index, arch) pairs and reports cross process boundaries.
_SPECS = []


def _compile_task(task):
    index, arch = task
    return compile_one(_SPECS[index], arch)


def run(specs, archs=None, stream=sys.stdout, jobs: int = 1) -> list:
    """Compile every (spec, arch) pair, ``jobs`` at a time (forked processes), printing one line each."""
    tasks = [(i, arch) for i, spec in enumerate(specs) for arch in spec.archs if not archs or arch in archs]
    _SPECS[:] = specs
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.imap(_compile_task, tasks)
            reports = [_print(rep, stream) for rep in results]
    else:
        reports = [_print(_compile_task(task), stream) for task in tasks]
    return reports


def _print(rep, stream):
    status = "ok  " if rep.ok else "FAIL"
    print(f"{status} sm_{rep.arch} {rep.name:60s} shared={rep.shared:6d} regs={rep.registers:3d} "
          f"spills={rep.spill_stores}/{rep.spill_loads} {rep.problems()}", file=stream, flush=True)
    return rep


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", choices=sorted(SHARED_LIMIT), default=None)
    parser.add_argument("--module", nargs="*", default=None, help="kernel modules to check (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    args = parser.parse_args(argv)
    specs = collect_specs(args.module)
    if not specs:
        print("compile_check: no kernel declares compile_specs()", file=sys.stderr)
        return 1
    reports = run(specs, args.arch, jobs=max(1, args.jobs))
    failed = [r for r in reports if not r.ok]
    print(f"compile_check: {len(reports) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
