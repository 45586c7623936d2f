"""Backend selection: ``torch`` (plain differentiable torch, the reference ops) or ``triton`` (kernels).

Rule: ``auto`` means ``triton`` when CUDA is available and ``torch`` otherwise. The environment variable
``GRADMEM_FAST_BACKEND=torch|triton`` overrides ``auto``, and inside ``with use_backend(name):`` ``auto``
means ``name`` (an explicit argument always wins).
On a machine without CUDA the Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``),
which must be set before Triton is first imported; ``resolve_backend`` sets it when it still can.
"""

import contextlib
import contextvars
import os
import sys

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "GRADMEM_FAST_BACKEND"

# Set by ``use_backend``: what "auto" means inside an engine call, so every op reached through a model
# (attention via the Hugging Face registry, for instance) runs on the engine's backend.
_override = contextvars.ContextVar("gradmem_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, ``resolve_backend("auto")`` returns ``backend`` ("torch" or "triton")."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"use_backend: backend must be 'torch' or 'triton', got {backend!r}")
    token = _override.set(backend)
    try:
        yield
    finally:
        _override.reset(token)


def resolve_backend(backend: str = "auto", device=None) -> str:
    """Return ``"torch"`` or ``"triton"`` for the requested backend name.

    ``device`` (optional) is where the data lives; a CUDA device selects compiled kernels, anything else
    the interpreter.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _override.get() is not None:
        backend = _override.get()
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in ("torch", "triton"):
                raise ValueError(f"environment variable {ENV_VAR} must be 'torch' or 'triton', got {env!r}")
            backend = env
        else:
            backend = "triton" if torch.cuda.is_available() else "torch"
    if backend == "triton":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if not on_cuda:
            ensure_triton_interpreter()
    return backend


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ensure_triton_interpreter() -> None:
    """Make Triton run kernels on the CPU, or explain why it cannot."""
    if interpreting():
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "the triton backend on CPU tensors needs the Triton interpreter, but Triton was already "
            "imported without TRITON_INTERPRET=1; set TRITON_INTERPRET=1 in the environment before "
            "starting Python, or use backend='torch'"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def check_interpreter_dtype(tensor: torch.Tensor) -> None:
    """Refuse bfloat16 on the triton backend for CPU tensors (the interpreter), before any work.

    The interpreter's bf16 dot products are garbage (see ``kernels/runtime.py``, which also refuses them
    inside any kernel that reaches one); float16, float32 and float64 are exact there.
    """
    if tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu":  # meta tensors (the census) compute nothing
        raise TypeError(
            "model: bfloat16 weights on the triton backend need a GPU (the Triton interpreter's bf16 dot "
            "products are garbage); use backend='torch' or float32 on a CPU"
        )
