"""pytest configuration of the kernel microbenchmarks (``benchmarks/test_kernel_bench.py``).

Loaded only when pytest collects benchmarks/ (``make bench-kernels``, ``pytest benchmarks/``); ``make test``
collects tests/ alone. Adds the run's metadata (device, commit, torch/triton versions, peer versions) to
pytest-benchmark's JSON, keeps a CPU run to one thread (small shapes gain nothing from more; the box is
shared), and bounds the session by ``GRADMEM_KERNEL_BENCH_SECONDS``.
"""

import os
import time

import pytest
import torch

_START = time.monotonic()


def pytest_configure(config):
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("GRADMEM_KERNEL_BENCH_THREADS", "1")))


@pytest.fixture(autouse=True)
def _session_deadline():
    """Skip a test that would start past the session's budget (its JSON is written only at the end)."""
    budget = float(os.environ.get("GRADMEM_KERNEL_BENCH_SECONDS", "0") or 0)
    if budget and time.monotonic() - _START > budget:
        pytest.skip(f"time budget of {budget:.0f} s (GRADMEM_KERNEL_BENCH_SECONDS) exhausted")
    yield


def pytest_collection_modifyitems(config, items):
    """Ours and the torch baselines first, the peers last: a peer's first compile (autotuning) may use up a
    short budget, and the session deadline then skips peers rather than our own measurements."""
    from .peers import PEERS

    def is_peer(item):
        spec = getattr(item, "callspec", None)
        return bool(spec) and spec.params.get("impl") in PEERS

    items.sort(key=is_peer)  # stable: file order within each group


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from .common import run_metadata

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_json["gradmem"] = run_metadata(device, dry_run=False)
