"""Per-step census of a WRITE: kernel launches, FLOPs, bytes, host syncs and a projected GPU step time.

    python -m benchmarks.census                    # GPT-2 WRITE shape and tiny KV shape, all implementations
    python -m benchmarks.census --dry-run          # tiny shapes (CI), same table and files
    python -m benchmarks.census --out DIR --json   # also write DIR/census.json (default folder: results/)
    python -m benchmarks.census --deterministic    # under torch.use_deterministic_algorithms(True)

Shapes (``benchmarks.bench_write.write_specs``): ``gpt2_124m`` (GPT-2 small, bf16, 64 documents of
100-450 tokens, m=8, K=5) and ``tiny_kv`` (Llama-style 4 layers x 128, 4 heads, fp32, 64 x 240 tokens,
m=8, K=2). Implementations: ``reference`` (``MemoryWriter(backend="torch")``: eager attention, full
logits), ``torch_sdpa`` (the plain torch loop with SDPA, as a GPU would run it: FlashAttention for 16-bit,
memory-efficient attention for fp32), ``engine_eager`` (``MemoryWriter(backend="triton")``: packed
documents, our attention / fused cross-entropy / update kernels inside the model's eager layers) and
``engine_compiled`` (the engine with its compiled step, once ``MemoryWriter(..., compile=True)`` exists).

How it counts without a GPU (``benchmarks.census_count``): the model lives on the ``meta`` device (no
data, no arithmetic) and each implementation runs whole writes of 1 and 2 steps under a dispatch mode
that classifies every aten op and records every Triton launch; one step = (2-step write) - (1-step write),
so the setup (validation, packing, embedding) is counted apart. Two branches that depend on the device
type take their CUDA path (fp32-output GEMMs in the cross-entropy, the update's split count for 132 SMs).

Attention: each record's ``attention_flops`` are our attention kernels' FLOPs per step by pass (``fwd``,
``bwd``, ``dbwd``) over the visible pairs, sliding windows included (``gradmem_fast.flops.attention_flops``,
in the mode torch is in: ``--deterministic`` selects the split backward); ``attention_tile_flops`` the
``[fewest, most]`` the kernels execute in whole tiles of the GPU tables (``census_count.tile_pairs``).

The roofline (``census_count.roofline``) is a **projection**, not a measurement: per kernel
``max(FLOPs / (peak x 0.7), bytes / (HBM x 0.8), 2 us)``, summed; the host issues eager launches at
4.5 us each (1 us from a CUDA graph) overlapped with the GPU; each host sync adds 15 us. Peaks: H100 SXM
989 TFLOP/s bf16 dense, 67 TFLOP/s fp32 (torch's default IEEE fp32 matmuls), HBM3 3.35 TB/s; H200 the
same compute with 4.8 TB/s. The GPU suite records measured times beside these (``projection``).
"""

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import sys
import time
from collections import Counter

IMPLS = ("reference", "torch_sdpa", "engine_eager", "engine_compiled")
# Opt-in (compiling on the CPU costs minutes): --impls ...,torch_sdpa_compiled
EXTRA_IMPLS = ("torch_sdpa_compiled",)
CASES = ("gpt2_124m", "tiny_kv")  # the default; any case of bench_write.write_specs can be named
ALL_CASES = CASES + ("llama_1b",)
LABELS = {
    "reference": "reference loop (eager attention, full logits)",
    "torch_sdpa": "SDPA loop (fused attention, torch CE)",
    "engine_eager": "engine, eager layers + our kernels",
    "engine_compiled": "engine, compiled step",
    "torch_sdpa_compiled": "SDPA loop, loss under torch.compile (inductor)",
    "engine_fusion_bound": "engine with ideal fusion (a model; bound for the compiled engine, CUDA graph)",
}
# bench_write implementation names -> census implementation (and whether the loop is replayed as a graph).
# bench_write's engine takes MemoryWriter's default compile="auto": compiled on CUDA (``projection(...,
# cuda=True)`` maps "gradmem_fast" there to engine_compiled), eager elsewhere.
BENCH_IMPLS = {
    "reference": ("reference", False),
    "torch_sdpa": ("torch_sdpa", False),
    "gradmem_fast": ("engine_eager", False),
    "gradmem_fast_graphs": ("engine_eager", True),
    "gradmem_fast_eager": ("engine_eager", False),
    "gradmem_fast_compiled": ("engine_compiled", False),
    "torch_sdpa_compiled": ("torch_sdpa_compiled", False),
}
TARGETS = {
    "launch_ratio_max": 0.5,
    "bytes_ratio_max": 0.5,
    "syncs": 0,
    "speedup_vs_reference_min": 3.0,
    "speedup_vs_sdpa_min": 1.5,
}


class NotAvailable(Exception):
    """An implementation that does not exist yet in this checkout."""


def _ensure_interpreter():
    """Set ``TRITON_INTERPRET=1`` where it still takes effect: our ops choose the Triton backend for non-CUDA
    tensors only under the interpreter (on the meta device nothing runs, the launches are recorded), and the
    compiled implementations run the kernels on real CPU tensors.

    Triton reads the variable when a kernel is decorated (``triton.knobs``, read lazily), not when ``triton``
    is imported, so what matters is whether our kernel modules are loaded yet. ``import triton`` alone does
    not settle it, and it happens early: ``torch.use_deterministic_algorithms(True)`` imports
    ``torch._dynamo``, which imports triton (so did ``from gradmem_fast import MemoryWriter``); the old check
    on ``"triton" in sys.modules`` then left the variable unset and the engine reported "needs CUDA or
    TRITON_INTERPRET=1"."""
    if _interpreter_problem() is None and os.environ.get("TRITON_INTERPRET", "0") != "1":
        os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_problem():
    """Why the engine cannot be counted in this process (None when it can): our kernel modules were imported
    before ``TRITON_INTERPRET=1`` was set, so their kernels are compiled for a GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    loaded = sorted(m for m in sys.modules if m == "gradmem_fast.kernels" or m.startswith("gradmem_fast.kernels."))
    if not loaded:
        return None
    return (
        "the Triton kernels were imported (" + ", ".join(loaded) + ") before TRITON_INTERPRET=1 was set, so they "
        "are compiled for a GPU and our ops do not pick them for meta or CPU tensors; set TRITON_INTERPRET=1 in "
        "the environment, or start the census before anything imports the kernels"
    )


@contextlib.contextmanager
def deterministic_mode(enabled: bool | None):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block (None: leave torch's mode as it is).
    Our attention backward and double backward then take their split, atomic-free kernels
    (``gradmem_fast.ops.attention.deterministic_kernels``: 7 and 20 GEMM units instead of 5 and 15)."""
    import torch

    if enabled is None:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(bool(enabled))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def compiled_engine_available() -> bool:
    from gradmem_fast import MemoryWriter

    return "compile" in inspect.signature(MemoryWriter.__init__).parameters


# ------------------------------------------------------------------------------------------ running


@contextlib.contextmanager
def gpu_branches(cpu_gemms_uncounted: bool = False):
    """Make the two device-type branches of our ops take their CUDA path on ``meta`` tensors.

    ``cpu_gemms_uncounted`` (a compiled run on real CPU tensors): the cross-entropy's CPU path for 16-bit
    GEMMs (fp32 copies of both operands, one of them the [V, d] head) runs outside the census: a GPU runs one
    fp32-output GEMM there, which the meta census counts."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    from gradmem_fast.kernels import update as update_kernels
    from gradmem_fast.ops import cross_entropy as ce

    saved = (ce._mm_acc, update_kernels.pick_num_splits, update_kernels._sm_count)
    pick = update_kernels.pick_num_splits

    def mm_acc(a, b):
        if a.device.type == "meta" and a.dtype in ce._HALF:
            return torch.mm(a, b, out_dtype=torch.float32)  # what a GPU runs (cuBLAS fp32 output)
        if cpu_gemms_uncounted and a.device.type == "cpu" and a.dtype in ce._HALF:
            with _disable_current_modes():
                return saved[0](a, b)
        return saved[0](a, b)

    def splits(batch, numel, device):
        if torch.device(device).type == "meta":
            return pick(batch, numel, torch.device("cuda", 0))
        return pick(batch, numel, device)

    ce._mm_acc = mm_acc
    update_kernels.pick_num_splits = splits
    update_kernels._sm_count = lambda index: 132  # H100 SXM / H200
    try:
        yield
    finally:
        ce._mm_acc, update_kernels.pick_num_splits, update_kernels._sm_count = saved


def _case_inputs(spec):
    """Meta-device model, real CPU token batch, lengths and initial memory of a ``WriteSpec``."""
    from .bench_write import build_model, initial_memory, make_batch

    model = build_model(spec.family, spec.config, spec.dtype, "meta")
    model.requires_grad_(False)
    ids, mask, lengths = make_batch(spec, model.config.vocab_size, "cpu")
    M0 = initial_memory(spec, model.get_input_embeddings().weight.shape[1], "cpu")
    return model, ids, mask, lengths, M0


def _runner(impl, model, spec, ids, mask, M0):
    """``run(steps)``: one whole write of ``steps`` steps by ``impl`` (inputs moved to the meta device)."""
    from .bench_write import _set_attention, make_impl

    if impl in COMPILED:
        raise ValueError(f"{impl} is counted by count_compiled, not on the meta device")
    if impl == "engine_eager" and _interpreter_problem():
        raise NotAvailable(_interpreter_problem())
    bench_name = {"engine_eager": "gradmem_fast"}.get(impl, impl)

    def run(steps):
        s = dataclasses.replace(spec, steps=steps)
        if impl == "torch_sdpa":
            _set_attention(model, "sdpa")
            # The plain loop takes its inputs on the model's device, as a user of it would pass them.
            f = make_impl(bench_name, model, s, ids.to("meta"), mask.to("meta"), "meta", dry_run=True)
            return f(M0.to("meta"))
        return make_impl(bench_name, model, s, ids, mask, "meta", dry_run=True)(M0)

    return run


def count_steps(run, sdpa: bool = False) -> dict:
    """Census of ``run(1)`` and ``run(2)``: per-step and setup totals, and the per-step launch lists."""
    from .census_count import Census, ce_logits_passes, fused_sdpa, record_triton

    runs = {}
    for steps in (1, 2):
        census = Census()
        with contextlib.ExitStack() as stack:
            stack.enter_context(gpu_branches())
            stack.enter_context(record_triton(census))
            if sdpa:
                stack.enter_context(fused_sdpa())
            stack.enter_context(census)
            run(steps)
        runs[steps] = census.since()
        runs[steps]["uncounted_flops"] = census.uncounted_flops
    one, two = runs[1], runs[2]
    keys = ("launches", "flops", "bytes", "syncs", "host_ops", "unknown_values", "uncounted_flops")
    step = {k: two[k] - one[k] for k in keys}
    setup = {k: one[k] - step[k] for k in keys}
    step["by_kind"] = {k: two["by_kind"].get(k, 0) - one["by_kind"].get(k, 0) for k in two["by_kind"]}
    step["sync_sites"] = {
        k: two["sync_sites"].get(k, 0) - one["sync_sites"].get(k, 0)
        for k in two["sync_sites"]
        if two["sync_sites"].get(k, 0) - one["sync_sites"].get(k, 0)
    }
    step["top_ops"] = _top_ops(one["by_op"], two["by_op"])
    step["ce_logits_passes"] = ce_logits_passes(two["launch_list"])  # per chunk: the same in every step
    step.update(_attention_step(one["launch_list"], two["launch_list"]))
    return {
        "step": step,
        "setup": setup,
        "launches_1": one["launch_list"],
        "launches_2": two["launch_list"],
        "all_sync_sites": set(two["sync_sites"]),
    }


def _attention_step(one: list, two: list) -> dict:
    """Per-step FLOPs of our attention kernels by pass (2-step launches minus 1-step ones): ``attention_flops``
    (visible pairs, = ``gradmem_fast.flops.attention_flops``) and ``attention_tile_flops`` (``[fewest, most]``
    over the GPU tables' tiles: what the kernels compute, whole tiles)."""
    from .census_count import attention_pass_flops

    def diff(tiles=None):
        a, b = attention_pass_flops(one, tiles), attention_pass_flops(two, tiles)
        return {k: b[k] - a[k] for k in b}

    low, high = diff(0), diff(1)
    return {"attention_flops": diff(), "attention_tile_flops": {k: [low[k], high[k]] for k in low}}


def _top_ops(one, two, n=8):
    diff = {}
    for name, row in two.items():
        base = one.get(name, {"launches": 0, "flops": 0, "bytes": 0})
        d = {k: row[k] - base[k] for k in row}
        if d["launches"]:
            diff[name] = d
    return dict(sorted(diff.items(), key=lambda kv: -kv[1]["launches"])[:n])


# ------------------------------------------------------------------------------------------ compiled implementations

# A compiled implementation -> (its eager twin in this census, how to build it on real CPU tensors).
COMPILED = {"torch_sdpa_compiled": "torch_sdpa", "engine_compiled": "engine_eager"}


def small_spec(spec):
    """The shape a compiled implementation really runs at on the CPU: the case's model and m, 2 documents of
    at most 16 tokens (dry-run shapes as they are). Launch counts do not depend on the lengths; the
    bytes of the non-GEMM kernels are scaled up (``compiled_counts``)."""
    if spec.batch * spec.max_len <= 64:
        return spec
    return dataclasses.replace(spec, batch=2, min_len=min(spec.min_len, 12), max_len=min(spec.max_len, 16))


def _compiled_impl(impl, model, spec, ids, mask):
    """(callable M0 -> memory, set_steps) of a compiled implementation on CPU tensors."""
    from .bench_write import _set_attention, make_impl

    if impl == "torch_sdpa_compiled":
        _set_attention(model, "sdpa")
        loop = make_impl("torch_sdpa_compiled", model, spec, ids, mask, "cpu", dry_run=False)  # inductor

        def set_steps(k):
            loop.steps = k

        return loop, set_steps
    if not compiled_engine_available():
        raise NotAvailable("not available yet: MemoryWriter has no compile option in this checkout")
    if _interpreter_problem():
        raise NotAvailable(_interpreter_problem())
    from gradmem_fast import MemoryWriter, WriteConfig

    from .bench_write import CLIP_NORM, LR

    _set_attention(model, "eager")
    config = WriteConfig(num_memory_tokens=spec.memory_tokens, steps=spec.steps, lr=LR, clip_norm=CLIP_NORM)
    writer = MemoryWriter(model, config, backend="triton", compile=True)

    def run(M0):
        return writer.write(ids, mask, memory=M0).memory

    def set_steps(k):
        # One writer for both step counts, so its compiled backbone is built once.
        writer.config = dataclasses.replace(config, steps=k)

    return run, set_steps


def count_compiled(impl, spec, eager_full: dict) -> dict:
    """Census of a compiled implementation: it runs for real on CPU tensors at ``small_spec(spec)`` (compiled
    first, outside the census), under ``InfraCensus`` + ``record_inductor`` + ``record_triton`` (Triton launches
    recorded, not run); then ``compiled_counts`` combines it with the eager twin's meta census."""
    import torch

    from .bench_write import build_model, initial_memory, make_batch
    from .census_count import InfraCensus, record_inductor, record_triton

    small = small_spec(spec)
    model = build_model(small.family, small.config, small.dtype, "cpu")
    model.requires_grad_(False)
    ids, mask, _ = make_batch(small, model.config.vocab_size, "cpu")
    M0 = initial_memory(small, model.get_input_embeddings().weight.shape[1], "cpu")
    run, set_steps = _compiled_impl(impl, model, small, ids, mask)
    runs = {}
    for steps in (1, 2):  # compile (and recompile for each step count) before counting
        set_steps(steps)
        run(M0)
    for steps in (1, 2):
        set_steps(steps)
        census = InfraCensus()
        with gpu_branches(cpu_gemms_uncounted=True), record_triton(census), record_inductor(census), census:
            run(M0)
        runs[steps] = census
    meta_model, meta_ids, meta_mask, _, meta_M0 = _case_inputs(small)
    eager_small = count_steps(
        _runner(COMPILED[impl], meta_model, small, meta_ids, meta_mask, meta_M0), sdpa=COMPILED[impl] == "torch_sdpa"
    )
    # Syncs that only real CPU tensors cause (our ops validate offsets when they are on the host, a check a
    # GPU skips): the sites the eager twin shows on real CPU tensors but not on meta ones are dropped.
    artefacts = _cpu_only_sync_sites(COMPILED[impl], model, small, ids, mask, M0, eager_small)
    torch.set_grad_enabled(True)
    kept = {k: [x for x in runs[k].syncs if _site(x) not in artefacts] for k in (1, 2)}
    out = compiled_counts(
        {k: c.launches for k, c in runs.items()}, {k: len(v) for k, v in kept.items()}, eager_small, eager_full
    )
    sites = [Counter(_site(x) for x in kept[k]) for k in (1, 2)]
    out["step"]["sync_sites"] = {k: v - sites[0].get(k, 0) for k, v in sites[1].items() if v - sites[0].get(k, 0)}
    out["step"]["cpu_only_syncs_dropped"] = sorted(artefacts)
    return out


def _site(sync) -> str:
    return f"{sync.name} @ {sync.where}"


def _cpu_only_sync_sites(eager_impl, model, spec, ids, mask, M0, eager_meta) -> set:
    """Sync sites of ``eager_impl`` run on real CPU tensors (as the compiled run is) minus those of its meta
    census (``eager_meta``, the GPU's branches)."""
    from .bench_write import make_impl
    from .census_count import InfraCensus, record_triton

    name = {"engine_eager": "gradmem_fast"}.get(eager_impl, eager_impl)
    census = InfraCensus()
    with record_triton(census), census:
        make_impl(name, model, dataclasses.replace(spec, steps=1), ids, mask, "cpu", dry_run=True)(M0)
    return {_site(x) for x in census.syncs} - eager_meta["all_sync_sites"]


def compiled_counts(compiled_launches: dict, compiled_syncs: dict, eager_small: dict, eager_full: dict) -> dict:
    """Full-shape counts of a compiled implementation, for the 1- and 2-step writes: the GEMMs, attention
    and our kernels ("anchors") of the eager twin's full-shape census, plus the compiled run's other launches
    (fused kernels, eager glue) with their bytes scaled by the eager twin's (full / small) ratio of non-anchor
    bytes. An extrapolation, labelled as such."""
    from .census_count import _is_anchor

    out = {}
    for k in (1, 2):
        full, small = eager_full[f"launches_{k}"], eager_small[f"launches_{k}"]
        scale = sum(x.bytes for x in full if not _is_anchor(x)) / max(
            1, sum(x.bytes for x in small if not _is_anchor(x))
        )
        rest = [dataclasses.replace(x, bytes=int(x.bytes * scale)) for x in compiled_launches[k] if not _is_anchor(x)]
        out[f"launches_{k}"] = [x for x in full if _is_anchor(x)] + rest
    one, two = out["launches_1"], out["launches_2"]
    step = {
        "launches": len(two) - len(one),
        "flops": sum(x.flops for x in two) - sum(x.flops for x in one),
        "bytes": sum(x.bytes for x in two) - sum(x.bytes for x in one),
        "syncs": compiled_syncs[2] - compiled_syncs[1],
        "unknown_values": 0,
        "uncounted_flops": 0,
        "fused_kernels": sum(x.kind == "fused" for x in compiled_launches[2])
        - sum(x.kind == "fused" for x in compiled_launches[1]),
        **_attention_step(one, two),
        "by_kind": {
            kind: sum(x.kind == kind for x in two) - sum(x.kind == kind for x in one) for kind in {x.kind for x in two}
        },
    }
    return {"step": step, "setup": {}, "launches_1": one, "launches_2": two}


def fused_counts(counts: dict) -> dict:
    """``counts`` with both launch lists passed through ``census_count.fusion_bound``."""
    from .census_count import fusion_bound

    one, two = fusion_bound(counts["launches_1"]), fusion_bound(counts["launches_2"])
    step = dict(
        counts["step"], launches=len(two) - len(one), bytes=sum(x.bytes for x in two) - sum(x.bytes for x in one)
    )
    step["by_kind"] = {k: sum(x.kind == k for x in two) - sum(x.kind == k for x in one) for k in {x.kind for x in two}}
    step.pop("top_ops", None)
    return {"step": step, "setup": counts["setup"], "launches_1": one, "launches_2": two}


def project(counts: dict, graphs: bool = False) -> dict:
    """Per-step roofline projection on each GPU of ``census_count.GPUS`` (components of the 2-step
    write minus the 1-step write; the step time combines them as in ``census_count.roofline``)."""
    from .census_count import GPUS, roofline

    out = {}
    for gpu in GPUS:
        two = roofline(counts["launches_2"], 0, gpu, graphs)
        one = roofline(counts["launches_1"], 0, gpu, graphs)
        comp = {k: two[k] - one[k] for k in ("gpu_busy_us", "host_launch_us", "compute_us", "memory_us")}
        syncs = counts["step"]["syncs"]
        step_us = max(comp["gpu_busy_us"], comp["host_launch_us"]) + syncs * gpu.sync_us
        bound = (
            "launch"
            if comp["host_launch_us"] >= comp["gpu_busy_us"]
            else ("compute" if comp["compute_us"] >= comp["memory_us"] else "memory")
        )
        out[gpu.name] = {
            "step_ms": step_us / 1e3,
            "gpu_busy_ms": comp["gpu_busy_us"] / 1e3,
            "host_launch_ms": comp["host_launch_us"] / 1e3,
            "compute_ms": comp["compute_us"] / 1e3,
            "memory_ms": comp["memory_us"] / 1e3,
            "bound": bound,
            "graphs": graphs,
        }
    return out


def spec_shape(spec) -> dict:
    """The WRITE shape fields a census record carries (a stored record answers only for the same shape)."""
    return dict(
        dtype=str(spec.dtype).replace("torch.", ""),
        batch=spec.batch,
        min_len=spec.min_len,
        max_len=spec.max_len,
        memory_tokens=spec.memory_tokens,
        steps=spec.steps,
    )


def census_case(spec, impls=IMPLS) -> list:
    """One record per implementation for the shape ``spec`` (status ok / not available / error)."""
    import torch

    from gradmem_fast.flops import write_step_flops

    _ensure_interpreter()
    model, ids, mask, lengths, M0 = _case_inputs(spec)
    useful = write_step_flops(model, lengths, spec.memory_tokens)
    base = dict(
        case=spec.name,
        **spec_shape(spec),
        useful_flops_per_step=useful,
        context_tokens=sum(lengths),
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    records, records_extra, counted = [], [], {}
    for impl in impls:
        rec = dict(base, impl=impl, label=LABELS[impl])
        start = time.monotonic()
        try:
            if impl in COMPILED:
                twin = counted.get(COMPILED[impl])
                if twin is None:
                    twin = counted[COMPILED[impl]] = count_steps(
                        _runner(COMPILED[impl], model, spec, ids, mask, M0), sdpa=COMPILED[impl] == "torch_sdpa"
                    )
                counts = count_compiled(impl, spec, twin)
            else:
                counts = counted[impl] = count_steps(
                    _runner(impl, model, spec, ids, mask, M0), sdpa=impl == "torch_sdpa"
                )
            rec.update(
                status="ok",
                **{k: v for k, v in counts["step"].items()},
                setup={k: v for k, v in counts["setup"].items()},
                projection=project(counts),
            )
            if impl in ("engine_eager", "engine_compiled"):  # a GPU suite measures both replayed as a graph
                rec["projection_graphs"] = project(counts, graphs=True)
            if impl == "engine_eager":
                fused = fused_counts(counts)
                records_extra.append(
                    dict(
                        base,
                        impl="engine_fusion_bound",
                        label=LABELS["engine_fusion_bound"],
                        status="ok",
                        **fused["step"],
                        projection=project(fused, graphs=True),
                        projection_no_graphs=project(fused),
                    )
                )
        except NotAvailable as exc:
            rec.update(status="not available", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - one implementation's failure is recorded, the rest go on
            rec.update(
                status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            )
        rec["census_wall_s"] = round(time.monotonic() - start, 2)
        print(f"census: {spec.name} {impl}: {rec['status']} ({rec['census_wall_s']} s)", file=sys.stderr, flush=True)
        records.append(rec)
    records += records_extra
    del model
    torch.set_grad_enabled(True)
    _add_ratios(records)
    return records


def _add_ratios(records):
    by = {r["impl"]: r for r in records if r.get("status") == "ok"}
    ref, sdpa, sdpa_c = by.get("reference"), by.get("torch_sdpa"), by.get("torch_sdpa_compiled")
    for r in by.values():
        for gpu, p in r["projection"].items():
            if ref:
                p["speedup_vs_reference"] = ref["projection"][gpu]["step_ms"] / p["step_ms"]
            if sdpa:
                p["speedup_vs_sdpa"] = sdpa["projection"][gpu]["step_ms"] / p["step_ms"]
            if sdpa_c:
                p["speedup_vs_sdpa_compiled"] = sdpa_c["projection"][gpu]["step_ms"] / p["step_ms"]
        if ref:
            r["launch_ratio_vs_reference"] = r["launches"] / max(1, ref["launches"])
            r["bytes_ratio_vs_reference"] = r["bytes"] / max(1, ref["bytes"])


def targets(records, gpu="H100 SXM") -> list:
    """Issue 13's census targets for the GPT-2 shape, for the compiled engine (and, to compare, the eager
    engine and the fusion bound): (implementation, target, value, met)."""
    rows = []
    for r in records:
        if r.get("case") != "gpt2_124m" or r.get("impl") not in (
            "engine_compiled",
            "engine_eager",
            "engine_fusion_bound",
        ):
            continue
        if r.get("status") != "ok":
            rows.append((r["impl"], "all targets", r.get("reason", r.get("status")), None))
            continue
        p = r["projection"][gpu]
        checks = [
            ("launches <= 1/2 reference", r.get("launch_ratio_vs_reference"), TARGETS["launch_ratio_max"], "le"),
            ("bytes <= 1/2 reference", r.get("bytes_ratio_vs_reference"), TARGETS["bytes_ratio_max"], "le"),
            ("host syncs per step = 0", r["syncs"], TARGETS["syncs"], "le"),
            (
                "projected speedup >= 3x reference",
                p.get("speedup_vs_reference"),
                TARGETS["speedup_vs_reference_min"],
                "ge",
            ),
            ("projected speedup >= 1.5x SDPA loop", p.get("speedup_vs_sdpa"), TARGETS["speedup_vs_sdpa_min"], "ge"),
        ]
        if p.get("speedup_vs_sdpa_compiled") is not None:  # DESIGN.md: >= 1.5x the best plain-torch loop
            checks.append(
                (
                    "projected >= 1.5x compiled SDPA loop",
                    p["speedup_vs_sdpa_compiled"],
                    TARGETS["speedup_vs_sdpa_min"],
                    "ge",
                )
            )
        for name, value, bound, how in checks:
            met = None if value is None else (value <= bound if how == "le" else value >= bound)
            rows.append((r["impl"], name, value, met))
    return rows


# ------------------------------------------------------------------------------------------ bucket waste


def uniform_mix_waste(
    num_memory_tokens=8, docs=20000, low=100, high=450, batch_tokens=16384, window=4096, seed=0
) -> dict:
    """Bucket padding of a ``write_many`` stream of ``docs`` documents with uniform lengths in [low, high].

    ``gradmem_fast.packing.padding_waste`` plans the batches exactly as the writer does (length-sorted windows,
    batches of at most ``batch_tokens`` rows, each padded to ``packing.bucket_rows``): the share of computed rows
    that are filler, and the number of distinct bucket shapes (= compiled steps of the stream).
    """
    import torch

    from gradmem_fast.packing import padding_waste

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (docs,), generator=gen).tolist()
    out = padding_waste(lengths, num_memory_tokens, batch_tokens=batch_tokens, window=window)
    out.update(docs=docs, low=low, high=high, batch_tokens=batch_tokens, target_max=0.125)
    return out


# ------------------------------------------------------------------------------------------ public entry points


def specs(dry_run: bool, cases=CASES):
    from .bench_write import write_specs

    return [s for s in write_specs(dry_run) if s.name in cases]


def run_census(dry_run: bool = False, cases=CASES, impls=IMPLS, deterministic: bool | None = None) -> dict:
    """The whole census: {"meta", "records", "targets", "bucket_waste"} (JSON-ready after ``_jsonable``).
    ``deterministic``: count under ``torch.use_deterministic_algorithms(True)`` (False: with it off; None:
    torch's mode as it is), where our attention backward takes its split kernels."""
    with deterministic_mode(deterministic):
        return _run_census(dry_run, cases, impls)


def _run_census(dry_run, cases, impls):
    import torch

    records = []
    for spec in specs(dry_run, cases):
        # The dry run (CI, <= 60 s on 2 cores) compiles for the GPT-2 shape only: a compile costs ~25 s there.
        skip = [i for i in impls if i in COMPILED] if dry_run and spec.name != "gpt2_124m" else []
        records += census_case(spec, [i for i in impls if i not in skip])
        records += [
            dict(
                case=spec.name,
                impl=i,
                label=LABELS[i],
                status="skipped",
                reason="compiled implementations are counted for gpt2_124m only in the dry run",
            )
            for i in skip
        ]
    try:
        waste = uniform_mix_waste()
    except Exception as exc:  # noqa: BLE001 - packing may change under another issue
        waste = {"status": "not available", "reason": f"{type(exc).__name__}: {exc}"}
    meta = {
        "kind": "projection (counted on CPU, no GPU time measured)",
        "dry_run": dry_run,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "assumptions": _assumptions(),
    }
    return {"meta": meta, "records": records, "targets": targets(records), "bucket_waste": waste}


def _assumptions() -> dict:
    from .census_count import GPUS

    return {g.name: dataclasses.asdict(g) for g in GPUS}


_CACHE = {}


def projection(case: str, impl: str, dry_run: bool = False, gpu: str = "H100 SXM", cuda: bool = False) -> dict:
    """Projected per-step and per-write milliseconds of a ``bench_write`` case and implementation name
    (``reference``, ``torch_sdpa``, ``gradmem_fast``, ``gradmem_fast_graphs``, ``gradmem_fast_compiled``),
    for the GPU suite to store beside the measured time. Raises KeyError for an implementation the census
    does not model, NotAvailable when it does not exist yet. ``cuda``: the measurement ran on a GPU, where the
    engine compiles its step by default."""
    name, graphs = census_impl(impl, cuda)
    import torch

    key = (case, name, dry_run, torch.are_deterministic_algorithms_enabled())
    if key not in _CACHE:
        spec = next(s for s in specs(dry_run, (case,)))
        _ensure_interpreter()
        model, ids, mask, lengths, M0 = _case_inputs(spec)
        if name in COMPILED:
            twin = count_steps(_runner(COMPILED[name], model, spec, ids, mask, M0), sdpa=COMPILED[name] == "torch_sdpa")
            counts = count_compiled(name, spec, twin)
        else:
            counts = count_steps(_runner(name, model, spec, ids, mask, M0), sdpa=name == "torch_sdpa")
        _CACHE[key] = (spec, counts)
    spec, counts = _CACHE[key]
    p = project(counts, graphs)
    gpu_key = gpu if gpu in p else next(iter(p))
    step_ms = p[gpu_key]["step_ms"]
    return {
        "projected_step_ms": step_ms,
        "projected_write_ms": step_ms * spec.steps,
        "projection_gpu": gpu_key,
        "projected_launches_per_step": counts["step"]["launches"],
        "projected_bound": p[gpu_key]["bound"],
    }


def census_impl(impl: str, cuda: bool = False):
    """(census implementation, replayed as a CUDA graph) of a ``bench_write`` implementation name; KeyError for
    one the census does not model. ``cuda``: measured on a GPU, where the engine compiles its step by default."""
    name, graphs = BENCH_IMPLS[impl]
    if cuda and name == "engine_eager" and impl != "gradmem_fast_eager" and compiled_engine_available():
        name = "engine_compiled"
    return name, graphs


def stored_projection(case: str, name: str, graphs: bool = False, gpu: str = "H100 SXM", root=None):
    """The projection of census implementation ``name`` on the full-size ``case`` from the newest stored census
    (``census.json`` under ``root``, default benchmarks/results/*/, not a dry run, in torch's current
    deterministic mode, the same WRITE shape), or None. Counting a compiled implementation compiles the model on
    the CPU (minutes, ``census_wall_s`` of the stored censuses), which no lent-GPU stage can wait for."""
    import glob

    import torch

    from .common import repo_root

    spec = next(iter(specs(False, (case,))), None)
    if spec is None:
        return None
    shape = spec_shape(spec)
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = "projection_graphs" if graphs else "projection"
    root = root or os.path.join(repo_root(), "benchmarks", "results")
    best = None
    for path in glob.glob(os.path.join(root, "*", "census.json")):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        meta = doc.get("meta", {})
        if meta.get("dry_run") or bool(meta.get("deterministic")) != deterministic:
            continue
        stamp = str(meta.get("timestamp", ""))
        for r in doc.get("records", []):
            p = r.get(key) or {}
            if (r.get("case"), r.get("impl"), r.get("status")) != (case, name, "ok") or not p:
                continue
            if any(r.get(k) != v for k, v in shape.items()) or (best and stamp <= best[0]):
                continue
            gpu_key = gpu if gpu in p else next(iter(p))
            best = (stamp, path, r, p[gpu_key], gpu_key)
    if best is None:
        return None
    stamp, path, r, p, gpu_key = best
    return {
        "projected_step_ms": p["step_ms"],
        "projected_write_ms": p["step_ms"] * spec.steps,
        "projection_gpu": gpu_key,
        "projected_launches_per_step": r.get("launches"),
        "projected_bound": p.get("bound"),
        "projection_source": f"{os.path.relpath(path, repo_root())} ({stamp})",
    }


# Seconds a compiled implementation's count takes on the CPU (inductor compiles the model there): 160-630 s in
# the stored censuses. With a time limit, compare starts such a count only when at least this much is left.
COMPILED_COUNT_S = 600.0


def compare(results_json: str, seconds: float | None = None, on_rows=None, stored_root=None) -> list:
    """Measured whole-WRITE times of a benchmark ``results.json`` beside the census projection of the same
    case and implementation (the GPU it ran on when it is an H200, else the H100 figures): one row per write
    record the census models, with ``measured / projected``.

    A full-size measurement takes its projection from the newest stored census when one has it
    (``stored_projection``, named in ``projection_source``), else counts it now: eager implementations first
    (seconds each), compiled ones last (minutes). ``seconds``: no count starts after that many seconds, nor a
    compiled one with less than ``COMPILED_COUNT_S`` left (the row says why). ``on_rows(rows)`` is called
    after each row is settled (the command line rewrites its JSON file there, so a killed stage keeps them)."""
    with open(results_json) as f:
        doc = json.load(f)
    start = time.monotonic()
    meta = doc.get("meta", {})
    gpu = "H200" if "H200" in str(meta.get("gpu", "")) else "H100 SXM"
    dry_run = bool(meta.get("dry_run"))
    cuda = str(meta.get("device", "")).startswith("cuda")
    rows, pending = [], []
    for r in doc.get("records", []):
        if r.get("bench") != "write" or r.get("status") != "ok" or r.get("impl") not in BENCH_IMPLS:
            continue
        row = {"case": r.get("case"), "impl": r["impl"], "measured_write_ms": r.get("ms"), "gpu": gpu}
        rows.append(row)
        try:
            name, graphs = census_impl(r["impl"], cuda)
            stored = None if dry_run else stored_projection(r.get("case"), name, graphs, gpu, stored_root)
        except Exception as exc:  # noqa: BLE001 - one row's failure is recorded, the others go on
            row["projection_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        if stored is None:
            pending.append((name in COMPILED, row))
        else:
            row.update(stored)
    for _, row in pending:
        row["projection_error"] = "not counted yet"
    _settle_ratios(rows)
    if on_rows:
        on_rows(rows)
    for compiled, row in sorted(pending, key=lambda item: item[0]):  # eager counts first
        left = math.inf if seconds is None else seconds - (time.monotonic() - start)
        if left <= (COMPILED_COUNT_S if compiled else 0.0):
            why = "a compiled implementation is counted by compiling it on the CPU (minutes); " if compiled else ""
            row["projection_error"] = (
                f"not counted: {why}{max(0.0, left):.0f} s left of --seconds {seconds:g}, and no stored census has it "
                "(python -m benchmarks.census --compare RESULTS_JSON, without --seconds, counts it)"
            )
            continue
        del row["projection_error"]
        try:
            row.update(projection(row["case"], row["impl"], dry_run=dry_run, gpu=gpu, cuda=cuda))
        except Exception as exc:  # noqa: BLE001 - one row's failure is recorded, the others go on
            row["projection_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        _settle_ratios(rows)
        if on_rows:
            on_rows(rows)
    return rows


def _settle_ratios(rows):
    for row in rows:
        if row.get("measured_write_ms") and row.get("projected_write_ms"):
            row["measured_over_projected"] = row["measured_write_ms"] / row["projected_write_ms"]


# ------------------------------------------------------------------------------------------ output


def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


def format_table(result: dict) -> str:
    lines = [
        "Step census (PROJECTION: counted on CPU with meta tensors; GPU times are a roofline model, not measurements)",
    ]
    if result.get("meta", {}).get("deterministic"):
        lines.append("torch deterministic mode: our attention backward runs its split kernels (7 GEMM units, not 5)")
    lines.append("")
    head = (
        f"{'case':10} {'implementation':20} {'launches':>8} {'GFLOP':>8} {'GB r+w':>8} {'syncs':>5} "
        f"{'H100 ms':>8} {'H200 ms':>8} {'bound':>7} {'x ref':>6} {'x sdpa':>6}"
    )
    lines += [head, "-" * len(head)]
    for r in result["records"]:
        if r.get("status") != "ok":
            lines.append(f"{r['case']:10} {r['impl']:20} {r['status']}: {r.get('reason', '')}")
            continue
        h100, h200 = r["projection"]["H100 SXM"], r["projection"]["H200"]
        lines.append(
            f"{r['case']:10} {r['impl']:20} {r['launches']:8d} {r['flops'] / 1e9:8.1f} "
            f"{r['bytes'] / 1e9:8.2f} {r['syncs']:5d} {h100['step_ms']:8.3f} {h200['step_ms']:8.3f} "
            f"{h100['bound']:>7} {_fmt(h100.get('speedup_vs_reference'), '{:.2f}'):>6} "
            f"{_fmt(h100.get('speedup_vs_sdpa'), '{:.2f}'):>6}"
        )
    lines.append("")
    lines.append(
        "Per step (one of K). Launches: one per eager aten op that runs a kernel, one per Triton launch. "
        "GFLOP: all matmul/attention FLOPs executed (padding included). GB: bytes read + written, summed "
        "over kernels. Syncs: host waits inside the loop."
    )
    for r in result["records"]:
        if r.get("status") == "ok" and r.get("sync_sites"):
            lines.append(
                f"  syncs of {r['case']} / {r['impl']}: "
                + "; ".join(f"{n}x {site}" for site, n in r["sync_sites"].items())
            )
        if r.get("note"):
            lines.append(f"  note on {r['case']} / {r['impl']}: {r['note']}")
        att = r.get("attention_flops") if r.get("status") == "ok" else None
        if att and any(att.values()):
            tiles = r.get("attention_tile_flops") or {}
            lines.append(
                f"  attention kernels of {r['case']} / {r['impl']}, GFLOP per step (visible pairs; whole GPU tiles): "
                + ", ".join(
                    f"{k} {v / 1e9:.3g}"
                    + ("; {:.3g}-{:.3g}".format(*(t / 1e9 for t in tiles[k])) if k in tiles else "")
                    for k, v in att.items()
                    if v
                )
            )
        if r.get("status") == "ok" and r.get("projection_graphs"):
            g = r["projection_graphs"]["H100 SXM"]
            lines.append(
                f"  {r['case']} / {r['impl']} replayed as a CUDA graph: {g['step_ms']:.3f} ms/step on H100 (projection)"
            )
    if result["targets"]:
        lines += ["", "Issue 13 targets, GPT-2 shape, H100 projection:"]
        for impl, name, value, met in result["targets"]:
            verdict = "n/a" if met is None else ("met" if met else "NOT met")
            shown = value if isinstance(value, str) else _fmt(value)
            lines.append(f"  {impl:20} {name:38} {shown:>10}  {verdict}")
    w = result.get("bucket_waste", {})
    if "row_waste" in w:
        lines += [
            "",
            f"Bucket padding waste, {w['docs']} documents of {w['low']}-{w['high']} tokens through write_many "
            f"(packing.padding_waste): rows {w['row_waste']:.1%} (target <= {w['target_max']:.1%}), "
            f"{w['buckets']} bucket shapes (compiles) for {w['batches']} batches",
        ]
    elif w:
        lines += ["", f"Bucket padding waste: {w.get('reason')}"]
    return "\n".join(lines)


def _strip(result):
    """JSON-ready copy (no launch objects)."""
    from .common import _jsonable

    return _jsonable(result)


def default_out_dir(dry_run: bool, deterministic: bool = False) -> str:
    from .common import repo_root

    date = datetime.date.today().isoformat()
    name = f"{date}-census" + ("-deterministic" if deterministic else "") + ("-dryrun" if dry_run else "")
    return os.path.join(repo_root(), "benchmarks", "results", name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.census", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (CI)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for census.json / census.txt (default benchmarks/results/<date>-census[-deterministic][-dryrun])",
    )
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="count under torch.use_deterministic_algorithms(True): the attention backward's split kernels "
        "(default: torch's mode as the process has it, normally off)",
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(ALL_CASES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS + EXTRA_IMPLS)}")
    p.add_argument(
        "--compare",
        default=None,
        metavar="RESULTS_JSON",
        help="print measured WRITE times of a benchmark results.json beside their projections "
        "(writes census_vs_measured.json next to it, or into --out)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="with --compare: start no count after this many seconds, and no compiled one (minutes) with less "
        f"than {COMPILED_COUNT_S:.0f} s left; stored censuses answer the rest (a lent GPU's stage limit)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        _ensure_interpreter()
        out_dir = args.out or os.path.dirname(os.path.abspath(args.compare))
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "census_vs_measured.json")

        def write_rows(rows):
            with open(path + ".tmp", "w") as f:
                json.dump(_strip(rows), f, indent=1)
                f.write("\n")
            os.replace(path + ".tmp", path)

        with deterministic_mode(True if args.deterministic else None):
            rows = compare(args.compare, seconds=args.seconds, on_rows=write_rows)
        write_rows(rows)
        for row in rows:
            print(
                f"{row['case']:10} {row['impl']:22} measured {_fmt(row.get('measured_write_ms'))} ms, projected "
                f"{_fmt(row.get('projected_write_ms'))} ms ({row['gpu']}), measured/projected "
                f"{_fmt(row.get('measured_over_projected'))} {row.get('projection_error', '')}"
            )
        return 0
    cases = [c for c in args.cases.split(",") if c]
    impls = [i for i in args.impls.split(",") if i]
    for c in cases:
        if c not in ALL_CASES:
            p.error(f"--cases: unknown case {c!r}; choose from {', '.join(ALL_CASES)}")
    for i in impls:
        if i not in IMPLS + EXTRA_IMPLS:
            p.error(f"--impls: unknown implementation {i!r}; choose from {', '.join(IMPLS + EXTRA_IMPLS)}")
    _ensure_interpreter()
    result = _strip(run_census(args.dry_run, cases, impls, deterministic=True if args.deterministic else None))
    table = format_table(result)
    out_dir = args.out or default_out_dir(args.dry_run, result["meta"]["deterministic"])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "census.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "census.txt"), "w") as f:
        f.write(table + "\n")
    print(json.dumps(result, indent=1) if args.json else table)
    print(f"\nwrote {os.path.join(out_dir, 'census.json')}", file=sys.stderr)
    errors = [r for r in result["records"] if r.get("status") == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
