"""Test setup shared by every test file.

The Triton interpreter must be switched on before Triton is imported anywhere, so this runs first.
On a CUDA machine (the GPU suite) set GRADMEM_TEST_DEVICE=cuda to run the kernels compiled instead.
"""

import os

if os.environ.get("GRADMEM_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import DEVICE  # noqa: E402

# One intra-op thread unless told otherwise: make test runs the sm_90 compile check on the other core, and
# with two threads beside it the many tiny ops of the interpreter tests slow down 10-30x (oversubscription).
torch.set_num_threads(int(os.environ.get("GRADMEM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test: seed from the test's own id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def nan_empty():
    """Factory for output buffers pre-filled with NaN, so a kernel that skips a store is caught."""

    def make(*shape, dtype=torch.float32, device=DEVICE):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    return make
