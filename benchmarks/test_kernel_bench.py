"""Kernel microbenchmarks as pytest-benchmark tests: each op against its torch baseline and the peers.

    make bench-kernels                                        # python -m benchmarks.kernel_bench: saves + compares
    python -m pytest benchmarks/ --benchmark-only             # the same tests with pytest-benchmark's own options

Ops: attention forward, forward+backward and double backward; linear cross-entropy forward+backward (d hidden);
the memory update (SGD with both clips, Adam). Implementations: ours (``gradmem_fast``), the torch baseline
(SDPA, its math backend for the double backward since the fused ones have none; ``F.linear`` +
``F.cross_entropy``; the update op's torch backend) and the peers of ``benchmarks/peers.py``.

Device: CUDA when present: our Triton kernels at the GPU suite's shapes (the GPT-2 WRITE attention, the GPT-2
cross-entropy, 64 x 8 x 768 memories). Otherwise the CPU at small shapes with our ops' torch backends (the Triton
interpreter would time Python, not kernels); the peers are skipped there with the reason. The callables timed are
the ones ``benchmarks.run`` times (``bench_kernels.attention_run`` / ``ce_run`` / ``update_run``).

Not part of ``make test`` (pytest.ini's testpaths is tests/). Nothing asserts a speed; a test only checks that
its op ran. ``GRADMEM_KERNEL_BENCH_SECONDS`` bounds the session: tests that would start later are skipped, so a
lent GPU's stage always ends with its JSON written.
"""

import contextlib
import sys

import pytest
import torch

from . import bench_kernels as bk
from . import peers
from .common import Skip, is_cuda

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = is_cuda(DEVICE)
# Our op's backend: the kernels on CUDA; on the CPU the torch backend (see the module docstring).
OURS_BACKEND = "triton" if ON_CUDA else "torch"
# pedantic rounds: enough for a median on a GPU; few on a CPU (small shapes, one thread, a minute in all).
ROUNDS, WARMUP = (20, 3) if ON_CUDA else (5, 1)

if ON_CUDA:
    ATTENTION_SHAPE = bk.attention_shapes(False)[0]  # the GPT-2 WRITE shape, ragged and packed for ours
    CE_SHAPE = bk.ce_shapes(False)[0]  # GPT-2: N=16384, d=768, V=50257, bf16
    UPDATE_SHAPE = (64, 8, 768)
else:
    ATTENTION_SHAPE = ("cpu varlen", 4, [61, 128, 17, 100], None, 4, 32, torch.float32)
    CE_SHAPE = ("cpu N=512 d=64 V=4096", 512, 64, 4096, torch.float32)
    UPDATE_SHAPE = (16, 8, 128)

ATTENTION_CASES = [
    (mode, impl)
    for mode in ("fwd", "fwd+bwd", "dbwd")
    for impl in ("gradmem_fast", "sdpa_math" if mode == "dbwd" else "sdpa_flash", *peers.peers_of("attention"))
]
CE_IMPLS = ("gradmem_fast", "torch", *peers.peers_of("cross_entropy"))
UPDATE_CASES = [(kind, impl) for kind in ("sgd_clip", "adam") for impl in ("gradmem_fast", "torch")]


def _timed(benchmark, run, *, op, mode, impl, case, dtype, **extra):
    """Time ``run`` (synchronised on CUDA) with fixed rounds; the case's description goes into the JSON."""

    def call():
        run()
        if ON_CUDA:
            torch.cuda.synchronize(DEVICE)

    backend = OURS_BACKEND if impl == "gradmem_fast" else bk.backend_label(impl, DEVICE)
    benchmark.extra_info.update(
        device=str(DEVICE),
        op=op,
        mode=mode,
        impl=impl,
        case=case,
        dtype=str(dtype).replace("torch.", ""),
        backend=backend,
        **extra,
    )
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    # One line per finished test on the real stderr (pytest captures stdout): a run cut by a hard time limit
    # (the GPU suite's stage) still shows what it measured, though pytest-benchmark writes its JSON at the end.
    median_ms = benchmark.stats.stats.median * 1e3
    print(f"KERNEL {op} {mode} {impl}: median {median_ms:.4g} ms", file=sys.__stderr__, flush=True)


@contextlib.contextmanager
def _skip_unavailable():
    """A case that cannot run here (a peer off CUDA or not installed, no double backward) is a pytest skip."""
    try:
        yield
    except Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mode,impl", ATTENTION_CASES, ids=[f"{m}-{i}" for m, i in ATTENTION_CASES])
def test_attention(benchmark, mode, impl):
    name, batch, lengths, s, h, d, dtype = ATTENTION_SHAPE
    torch.manual_seed(0)
    build = bk.attention_impls(DEVICE, backend=OURS_BACKEND)[impl]
    with _skip_unavailable():
        fn, tensors, ctx, info = build(batch, lengths, s, h, d, dtype)
        with ctx():
            run = bk.attention_run(fn, tensors, mode)
            flops = bk.attention_flops(lengths if lengths is not None else [s] * batch, h, d, mode)
            _timed(benchmark, run, op="attention", mode=mode, impl=impl, case=name, dtype=dtype, flops=flops, **info)
    assert benchmark.stats is not None


@pytest.mark.parametrize("impl", CE_IMPLS)
def test_linear_cross_entropy(benchmark, impl):
    name, mode = CE_SHAPE[0], "fwd+bwd:dh"
    torch.manual_seed(0)
    make = bk.ce_impls(DEVICE, dry_run=False, backend=OURS_BACKEND)[impl]
    with _skip_unavailable():
        fn, info = make()
        run, flops = bk.ce_run(fn, *bk.ce_inputs(CE_SHAPE, DEVICE), mode)
        _timed(
            benchmark,
            run,
            op="linear_cross_entropy",
            mode=mode,
            impl=impl,
            case=name,
            dtype=CE_SHAPE[-1],
            flops=flops,
            **info,
        )
    assert benchmark.stats is not None


@pytest.mark.parametrize("kind,impl", UPDATE_CASES, ids=[f"{k}-{i}" for k, i in UPDATE_CASES])
def test_memory_update(benchmark, kind, impl):
    torch.manual_seed(0)
    with _skip_unavailable():
        run, nbytes = bk.update_run(impl, UPDATE_SHAPE, kind, DEVICE, backend=OURS_BACKEND)
        _timed(
            benchmark,
            run,
            op="memory_update",
            mode=kind,
            impl=impl,
            case="B={} m={} d={}".format(*UPDATE_SHAPE),
            dtype=torch.float32,
            bytes=nbytes,
        )
    assert benchmark.stats is not None
