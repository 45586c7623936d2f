"""Compile every Triton kernel launch configuration for real GPUs, in the specialisations launches produce.

``python -m gradmem_fast.tools.compile_check [--arch 90 80] [--module NAME ...] [--match REGEX] [--jobs N]``

For every ``CompileSpec`` that a module of ``gradmem_fast.kernels`` lists in ``compile_specs()``, and for every
``Variant`` of it (the argument specialisations a real launch gives that configuration, see
``gradmem_fast.kernels.runtime``), this builds real machine code with Triton's ahead-of-time compiler
(``triton.compile`` on an ``ASTSource`` whose ``attrs`` carry ``tt.divisibility=16`` for the 16-divisible
arguments and whose constants hold the arguments equal to 1, exactly as Triton's launcher builds them),
reads the shared memory from the compiled metadata and the registers and spills from the bundled
``ptxas -v``, prints one line per (configuration, variant, architecture) and fails on any spill or on shared
memory above the architecture's limit. It must run with ``TRITON_INTERPRET`` unset: under the interpreter
``@triton.jit`` yields objects the compiler cannot take.
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

from gradmem_fast.kernels.runtime import UNSPECIALISED, CompileSpec, Variant, pointers_and_ints  # noqa: F401

# Largest dynamic shared memory per block (bytes), per compute capability.
SHARED_LIMIT = {90: 232448, 80: 166912}


@dataclasses.dataclass
class CompileReport:
    name: str
    arch: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    error: str = ""
    variant: str = UNSPECIALISED.label

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.spill_stores == 0
            and self.spill_loads == 0
            and (self.shared <= SHARED_LIMIT[self.arch])
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
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-2000:]}")
    log = proc.stderr + proc.stdout
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def source_parts(spec: CompileSpec, variant: Variant, arch: int = 90) -> tuple:
    """``(signature, constexprs, attrs)`` of the ``ASTSource`` for ``spec`` under ``variant``, in the form
    Triton's launcher gives them (``JITFunction._pack_args``): every argument in parameter order, arguments
    equal to 1 turned into constexprs, ``attrs[(index,)] = backend.parse_attr("D")`` (``tt.divisibility=16``)
    for the 16-divisible ones and ``[]`` for the other pointers and integers, none for ``do_not_specialize``
    arguments (the launcher never specialises those)."""
    names = list(spec.kernel.arg_names)
    constexprs = dict(spec.constexprs)
    constexprs.update(dict(variant.constexprs))
    for label, group in (("divisible", variant.divisible), ("ones", variant.ones)):
        unknown = set(group) - set(spec.signature)
        if unknown:
            raise ValueError(f"{spec.name} [{variant.label}]: {label} names non-argument(s) {sorted(unknown)}")
    fixed = {names[a] if isinstance(a, int) else a for a in getattr(spec.kernel, "do_not_specialize", ())}
    fixed &= set(variant.divisible) | set(variant.ones)
    if fixed:
        raise ValueError(
            f"{spec.name} [{variant.label}]: {sorted(fixed)} are do_not_specialize arguments: "
            "a launch never specialises them"
        )
    for arg in variant.ones:
        if not spec.signature[arg].startswith("i"):
            raise ValueError(f"{spec.name} [{variant.label}]: only integer arguments can be 1, not {arg!r}")
        constexprs[arg] = 1
    missing = [n for n in names if n not in spec.signature and n not in constexprs]
    if missing:
        raise ValueError(f"{spec.name}: no type or value for argument(s) {missing}")
    signature = {n: "constexpr" if n in constexprs else spec.signature[n] for n in names}
    backend = _backend(arch)
    attrs = {}
    never = {names[a] if isinstance(a, int) else a for a in getattr(spec.kernel, "do_not_specialize", ())}
    for i, n in enumerate(names):
        t = signature[n]
        if n not in never and (t.startswith("*") or (t[:1] in ("i", "u") and t != "u1")):
            attrs[(i,)] = backend.parse_attr("D" if n in variant.divisible else "")
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    return signature, consts, attrs


def launch_parts(kernel, *args, arch: int = 90, **kwargs) -> tuple:
    """``(signature, constexprs, attrs)`` that Triton's own launcher derives from concrete arguments (tensors
    may live on the CPU: only their addresses and dtypes matter). The reference ``source_parts`` is tested
    against; no GPU needed."""
    from triton.runtime.jit import create_function_from_signature

    backend = _backend(arch)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs


def compile_source(spec: CompileSpec, variant: Variant, arch: int):
    """The compiled kernel (``triton.compile``) of ``spec`` under ``variant`` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = source_parts(spec, variant, arch)
    source = ASTSource(spec.kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )


def compile_one(spec: CompileSpec, arch: int, variant: Variant | None = None) -> CompileReport:
    variant = spec.variants[0] if variant is None else variant
    try:
        compiled = compile_source(spec, variant, arch)
        regs, stores, loads = _ptxas_usage(compiled.asm["ptx"], arch)
        return CompileReport(spec.name, arch, int(compiled.metadata.shared), regs, stores, loads, variant=variant.label)
    except Exception as exc:  # report every failing configuration, not just the first
        return CompileReport(
            spec.name, arch, 0, 0, 0, 0, error=f"{type(exc).__name__}: {exc}"[:2000], variant=variant.label
        )


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
# not pickle), and only (index, variant index, arch) triples and reports cross process boundaries.
_SPECS = []


def _compile_task(task):
    index, vindex, arch = task
    spec = _SPECS[index]
    return compile_one(spec, arch, spec.variants[vindex])


def run(specs, archs=None, stream=sys.stdout, jobs: int = 1, match: str | None = None) -> list:
    """Compile every (spec, variant, arch), ``jobs`` at a time (forked processes), printing one line each.

    ``match``: a regular expression; only ``name [variant]`` strings it finds are compiled."""
    pattern = re.compile(match) if match else None
    tasks = [
        (i, j, arch)
        for i, spec in enumerate(specs)
        for j, variant in enumerate(spec.variants)
        for arch in spec.archs
        if (not archs or arch in archs)
        and (not variant.archs or arch in variant.archs)
        and (pattern is None or pattern.search(f"{spec.name} [{variant.label}]"))
    ]
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
    print(
        f"{status} sm_{rep.arch} {rep.name:52s} {rep.variant:12s} shared={rep.shared:6d} regs={rep.registers:3d} "
        f"spills={rep.spill_stores}/{rep.spill_loads} {rep.problems()}",
        file=stream,
        flush=True,
    )
    return rep


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", choices=sorted(SHARED_LIMIT), default=None)
    parser.add_argument("--module", nargs="*", default=None, help="kernel modules to check (default: all)")
    parser.add_argument(
        "--match", default=None, help="regular expression on 'NAME [VARIANT]': compile only the matching ones"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    args = parser.parse_args(argv)
    specs = collect_specs(args.module)
    if not specs:
        print("compile_check: no kernel declares compile_specs()", file=sys.stderr)
        return 1
    reports = run(specs, args.arch, jobs=max(1, args.jobs), match=args.match)
    if not reports:
        print("compile_check: nothing matched", file=sys.stderr)
        return 1
    failed = [r for r in reports if not r.ok]
    print(f"compile_check: {len(reports) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
