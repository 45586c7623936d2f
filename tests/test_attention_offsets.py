"""64-bit addressing in the attention kernels (issue 13, item 6), without allocating a huge tensor.

q, k, v (and the cotangents of the double backward) are views into a sparse file-backed storage with a token
stride of 2^27 elements, so a token index of 16 or more times the stride passes 2^31: 32-bit offsets wrap
to an address before the buffer. Only the pages the test touches get memory (about 100 KB), however large
the file's apparent size. The kernels run in the Triton interpreter, which wraps int32 arithmetic like a GPU
does, so a kernel that forms ``index * stride`` in 32 bits reads the wrong memory and crashes or differs.
Each case runs in a child process (a wrapped address is a segmentation fault, not an exception) and compares
the strided run bit for bit with the same kernels on contiguous copies; the contiguous kernels are checked
against fp64 references by test_attention.py and test_attention_second_order.py.

Layouts: packed varlen (a single document of 18 tokens: the within-sequence offset overflows, not only the
document start) and padded with a head stride of 2^30 (``h * stride_h`` overflows at head 2).
"""

import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.abspath(__file__)


@pytest.mark.parametrize("layout", ["varlen", "padded"])
def test_token_and_head_offsets_do_not_wrap_at_2_31(layout):
    out = subprocess.run(
        [sys.executable, HERE, layout],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    assert out.returncode == 0, (
        f"child exited with {out.returncode} (-11: a wrapped 32-bit address)\n"
        f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    )
    assert "identical" in out.stdout, out.stdout


def _huge_views(tmp, shape, strides, count, dtype):
    """``count`` views of ``shape``/``strides`` at consecutive ``D``-element offsets of one sparse storage."""
    import torch

    n = sum((s - 1) * st for s, st in zip(shape, strides)) + count * shape[-1] + 1
    path = os.path.join(tmp, "storage.bin")
    with open(path, "wb") as f:
        f.truncate(n * torch.tensor([], dtype=dtype).element_size())
    store = torch.from_file(path, shared=True, size=n, dtype=dtype)
    views = [store.as_strided(shape, strides, i * shape[-1]) for i in range(count)]
    for t in views:
        t.copy_(torch.randn(shape, dtype=dtype))
    return views


def _main(layout):
    import torch

    from gradmem_fast.kernels import attention as A

    torch.manual_seed(0)
    dtype, D = torch.float32, 16
    with tempfile.TemporaryDirectory() as tmp:
        if layout == "varlen":
            T, H = 20, 2
            views = _huge_views(tmp, (T, H, D), (1 << 27, 3 * H * D, 1), 3, dtype)
            views[1], views[2] = views[1][:, :1], views[2][:, :1]  # GQA: one KV head
            cu = torch.tensor([0, 2, T], dtype=torch.int32)
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=18, max_seqlen_k=18)
        else:
            B, S, H = 1, 6, 3
            views = _huge_views(tmp, (B, S, H, D), (S * D, D, 1 << 30, 1), 3, dtype)
            kw = dict(key_padding_mask=torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool))
        q, k, v = views
        copies = [t.contiguous() for t in views]
        dout = torch.randn(q.shape, dtype=dtype)
        g = [torch.randn(t.shape, dtype=dtype) for t in (q, k, v)]
        results = []
        for qq, kk, vv in (views, copies):
            out, lse = A.attention_fwd(qq, kk, vv, **kw)
            grads = A.attention_bwd(dout, qq, kk, vv, out, lse, **kw)
            second = A.attention_dbwd(dout, qq, kk, vv, out, lse, *g, **kw)
            results.append([out, lse, *grads, *second])
        names = ["out", "lse", "dq", "dk", "dv", "grad_q", "grad_k", "grad_v", "grad_dout", "grad_dlse"]
        for name, a, b in zip(names, *results):
            assert torch.equal(a, b), f"{layout}: {name} differs on the strided views"
    print(f"{layout}: identical")


if __name__ == "__main__":
    _main(sys.argv[1])
