"""Launch helpers of the prefix-attention kernels (forward, backward, dropout mask) and their configs.

Layouts (the same kernels serve both; only where a sequence starts and how long it is differ):

* packed varlen: ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``, ``cu_seqlens_q/k`` int32 ``[B + 1]``
  (FlashAttention convention, ending at Tq/Tk: tokens past the end would not be written); log-sum-exp
  ``[Hq, Tq]``; optional key mask ``[Tk]``;
* padded: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (any strides with a unit last stride, e.g. the
  transposed views Hugging Face hands over); log-sum-exp ``[B, Hq, Sq]``; optional key padding mask
  ``[B, Sk]`` (nonzero = keep) applied inside the kernels, so there is no unpadding copy.

The padded layout still computes the padded blocks (they are masked, not skipped); the packed layout is the
fast path for many documents of different lengths.

Dropout seed: the kernels read it from an int64 device tensor (``Seed``, see ``_seed_pointer``), so a new
seed is a new value in memory, not a new kernel argument: no recompile, and a CUDA graph replays with it.

Configurations: a short curated list per head-dim class (padded power-of-two ``BLOCK_D``) and element size,
autotuned on a GPU; under the Triton interpreter one small configuration is used (autotuning needs a GPU
driver). ``compile_specs()`` lists every configuration for ``gradmem_fast.tools.compile_check``.

Autotuning by length bucket: a tile that suits 4096-token sequences wastes most of its rows on a 136-token
document, so the tuned choice depends on length. Triton's autotuner keys on argument values; keying it on
the lengths themselves would re-tune (benchmark every configuration) at each new length, keying it on the
flags alone lets the first call's length decide for all. The launcher keeps one autotuner per
``length_bucket`` (next power of two of ``max(max_seqlen_q, max_seqlen_k)``, clamped to [128, 4096]: at most
six tunings per kernel class, flags and alignment), and buckets up to 1024 tokens, where GradMem's 100-1000
token contexts fall, also try the short-document tiles of ``_SHORT`` (64-row query tiles, 64-key key tiles)
where a class's list has none. The bucket is part of the tuner's cache key rather than a kernel argument,
so no kernel signature changes and the binaries are shared between buckets.

Soft-capping (``softcap=c`` of every launcher): the ``SOFTCAP`` constexpr of every kernel (0.0 = off compiles
exactly the uncapped code; a capped model compiles one more binary per kernel for its c). Capped calls pick
from the same tables less the entries that spill with the cap's extra tiles (``_SOFTCAP_SPILLS``, with
``_SOFTCAP_EXTRA`` where a list would empty); the compile check compiles every capped entry. Sink logits
are no kernel matter: ``gradmem_fast.ops.attention`` composes them on the kernels' outputs.

Backward (``attention_bwd``): by default of the op layer the dK/dV kernel also accumulates dQ with atomics
(kind ``dkdv_atomic``, 5 GEMM units); ``deterministic=True`` (torch's deterministic mode) runs the split
``dkdv`` and ``dq`` kernels (7 units). Formulas in attention_bwd.py.
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .attention_common import _dropout_mask_kernel
from .attention_dbwd import attn_dbwd_kernel
from .attention_fwd import attn_fwd_kernel
from .runtime import CompileSpec, Variant, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
FP32_PRECISIONS = ("ieee", "tf32")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return interpreting()


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (head-dim class, element size): "plain" for calls without
# dropout, "dropout" for calls with it (Philox needs registers of its own, so those tiles are smaller or
# get more warps). Forward and dQ tile queries by BLOCK_M and stream keys by BLOCK_N; dK/dV tiles keys by
# BLOCK_N and streams queries by BLOCK_M.
# Two tables per kernel: these ``_*_CONFIGS`` serve unaligned calls (``_aligned_call`` false: scalar loads,
# so small tiles), ``_ALIGNED`` below overrides entries for aligned calls (16-byte vector loads, cp.async,
# wgmma: larger tiles fit). Every entry passes the sm_90 compile check without spills in the specialisation
# it is launched with (compile_specs() compiles each entry in the variants of the tables that hold it).
_FWD_CONFIGS = {
    # dropout 128x64 spills unaligned (255 regs + 64 B); 128x32: 173 regs
    (64, 2): {"plain": [(128, 64, 8, 3), (64, 64, 4, 3)], "dropout": [(128, 32, 8, 3)]},
    # d128 dropout: 128x32 spills 12 B unaligned, 64x64 28 B; 64x32 fits (255 regs)
    (128, 2): {"plain": [(128, 32, 8, 3), (64, 64, 8, 3)], "dropout": [(64, 32, 8, 3)]},
    # d256: 32x32 with 4 warps spills 124 B unaligned (aligned: 238 regs, see _ALIGNED)
    (256, 2): {"plain": [(32, 32, 8, 2), (16, 16, 4, 2)], "dropout": [(16, 16, 4, 2)]},
    (64, 4): {"plain": [(128, 64, 8, 3), (64, 64, 4, 3)], "dropout": [(128, 64, 8, 3)]},
    # fp32 d128 unaligned: 64x64 spills 208 B, 128x32 with dropout 8 B
    (128, 4): {"plain": [(128, 32, 8, 3)], "dropout": [(64, 32, 8, 3)]},
    # fp32 d256 unaligned: 32x32 spills 92 B, 16x32 40 B (148 B with dropout); 16x16: 199 / 220 regs
    (256, 4): {"plain": [(16, 16, 4, 2)], "dropout": [(16, 16, 4, 2)]},
}
_DKDV_CONFIGS = {
    (64, 2): {"plain": [(32, 128, 8, 3), (64, 64, 8, 2)], "dropout": [(32, 128, 8, 3)]},
    # d128 64x64 spills 8 B unaligned with the 64-bit row offsets (255 regs aligned): not in either table.
    (128, 2): {"plain": [(32, 64, 8, 2)], "dropout": [(32, 64, 8, 2)]},
    (256, 2): {"plain": [(32, 32, 8, 2), (16, 32, 4, 2)], "dropout": [(32, 32, 8, 2)]},
    (64, 4): {"plain": [(32, 64, 8, 2)], "dropout": [(32, 64, 8, 2)]},  # 32x128 spills 192 B unaligned
    (128, 4): {"plain": [(16, 32, 4, 2)], "dropout": [(16, 32, 4, 2)]},
    (256, 4): {"plain": [(16, 32, 8, 1)], "dropout": [(16, 32, 8, 1)]},
}
# dK/dV with dQ accumulated by atomics (deterministic=False): one more dot (dS^T K) and its [BLOCK_M, D]
# fp32 result live at the atomic add on top of the dK/dV kernel's state. Unaligned 16-bit: d128 32x64 spills
# 16 B (32x32 with 8 warps: 250 regs, 246 with dropout); d256 16x32 with 4 warps spills 16 B (8 warps: 255).
_DKDV_ATOMIC_CONFIGS = {
    (64, 2): {"plain": [(32, 128, 8, 3), (64, 64, 8, 2)], "dropout": [(32, 128, 8, 3)]},
    (128, 2): {"plain": [(32, 32, 8, 2)], "dropout": [(32, 32, 8, 2)]},
    (256, 2): {"plain": [(32, 32, 8, 2), (16, 32, 8, 2)], "dropout": [(32, 32, 8, 2)]},
    (64, 4): {"plain": [(32, 64, 8, 2)], "dropout": [(32, 64, 8, 2)]},
    (128, 4): {"plain": [(16, 32, 4, 2)], "dropout": [(16, 32, 4, 2)]},
    (256, 4): {"plain": [(16, 32, 8, 1)], "dropout": [(16, 32, 8, 1)]},
}
_DQ_CONFIGS = {
    # dropout 128x64 spills 8 B unaligned; 128x32: 188 regs
    (64, 2): {"plain": [(128, 64, 8, 3), (64, 64, 4, 3)], "dropout": [(128, 32, 8, 3)]},
    (128, 2): {"plain": [(64, 32, 8, 2), (32, 64, 8, 2)], "dropout": [(32, 64, 8, 2)]},
    # unaligned: d256 dropout 16x32 spills 320 B (16x16: 255 regs); fp32 d64 plain 64x32 spills 8 B
    (256, 2): {"plain": [(16, 32, 4, 2), (32, 16, 8, 2)], "dropout": [(16, 16, 4, 2)]},
    (64, 4): {"plain": [(128, 64, 8, 3)], "dropout": [(64, 32, 4, 3)]},
    # fp32 d128 unaligned: 128x32 spills 20 B (and 8 B with dropout, aligned too), 64x32 with 8 warps more
    (128, 4): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 4, 2)]},
    (256, 4): {"plain": [(32, 32, 8, 2), (32, 16, 4, 2)], "dropout": [(32, 16, 4, 2)]},
}
# Double backward (kernels/attention_dbwd.py): a program holds three input tiles of its own side (q, dO,
# gQ or k, v, gK, gV) and up to five recomputed score-shaped tiles, about twice the live state of the
# backward, so tiles are small. Every entry was found by compiling candidates for sm_90 and keeping the
# first spill-free one; an empty list means none was found, and the launcher refuses that class
# (``dbwd_supported``) rather than run a spilling kernel.
# Row pass (beta, psi, grad dO): one [BLOCK_M, D] accumulator. Unaligned fp16 regs: d64 64x32/8 202 (64x32/4
# spilled 40 B), with dropout 32x32 255; d128 16x16 255; d256 236 / 244.
_DBWD_ROW_CONFIGS = {
    (64, 2): {"plain": [(64, 32, 8, 2)], "dropout": [(32, 32, 4, 2)]},
    (128, 2): {"plain": [(16, 16, 4, 1)], "dropout": [(16, 16, 4, 1)]},
    (256, 2): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 8, 1)]},
    (64, 4): {"plain": [(16, 32, 4, 1)], "dropout": [(16, 32, 4, 1)]},
    (128, 4): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 8, 1)]},
    (256, 4): {"plain": [], "dropout": []},
}
_DBWD_DQ_CONFIGS = {
    (64, 2): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 4, 2)]},
    (128, 2): {"plain": [(16, 16, 4, 1)], "dropout": [(16, 16, 4, 1)]},
    (256, 2): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 8, 1)]},
    (64, 4): {"plain": [(32, 32, 4, 1)], "dropout": [(32, 32, 4, 2)]},
    (128, 4): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 4, 1)]},
    (256, 4): {"plain": [], "dropout": []},
}
_DBWD_DKDV_CONFIGS = {
    (64, 2): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 4, 2)]},
    (128, 2): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 8, 1)]},
    (256, 2): {"plain": [(16, 16, 4, 1)], "dropout": [(16, 16, 4, 1)]},
    (64, 4): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 4, 2)]},
    # fp32 d128 unaligned: 32x16 spills (132 B; 36 B with dropout): 16x16 (170 / 242 regs)
    (128, 4): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 4, 1)]},
    (256, 4): {"plain": [], "dropout": []},
}
# Fused key pass (grad k, grad v, grad q by atomics): the key pass plus two dots and the atomic tile.
# Unaligned fp16: d64 32x32/4 208 / 252 regs; d128 32x32/8 255 (32x32/4 spills 20 B); d256 16x16/8 254 / 255
# (16x16/4 spills 16 B).
_DBWD_FUSED_CONFIGS = {
    **_DBWD_DKDV_CONFIGS,
    (128, 2): {"plain": [(32, 32, 8, 1)], "dropout": [(32, 32, 8, 1)]},
    (256, 2): {"plain": [(16, 16, 8, 1)], "dropout": [(16, 16, 8, 1)]},
}
# fp32 with input_precision="ieee": FMA dots keep both operands in registers, so one small tile per class.
_IEEE_CONFIGS = {
    "fwd": {64: [(32, 32, 8, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
    # d256 with 4 warps: ptxas caps the unaligned dropout kernel at 168 regs and spills (8 warps: 186 regs)
    "dkdv": {64: [(32, 32, 8, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 8, 1)]},
    # atomic dQ, unaligned with dropout: d64 32x32 spills (16x32 with 8 warps: 110 regs), d256 as dkdv (201)
    "dkdv_atomic": {64: [(16, 32, 8, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 8, 1)]},
    "dq": {64: [(32, 32, 8, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
    # IEEE fp32 double backward: FMA dots replicate their operands across threads and five of them are in
    # flight; without alignment hints the grad-q pass spills at every tile shape tried (16x16 with 1-8
    # warps), so unaligned calls are refused. Aligned calls have 16x16 tiles (``_ALIGNED_IEEE``).
    "dbwd_row": {64: [], 128: [], 256: []},
    "dbwd_dq": {64: [], 128: [], 256: []},
    "dbwd_dkdv": {64: [], 128: [], 256: []},
    "dbwd_fused": {64: [], 128: [], 256: []},
}


# Aligned calls: entries that differ from the unaligned tables, found by compiling candidates for sm_90 in the
# ``aligned`` specialisation and keeping the first spill-free one, largest tiles first (registers in the
# comments, measured with Triton 3.6's ptxas). Kinds/classes not listed use the unaligned entry.
# fp16 figures (bf16 shares the table), "plain" with key mask and window, "dropout" with dropout added; a
# wgmma tile needs 64 rows per warpgroup of 4 warps, so BLOCK_M = 128 goes with 8 warps (BLOCK_N for the
# key-side kernels, whose dots have the keys as rows).
_ALIGNED = {
    # d128 forward: 128x64 (198 regs, 128 KiB smem) instead of 128x32 (158); dropout stays at 128x32
    # (128x64 with dropout reaches 255 regs).
    "fwd": {
        (64, 2): {"dropout": [(128, 64, 8, 3)]},  # 172 regs aligned
        (128, 2): {"plain": [(128, 64, 8, 3), (128, 32, 8, 3)], "dropout": [(128, 32, 8, 3)]},
        (256, 2): {"plain": [(32, 32, 4, 2)], "dropout": [(32, 32, 4, 2)]},  # 238 / 255 regs
        (128, 4): {"plain": [(128, 32, 8, 3), (64, 64, 8, 3)], "dropout": [(128, 32, 8, 3)]},  # fp32 195/224, 245
        (256, 4): {"plain": [(32, 32, 8, 2), (16, 32, 4, 2)], "dropout": [(16, 32, 4, 2)]},
    },  # fp32 176 / 198
    # d64: 64 keys x 128 queries streamed (239 regs; spills with dropout, which keeps the unaligned entry);
    # d128: 32x128 (233 regs) first (spills 8 B with dropout).
    "dkdv": {
        (64, 2): {"plain": [(64, 128, 8, 2), (32, 128, 8, 3)]},
        (128, 2): {"plain": [(32, 128, 8, 2), (32, 64, 8, 2)]},
        (64, 4): {"plain": [(32, 64, 8, 2), (32, 128, 8, 2)]},
    },  # fp32 32x128: 207 regs aligned
    "dkdv_atomic": {
        (64, 2): {"plain": [(64, 128, 8, 2), (32, 128, 8, 3)]},
        (128, 2): {"plain": [(32, 128, 8, 2), (32, 64, 8, 2)]},
        (64, 4): {"plain": [(32, 64, 8, 2), (32, 128, 8, 2)]},
    },
    # d128 dQ: 128-query tiles (128x64: 218 regs; 128x32: 182, with dropout 223; 128x64 spills with dropout).
    "dq": {
        (128, 2): {"plain": [(128, 64, 8, 2), (128, 32, 8, 2)], "dropout": [(128, 32, 8, 2)]},
        (256, 2): {"dropout": [(16, 32, 4, 2)]},  # 168 regs aligned
        (64, 4): {"plain": [(128, 64, 8, 3), (64, 32, 4, 3)]},  # fp32: 217 / 174 regs aligned
        (128, 4): {"plain": [(128, 32, 8, 2), (32, 32, 4, 2)]},
    },  # fp32: 219 regs aligned
    # Double backward on wgmma-sized tiles, 128 queries over 8 warps (d64 / d128 regs, plain -> dropout):
    # grad q 144 / 192 -> 186 / 236.
    "dbwd_row": {
        (64, 2): {"plain": [(128, 32, 8, 2), (64, 64, 4, 2)], "dropout": [(128, 32, 8, 2)]},
        (128, 2): {"plain": [(128, 32, 8, 2), (64, 32, 4, 2)], "dropout": [(128, 32, 8, 2)]},
    },
    "dbwd_dq": {
        (64, 2): {"plain": [(128, 32, 8, 2), (64, 64, 4, 2)], "dropout": [(128, 32, 8, 2)]},
        (128, 2): {"plain": [(128, 32, 8, 2), (64, 32, 4, 2)], "dropout": [(128, 32, 8, 2)]},
    },
    # d64 key side: 128 keys over 8 warps (200 regs; 255 with dropout, which keeps 32x32). d128 spills at
    # every wgmma-sized tile tried (32x128/8, 64x64/4, 32x64/4 and /8, 16x64/4): the unaligned 32x32 stays.
    # fp32 d128 aligned keeps 32x16 (210 / 198 regs), which spills unaligned.
    "dbwd_dkdv": {
        (64, 2): {"plain": [(32, 128, 8, 2), (32, 64, 4, 2)]},
        (128, 4): {"plain": [(32, 16, 4, 1)], "dropout": [(32, 16, 4, 1)]},
    },
    # fused key pass, aligned fp16: d64 with dropout 32x64/4 255 regs (32x128/8 spills 28 B); d128 16x128/8
    # 246 regs (32x64/4, 64x64/4, 32x128/8, 16x64/4 spill; with dropout every one tried, so 32x32/8 stays).
    "dbwd_fused": {
        (64, 2): {"plain": [(32, 128, 8, 2), (32, 64, 4, 2)], "dropout": [(32, 64, 4, 2), (32, 32, 4, 2)]},
        (128, 2): {"plain": [(16, 128, 8, 2), (32, 32, 8, 1)]},
        (128, 4): {"plain": [(32, 16, 4, 1)], "dropout": [(32, 16, 4, 1)]},
    },
}
# IEEE fp32 double backward: with aligned operands the FMA tiles fit at 16x16 for d <= 64 (regs with
# dropout: row pass 124, grad q 168, key pass 134, fused key pass 132) and, for d128, in the atomic-free
# path (row pass 198 with 8 warps, grad q 255, key pass 234; the fused key pass spills 364 B at 16x16 with 8
# warps, 660 B with 4, so d128 falls back to the atomic-free path). Unaligned calls (grad q spills without
# hints) and d256 are refused.
_ALIGNED_IEEE = {kind: {} for kind in _ALIGNED}
_ALIGNED_IEEE["dkdv_atomic"] = {64: [(32, 32, 8, 1)]}  # aligned: 32x32 fits with dropout
_ALIGNED_IEEE["dbwd_row"] = {64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1)]}
_ALIGNED_IEEE["dbwd_dq"] = {64: [(16, 16, 4, 1)], 128: [(16, 16, 4, 1)]}
_ALIGNED_IEEE["dbwd_dkdv"] = {64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1)]}
_ALIGNED_IEEE["dbwd_fused"] = {64: [(16, 16, 8, 1)]}


# Short documents (issue 14 item 4): GradMem contexts are 100-1000 tokens, and a 136-token document fills a
# 128-row tile and 6% of the next one. Calls whose length bucket (``length_bucket``) is at most _SHORT_MAX
# also autotune over these tiles (64 rows for the query-side kernels, 64 keys for the key-side ones), added
# where a class's list has no tile of that size: 16-bit calls with and without dropout, and fp32 calls with
# TF32 dots (the paper's tiny KV model: fp32, head dim 32, 240-token contexts; IEEE fp32 keeps its own small
# tiles). Longer calls keep the plain lists. Every entry is compiled in both specialisations
# (``compile_specs``: fp16 and bf16 for the 16-bit entries, both spill-free) and executed by the GPU-tile
# interpreter tests. Registers (sm_90, "plain" with key mask and window, "dropout" with dropout added) as
# unaligned / aligned, fp16 figures; the first spill-free candidate, largest tiles first, was kept.
_SHORT = {
    "fwd": {
        # 16-bit d64 dropout: 64x64/4 255 / 175 (64x32/4 also fits: 178 / 168)
        (64, 2): {"dropout": [(64, 64, 4, 3)]},
        # 16-bit d128: plain 64x64/8 255 / 169 (64x64 with 4 warps spills 248 B unaligned); dropout 64x32/8
        # 255 / 170 (the unaligned list's tile, added to the aligned one)
        (128, 2): {"plain": [(64, 64, 8, 3)], "dropout": [(64, 32, 8, 3)]},
        # fp32 d64 dropout: 64x32/4 255 / 176 (64x64/4 spills 48 B unaligned, 64x64/8 4 B unaligned with 3
        # stages and 4 B aligned with 2)
        (64, 4): {"dropout": [(64, 32, 4, 3)]},
        # fp32 d128: 64x32/8 plain 255 / 167, dropout 247 aligned (the unaligned dropout list's tile)
        (128, 4): {"plain": [(64, 32, 8, 3)], "dropout": [(64, 32, 8, 3)]},
    },
    "dq": {
        # 16-bit d64 dropout: 64x64/8 255 / 188 (64x64/4 spills 24 B unaligned; 64x32/4 fits: 239 / 180)
        (64, 2): {"dropout": [(64, 64, 8, 3)]},
        # 16-bit d128: plain 64x32/8 255 / 159; dropout 64x16/8 255 / 173 (64x32/8 spills 4 B unaligned at 1,
        # 2 and 3 stages, 64x32/4 516 B; 32x64/8, the unaligned list's tile, fits aligned too: 168 regs)
        (128, 2): {"plain": [(64, 32, 8, 2)], "dropout": [(64, 16, 8, 2)]},
        # fp32 d64 plain: 64x64/8 255 / 226 (64x32/8 fits too: 219 / 160)
        (64, 4): {"plain": [(64, 64, 8, 3)]},
    },
    # 16-bit d64, 64 keys: plain 64x64/8 251 / 209, dropout 255 / 255
    "dkdv": {(64, 2): {"plain": [(64, 64, 8, 2)], "dropout": [(64, 64, 8, 2)]}},
    # 16-bit d64: plain 64x64/8 255 / 238; dropout 32x64/8 219 / 186 (64x64/8 spills 16 B unaligned, 64x64/4
    # 668 B, 64x64/8 with one stage 36 B)
    "dkdv_atomic": {(64, 2): {"plain": [(64, 64, 8, 2)], "dropout": [(32, 64, 8, 2)]}},
}
# Soft-capped calls (SOFTCAP > 0) keep a tanh and a slope tile live beside the others: the entries below spill
# with the cap on sm_90 (compile check, every entry compiled with SOFTCAP=50) and are left out of the lists
# for capped calls, keyed by (kind, head-dim class, element size, fp32 precision, dropout, aligned). A
# double-backward class left without a fused entry runs the atomic-free path (``dbwd_supported``).
_SOFTCAP_SPILLS = {
    # 16-bit (fp16 figures; bf16 shares the tables): spills of 4-56 B at 255 regs
    ("dkdv", 64, 2, "tf32", True, True): [(64, 64, 8, 2)],
    ("dkdv_atomic", 64, 2, "tf32", False, False): [(64, 64, 8, 2)],
    ("dq", 64, 2, "tf32", True, False): [(64, 64, 8, 3), (128, 32, 8, 3)],
    ("dq", 128, 2, "tf32", False, False): [(64, 32, 8, 2)],
    ("dbwd_dq", 64, 2, "tf32", False, True): [(64, 64, 4, 2)],
    ("dbwd_fused", 64, 2, "tf32", True, True): [(32, 64, 4, 2)],
    ("dbwd_fused", 128, 2, "tf32", True, False): [(32, 32, 8, 1)],  # fused path off: atomic-free path runs
    # fp32 with TF32 dots: d64 dQ with dropout (64x32/4 spills in both specialisations)
    ("dq", 64, 4, "tf32", True, False): [(64, 32, 4, 3)],
    ("dq", 64, 4, "tf32", True, True): [(64, 32, 4, 3)],
    # IEEE fp32 (one list for plain and dropout calls, checked with dropout): d128 grad-q pass 16x16/4
    ("dbwd_dq", 128, 4, "ieee", False, True): [(16, 16, 4, 1)],
    ("dbwd_dq", 128, 4, "ieee", True, True): [(16, 16, 4, 1)],
}
# Entries capped calls use in place of dropped ones where a list would be left empty (same key; compiled with
# the cap by the compile check, which lists them through ``gpu_configs(..., softcap=True)``). Registers with
# the cap: fp16 d64 dQ with dropout 64x32/8 232 unaligned; fp32 d64 dQ with dropout 32x32/4 252 unaligned,
# 64x32/8 255 aligned; IEEE fp32 d128 grad-q pass 16x16/8 240 aligned.
_SOFTCAP_EXTRA = {
    ("dq", 64, 2, "tf32", True, False): [(64, 32, 8, 3)],
    ("dq", 64, 4, "tf32", True, False): [(32, 32, 4, 3)],
    ("dq", 64, 4, "tf32", True, True): [(64, 32, 8, 3)],
    ("dbwd_dq", 128, 4, "ieee", False, True): [(16, 16, 8, 1)],
    ("dbwd_dq", 128, 4, "ieee", True, True): [(16, 16, 8, 1)],
}
# Length buckets of the autotuner (``length_bucket``): one tuning per kernel class and power of two between
# these bounds. Triton's own key would re-tune at every new length if it held the length itself.
_MIN_BUCKET, _MAX_BUCKET, _SHORT_MAX = 128, 4096, 1024


def length_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """The autotune length bucket of a call: the next power of two of its longest sequence (``max_seqlen_q``,
    ``max_seqlen_k``), clamped to [128, 4096]."""
    n = max(int(seqlen_q), int(seqlen_k), 1)
    return min(max(triton.next_power_of_2(n), _MIN_BUCKET), _MAX_BUCKET)


def _pre_block_m(block_d):
    # the preprocess kernel holds two [BLOCK_M, BLOCK_D] tiles; 4K elements each (8K spilled for unaligned
    # fp32 at d128 once the row offsets became 64-bit)
    return max(16, min(64, 4096 // block_d))


_INTERPRET_CONFIG = (16, 16, 4, 1)
# Configurations pinned per kind under the interpreter by ``interpret_configs`` (tests of the GPU tiles).
_INTERPRET_PINS = {}
_TABLES = {
    "fwd": _FWD_CONFIGS,
    "dkdv": _DKDV_CONFIGS,
    "dkdv_atomic": _DKDV_ATOMIC_CONFIGS,
    "dq": _DQ_CONFIGS,
    "dbwd_row": _DBWD_ROW_CONFIGS,
    "dbwd_dq": _DBWD_DQ_CONFIGS,
    "dbwd_dkdv": _DBWD_DKDV_CONFIGS,
    "dbwd_fused": _DBWD_FUSED_CONFIGS,
}
_KERNELS = {
    "fwd": attn_fwd_kernel,
    "dkdv": attn_bwd_dkdv_kernel,
    "dkdv_atomic": attn_bwd_dkdv_kernel,
    "dq": attn_bwd_dq_kernel,
    "dbwd_row": attn_dbwd_kernel,
    "dbwd_dq": attn_dbwd_kernel,
    "dbwd_dkdv": attn_dbwd_kernel,
    "dbwd_fused": attn_dbwd_kernel,
}
# The launches of attn_dbwd_kernel (its ROLE constexpr): row pass, grad-q pass, key pass, fused key pass;
# the deterministic double backward runs the first three, the other one the row pass and the fused key pass.
_DBWD_ROLE = {"dbwd_row": 0, "dbwd_dq": 1, "dbwd_dkdv": 2, "dbwd_fused": 3}
_DBWD_PATHS = {True: ("dbwd_row", "dbwd_dq", "dbwd_dkdv"), False: ("dbwd_row", "dbwd_fused")}
# The two launches of attn_bwd_dkdv_kernel (its ATOMIC_DQ constexpr): split (deterministic) or with atomic dQ.
_DKDV_ATOMIC = {"dkdv": False, "dkdv_atomic": True}
# The accumulators the launcher zeroes before these kinds add into them with atomics (the dQ of the atomic
# backward, grad q of the fused key pass): the autotuner must zero them again before each of its runs.
_ATOMIC_OUTPUTS = {"dkdv_atomic": ["dQacc"], "dbwd_fused": ["GradQ"]}
_AUTOTUNE_KEY = [
    "HEAD_DIM",
    "IS_VARLEN",
    "IS_CAUSAL",
    "HAS_WINDOW",
    "HAS_KPM",
    "HAS_DROPOUT",
    "INPUT_PRECISION",
    "SOFTCAP",
]


def head_dim_class(block_d: int) -> int:
    """Head dims up to 64 share tiles; 128 and 256 get their own."""
    return 64 if block_d <= 64 else block_d


def block_d_for(head_dim: int) -> int:
    # 16 is the smallest dot operand width on tensor cores; smaller heads are zero-padded by masking.
    return max(16, triton.next_power_of_2(head_dim))


def configs(
    kind: str,
    block_d: int,
    element_size: int,
    dropout: bool = False,
    precision: str = "tf32",
    aligned: bool = True,
    bucket: int | None = None,
    softcap: bool = False,
) -> list:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) list the launcher may use for this kernel/class.

    fp32 with IEEE dots runs on CUDA cores (FMA), whose operands live in registers: it gets its own
    small tiles. ``aligned``: whether the call passes ``_aligned_call`` (it picks the table). ``bucket``: the
    call's ``length_bucket`` (None: every entry any length may use). The interpreter has no driver to
    autotune with: it always runs one configuration.
    """
    if _interpreting():
        return [_INTERPRET_CONFIG]
    return gpu_configs(kind, block_d, element_size, dropout, precision, aligned, bucket, softcap)


def gpu_configs(
    kind: str,
    block_d: int,
    element_size: int,
    dropout: bool = False,
    precision: str = "tf32",
    aligned: bool = True,
    bucket: int | None = None,
    softcap: bool = False,
) -> list:
    """The GPU table entry for this kernel/class (what ``configs`` returns on a GPU), also under the interpreter;
    with the short-document tiles (``_SHORT``) unless ``bucket`` is a length bucket above ``_SHORT_MAX``;
    ``softcap``: for soft-capped calls, without the entries of ``_SOFTCAP_SPILLS``."""
    listed = _gpu_list(kind, block_d, element_size, dropout, precision, aligned, bucket)
    if not softcap:
        return listed
    # 16-bit calls share one table whatever fp32 precision the caller names (the launchers may pass "ieee")
    key = (
        kind,
        head_dim_class(block_d),
        element_size,
        precision if element_size == 4 else "tf32",
        bool(dropout),
        aligned,
    )
    drop = _SOFTCAP_SPILLS.get(key, ())
    kept = [c for c in listed if c not in drop]
    return kept + [c for c in _SOFTCAP_EXTRA.get(key, ()) if c not in kept]


def _gpu_list(kind, block_d, element_size, dropout, precision, aligned, bucket):
    if element_size not in (2, 4):
        raise TypeError("prefix attention kernels: float64 runs only under the Triton interpreter")
    cls = head_dim_class(block_d)
    variant = "dropout" if dropout else "plain"
    if element_size == 4 and precision == "ieee":
        if aligned and cls in _ALIGNED_IEEE[kind]:
            return _ALIGNED_IEEE[kind][cls]
        return _IEEE_CONFIGS[kind][cls]
    override = _ALIGNED[kind].get((cls, element_size), {}) if aligned else {}
    base = override[variant] if variant in override else _TABLES[kind][(cls, element_size)][variant]
    if bucket is not None and bucket > _SHORT_MAX:
        return base
    short = _SHORT.get(kind, {}).get((cls, element_size), {}).get(variant, [])
    return base + [c for c in short if c not in base]


def dbwd_supported(
    block_d: int,
    element_size: int,
    dropout: bool,
    precision: str,
    aligned: bool = False,
    deterministic: bool = True,
    softcap: bool = False,
) -> bool:
    """Whether every launch of the double backward's ``deterministic`` (atomic-free) or fused path has a
    spill-free configuration for this class on a GPU.

    Empty entries of the double-backward tables mark classes where no tile shape compiled without register
    spills for sm_90 (the double backward keeps about twice the live tiles of the backward); the launcher
    refuses those instead of running a configuration the compile check rejects. ``aligned`` (default: the
    unaligned tables, whose support the aligned ones include) as in ``configs``.
    """
    if _interpreting():
        return True
    kinds = _DBWD_PATHS[bool(deterministic)]
    return all(configs(kind, block_d, element_size, dropout, precision, aligned, None, softcap) for kind in kinds)


@functools.cache
def _tuned(
    kind: str,
    block_d: int,
    element_size: int,
    dropout: bool,
    precision: str,
    aligned: bool,
    bucket: int,
    softcap: bool = False,
):
    """One autotuner per kernel class, alignment and length bucket: the bucket is part of the tuning key this
    way (a kernel argument would change every kernel's signature), and each autotuner keys on the flags in
    ``_AUTOTUNE_KEY``. The compiled binaries are shared: they are cached by the kernel, not by the tuner.

    Tuning runs the kernel many times on the call's own buffers; the kinds that add into an accumulator with
    atomics (``_ATOMIC_OUTPUTS``) have it zeroed before every timed run and before the real one, or the call
    that tunes would return the sum of every run."""
    cfgs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in configs(kind, block_d, element_size, dropout, precision, aligned, bucket, softcap)
    ]
    return triton.autotune(configs=cfgs, key=_AUTOTUNE_KEY, reset_to_zero=_ATOMIC_OUTPUTS.get(kind))(_KERNELS[kind])


def _aligned_call(tensors, strides) -> bool:
    """Whether a launch gets the ``aligned`` specialisation ``compile_specs`` compiles for the aligned tables:
    every pointer argument 16-byte aligned and every tile stride divisible by 16 (Triton's launcher rule)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(int(st) % 16 == 0 for st in strides)


def _launch(kind, grid_of, args, consts, block_d, element_size):
    """Run ``kind`` with the autotuned config on a GPU (from the aligned or unaligned table, as ``args``
    decide), or with the single interpreter config."""
    if kind in _DBWD_ROLE:
        consts = dict(consts, ROLE=_DBWD_ROLE[kind])
    if kind in _DKDV_ATOMIC:
        consts = dict(consts, ATOMIC_DQ=_DKDV_ATOMIC[kind])
    if _interpreting():
        bm, bn, w, s = _INTERPRET_PINS.get(kind, _INTERPRET_CONFIG)
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        _KERNELS[kind][grid_of(meta)](*args, **consts, **meta, num_warps=w, num_stages=s)
    else:
        names = _KERNELS[kind].arg_names
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        strides = [a for n, a in zip(names, args) if n.startswith("stride_") and n not in _UNHINTED_STRIDES]
        aligned = _aligned_call(tensors, strides)
        lengths = dict((n, a) for n, a in zip(names, args) if n in ("seqlen_q", "seqlen_k"))
        bucket = length_bucket(lengths.get("seqlen_q", 1), lengths.get("seqlen_k", 1))
        key = (kind, block_d, element_size, consts["HAS_DROPOUT"], consts["INPUT_PRECISION"], aligned, bucket)
        # uncapped calls keep today's key (no eighth element) and tables
        tuned = _tuned(*key, True) if consts["SOFTCAP"] > 0 else _tuned(*key)
        tuned[grid_of](*args, **consts)


@contextlib.contextmanager
def interpret_configs(**pins):
    """Under the interpreter, launch each named kind with the given ``(BLOCK_M, BLOCK_N, num_warps,
    num_stages)`` instead of the one small interpreter config, e.g. ``interpret_configs(fwd=(128, 64, 8, 3))``.

    Tests use it to execute the tiles of the GPU tables on CPU; on a GPU the autotuner picks and pins are unused.
    """
    unknown = set(pins) - set(_KERNELS)
    if unknown:
        raise ValueError(
            f"interpret_configs: unknown kernel kinds {sorted(unknown)}; expected some of {sorted(_KERNELS)}"
        )
    saved = dict(_INTERPRET_PINS)
    _INTERPRET_PINS.update(pins)
    try:
        yield
    finally:
        _INTERPRET_PINS.clear()
        _INTERPRET_PINS.update(saved)


class _Geometry:
    """Shapes, strides and flags of one call, shared by the forward and backward launchers."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.total_q, self.hq, self.d = q.shape
            self.total_k, self.hkv = k.shape[0], k.shape[1]
            self.batch = cu_seqlens_q.numel() - 1
            if max_seqlen_q is None or max_seqlen_q < 0:
                max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if self.batch else 0
            if max_seqlen_k is None or max_seqlen_k < 0:
                max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if self.batch else 0
            self.seqlen_q, self.seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
            self.lse_shape = (self.hq, self.total_q)
            self.lse_strides = (0, self.total_q)
        else:
            self.batch, self.seqlen_q, self.hq, self.d = q.shape
            self.seqlen_k, self.hkv = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.hq, self.seqlen_q)
            self.lse_strides = (self.hq * self.seqlen_q, self.seqlen_q)
        self.group = self.hq // self.hkv
        self.block_d = block_d_for(self.d)
        self.cu_q = cu_seqlens_q
        self.cu_k = cu_seqlens_k
        self.kpm = None
        self.kpm_stride = 0
        if key_padding_mask is not None:
            kpm = key_padding_mask
            kpm = kpm.view(torch.uint8) if kpm.dtype == torch.bool else kpm.ne(0).view(torch.uint8)
            if kpm.stride(-1) != 1:
                kpm = kpm.contiguous()
            self.kpm = kpm
            self.kpm_stride = kpm.stride(0) if kpm.dim() == 2 else 0
        self.empty = self.batch == 0 or self.seqlen_q == 0 or self.hq == 0

    def strides(self, t):
        """(batch, token, head) strides of a [B, S, H, D] or [T, H, D] tensor."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def pointers(self, q):
        """cu_seqlens and key-mask pointers, with ``q`` standing in for absent ones (never read)."""
        return (
            self.cu_q if self.varlen else q,
            self.cu_k if self.varlen else q,
            self.kpm if self.kpm is not None else q,
        )


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _scalars(q, scale, dropout_p):
    """Runtime scalars, plus the fp64 copy the kernels read in fp64 mode (see ``load_scalars``)."""
    rescale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    fp64 = q.dtype == torch.float64
    params = (
        torch.tensor([scale * _LOG2E, scale, rescale, _LOG2E, _LN2], dtype=torch.float64, device=q.device)
        if fp64
        else q
    )
    return (scale * _LOG2E, scale, rescale), params, fp64


def _seed_pointer(seed, dropout_p, q):
    """The kernels' ``Seed`` argument: the int64 device tensor holding the dropout seed (an int ``seed`` is
    put into a fresh one), or ``q`` as a placeholder without dropout (the kernels never read it then).

    A tensor seed is read by the kernels on the device when they run: a new value needs no recompile and no
    host sync, and a captured CUDA graph reads whatever value the tensor holds at replay.
    """
    if not dropout_p > 0:
        return q
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.full((1,), int(seed), dtype=torch.int64, device=q.device)


def _consts(geo, q, causal, window, dropout_p, fp32_precision, fp64, softcap=0.0):
    if q.dtype == torch.float32:
        precision = fp32_precision
    elif fp64:
        precision = "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    return dict(
        HEAD_DIM=geo.d,
        BLOCK_D=geo.block_d,
        IS_VARLEN=geo.varlen,
        IS_CAUSAL=bool(causal),
        HAS_WINDOW=window is not None,
        HAS_KPM=geo.kpm is not None,
        HAS_DROPOUT=dropout_p > 0,
        PARAMS_FP64=fp64,
        ACC_DTYPE=tl.float64 if fp64 else tl.float32,
        INPUT_PRECISION=precision,
        SOFTCAP=float(softcap or 0.0),
    )


def attention_fwd(
    q,
    k,
    v,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    causal=True,
    scale=None,
    dropout_p=0.0,
    seed=0,
    window=None,
    fp32_precision="ieee",
    softcap=0.0,
    out=None,
    lse=None,
):
    """Forward pass; returns ``(out, lse)``.

    ``out = softmax(scale q k^T + mask) (dropout) v`` in q's dtype and layout, ``lse`` (fp32, fp64 for fp64
    inputs) the natural log-sum-exp of the visible scores per query and head (-inf where none is visible).
    ``out``/``lse`` may be given as preallocated buffers; every element of them is written.
    Arguments are assumed validated by ``gradmem_fast.ops.attention``.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    geo = _Geometry(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask)
    scale = 1.0 / math.sqrt(geo.d) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(geo.lse_shape, dtype=acc_dtype, device=q.device)
    if geo.empty:
        return out, lse
    (qk_scale, sm_scale, rescale), params, fp64 = _scalars(q, scale, dropout_p)
    cu_q, cu_k, kpm = geo.pointers(q)
    args = (
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        kpm,
        params,
        *geo.strides(q),
        *geo.strides(k),
        *geo.strides(v),
        *geo.strides(out),
        *geo.lse_strides,
        geo.kpm_stride,
        geo.seqlen_q,
        geo.seqlen_k,
        geo.hq,
        geo.group,
        qk_scale,
        sm_scale,
        rescale,
        float(dropout_p),
        _seed_pointer(seed, dropout_p, q),
        int(window or 0),
    )
    consts = _consts(geo, q, causal, window, dropout_p, fp32_precision, fp64, softcap)

    def grid(meta):
        return (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.hq, geo.batch)

    _launch("fwd", grid, args, consts, geo.block_d, q.element_size())
    return out, lse


def attention_bwd_preprocess(out, dout, *, cu_seqlens_q=None, max_seqlen_q=None, delta=None):
    """``delta[i] = sum_d dout[i, d] * out[i, d]`` per query and head, in the log-sum-exp layout."""
    out, dout = _unit_last(out), _unit_last(dout)
    geo = _Geometry(out, out, out, cu_seqlens_q, cu_seqlens_q, max_seqlen_q, max_seqlen_q, None)
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    if delta is None:
        delta = torch.empty(geo.lse_shape, dtype=acc_dtype, device=out.device)
    if geo.empty:
        return delta
    block_m = _INTERPRET_CONFIG[0] if _interpreting() else _pre_block_m(geo.block_d)
    grid = (triton.cdiv(geo.seqlen_q, block_m), geo.hq, geo.batch)
    attn_bwd_preprocess_kernel[grid](
        out,
        dout,
        delta,
        geo.cu_q if geo.varlen else out,
        *geo.strides(out),
        *geo.strides(dout),
        *geo.lse_strides,
        geo.seqlen_q,
        HEAD_DIM=geo.d,
        BLOCK_D=geo.block_d,
        BLOCK_M=block_m,
        IS_VARLEN=geo.varlen,
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        num_warps=4,
    )
    return delta


def attention_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    causal=True,
    scale=None,
    dropout_p=0.0,
    seed=0,
    window=None,
    fp32_precision="ieee",
    softcap=0.0,
    delta=None,
    dq=None,
    dk=None,
    dv=None,
    deterministic=True,
):
    """Gradients ``(dq, dk, dv)`` of ``<dout, out>`` by recomputation from ``lse`` (see attention_bwd.py).

    ``delta`` (from ``attention_bwd_preprocess``) is computed when not given; ``dq/dk/dv`` may be
    preallocated buffers shaped like q/k/v (unit last stride). ``deterministic``: True runs the split
    kernels (dK/dV, then dQ recomputing S and dP: 7 GEMM units, bitwise reproducible); False accumulates dQ
    inside the dK/dV kernel with fp32 atomics (fp64 for fp64 inputs) into a zeroed buffer, cast into dq
    afterwards unless dq has the accumulator's dtype (5 units; the last bits of dq vary between runs on a GPU).
    """
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    geo = _Geometry(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask)
    scale = 1.0 / math.sqrt(geo.d) if scale is None else float(scale)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if geo.batch == 0 or geo.hq == 0:
        return dq, dk, dv
    if geo.seqlen_q == 0 or geo.seqlen_k == 0:
        # No (query, key) pair exists: every gradient is zero, and the kernels would not visit all rows.
        return dq.zero_(), dk.zero_(), dv.zero_()
    if delta is None:
        delta = attention_bwd_preprocess(out, dout, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=geo.seqlen_q)
    (qk_scale, sm_scale, rescale), params, fp64 = _scalars(q, scale, dropout_p)
    cu_q, cu_k, kpm = geo.pointers(q)
    consts = _consts(geo, q, causal, window, dropout_p, fp32_precision, fp64, softcap)
    tail = (
        *geo.lse_strides,
        geo.kpm_stride,
        geo.seqlen_q,
        geo.seqlen_k,
        geo.hq,
        geo.group,
        qk_scale,
        sm_scale,
        rescale,
        float(dropout_p),
        _seed_pointer(seed, dropout_p, q),
        int(window or 0),
    )

    def dkdv_args(acc):
        return (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            acc,
            cu_q,
            cu_k,
            kpm,
            params,
            *geo.strides(q),
            *geo.strides(k),
            *geo.strides(v),
            *geo.strides(dout),
            *geo.strides(dk),
            *geo.strides(dv),
            *geo.strides(acc),
            *tail,
        )

    def grid_kv(meta):
        return (triton.cdiv(geo.seqlen_k, meta["BLOCK_N"]), geo.hkv, geo.batch)

    if not deterministic:
        # dQ by atomics from the dK/dV programs into zeros: rows no program visits (no visible key) stay 0.
        acc_dtype = torch.float64 if fp64 else torch.float32
        direct = dq.dtype == acc_dtype and dq.stride(-1) == 1
        acc = dq.zero_() if direct else torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        _launch("dkdv_atomic", grid_kv, dkdv_args(acc), consts, geo.block_d, q.element_size())
        if not direct:
            dq.copy_(acc)
        return dq, dk, dv
    # the split kernels never touch the accumulator argument: q stands in for it
    _launch("dkdv", grid_kv, dkdv_args(q), consts, geo.block_d, q.element_size())

    dq_args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        cu_q,
        cu_k,
        kpm,
        params,
        *geo.strides(q),
        *geo.strides(k),
        *geo.strides(v),
        *geo.strides(dout),
        *geo.strides(dq),
        *tail,
    )

    def grid_q(meta):
        return (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.hq, geo.batch)

    _launch("dq", grid_q, dq_args, consts, geo.block_d, q.element_size())
    return dq, dk, dv


def attention_dbwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    gdq,
    gdk,
    gdv,
    *,
    dlse=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    causal=True,
    scale=None,
    dropout_p=0.0,
    seed=0,
    window=None,
    fp32_precision="ieee",
    softcap=0.0,
    deterministic=True,
):
    """Double backward: gradients of ``<gdq, dq> + <gdk, dk> + <gdv, dv>``, where ``(dq, dk, dv)`` is
    ``attention_bwd`` of ``<dout, out> + <dlse, lse>``, with respect to ``q, k, v, dout`` and ``dlse``.

    ``out`` and ``lse`` must be the forward's outputs for ``q, k, v``: their dependence on ``q, k, v`` is
    part of the result (formulas in attention_dbwd.py). Returns ``(grad_q, grad_k, grad_v, grad_dout,
    grad_dlse)``; the first four in the inputs' dtype and layouts, ``grad_dlse`` in the log-sum-exp layout
    and precision. No [Lq, Lk] tensor is formed.

    ``deterministic``: True runs the atomic-free path (row pass, grad-q pass, key pass: 20 GEMM units,
    bitwise reproducible); False the row pass and the fused key pass, which adds grad q with fp32 atomics
    (fp64 for fp64 inputs) into a zeroed accumulator (15 units; the last bits of grad q vary between runs on
    a GPU). Where the fused pass has no spill-free configuration on a GPU, the deterministic path runs.
    """
    q, k, v, dout, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout), _unit_last(out)
    gdq, gdk, gdv = _unit_last(gdq), _unit_last(gdk), _unit_last(gdv)
    geo = _Geometry(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask)
    precision = "ieee" if q.dtype == torch.float64 else fp32_precision
    # The launches' alignment follows from the inputs' (the outputs are allocated with q's and k's shapes).
    ins = [q, k, v, dout, out, gdq, gdk, gdv]
    aligned = _aligned_call(
        ins + [t for t in (cu_seqlens_q, cu_seqlens_k, geo.kpm) if t is not None],
        [st for t in ins for st in geo.strides(t)],
    )
    if q.dtype != torch.float64:
        class_args = (geo.block_d, q.element_size(), dropout_p > 0, precision, aligned)
        capped = bool(softcap)
        deterministic = deterministic or not dbwd_supported(*class_args, deterministic=False, softcap=capped)
        if not dbwd_supported(*class_args, deterministic=True, softcap=capped):
            raise NotImplementedError(
                f"prefix attention double backward: no spill-free sm_90 kernel configuration for "
                f"head_dim={geo.d} (padded to {geo.block_d}), dtype {q.dtype}, fp32_precision={fp32_precision!r}, "
                f"dropout={'yes' if dropout_p > 0 else 'no'}{'' if aligned else ', unaligned tensors'}"
                f"{', softcap' if capped else ''} yet; use "
                "backend='torch' for this second-order call"
                + (", or fp32_precision='tf32' / 16-bit inputs" if q.dtype == torch.float32 else "")
            )
    scale = 1.0 / math.sqrt(geo.d) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_do = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(k.shape, dtype=v.dtype, device=v.device)  # allocated like grad_k: shared strides
    beta = torch.empty(geo.lse_shape, dtype=acc_dtype, device=q.device)
    if deterministic:
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:  # the atomic accumulator; rows no key block visits (no visible key) stay 0
        grad_q = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    if geo.batch == 0 or geo.hq == 0 or geo.seqlen_q == 0 or geo.seqlen_k == 0:
        # No (query, key) pair exists: the backward is identically zero, and so is its derivative.
        grad_q = grad_q.to(q.dtype).zero_()
        return grad_q, grad_k.zero_(), grad_v.zero_(), grad_do.zero_(), beta.zero_()
    # delta_i = dO_i . O_i - dlse_i, exactly as the first-order backward formed it.
    delta = attention_bwd_preprocess(out, dout, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=geo.seqlen_q)
    if dlse is not None:
        # rows with no visible key carry lse = -inf and no gradient; a cotangent there must not leak into delta
        delta = delta - dlse.to(acc_dtype).masked_fill(torch.isneginf(lse), 0.0)
    psi = torch.empty_like(beta)
    (qk_scale, sm_scale, rescale), params, fp64 = _scalars(q, scale, dropout_p)
    cu_q, cu_k, kpm = geo.pointers(q)
    consts = _consts(geo, q, causal, window, dropout_p, fp32_precision, fp64, softcap)
    args = (
        q,
        k,
        v,
        dout,
        out,
        gdq,
        gdk,
        gdv,
        lse,
        delta,
        beta,
        psi,
        grad_q,
        grad_do,
        grad_k,
        grad_v,
        cu_q,
        cu_k,
        kpm,
        params,
        *(st for t in ins for st in geo.strides(t)),
        *geo.strides(grad_do),  # every query-shaped output is allocated like grad_do
        *geo.strides(grad_k),  # and every key-shaped one like grad_k
        *geo.lse_strides,
        geo.kpm_stride,
        geo.seqlen_q,
        geo.seqlen_k,
        geo.hq,
        geo.group,
        qk_scale,
        sm_scale,
        rescale,
        float(dropout_p),
        _seed_pointer(seed, dropout_p, q),
        int(window or 0),
    )

    def grid_q(meta):
        return (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.hq, geo.batch)

    def grid_kv(meta):
        return (triton.cdiv(geo.seqlen_k, meta["BLOCK_N"]), geo.hkv, geo.batch)

    # the row pass first: every other pass reads its beta and psi
    for kind in _DBWD_PATHS[bool(deterministic)]:
        grid = grid_q if kind in ("dbwd_row", "dbwd_dq") else grid_kv
        _launch(kind, grid, args, consts, geo.block_d, q.element_size())
    return grad_q.to(q.dtype), grad_k, grad_v, grad_do, beta


def dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, device, cu_seqlens_q=None, cu_seqlens_k=None):
    """The keep mask ``[B, H, Sq, Sk]`` (bool) the kernels use for this seed (tests and debugging only).

    ``seed``: an int, or an int64 device tensor of one element (the value the attention kernels read).
    For varlen calls, ``seqlen_q/k`` are the maximum lengths and entries past a sequence's end are False.
    """
    keep = torch.zeros((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    varlen = cu_seqlens_q is not None
    block_m, block_n = (16, 16) if _interpreting() else (64, 64)
    grid = (triton.cdiv(seqlen_q, block_m), heads, batch)
    _dropout_mask_kernel[grid](
        keep,
        cu_seqlens_q if varlen else keep,
        cu_seqlens_k if varlen else keep,
        _seed_pointer(seed, 1.0, keep),
        float(dropout_p),
        heads,
        seqlen_q,
        seqlen_k,
        keep.stride(0),
        keep.stride(1),
        keep.stride(2),
        IS_VARLEN=varlen,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return keep.bool()


# ----------------------------------------------------------------------------------------------------
# Compile check: every configuration the launcher can pick, for sm_90.

_DTYPE_SIG = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# Strides of the per-row statistics and the key mask: token counts, arbitrary in both specialisations.
_UNHINTED_STRIDES = ("stride_lb", "stride_lh", "stride_mb")
# Buffers the launchers allocate themselves (or that callers preallocate like them): always 16-byte aligned.
_OWN_BUFFERS = {
    "fwd": {"Out", "Lse"},
    "dkdv": {"Lse", "Delta", "dK", "dV"},
    "dkdv_atomic": {"Lse", "Delta", "dK", "dV", "dQacc"},  # the zeroed accumulator, or dq (allocated like it)
    "dq": {"Lse", "Delta", "dQ"},
}
for _kind in _DBWD_ROLE:  # Out, the forward's output, may be a caller's buffer: not counted as own
    _OWN_BUFFERS[_kind] = {"Lse", "Delta", "Beta", "Psi", "GradQ", "GraddOut", "GradK", "GradV"}


def _variants(kind, sig, dropout=False):
    """The two specialisations of a configuration (see kernels/runtime.py) the launcher tells apart.

    ``aligned`` (``_aligned_call``: every tensor the tiles read or write 16-byte aligned, their batch, token
    and head strides divisible by 16, e.g. GPT-2/Llama shapes, fused QKV included): every pointer and every
    tile stride carries ``tt.divisibility=16``, so tile loads become 16-byte vectors, ``cp.async`` copies and
    wgmma operands. ``unaligned`` (odd head dims, views at odd offsets): only the buffers the launcher
    allocates are hinted, and with dropout the seed tensor (the op layer always hands the kernels a fresh one;
    without dropout ``q`` stands in for it). Lengths, the log-sum-exp and key-mask strides, window and head
    count are compiled unhinted and the GQA group as a runtime value: launches with 16-divisible lengths or group 1
    (a constant) get binaries that differ from these in scalar index arithmetic only.
    """
    pointers = {n for n, t in sig.items() if t.startswith("*")}
    strides = {n for n in sig if n.startswith("stride_") and n not in _UNHINTED_STRIDES}
    own = _OWN_BUFFERS[kind] | ({"Seed"} if dropout else set())
    return (Variant("aligned", divisible=pointers | strides), Variant("unaligned", divisible=own))


def _specs_for(kind, dtype, block_d, cfg, flags, precision="tf32"):
    flags = {"SOFTCAP": 0.0, **flags}
    t = "*" + _DTYPE_SIG[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    i32, f32 = "i32", "fp32"
    bm, bn, warps, stages = cfg
    extra = {"ROLE": _DBWD_ROLE[kind]} if kind in _DBWD_ROLE else {}
    if kind in _DKDV_ATOMIC:
        extra = {"ATOMIC_DQ": _DKDV_ATOMIC[kind]}
    consts = dict(
        **extra,
        HEAD_DIM=block_d,
        BLOCK_D=block_d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        PARAMS_FP64=dtype == torch.float64,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        INPUT_PRECISION=precision,
        **flags,
    )
    strides3 = lambda p: {f"stride_{p}b": i32, f"stride_{p}t": i32, f"stride_{p}h": i32}  # noqa: E731
    tail = {
        "stride_lb": i32,
        "stride_lh": i32,
        "stride_mb": i32,
        "seqlen_q": i32,
        "seqlen_k": i32,
        "num_heads": i32,
        "group": i32,
        "qk_scale": f32,
        "sm_scale": f32,
        "rescale": f32,
        "dropout_p": f32,
        # with dropout the int64 seed tensor (allocated by the op layer: aligned); without, q stands in
        "Seed": "*i64" if flags["HAS_DROPOUT"] else t,
        "window": i32,
    }
    common = {"CuQ": "*i32", "CuK": "*i32", "Kpm": "*u8", "Params": "*fp64" if dtype == torch.float64 else t}
    if kind == "fwd":
        sig = {
            "Q": t,
            "K": t,
            "V": t,
            "Out": t,
            "Lse": acc,
            **common,
            **strides3("q"),
            **strides3("k"),
            **strides3("v"),
            **strides3("o"),
            **tail,
        }
    elif kind in _DKDV_ATOMIC:
        sig = {
            "Q": t,
            "K": t,
            "V": t,
            "dOut": t,
            "Lse": acc,
            "Delta": acc,
            "dK": t,
            "dV": t,
            # the atomic dQ accumulator (fp32/fp64); the split kernel gets q as a stand-in it never reads
            "dQacc": acc if _DKDV_ATOMIC[kind] else t,
            **common,
            **strides3("q"),
            **strides3("k"),
            **strides3("v"),
            **strides3("do"),
            **strides3("dk"),
            **strides3("dv"),
            **strides3("dq"),
            **tail,
        }
    elif kind == "dq":
        sig = {
            "Q": t,
            "K": t,
            "V": t,
            "dOut": t,
            "Lse": acc,
            "Delta": acc,
            "dQ": t,
            **common,
            **strides3("q"),
            **strides3("k"),
            **strides3("v"),
            **strides3("do"),
            **strides3("dq"),
            **tail,
        }
    else:
        ins = {"Q": t, "K": t, "V": t, "dOut": t, "Out": t, "gQ": t, "gK": t, "gV": t, "Lse": acc, "Delta": acc}
        # GradQ: the fused key pass's accumulator (fp32/fp64), the grad-q pass's output (the others ignore it)
        outs = {"Beta": acc, "Psi": acc, "GradQ": acc if kind == "dbwd_fused" else t, "GraddOut": t}
        outs.update(GradK=t, GradV=t)
        in_strides = {name: i32 for p in ("q", "k", "v", "do", "o", "gq", "gk", "gv") for name in strides3(p)}
        sig = {**ins, **outs, **common, **in_strides, **strides3("oq"), **strides3("ok"), **tail}
    name = (
        f"attn_{kind}_{_DTYPE_SIG[dtype]}{'_ieee' if precision == 'ieee' and dtype == torch.float32 else ''}"
        f"_d{block_d}_m{bm}n{bn}w{warps}s{stages}{'_dropout' if flags['HAS_DROPOUT'] else ''}"
        f"{'_softcap' if flags['SOFTCAP'] else ''}"
    )
    return CompileSpec(
        name=name,
        kernel=_KERNELS[kind],
        signature=sig,
        constexprs=consts,
        num_warps=warps,
        num_stages=stages,
        archs=(90,),
        variants=_variants(kind, sig, flags["HAS_DROPOUT"]),
    )


SOFTCAP_CHECKED = 50.0
KINDS = ("fwd", "dkdv", "dkdv_atomic", "dq", "dbwd_row", "dbwd_dq", "dbwd_dkdv", "dbwd_fused")


def compile_specs(kinds=KINDS):
    """Every (kernel, head-dim class, dtype, config) the launcher can pick on a GPU, each in the
    specialisations it is launched with: ``aligned`` when the aligned table holds it, ``unaligned`` when the
    unaligned table does (``_variants``).

    A class is checked at its largest head dim (64 stands for 16/32/48/64). "plain" configs are compiled
    with the flags that cost the most registers without dropout (padded layout, key padding mask, sliding
    window), "dropout" configs with dropout added; plain varlen-causal calls use a subset of that code.
    IEEE fp32 shares one list between plain and dropout calls, checked with dropout. Every configuration is
    compiled once more with soft-capping on (``SOFTCAP``, Gemma 2's 50.0; the value is a constant of the
    binary, any positive one compiles to the same code shape): the cap's tanh and slope tiles must fit the
    same tables. Sink logits need no specialisation (they are composed on the kernels' outputs).
    """
    flags = {
        "plain": dict(IS_VARLEN=False, IS_CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True, HAS_DROPOUT=False),
        "dropout": dict(IS_VARLEN=False, IS_CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True, HAS_DROPOUT=True),
    }
    capped = {name: dict(f, SOFTCAP=SOFTCAP_CHECKED) for name, f in flags.items()}
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        size = torch.tensor([], dtype=dtype).element_size()
        for block_d in (64, 128, 256):
            for kind in kinds:
                cases = [("plain", "tf32"), ("dropout", "tf32")] + ([("dropout", "ieee")] if size == 4 else [])
                for flag, precision in cases:
                    for flag_set in (flags, capped):
                        lists = {
                            label: gpu_configs(
                                kind,
                                block_d,
                                size,
                                flag == "dropout",
                                precision,
                                label == "aligned",
                                softcap=flag_set is capped,
                            )
                            for label in ("aligned", "unaligned")
                        }
                        for cfg in dict.fromkeys(lists["aligned"] + lists["unaligned"]):
                            spec = _specs_for(kind, dtype, block_d, cfg, flag_set[flag], precision)
                            spec.variants = tuple(v for v in spec.variants if cfg in lists[v.label])
                            specs.append(spec)
            t = "*" + _DTYPE_SIG[dtype]
            specs.append(
                CompileSpec(
                    name=f"attn_bwd_preprocess_{_DTYPE_SIG[dtype]}_d{block_d}",
                    kernel=attn_bwd_preprocess_kernel,
                    signature={
                        "Out": t,
                        "dOut": t,
                        "Delta": "*fp32",
                        "CuQ": "*i32",
                        "stride_ob": "i32",
                        "stride_ot": "i32",
                        "stride_oh": "i32",
                        "stride_dob": "i32",
                        "stride_dot": "i32",
                        "stride_doh": "i32",
                        "stride_lb": "i32",
                        "stride_lh": "i32",
                        "seqlen_q": "i32",
                    },
                    constexprs=dict(
                        HEAD_DIM=block_d,
                        BLOCK_D=block_d,
                        BLOCK_M=_pre_block_m(block_d),
                        IS_VARLEN=True,
                        ACC_DTYPE=tl.float32,
                    ),
                    num_warps=4,
                    num_stages=1,
                    archs=(90,),
                    variants=(
                        Variant(
                            "aligned",
                            divisible={
                                "Out",
                                "dOut",
                                "Delta",
                                "CuQ",
                                "stride_ob",
                                "stride_ot",
                                "stride_oh",
                                "stride_dob",
                                "stride_dot",
                                "stride_doh",
                            },
                        ),
                        Variant("unaligned", divisible={"Delta"}),
                    ),
                )
            )
    return specs
