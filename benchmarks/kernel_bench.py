"""Run the pytest-benchmark kernel microbenchmarks (``make bench-kernels``; the GPU suite's ``kernels`` stage).

    python -m benchmarks.kernel_bench                    # save under benchmarks/results/pytest-benchmark/<device>/
                                                         # and compare with the previous saved run there
    python -m benchmarks.kernel_bench --json F --no-save # one JSON file, nothing saved (a lent GPU machine)
    python -m benchmarks.kernel_bench -- -k attention    # anything after -- goes to pytest

Each device gets its own storage folder, so ``--benchmark-compare`` compares a CPU run with CPU runs and an
H200 run with H200 runs. To compare a JSON brought back from a GPU machine: copy it into that device's folder
under ``Linux-CPython-<python>-64bit/`` with a ``NNNN_`` prefix, then ``pytest-benchmark --storage
file://benchmarks/results/pytest-benchmark/<device> compare``.
"""

import argparse
import glob
import os
import sys

from .common import gpu_name, repo_root, slug

TEST_FILE = os.path.join("benchmarks", "test_kernel_bench.py")


def storage_dir(device_label: str) -> str:
    return os.path.join(repo_root(), "benchmarks", "results", "pytest-benchmark", slug(device_label))


def pytest_args(args, device_label: str) -> list:
    out = [
        os.path.join(repo_root(), TEST_FILE),
        "--benchmark-only",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
        "--benchmark-columns=min,median,max,rounds",
        "--benchmark-sort=name",
    ]
    storage = args.storage or storage_dir(device_label)
    out.append(f"--benchmark-storage=file://{storage}")
    if glob.glob(os.path.join(storage, "*", "*.json")) and not args.no_compare:
        out.append("--benchmark-compare")  # the latest run saved in this device's folder
    if not args.no_save:
        out.append("--benchmark-autosave")
    if args.json:
        out.append(f"--benchmark-json={args.json}")
    return out + list(args.pytest_args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="also write pytest-benchmark's JSON to this file")
    p.add_argument("--no-save", action="store_true", help="do not autosave into the storage folder")
    p.add_argument("--no-compare", action="store_true", help="do not compare with the previous saved run")
    p.add_argument("--storage", default=None, help="storage folder (default: per device, see above)")
    p.add_argument("--seconds", type=float, default=0, help="skip tests that would start after this many seconds")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.seconds:
        os.environ["GRADMEM_KERNEL_BENCH_SECONDS"] = str(args.seconds)
    import pytest
    import torch

    device_label = gpu_name("cuda") if torch.cuda.is_available() else "cpu"
    argv = pytest_args(args, device_label)
    print("pytest " + " ".join(argv), flush=True)
    return int(pytest.main(argv))


if __name__ == "__main__":
    sys.exit(main())
