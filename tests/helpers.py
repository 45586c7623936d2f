"""Shared test helpers: the one tolerance table of DESIGN.md, relative-error assertions, random documents."""

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

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


class OpTrace(TorchDispatchMode):
    """The aten ops a call runs, each with its tensors' shapes and dtypes and its other arguments: what a CUDA
    graph freezes at capture (a replay relaunches the captured kernels with the captured scalars and shapes,
    whatever Python would compute for the inputs now in the static buffers). CPU stand-ins for a capture
    record the captured call and check each replay against it (``assert_same``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        described = tree_map(lambda x: (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        self.ops.append(f"{func} {described}")
        return func(*args, **kwargs)

    def assert_same(self, replay: "OpTrace", what: str = "replay") -> None:
        diff = next((i for i, (a, b) in enumerate(zip(self.ops, replay.ops)) if a != b), None)
        if diff is None and len(replay.ops) == len(self.ops):
            return
        where = min(len(self.ops), len(replay.ops)) if diff is None else diff
        got = replay.ops[where] if where < len(replay.ops) else "(end)"
        want = self.ops[where] if where < len(self.ops) else "(end)"
        raise AssertionError(f"{what} differs from the captured call at op {where} of {len(self.ops)}: {got} vs {want}")


def packed_attention_without_host_reads(monkeypatch) -> None:
    """Route the torch backend's packed attention to its host-read-free dense form: the Triton kernels read the
    packed offsets on the device, the torch backend's per-document loop on the host, which no CUDA graph could
    replay for another batch (an ``OpTrace`` check of a stand-in capture catches it)."""
    from gradmem_fast.ops import attention as attention_ops

    per_document = attention_ops.attention_reference

    def dense(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, **kw):
        if cu_seqlens_q is None:
            return per_document(q, k, v, **kw)
        args = (kw["key_padding_mask"], kw["causal"], kw["scale"], kw["dropout_p"], kw["window"])
        extra = (kw.get("softcap"), kw.get("sinks"))
        return attention_ops._reference_packed_dense(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, *extra)

    monkeypatch.setattr(attention_ops, "attention_reference", dense)


def eager_capture(counter: dict, tensors=lambda out: [out]):
    """A CPU stand-in for ``engine.capture_cuda_graph`` with a graph's buffer discipline: the captured call's
    outputs are fixed tensors that every replay overwrites in place (``tensors(out)``: them, in a fixed
    order), computed from the static inputs only, and each replay must run the captured call's exact op
    sequence (``OpTrace``): the eager re-run would otherwise hide a Python-side value that differs between
    inputs sharing a graph, which a real replay takes from the captured call. ``counter`` counts "captures"
    and "replays"."""

    def capture(fn):
        counter["captures"] += 1
        with OpTrace() as captured:
            out = fn()
        # A tensor made from host data (torch.tensor) is a host-to-device copy on a GPU: illegal in a capture.
        lifted = [op for op in captured.ops if op.startswith("aten.lift_fresh")]
        assert not lifted, f"the captured call builds {len(lifted)} tensors from host data: {lifted[:3]}"

        def replay():
            counter["replays"] += 1
            with OpTrace() as now:
                values = fn()
            captured.assert_same(now, f"replay {counter['replays']}")
            for buffer, value in zip(tensors(out), tensors(values), strict=True):
                buffer.copy_(value)

        return replay, out

    return capture


def seeded_initial_memory(model, config) -> torch.Tensor:
    """[m, d] fp64: the initial memory a write draws when none is given (N(0, init_std^2) from a CPU generator
    seeded with ``config.seed``), written out independently of ``gradmem_fast.inputs``."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    d = model.config.hidden_size
    return torch.randn(config.num_memory_tokens, d, generator=gen, dtype=torch.float64) * config.init_std
