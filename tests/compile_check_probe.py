"""Toy kernels for tests/test_compile_check.py: one that fits, one far over the shared-memory limit,
and one that needs more registers than a thread has. Run as a script with TRITON_INTERPRET unset."""
import json
import sys

import triton
import triton.language as tl

from gradmem_fast.tools.compile_check import CompileSpec, compile_one


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


SPECS = {
    "fits": CompileSpec("scale", scale_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "factor": "fp32"},
                        {"BLOCK": 256}, num_warps=4, num_stages=1),
    "too_much_shared": CompileSpec("matmul", matmul_loop_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
                                   "K": "i32"}, {"BLOCK": 256}, num_warps=8, num_stages=4),
    "spills": CompileSpec("matmul", matmul_loop_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
                          "K": "i32"}, {"BLOCK": 256}, num_warps=1, num_stages=1),
}

if __name__ == "__main__":
    name, arch = sys.argv[1], int(sys.argv[2])
    rep = compile_one(SPECS[name], arch)
    print(json.dumps(dict(ok=rep.ok, shared=rep.shared, registers=rep.registers, spills=rep.spill_stores + rep.spill_loads,
                          problems=rep.problems())))
