"""Toy kernels for tests/test_compile_check.py: one that fits, one far over the shared-memory limit, one
that needs more registers than a thread has, and a strided copy whose aligned specialisation vectorises.
Run as a script with TRITON_INTERPRET unset; prints one JSON line."""

import json
import sys

import torch
import triton
import triton.language as tl

from gradmem_fast.tools.compile_check import (
    CompileSpec,
    Variant,
    compile_one,
    compile_source,
    launch_parts,
    pointers_and_ints,
    source_parts,
)


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=keep) * factor, mask=keep)


@triton.jit
def matmul_loop_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + rows[:, None] * K + (k + rows)[None, :])
        b = tl.load(b_ptr + (k + rows)[:, None] * BLOCK + rows[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


@triton.jit
def rows_copy_kernel(x_ptr, out_ptr, stride_x, n_cols, group, BLOCK: tl.constexpr):
    """out[r, :n] = x[r // group, :n]: a row copy whose vector width depends on the specialisation."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    row = tl.load(x_ptr + (r // group) * stride_x + cols, mask=keep)
    tl.store(out_ptr + r * n_cols + cols, row, mask=keep)


COPY_SIG = {"x_ptr": "*fp16", "out_ptr": "*fp16", "stride_x": "i32", "n_cols": "i32", "group": "i32"}
COPY_ALIGNED = Variant("aligned", divisible={"x_ptr", "out_ptr", "stride_x", "n_cols"}, ones={"group"})
COPY_UNALIGNED = Variant("unaligned", divisible={"out_ptr"})
COPY = CompileSpec(
    "rows_copy",
    rows_copy_kernel,
    COPY_SIG,
    {"BLOCK": 1024},
    num_warps=4,
    num_stages=1,
    variants=(COPY_ALIGNED, COPY_UNALIGNED),
)

SPECS = {
    "fits": CompileSpec(
        "scale",
        scale_kernel,
        {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "factor": "fp32"},
        {"BLOCK": 256},
        num_warps=4,
        num_stages=1,
    ),
    "too_much_shared": CompileSpec(
        "matmul",
        matmul_loop_kernel,
        {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"},
        {"BLOCK": 256},
        num_warps=8,
        num_stages=4,
    ),
    "spills": CompileSpec(
        "matmul",
        matmul_loop_kernel,
        {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"},
        {"BLOCK": 256},
        num_warps=1,
        num_stages=1,
    ),
}


def _plain(parts):
    """JSON-able form of (signature, constexprs, attrs)."""
    sig, consts, attrs = parts
    return [sig, sorted([list(k), v] for k, v in consts.items()), sorted([list(k), v] for k, v in attrs.items())]


def specialisation():
    """The compile check's ASTSource parts next to those Triton's launcher derives from real arguments:
    aligned (fresh tensors, 16-divisible stride and length, group 1) and unaligned (an offset view, odd
    stride and length, group 3)."""
    x = torch.zeros(4096, dtype=torch.float16)
    out = torch.zeros(4096, dtype=torch.float16)
    aligned = launch_parts(rows_copy_kernel, x, out, 1024, 512, 1, BLOCK=1024)
    unaligned = launch_parts(rows_copy_kernel, x[1:], out, 1001, 1000, 3, BLOCK=1024)
    return dict(
        check_aligned=_plain(source_parts(COPY, COPY_ALIGNED)),
        launch_aligned=_plain(aligned),
        check_unaligned=_plain(source_parts(COPY, COPY_UNALIGNED)),
        launch_unaligned=_plain(unaligned),
        all_hints=sorted(pointers_and_ints(COPY_SIG)),
    )


def vector_width():
    """16-byte vector loads in the aligned variant's PTX, none in the unaligned one's; registers of both."""
    out = {}
    for variant in COPY.variants:
        ptx = compile_source(COPY, variant, 90).asm["ptx"]
        rep = compile_one(COPY, 90, variant)
        out[variant.label] = dict(
            v4_loads=len([ln for ln in ptx.splitlines() if "ld.global" in ln and ".v4." in ln]),
            scalar_loads=len([ln for ln in ptx.splitlines() if "ld.global.b16" in ln]),
            registers=rep.registers,
            ok=rep.ok,
        )
    return out


if __name__ == "__main__":
    name, arch = sys.argv[1], int(sys.argv[2])
    if name == "specialisation":
        print(json.dumps(specialisation()))
    elif name == "vector_width":
        print(json.dumps(vector_width()))
    else:
        rep = compile_one(SPECS[name], arch)
        print(
            json.dumps(
                dict(
                    ok=rep.ok,
                    shared=rep.shared,
                    registers=rep.registers,
                    spills=rep.spill_stores + rep.spill_loads,
                    problems=rep.problems(),
                )
            )
        )
