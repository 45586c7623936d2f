"""Shared test helpers: the one tolerance table of DESIGN.md, relative-error assertions, random documents."""

import os

import torch

DEVICE = os.environ.get("GRADMEM_TEST_DEVICE", "cpu")

# DESIGN.md "Tolerances": relative error ||out - ref|| / ||ref||, per dtype of the fast path.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # IEEE fp32 (the interpreter, or tl.dot with input_precision="ieee")
    "tf32": 5e-4,  # fp32 inputs with TF32 tensor-core dots on a GPU
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def tolerance(dtype, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TOLERANCE["tf32"]
    return TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (absolute error when the reference is all zeros)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError("output has non-finite values")
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def assert_close(out, ref, dtype=None, tf32: bool = False, name: str = "output"):
    """Assert relative error within the DESIGN.md bound for ``dtype`` (default: ``out``'s dtype)."""
    dtype = out.dtype if dtype is None else dtype
    bound = tolerance(dtype, tf32)
    err = rel_error(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3e} exceeds {bound:.1e} for {dtype}"


def random_documents(lengths, vocab: int, seed: int) -> list:
    """Token-id documents [n] of the given lengths, drawn from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def right_padded(docs) -> tuple:
    """Right-padded ids and 0/1 mask [B, S] (long) of 1-D token tensors."""
    S = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), S, dtype=torch.long)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, : len(d)], mask[b, : len(d)] = d, 1
    return ids, mask
