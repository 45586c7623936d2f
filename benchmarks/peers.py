"""Peer implementations measured beside ours in the same run (issue 14): optional and benchmark-only.

Record name, section, distribution (pinned for the wheels folder) and the entry point used:

- ``liger`` (cross_entropy), ``liger-kernel==0.8.5``:
  ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(input, weight, target, reduction=)``
- ``cce`` (cross_entropy), ``cut-cross-entropy==25.1.1``:
  ``cut_cross_entropy.linear_cross_entropy(e, c, targets, impl="cce")`` (its default gradient filter)
- ``jvp_flash_attention`` (attention), ``jvp-flash-attention==0.14.0``:
  ``jvp_flash_attention.jvp_attention.attention(q, k, v, causal=True)`` on ``[B, H, S, D]``, S a multiple of 32
- ``flash_attn`` (attention): the first importable of ``flash_attn_3`` (module ``flash_attn_interface``),
  ``flash-attn`` 2 (``flash_attn``), ``flash-attn-4`` (``flash_attn.cute``): ``flash_attn_func(q, k, v,
  causal=True)`` on ``[B, S, H, D]``; ragged documents packed as ``[T, H, D]`` through
  ``flash_attn_varlen_func(q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=, max_seqlen_k=, causal=True)``

None of them is a dependency of ``make test``; nothing here imports them at module import time (only a case
that runs on CUDA does). They run on CUDA only: on a CPU every peer case is recorded as skipped with the
reason and the installed version (or "not installed"). The three pure-Python ones travel to a GPU machine
that cannot download as wheels in ``benchmarks/wheels/`` (``benchmarks/fetch_peer_wheels.sh``); flash-attn
is measured only where the machine has it (see benchmarks/README.md).
"""

import importlib
import importlib.metadata

import torch

from .common import Skip, is_cuda

# Pinned versions of the pure-Python peers (benchmarks/fetch_peer_wheels.sh downloads exactly these).
WHEEL_PINS = {
    "liger-kernel": "0.8.5",
    "cut-cross-entropy": "25.1.1",
    "jvp-flash-attention": "0.14.0",
}
# Every distribution whose version results.json records (flash-attn under each of its three packagings).
DISTRIBUTIONS = (
    "liger-kernel",
    "cut-cross-entropy",
    "jvp-flash-attention",
    "flash-attn",
    "flash_attn_3",
    "flash-attn-4",
)
NOT_INSTALLED = "not installed"

PEERS = {
    # impl name -> (section, distributions it may come from, what it is)
    "liger": ("cross_entropy", ("liger-kernel",), "Liger-Kernel fused linear cross-entropy"),
    "cce": ("cross_entropy", ("cut-cross-entropy",), "Apple Cut Cross-Entropy"),
    "jvp_flash_attention": ("attention", ("jvp-flash-attention",), "jvp-flash-attention (Triton, JVP/HVP)"),
    "flash_attn": ("attention", ("flash_attn_3", "flash-attn", "flash-attn-4"), "FlashAttention 3, 2 or 4"),
}
# jvp-flash-attention's kernels need sequence lengths that are multiples of this (its MIN_SEQUENCE_LENGTH).
JVP_SEQ_MULTIPLE = 32


def version(distribution: str) -> str:
    """Installed version of a distribution, read from its metadata (the package itself is not imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def versions() -> dict:
    """``distribution -> version or "not installed"`` for every peer (recorded in results.json's meta)."""
    return {name: version(name) for name in DISTRIBUTIONS}


def peers_of(section: str) -> list:
    return [name for name, (sec, _, _) in PEERS.items() if sec == section]


def _installed(name: str) -> str:
    found = [f"{d} {version(d)}" for d in PEERS[name][1] if version(d) != NOT_INSTALLED]
    return ", ".join(found) if found else f"{' / '.join(PEERS[name][1])} not installed"


def require(name: str, device) -> None:
    """Raise Skip unless peer ``name`` can run on ``device`` (CUDA, and installed)."""
    if not is_cuda(device):
        raise Skip(f"peer {name} runs on CUDA only ({_installed(name)})")
    if all(version(d) == NOT_INSTALLED for d in PEERS[name][1]):
        raise Skip(
            f"peer {name}: {_installed(name)} (a GPU machine gets the pure-Python peers from benchmarks/wheels/, "
            "see benchmarks/README.md)"
        )


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken peer install is recorded as a skip, not our failure
        raise Skip(f"peer {name}: import {module} failed ({type(exc).__name__}: {str(exc)[:200]})") from None


def _first(out):
    """Several peers return (value, extras...): keep the value."""
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------ cross-entropy


def linear_cross_entropy(name: str, device):
    """``fn(hidden [N, d], weight [V, d], targets [N]) -> mean loss`` of peer ``name``, and a label."""
    require(name, device)
    if name == "liger":
        functional = _import("liger_kernel.transformers.functional", name)

        def liger(h, w, t):
            return _first(functional.liger_fused_linear_cross_entropy(h, w, t, reduction="mean"))

        return liger, f"liger-kernel {version('liger-kernel')}"
    if name == "cce":
        cce = _import("cut_cross_entropy", name)

        def cut(h, w, t):
            # CCE's defaults kept (filter_eps="high" skips gradient blocks below the input dtype's eps / 32).
            return cce.linear_cross_entropy(h, w, t, reduction="mean", impl="cce")

        return cut, f"cut-cross-entropy {version('cut-cross-entropy')}"
    raise ValueError(f"not a cross-entropy peer: {name!r}")


# ------------------------------------------------------------------------------------------ attention


def flash_attn_module(name: str = "flash_attn"):
    """(module with flash_attn_func / flash_attn_varlen_func, label): FA3, then FA2, then FA4."""
    for dist, module in (
        ("flash_attn_3", "flash_attn_interface"),
        ("flash-attn", "flash_attn"),
        ("flash-attn-4", "flash_attn.cute"),
    ):
        if version(dist) == NOT_INSTALLED:
            continue
        mod = _import(module, name)
        if hasattr(mod, "flash_attn_func") and hasattr(mod, "flash_attn_varlen_func"):
            return mod, f"{dist} {version(dist)} ({module})"
    raise Skip(f"peer {name}: no importable flash_attn_func in {', '.join(PEERS[name][1])}")


def attention(name: str, device, batch, lengths, seqlen, heads, head_dim, dtype):
    """(fn(q, k, v) -> out, [q, k, v], label) of peer ``name`` for one attention case (causal).

    ``lengths`` (ragged documents) or ``seqlen`` (dense). flash-attn packs ragged documents (varlen);
    jvp-flash-attention has no varlen path: its batch is padded to the longest document rounded up to a
    multiple of 32 (right padding does not change a causal row), the padding counted as its own cost.
    """
    require(name, device)
    if name == "flash_attn":
        if dtype not in (torch.float16, torch.bfloat16):
            raise Skip(f"peer flash_attn: 16-bit inputs only, got {dtype}")
        mod, label = flash_attn_module(name)
        if lengths is not None:
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
            longest = max(lengths)
            tensors = [torch.randn(sum(lengths), heads, head_dim, device=device, dtype=dtype) for _ in range(3)]

            def fa_varlen(q, k, v):
                # Keywords: flash-attn 4 puts an optional ``qv`` before cu_seqlens_q; the names agree in 2, 3, 4.
                return _first(
                    mod.flash_attn_varlen_func(
                        q,
                        k,
                        v,
                        cu_seqlens_q=cu,
                        cu_seqlens_k=cu,
                        max_seqlen_q=longest,
                        max_seqlen_k=longest,
                        causal=True,
                    )
                )

            return fa_varlen, tensors, label
        tensors = [torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype) for _ in range(3)]

        def fa(q, k, v):
            return _first(mod.flash_attn_func(q, k, v, causal=True))

        return fa, tensors, label
    if name == "jvp_flash_attention":
        mod = _import("jvp_flash_attention.jvp_attention", name)
        s = max(lengths) if lengths is not None else seqlen
        s = -(-s // JVP_SEQ_MULTIPLE) * JVP_SEQ_MULTIPLE
        tensors = [torch.randn(batch, heads, s, head_dim, device=device, dtype=dtype) for _ in range(3)]

        def jvp(q, k, v):
            return mod.attention(q, k, v, causal=True)

        return jvp, tensors, f"jvp-flash-attention {version('jvp-flash-attention')} (padded to {s})"
    raise ValueError(f"not an attention peer: {name!r}")
