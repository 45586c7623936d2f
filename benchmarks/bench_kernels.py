"""Kernel microbenchmarks: prefix attention, fused linear cross-entropy, per-sample memory update.

Every op is compared with what a user would otherwise run, in the same process, on the same inputs.
Times are ``triton.testing.do_bench`` medians (``do_bench_cudagraph`` for the tiny update op); peak
memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

FLOP formulas (the same for every implementation, so TFLOP/s compare like for like):

* attention, per sequence of ``S`` queries/keys, ``H`` query heads of dim ``D``, causal:
  ``P = S (S + 1) / 2`` visible pairs; forward ``4 H D P`` (``QK^T`` and ``PV``); backward ``2.5x``
  forward (FlashAttention's convention: ``dV, dP, dQ, dK`` plus recomputing ``QK^T``); fwd+bwd ``3.5x``.
  Ragged batches sum ``P`` over their real lengths (padding is not useful work). The double backward
  has no formula here: time and memory only.
* linear cross-entropy, ``N`` tokens, width ``d``, vocabulary ``V``: forward ``2 N d V``; the backward
  adds ``2 N d V`` for ``dhidden`` and another ``2 N d V`` for ``dweight``.
* memory update, ``B x m x d`` fp32 memories: bandwidth only, bytes = SGD ``3 x 4 B m d`` (read M, g;
  write M), Adam ``7 x 4 B m d`` (plus read and write both moments).

Peers (``benchmarks/peers.py``): flash-attn and jvp-flash-attention in the attention section, Liger-Kernel's
fused linear cross-entropy and Cut Cross-Entropy in the cross-entropy section; on CUDA when installed,
otherwise recorded as skipped with the reason. The timed callables (``attention_run``, ``ce_run``,
``update_run``) are shared with the pytest-benchmark microbenchmarks (``benchmarks/test_kernel_bench.py``).
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from . import peers
from .common import Skip, bench_ms, is_cuda, peak_memory_mb, tflops

ATTENTION_MODES = ("fwd", "bwd", "fwd+bwd", "dbwd")
CE_MODES = ("fwd", "fwd+bwd:dh", "fwd+bwd:dh,dW")
UPDATE_KINDS = ("sgd", "sgd_clip", "adam")


# ------------------------------------------------------------------------------------------ helpers


def gradmem_op(name):
    """``gradmem_fast.<name>``, or a Skip naming why it is missing."""
    try:
        import gradmem_fast

        return getattr(gradmem_fast, name)
    except (ImportError, AttributeError) as exc:
        raise Skip(f"gradmem_fast.{name} is not available yet ({type(exc).__name__}: {exc})") from None


def our_backend(device) -> str:
    """Our kernels: compiled on CUDA, the Triton interpreter on CPU when it is on, else the torch ops."""
    if is_cuda(device):
        return "triton"
    from gradmem_fast.backend import interpreting

    return "triton" if interpreting() else "torch"


def _measure(fn, device, timing, flop_count=None, nbytes=None, cudagraph=False, memory=True):
    ms = bench_ms(fn, device, cudagraph=cudagraph, **timing)
    out = {"ms": ms}
    if flop_count is not None:
        out["tflops"] = tflops(flop_count, ms)
        out["flops"] = flop_count
    if nbytes is not None:
        out["gbps"] = nbytes / (ms * 1e-3) / 1e9
        out["bytes"] = nbytes
    if memory and is_cuda(device):
        out["peak_mem_mb"] = peak_memory_mb(fn, device)
    return out


# ------------------------------------------------------------------------------------------ attention


def attention_shapes(dry_run: bool) -> list:
    """(name, batch, lengths or None, seqlen or None, heads, head_dim, dtype) of every attention case.

    Most telling first (the WRITE-shaped cases), so a tight budget still measures them.
    """
    if dry_run:
        return [
            ("S=16", 2, None, 16, 2, 16, torch.float32),
            ("varlen", 3, [5, 17, 9], None, 2, 16, torch.float32),
        ]
    gen = torch.Generator().manual_seed(0)
    write_lengths = (8 + torch.randint(100, 451, (64,), generator=gen)).tolist()
    shapes = [
        ("gpt2-write varlen", 64, write_lengths, None, 12, 64, torch.bfloat16),
        ("tiny-kv-write", 64, None, 248, 4, 32, torch.float32),
    ]
    for d in (64, 128):
        for s in (512, 1024, 2048, 4096):
            shapes.append((f"S={s}", 16384 // s, None, s, 2048 // d, d, torch.bfloat16))
    return shapes


def attention_flops(lengths, heads, head_dim, mode):
    pairs = sum(s * (s + 1) // 2 for s in lengths)
    fwd = 4 * heads * head_dim * pairs
    return {"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)}.get(mode)


def _eager_attention(q, k, v, keep):
    """Plain torch attention on [B, H, S, D] with a boolean [S, S] visibility mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(q.dtype), v)


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[name]
    )


def attention_impls(device, backend=None):
    """name -> builder(B, lengths, S, H, D, dtype) -> (fn(q, k, v) -> out, [q, k, v], context, info dict).

    ``backend``: our op's backend (default ``our_backend(device)``)."""

    def ours(batch, lengths, s, h, d, dtype):
        op = gradmem_op("prefix_attention")
        ours_backend = backend or our_backend(device)
        if lengths is not None:  # packed varlen, the fast path for ragged documents
            total = sum(lengths)
            cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
            shape = (total, h, d)
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
        else:
            shape = (batch, s, h, d)
            kw = {}

        def fn(q, k, v):
            return op(q, k, v, causal=True, backend=ours_backend, **kw)

        return fn, [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)], contextlib.nullcontext, {}

    def sdpa(kind):
        def build(batch, lengths, s, h, d, dtype):
            s = max(lengths) if lengths is not None else s  # ragged: padded to the longest, causal

            def fn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            return (
                fn,
                [torch.randn(batch, h, s, d, device=device, dtype=dtype) for _ in range(3)],
                (lambda: _sdpa_backend(kind)),
                {},
            )

        return build

    def eager(batch, lengths, s, h, d, dtype):
        s = max(lengths) if lengths is not None else s
        keep = torch.ones(s, s, dtype=torch.bool, device=device).tril()

        def fn(q, k, v):
            return _eager_attention(q, k, v, keep)

        return (
            fn,
            [torch.randn(batch, h, s, d, device=device, dtype=dtype) for _ in range(3)],
            contextlib.nullcontext,
            {},
        )

    def peer(name):
        def build(batch, lengths, s, h, d, dtype):
            fn, tensors, label = peers.attention(name, device, batch, lengths, s, h, d, dtype)
            return fn, tensors, contextlib.nullcontext, {"peer": label}

        return build

    impls = {
        "gradmem_fast": ours,
        "sdpa_flash": sdpa("flash"),
        "sdpa_efficient": sdpa("efficient"),
        "sdpa_cudnn": sdpa("cudnn"),
        "sdpa_math": sdpa("math"),
        "eager": eager,
    }
    if not is_cuda(device):
        impls.pop("sdpa_cudnn")
    for name in peers.peers_of("attention"):  # listed everywhere; off CUDA each case records why it is skipped
        impls[name] = peer(name)
    return impls


def attention_run(fn, tensors, mode):
    """The timed callable of one attention ``mode`` on built inputs (call and time it inside the impl's context).

    ``bwd`` times the backward of one kept forward; ``dbwd`` the gradient's own gradient (second-order
    meta-training): the first-order gradients with ``create_graph`` against random cotangents, then the
    gradient of their inner product with random directions. An implementation whose gradient carries no
    graph has no double backward: Skip.
    """
    q, k, v = tensors
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(q, k, v)

        return run
    for t in (q, k, v):
        t.requires_grad_(True)
    dout = torch.randn_like(fn(q, k, v).detach())
    if mode == "bwd":
        out = fn(q, k, v)

        def run():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    elif mode == "fwd+bwd":

        def run():
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    elif mode == "dbwd":
        w = [torch.randn_like(t) for t in (q, k, v)]
        probe = torch.autograd.grad(fn(q, k, v), (q, k, v), dout, create_graph=True)
        if not any(g.requires_grad for g in probe):
            raise Skip("unsupported here: no reverse-mode double backward (its gradient carries no graph)")
        del probe

        def run():
            grads = torch.autograd.grad(fn(q, k, v), (q, k, v), dout, create_graph=True)
            inner = sum((g * wi).sum() for g, wi in zip(grads, w))
            torch.autograd.grad(inner, (q, k, v))

    else:
        raise ValueError(f"mode: expected one of {ATTENTION_MODES}, got {mode!r}")
    return run


def _attention_case(build, shape, mode, device, timing):
    name, batch, lengths, s, h, d, dtype = shape

    def measure():
        fn, tensors, ctx, info = build(batch, lengths, s, h, d, dtype)
        with ctx():
            run = attention_run(fn, tensors, mode)
            lens = lengths if lengths is not None else [s] * batch
            return {**_measure(run, device, timing, attention_flops(lens, h, d, mode)), **info}

    return measure


def run_attention(rec, device, dry_run, timing) -> None:
    impls = attention_impls(device)
    for shape in attention_shapes(dry_run):
        name, batch, lengths, s, h, d, dtype = shape
        longest = max(lengths) if lengths is not None else s
        for mode in ATTENTION_MODES:
            if mode == "dbwd" and longest > 1024:
                continue  # eager/math double backward materialises several S x S tensors per head
            for impl, build in impls.items():
                rec.case(
                    "attention",
                    impl,
                    _attention_case(build, shape, mode, device, timing),
                    device=device,
                    min_seconds=2.0,
                    mode=mode,
                    case=name,
                    dtype=str(dtype).replace("torch.", ""),
                    batch=batch,
                    seqlen=longest,
                    heads=h,
                    head_dim=d,
                    backend=backend_label(impl, device),
                )


# ------------------------------------------------------------------------------------------ cross-entropy


def ce_shapes(dry_run: bool) -> list:
    """(name, N tokens, d, V, dtype)."""
    if dry_run:
        return [("N=48 d=16 V=61", 48, 16, 61, torch.float32)]
    return [
        ("gpt2 N=16384 V=50257", 16384, 768, 50257, torch.bfloat16),
        ("llama1b N=8192 V=128256", 8192, 2048, 128256, torch.bfloat16),
        ("tiny-kv N=15360 V=256", 15360, 128, 256, torch.float32),
    ]


def _torch_ce(hidden, weight, targets):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def ce_impls(device, dry_run, backend=None):
    """name -> make() -> (fn(hidden, weight, targets) -> mean loss, info dict stored with the record).

    ``backend``: our op's backend (default ``our_backend(device)``)."""

    def ours():
        op = gradmem_op("linear_cross_entropy")
        ours_backend = backend or our_backend(device)
        return (lambda h, w, t: op(h, w, t, reduction="mean", backend=ours_backend)), {}

    def torch_eager():
        return _torch_ce, {}

    def torch_compiled():
        # The dry run traces with the eager backend (no C++/Triton compilation on a CPU box).
        return torch.compile(_torch_ce, backend="eager" if dry_run else "inductor", dynamic=False), {}

    def peer(name):
        def make():
            fn, label = peers.linear_cross_entropy(name, device)
            return fn, {"peer": label}

        return make

    impls = {"gradmem_fast": ours, "torch": torch_eager, "torch_compiled": torch_compiled}
    for name in peers.peers_of("cross_entropy"):  # listed everywhere; off CUDA each case records why it is skipped
        impls[name] = peer(name)
    return impls


def ce_inputs(shape, device):
    """hidden [N, d], weight [V, d] (scaled so logits are O(1)), targets [N] of one cross-entropy case."""
    _, n, d, v, dtype = shape
    hidden = torch.randn(n, d, device=device, dtype=dtype)
    weight = torch.randn(v, d, device=device, dtype=dtype) / math.sqrt(d)
    return hidden, weight, torch.randint(0, v, (n,), device=device)


def ce_run(fn, hidden, weight, targets, mode):
    """(timed callable, FLOPs) of one cross-entropy ``mode``: ``fwd``, ``fwd+bwd:dh``, ``fwd+bwd:dh,dW``."""
    n, d = hidden.shape
    v = weight.shape[0]
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(hidden, weight, targets)

        return run, 2 * n * d * v
    if mode not in CE_MODES:
        raise ValueError(f"mode: expected one of {CE_MODES}, got {mode!r}")
    wrt = [hidden.requires_grad_(True)]
    if mode.endswith("dW"):
        wrt.append(weight.requires_grad_(True))

    def run():
        torch.autograd.grad(fn(hidden, weight, targets), wrt)

    return run, 2 * n * d * v * (1 + len(wrt))


def _ce_case(make, shape, mode, device, timing):
    def measure():
        fn, info = make()
        run, count = ce_run(fn, *ce_inputs(shape, device), mode)
        return {**_measure(run, device, timing, count), **info}

    return measure


def backend_label(impl, device) -> str:
    """The record's ``backend``: ours (triton / torch), ``peer`` for another project's kernels, else torch."""
    if impl.startswith("gradmem"):
        return our_backend(device)
    return "peer" if impl in peers.PEERS else "torch"


def run_cross_entropy(rec, device, dry_run, timing) -> None:
    for shape in ce_shapes(dry_run):
        name, n, d, v, dtype = shape
        for mode in CE_MODES:
            for impl, make in ce_impls(device, dry_run).items():
                rec.case(
                    "linear_cross_entropy",
                    impl,
                    _ce_case(make, shape, mode, device, timing),
                    device=device,
                    min_seconds=2.0,
                    mode=mode,
                    case=name,
                    dtype=str(dtype).replace("torch.", ""),
                    tokens=n,
                    hidden=d,
                    vocab=v,
                    backend=backend_label(impl, device),
                )


# ------------------------------------------------------------------------------------------ memory update


def update_shapes(dry_run: bool) -> list:
    """(B, m, d) fp32 memories (16-bit models keep fp32 memories)."""
    if dry_run:
        return [(4, 2, 16)]
    return [(64, 8, 128), (64, 8, 768), (64, 32, 2048), (16, 32, 4096)]


def _update_kwargs(kind):
    return {
        "sgd": dict(optimizer="sgd"),
        "sgd_clip": dict(optimizer="sgd", clip_value=1.0, clip_norm=1.0),
        "adam": dict(optimizer="adam", clip_norm=1.0),
    }[kind]


def update_run(impl, shape, kind, device, dry_run=False, backend=None):
    """(timed callable, bytes moved) of one memory update: ``gradmem_fast`` (our kernels where they run, or
    ``backend``), ``torch`` (the op's torch backend) or ``torch_compiled`` (that backend under ``torch.compile``)."""
    b, m, d = shape
    op = gradmem_op("memory_update")
    memory = torch.randn(b, m, d, device=device)
    grad = torch.randn(b, m, d, device=device)
    kwargs = _update_kwargs(kind)
    backend = (backend or our_backend(device)) if impl == "gradmem_fast" else "torch"
    state = None
    if kind == "adam":
        state = (torch.zeros_like(memory), torch.rand_like(memory))

    def call(mem, g, st):
        return op(mem, g, lr=1e-2, state=st, step=3 if st is not None else 1, backend=backend, **kwargs)

    if impl == "torch_compiled":
        call = torch.compile(call, backend="eager" if dry_run else "inductor", dynamic=False)

    def run():
        with torch.no_grad():
            call(memory, grad, state)

    return run, (7 if kind == "adam" else 3) * memory.numel() * memory.element_size()


def _update_case(impl, shape, kind, device, timing, dry_run):
    def measure():
        run, nbytes = update_run(impl, shape, kind, device, dry_run)
        return _measure(run, device, timing, nbytes=nbytes, cudagraph=True, memory=False)

    return measure


def run_update(rec, device, dry_run, timing) -> None:
    for shape in update_shapes(dry_run):
        for kind in UPDATE_KINDS:
            for impl in ("gradmem_fast", "torch", "torch_compiled"):
                rec.case(
                    "memory_update",
                    impl,
                    _update_case(impl, shape, kind, device, timing, dry_run),
                    device=device,
                    min_seconds=1.0,
                    mode=kind,
                    case="B={} m={} d={}".format(*shape),
                    dtype="fp32",
                    batch=shape[0],
                    memory_tokens=shape[1],
                    hidden=shape[2],
                    backend=backend_label(impl, device),
                )
