"""Counting what a GPU would run: kernel launches, FLOPs, bytes and host synchronisations of torch code.

``Census`` is a ``TorchDispatchMode`` meant for code that runs on the ``meta`` device (shapes, no data, no
compute), so a GPT-2-sized WRITE step costs no real arithmetic on a CPU. Every aten op that reaches it is
classified:

* **device op** (a tensor on a non-CPU device): one kernel launch in eager mode, unless it only changes
  metadata (views, ``empty``, ``detach``); its FLOPs come from ``torch.utils.flop_counter``'s formulas
  (matrix products and attention; elementwise ops count 0, the usual MFU convention) and its bytes are the
  sum of the bytes of its distinct input tensors plus its outputs (stride-0 dimensions counted once: a
  broadcast operand is read once);
* **host op** (CPU tensors only): run for real (packing, lengths); no launch;
* **host synchronisation**: ``_local_scalar_dense`` (``item``, ``int()``, ``bool()``, ``tolist``), a copy
  between the device and the host in either direction (a blocking host-to-device copy waits for the stream
  too), and ops whose output size depends on device data (``nonzero``, ``masked_select``, ...).

Values the host needs (token lengths, ``cu_seqlens``, masks) are tracked beside the meta tensors: an op
whose every tensor input has a known value (a host tensor, or a meta tensor computed that way) and whose
output is small is also run on real CPU copies, so ``mask.sum(1).tolist()`` answers with the true lengths
and a data-dependent branch takes the real path. A sync on a value that is not known (it depends on model
weights) answers 0 and is counted in ``unknown_values``.

Triton launches (``kernel[grid](...)``) are recorded, not run, while ``record_triton`` is active: one
launch each, with FLOPs from ``triton_kernel_cost`` (attention: multiples of ``2 Hq D P`` for ``P``
visible query-key pairs, read from the known ``cu_seqlens``, inside the sliding window when the launch has one:
``launch_window``) and bytes = the distinct tensor arguments
(plus a second pass over a buffer the kernel rewrites in place). Our ``gradmem_fast::*`` custom ops run
their real Python implementation inside the census, so the launches they make are what is counted.

Everything counted here is a model of the GPU, not a measurement: each aten op is one launch (cuBLAS
sometimes adds a split-K reduction, a sort launches several), and bytes are the compulsory traffic (no
cache misses, no re-reads).
"""

import contextlib
import dataclasses
import inspect
import math
import os
import traceback
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# Ops that allocate or relabel memory without launching a kernel.
NO_LAUNCH = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "detach",
        "alias",
        "lift_fresh",
        "lift",
        "_unsafe_view",
        "set_",
        "resize_",
        "_reshape_alias",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "_has_compatible_shallow_copy_type",
        "is_same_size",
        "_nested_tensor_from_mask",
        "record_stream",
        "_assert_async",
        "_assert_scalar",
        "_functional_assert_async",
        "_fused_sdp_choice",
    }
)
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# Ops whose output size is read back from the device (a sync before the host can go on).
DATA_DEPENDENT = frozenset(
    {
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "nonzero_static",
        "equal",
        "is_nonzero",
        "argwhere",
    }
)
# Ops that overwrite their mutated argument without reading it (the mutated tensor is not an input read).
OVERWRITE = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "index_put_"})
# Above this many elements a known value is not computed on the CPU (it would cost real time and memory).
VALUE_LIMIT = 1 << 24


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write all of ``t``: dimensions of stride 0 (broadcasts) once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _where(skip=("torch", "census_count", "contextlib", "threading")) -> str:
    """``file:line function`` of the first frame outside torch and this module (who asked for a sync)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if any(f"/{s}/" in path or path.endswith(f"/{s}.py") for s in skip):
            continue
        parts = path.split("/")
        return f"{'/'.join(parts[-2:])}:{frame.lineno} {frame.name}"
    return "?"


@dataclasses.dataclass
class Launch:
    """One kernel launch: what ran, its FLOPs, bytes read + written, the dtype that sets its peak."""

    name: str
    kind: str  # "aten" | "triton" | "memcpy"
    flops: int
    bytes: int
    dtype: torch.dtype = None
    parent: str = None  # the custom op or aten op that made this launch, if any
    reads: tuple = ()  # (storage key, bytes) of each distinct tensor read (for the fusion model)
    writes: tuple = ()  # (storage key, bytes) of each tensor written
    tile_flops: tuple = None  # attention: (fewest, most) FLOPs over the GPU tables' tiles (``attention_tile_flops``)


@dataclasses.dataclass
class Sync:
    name: str
    where: str
    known: bool


class Census(TorchDispatchMode):
    host_is_device = False  # InfraCensus: real CPU tensors stand for device tensors

    """Counts launches, FLOPs, bytes and host syncs of the ops run under it (module docstring).

    Use ``with Census() as c:`` around code whose device tensors live on ``meta``; then read
    ``c.summary()``. ``c.mark()``/``c.since(mark)`` give the counts of a part of the run.
    """

    def __init__(self, value_limit: int = VALUE_LIMIT):
        super().__init__()
        self.uncounted_flops = 0  # Triton launches whose FLOPs ``triton_kernel_cost`` does not model
        self.launches = []
        self.syncs = []
        self.host_ops = 0
        self.unknown_values = 0
        self.values = WeakIdKeyDictionary()
        self.value_limit = value_limit
        self._parent = None
        self._storages = []

    # ----------------------------------------------------------------------------------- values
    def known(self, t):
        """The real CPU value of ``t`` (a host tensor is its own value), or None."""
        if not isinstance(t, torch.Tensor):
            return None
        if t.device.type == "cpu":
            return t
        return self.values.get(t)

    def set_value(self, t, value):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu" and value is not None:
            self.values[t] = value

    def _all_known(self, flat):
        return all(self.known(a) is not None for a in flat if isinstance(a, torch.Tensor))

    def _real_call(self, func, args, kwargs):
        """``func`` on the known CPU values of its tensor arguments, device keywords mapped to the CPU."""

        def real(a):
            if isinstance(a, torch.Tensor):
                return self.known(a)
            if isinstance(a, torch.device) and a.type != "cpu":
                return torch.device("cpu")
            return a

        r_args = tree_map(real, args)
        r_kwargs = {
            k: (torch.device("cpu") if k == "device" and v is not None else tree_map(real, v))
            for k, v in kwargs.items()
        }
        return func(*r_args, **r_kwargs)

    # ----------------------------------------------------------------------------------- recording
    def add_launch(self, launch: Launch):
        if launch.parent is None:
            launch.parent = self._parent
        self.launches.append(launch)

    def add_sync(self, name, known):
        self.syncs.append(Sync(name, _where(), bool(known)))
        if not known:
            self.unknown_values += 1

    def mark(self):
        return (len(self.launches), len(self.syncs), self.host_ops, self.unknown_values)

    def since(self, mark=None):
        """Totals of the launches and syncs recorded after ``mark`` (from the start when None)."""
        n_l, n_s, n_h, n_u = mark or (0, 0, 0, 0)
        launches, syncs = self.launches[n_l:], self.syncs[n_s:]
        by_op = defaultdict(lambda: [0, 0, 0])
        for x in launches:
            row = by_op[x.name]
            row[0] += 1
            row[1] += x.flops
            row[2] += x.bytes
        return {
            "launches": len(launches),
            "flops": sum(x.flops for x in launches),
            "bytes": sum(x.bytes for x in launches),
            "syncs": len(syncs),
            "sync_sites": dict(Counter(f"{s.name} @ {s.where}" for s in syncs)),
            "host_ops": self.host_ops - n_h,
            "unknown_values": self.unknown_values - n_u,
            "by_kind": dict(Counter(x.kind for x in launches)),
            "by_op": {k: {"launches": v[0], "flops": v[1], "bytes": v[2]} for k, v in by_op.items()},
            "launch_list": launches,
        }

    # ----------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        namespace = func.namespace
        flat_in, _ = tree_flatten((args, kwargs))
        tensors_in = [a for a in flat_in if isinstance(a, torch.Tensor)]
        device_kw = kwargs.get("device")
        on_device = any(t.device.type != "cpu" for t in tensors_in) or (
            device_kw is not None and torch.device(device_kw).type != "cpu"
        )
        if namespace == "gradmem_fast":
            return self._custom_op(func, args, kwargs)
        if self.host_is_device:
            return self._host_device_op(func, name, args, kwargs, tensors_in)
        if not on_device:
            self.host_ops += 1
            return func(*args, **kwargs)
        if name == "_local_scalar_dense":
            value = self.known(args[0])
            self.add_sync("item", value is not None)
            return value.item() if value is not None else (False if args[0].dtype == torch.bool else 0)
        if name in ("_to_copy", "copy_") and self._crosses_host(func, args, kwargs):
            return self._host_copy(func, name, args, kwargs)
        all_known = self._all_known(flat_in)
        if name in DATA_DEPENDENT:
            return self._data_dependent(func, name, args, kwargs, all_known)
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            # The meta kernel cannot size an output that depends on data (boolean-mask indexing): run it on
            # the known values, which a GPU would read back first.
            if not all_known or "meta" not in str(exc) and "nonzero" not in str(exc):
                raise
            return self._data_dependent(func, name, args, kwargs, all_known)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not (func.is_view or name in NO_LAUNCH):
            reads, writes = self._io(func, name, args, tensors_in, flat_out)
            self.add_launch(
                Launch(
                    f"aten.{name}",
                    "aten",
                    self._flops(func, args, kwargs, out),
                    sum(b for _, b in reads) + sum(b for _, b in writes),
                    _dtype_of(tensors_in, flat_out),
                    reads=reads,
                    writes=writes,
                )
            )
        self._propagate(func, args, kwargs, out, flat_out, all_known)
        return out

    def _host_device_op(self, func, name, args, kwargs, tensors_in):
        """CPU tensors standing for device tensors (``InfraCensus``): run for real, count as on a GPU."""
        if name == "_local_scalar_dense" or name in DATA_DEPENDENT:
            self.add_sync("item" if name == "_local_scalar_dense" else name, True)
        out = func(*args, **kwargs)
        if not (func.is_view or name in NO_LAUNCH or name == "_local_scalar_dense"):
            flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            reads, writes = self._io(func, name, args, tensors_in, flat_out)
            self.add_launch(
                Launch(
                    f"aten.{name}",
                    "aten",
                    self._flops(func, args, kwargs, out),
                    sum(b for _, b in reads) + sum(b for _, b in writes),
                    _dtype_of(tensors_in, flat_out),
                    reads=reads,
                    writes=writes,
                )
            )
        return out

    def _propagate(self, func, args, kwargs, out, flat_out, all_known):
        mutated = _mutated_args(func, args, kwargs)
        small = sum(t.numel() for t in flat_out) <= self.value_limit
        # Uninitialised memory has no value (a kernel we do not follow may write it).
        if all_known and small and func._schema.name.split("::")[-1] not in UNINITIALISED:
            real = self._real_call(func, args, kwargs)
            for fake_t, real_t in zip(flat_out, [t for t in tree_flatten(real)[0] if isinstance(t, torch.Tensor)]):
                if fake_t.device.type != "cpu":
                    self.set_value(fake_t, real_t)
        else:
            for t in mutated:  # written with values we do not know
                self.values.pop(t, None)
            for t in flat_out:
                self.values.pop(t, None)

    def _crosses_host(self, func, args, kwargs):
        src = args[1] if func._schema.name.endswith("copy_") else args[0]
        dst_dev = (
            args[0].device if func._schema.name.endswith("copy_") else torch.device(kwargs.get("device") or src.device)
        )
        return (src.device.type == "cpu") != (dst_dev.type == "cpu")

    def _host_copy(self, func, name, args, kwargs):
        """A copy between host and device: a memcpy launch, and a sync unless it is non-blocking H2D."""
        src = args[1] if name == "copy_" else args[0]
        to_host = src.device.type != "cpu"
        value = self.known(src)
        nbytes = tensor_bytes(src)
        self.add_launch(
            Launch(
                f"memcpy {'D2H' if to_host else 'H2D'}",
                "memcpy",
                0,
                nbytes,
                src.dtype,
                reads=((self.storage_key(src), nbytes),) if to_host else (),
            )
        )
        non_blocking = bool(kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True))
        if to_host or not non_blocking:
            self.add_sync("D2H copy" if to_host else "blocking H2D copy", value is not None or not to_host)
        if to_host:
            if value is None:
                value = torch.zeros(src.shape, dtype=src.dtype)
            if name == "copy_":
                with torch.no_grad():
                    args[0].copy_(value.to(args[0].dtype))
                return args[0]
            return value.to(dtype=kwargs.get("dtype") or src.dtype).clone()
        out = func(*args, **kwargs)
        target = args[0] if name == "copy_" else out
        self.set_value(target, value.to(dtype=target.dtype).clone() if value is not None else None)
        return out

    def _data_dependent(self, func, name, args, kwargs, all_known):
        self.add_sync(name, all_known)
        if not all_known:
            raise RuntimeError(
                f"census: aten.{name} needs device values that are not known here (they depend "
                "on model weights); the census cannot follow this path"
            )
        real = self._real_call(func, args, kwargs)
        if not isinstance(real, torch.Tensor):
            return real
        device = next(t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        out = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)
        self.set_value(out, real)
        self.add_launch(
            Launch(
                f"aten.{name}",
                "aten",
                0,
                sum(tensor_bytes(t) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)) + tensor_bytes(out),
                real.dtype,
            )
        )
        return out

    def _custom_op(self, func, args, kwargs):
        """Our ops: run the real implementation (its aten ops and Triton launches are counted under it)."""
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(func._schema.name)
        if opdef is None:
            raise RuntimeError(f"census: no implementation found for custom op {func._schema.name}")
        saved, self._parent = self._parent, func._schema.name
        try:
            with self:
                return opdef._init_fn(*args, **kwargs)
        finally:
            self._parent = saved

    # ----------------------------------------------------------------------------------- costs
    def _flops(self, func, args, kwargs, out):
        from torch.utils.flop_counter import flop_registry

        name = func._schema.name.split("::")[-1]
        if name in SDPA_FLOPS:
            return SDPA_FLOPS[name](args, kwargs)
        fn = flop_registry.get(func._overloadpacket)
        if fn is None:
            return 0
        return int(fn(*args, **kwargs, out_val=out))

    def storage_key(self, t):
        """A key naming ``t``'s storage for the whole census (the storage is kept alive, so no key is
        reused by a later allocation; meta storages hold no memory)."""
        storage = t.untyped_storage()
        self._storages.append(storage)
        return storage._cdata

    def _io(self, func, name, args, tensors_in, flat_out):
        """(reads, writes): distinct input tensors (a buffer the op only overwrites is not read) and outputs,
        each as (storage key, bytes)."""
        mutated = {id(t) for t in _mutated_args(func, args, {})}
        overwrite = name in OVERWRITE or func._overloadname.startswith("out")  # torch.mm(..., out=z)
        if func._overloadname.startswith("out"):
            # ``out=`` arrives as a keyword, which ``_mutated_args(func, args, {})`` does not see; the op returns it.
            mutated |= {id(t) for t in flat_out}
        seen, reads = set(), []
        for t in tensors_in:
            if id(t) in seen or (overwrite and id(t) in mutated):
                continue
            seen.add(id(t))
            reads.append((self.storage_key(t), tensor_bytes(t)))
        writes = [(self.storage_key(t), tensor_bytes(t)) for t in flat_out]
        return tuple(reads), tuple(writes)


def _dtype_of(tensors_in, flat_out):
    for t in list(tensors_in) + list(flat_out):
        if t.is_floating_point():
            return t.dtype
    return (tensors_in or flat_out or [torch.empty(0)])[0].dtype


def _mutated_args(func, args, kwargs):
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


# ------------------------------------------------------------------------------------------ attention costs


def causal_pairs(lq: int, lk: int, causal: bool = True, window: int | None = None) -> int:
    """Visible (query, key) pairs of one sequence, bottom-right aligned causal mask (``j <= i + lk - lq``) and,
    with a sliding ``window``, ``j > i + lk - lq - window`` (``gradmem_fast.flops.visible_pairs``, one formula
    for the census and the FLOP accounting)."""
    from gradmem_fast.flops import visible_pairs

    return visible_pairs(lq, lk, causal, window)


def _sdpa_pairs(q, k, is_causal):
    b, h, lq, d = q.shape
    return b * h * d * causal_pairs(lq, k.shape[-2], bool(is_causal))


def _sdpa_arg(args, kwargs, index, name, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


# FLOPs of torch's fused attention kernels, counting only the visible causal block (FlashAttention skips the
# masked upper triangle): forward QK^T + PV = 4 D per pair and head; backward recomputes QK^T and forms dP,
# dV, dK, dQ = 10 D (FlashAttention-2).
SDPA_FLOPS = {
    "_scaled_dot_product_flash_attention": lambda a, k: (
        4 * _sdpa_pairs(a[0], a[1], _sdpa_arg(a, k, 4, "is_causal", False))
    ),
    "_scaled_dot_product_flash_attention_backward": lambda a, k: (
        10 * _sdpa_pairs(a[1], a[2], _sdpa_arg(a, k, 11, "is_causal", False))
    ),
    "_scaled_dot_product_efficient_attention": lambda a, k: (
        4 * _sdpa_pairs(a[0], a[1], _sdpa_arg(a, k, 6, "is_causal", False))
    ),
    "_scaled_dot_product_efficient_attention_backward": lambda a, k: (
        10 * _sdpa_pairs(a[1], a[2], _sdpa_arg(a, k, 9, "is_causal", False))
    ),
}


@contextlib.contextmanager
def fused_sdpa(device_type="cuda"):
    """Route ``F.scaled_dot_product_attention`` to the fused kernel a GPU would pick, for the census.

    On ``meta`` tensors torch picks its math backend (S x S scores); on an H100 it picks FlashAttention for
    16-bit inputs without a mask and the memory-efficient kernel otherwise (fp32, or an explicit mask).
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, need_lse, dropout_p, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ------------------------------------------------------------------------------------------ Triton launches

# FLOPs of our attention kernels in units of 2 Hq D P (one Lq x Lk x D matrix product over the visible
# pairs): forward S = QK^T and O = PV; backward dK/dV kernel recomputes S, forms dP = dO V^T, dV = P^T dO,
# dK = dS^T Q and, launched with ATOMIC_DQ (the default backward, unless torch's deterministic mode is on),
# also dQ = dS K (5 units in all, no dQ kernel); the deterministic path's dQ kernel recomputes S and dP and
# forms dQ = dS K (4 + 3 = 7 units). A "[CONSTEXPR]" suffix names the launch with that constexpr true.
# Kernels not listed count 0 FLOPs (reported as uncounted). Update this table when a kernel's work changes.
ATTENTION_UNITS = {
    "attn_fwd_kernel": 2,
    "attn_bwd_dkdv_kernel": 4,
    "attn_bwd_dkdv_kernel[ATOMIC_DQ]": 5,
    "attn_bwd_dq_kernel": 3,
    # double backward (kernels/attention_dbwd.py), one kernel whose ROLE constexpr picks the pass: row pass
    # (S, B = gQ k^T + q gK^T, P (B - c) v, P gV), grad-q pass (S, dP, B, C = dO gV^T, dS gK, G k), key pass
    # (S, dP, B, C, dS^T gQ + G^T q, W^T dO), fused key pass (the key pass and dS gK + G k by atomics):
    # split path 5 + 7 + 8 = 20 units, fused path 5 + 10 = 15 (gradmem_fast.flops.attention_flops).
    "attn_dbwd_kernel": None,  # marks the kernel as counted; the units are its ROLE entries
    "attn_dbwd_kernel[ROLE=0]": 5,
    "attn_dbwd_kernel[ROLE=1]": 7,
    "attn_dbwd_kernel[ROLE=2]": 8,
    "attn_dbwd_kernel[ROLE=3]": 10,
}
# Which pass of ``gradmem_fast.flops.attention_flops`` (``fwd``, ``bwd``, ``dbwd``) each attention kernel belongs to.
ATTENTION_PASSES = {
    "attn_fwd_kernel": "fwd",
    "attn_bwd_dkdv_kernel": "bwd",
    "attn_bwd_dq_kernel": "bwd",
    "attn_dbwd_kernel": "dbwd",
}


def attention_pass_flops(launches, tiles: int | None = None) -> dict:
    """FLOPs of our attention kernels among ``launches`` per pass, ``{"fwd", "bwd", "dbwd"}``: comparable with
    ``gradmem_fast.flops.attention_flops`` (summed over layers and calls), in either of torch's modes.
    ``tiles`` 0 / 1: the fewest / most FLOPs at the GPU tables' tiles instead (``Launch.tile_flops``; a launch
    without them counts its visible pairs)."""
    out = {"fwd": 0, "bwd": 0, "dbwd": 0}
    for x in launches:
        if x.kind == "triton" and x.name in ATTENTION_PASSES:
            at_tiles = tiles is not None and x.tile_flops is not None
            out[ATTENTION_PASSES[x.name]] += x.tile_flops[tiles] if at_tiles else x.flops
    return out


# Elementwise FLOPs per element of the logits chunk (max, exp, sum, subtract, scale): small next to the GEMMs.
# ce_dh_kernel / ce_dw_kernel also multiply the gradient formed from the chunk by W / H: 2 d FLOPs per logit.
CE_ELEMENTWISE = {"ce_forward_kernel": 5, "ce_grad_kernel": 4, "ce_dh_kernel": 4, "ce_dw_kernel": 4}
CE_PRODUCTS = ("ce_dh_kernel", "ce_dw_kernel")
# Soft-capped logits (SOFTCAP, Gemma 2): c tanh(y / c) per element read (scale, exp, add, divide, subtract,
# scale: 6), and in the gradient kernels its derivative 1 - t^2 times G (3 more).
CE_SOFTCAP = {"ce_forward_kernel": 6, "ce_grad_kernel": 9, "ce_dh_kernel": 9, "ce_dw_kernel": 9}


def _attention_docs(census, tensors, kwargs):
    """(Hq, D, [(queries, keys) per sequence]) of an attention launch: q, k are the first two tensor arguments;
    cu_seqlens (known values) give the packed documents, otherwise the padded [B, S, H, D] shapes do. The list
    is None when the offsets are not known."""
    q, k = tensors[0], tensors[1]
    if kwargs.get("IS_VARLEN"):
        cu = [t for t in tensors[2:] if t.dtype == torch.int32 and t.dim() == 1]
        if cu:  # one tensor when the query and key offsets are the same object
            cq, ck = census.known(cu[0]), census.known(cu[-1])
            if cq is not None and ck is not None:
                lq, lk = (cq[1:] - cq[:-1]).tolist(), (ck[1:] - ck[:-1]).tolist()
                return q.shape[1], q.shape[2], list(zip(lq, lk))
        return q.shape[1], q.shape[2], None
    return q.shape[2], q.shape[3], [(q.shape[1], k.shape[1])] * q.shape[0]


def _triton_pairs(census, tensors, kwargs, window=None):
    """(Hq, D, visible pairs) of an attention launch (``_attention_docs``). ``window``: the launch's sliding
    window (None without one); pairs outside it are not counted because the kernels do not visit their tiles
    (``launch_window``)."""
    hq, d, docs = _attention_docs(census, tensors, kwargs)
    causal = bool(kwargs.get("IS_CAUSAL", True))
    pairs = None if docs is None else sum(causal_pairs(a, b, causal, window) for a, b in docs)
    return hq, d, pairs


def tile_pairs(lq: int, lk: int, block_m: int, block_n: int, causal: bool = True, window: int | None = None) -> int:
    """(query, key) pairs our attention kernels compute for one sequence at ``block_m x block_n`` tiles.

    A query-block program (forward, dQ, the double backward's row and grad-q passes) sweeps the key tiles from
    ``key_range``'s ``lo`` (the window's start for the block's first row, rounded down to the tile grid) to its
    ``hi`` (the last row's last visible key); a key-block program (dK/dV, the key passes) sweeps the query
    blocks from ``query_range``'s ``lo`` to its ``hi``. Both grids start at 0 and every row's visible keys form
    one interval that moves by one per row, so either way the tiles computed are exactly the tiles of the grid
    that hold at least one visible pair, each computed whole (rows past the sequence's end and masked pairs
    included): that count times ``block_m * block_n``, summed here over query blocks."""
    diag, tiles = lk - lq, 0
    for m0 in range(0, lq, block_m):
        last = min(m0 + block_m, lq) - 1
        lo = 0 if window is None else max(m0 + diag - int(window) + 1, 0)
        hi = min(lk, last + diag + 1) if causal else lk
        if hi > lo:
            tiles += -(-hi // block_n) - lo // block_n
    return tiles * block_m * block_n


def attention_tile_flops(census, name, args, kwargs, arg_names):
    """(fewest, most) FLOPs an attention launch executes on a GPU, over the tiles its kernel class may autotune
    to (``gpu_configs`` of kernels/attention.py for this head dim, dtype, dropout, precision, alignment and
    length bucket): the launch's GEMM units x ``2 D`` x ``tile_pairs`` per query head. None when not modelled
    (fp64, an unknown kernel, offsets not known). Alignment follows ``_aligned_call`` with the meta tensors'
    storage offsets standing in for their addresses."""
    from gradmem_fast.kernels import attention as ka

    units = _attention_units(name, kwargs)
    tensors = _distinct_tensors(args, kwargs)
    if units is None or not tensors or tensors[0].element_size() not in (2, 4):
        return None
    if name == "attn_bwd_dkdv_kernel":
        kind = "dkdv_atomic" if kwargs.get("ATOMIC_DQ") else "dkdv"
    elif name == "attn_dbwd_kernel":
        kind = {role: k for k, role in ka._DBWD_ROLE.items()}[int(kwargs["ROLE"])]
    else:
        kind = {"attn_fwd_kernel": "fwd", "attn_bwd_dq_kernel": "dq"}.get(name)
    hq, d, docs = _attention_docs(census, tensors, kwargs)
    if kind is None or docs is None:
        return None
    named = dict(zip(arg_names or (), args))
    strides = [v for n, v in named.items() if n.startswith("stride_") and n not in ka._UNHINTED_STRIDES]
    aligned = all(t.storage_offset() * t.element_size() % 16 == 0 for t in tensors) and all(
        int(st) % 16 == 0 for st in strides
    )
    bucket = ka.length_bucket(named.get("seqlen_q", 1), named.get("seqlen_k", 1))
    tiles = ka.gpu_configs(
        kind,
        int(kwargs["BLOCK_D"]),
        tensors[0].element_size(),
        bool(kwargs.get("HAS_DROPOUT")),
        str(kwargs.get("INPUT_PRECISION", "tf32")),
        aligned,
        bucket,
    )
    if not tiles:
        return None
    causal, window = bool(kwargs.get("IS_CAUSAL", True)), launch_window(arg_names, args, kwargs)
    flops = [
        units * 2 * hq * d * sum(tile_pairs(a, b, bm, bn, causal, window) for a, b in docs) for bm, bn, *_ in tiles
    ]
    return min(flops), max(flops)


def _attention_units(name, kwargs):
    """GEMM units of one attention launch (``ATTENTION_UNITS``), None when the kernel is not modelled."""
    if name not in ATTENTION_UNITS:
        return None
    if "ROLE" in kwargs:
        return ATTENTION_UNITS.get(f"{name}[ROLE={int(kwargs['ROLE'])}]")
    return ATTENTION_UNITS.get(f"{name}[ATOMIC_DQ]" if kwargs.get("ATOMIC_DQ") else name)


def _distinct_tensors(args, kwargs):
    tensors, seen = [], set()
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and id(a) not in seen:
            seen.add(id(a))
            tensors.append(a)
    return tensors


def launch_window(arg_names, args, kwargs):
    """The sliding window of an attention launch, or None: the ``window`` argument (0 stands for none in
    kernels/attention.py) when the ``HAS_WINDOW`` constexpr is set.

    What the kernels skip (kernels/attention_common.py): a query-block program (forward, dQ, the double
    backward's row and grad-q passes) starts its key loop at ``key_range``'s ``lo``, the first key tile that
    holds a key inside the window of the block's first row; a key-block program (dK/dV, the key passes) stops
    its query loop at ``query_range``'s ``hi``, past the last query whose window reaches the block. So tiles
    wholly outside the window are never computed and the work scales with the window, not with the causal
    triangle. Tiles that straddle a window edge or the diagonal are computed whole and masked; that overhead
    depends on the tile size, which the GPU's autotuner picks, and is not counted (for the diagonal neither),
    so the census's attention FLOPs stay the visible-pair formula of ``gradmem_fast.flops.attention_flops``."""
    if not kwargs.get("HAS_WINDOW"):
        return None
    named = dict(zip(arg_names or (), args))
    window = kwargs.get("window", named.get("window"))
    if window is None:
        raise RuntimeError("census: an attention launch has HAS_WINDOW set but no 'window' argument was found")
    return int(window) or None


def triton_kernel_cost(census, name, args, kwargs, arg_names=None):
    """(flops, bytes) of one Triton launch (module docstring); flops None when not modelled. ``arg_names``:
    the kernel's parameter names, for the positional arguments (an attention launch's window)."""
    tensors = _distinct_tensors(args, kwargs)
    nbytes = sum(tensor_bytes(t) for t in tensors)
    flops = None
    if name in ATTENTION_UNITS:
        units = _attention_units(name, kwargs)
        hq, d, pairs = _triton_pairs(census, tensors, kwargs, launch_window(arg_names, args, kwargs))
        flops = None if pairs is None else units * 2 * hq * d * pairs
    elif name == "attn_bwd_preprocess_kernel":
        flops = 2 * tensors[0].numel()
    elif name in CE_ELEMENTWISE:
        z = tensors[0]
        flops = (CE_ELEMENTWISE[name] + (CE_SOFTCAP[name] if kwargs.get("SOFTCAP") else 0)) * z.numel()
        if _ce_writes_logits(name, kwargs):
            nbytes += tensor_bytes(z)  # read, then overwritten in place with the gradient
        if name in CE_PRODUCTS:
            # [V, d]: the head (dh) or the dW accumulator (dw); the hidden size is its second dimension.
            mats = [t for t in tensors[1:] if t.dim() == 2 and t.shape[0] == z.shape[1]]
            if name == "ce_dh_kernel" or kwargs.get("HAS_DW"):
                flops += 2 * z.numel() * (mats[0].shape[1] if mats else 0)
            if name == "ce_dw_kernel":  # dW and db are read, added to and written back
                nbytes += sum(tensor_bytes(t) for t in tensors[1:] if t.dim() >= 1 and t.shape[0] == z.shape[1])
    elif name in ("_memory_update_kernel", "_grad_sumsq_kernel"):
        flops = 12 * tensors[0].numel()
    return flops, nbytes


def _ce_writes_logits(name, kwargs):
    """Whether a cross-entropy launch overwrites its logits chunk in place (with the gradient)."""
    return name == "ce_grad_kernel" or (name == "ce_forward_kernel" and bool(kwargs.get("WRITE_GRAD")))


def ce_logits_passes(launches) -> dict:
    """HBM passes over the cross-entropy's logits, counted from recorded launches.

    The logits buffers are the storages the cross-entropy kernels take as their first argument. Every launch's
    reads and writes of those storages (a Triton launch reads its tensors once, and writes the chunk too when
    it overwrites it in place; a GEMM ``out=`` writes it) are summed per launch name and divided by the bytes of
    the logits themselves, which the statistics kernel (``ce_forward_kernel``, one launch per chunk) reads
    exactly once: ``{"chunks": statistics launches, "passes": total, "by_op": {name: passes}}``. The fused
    linear cross-entropy makes 3 with a frozen head (GEMM write, statistics read, dH read; module docstring of
    ``gradmem_fast.ops.cross_entropy``); a backward that recomputes the logits adds its own GEMM write and
    reads. ``passes`` is 0 when no statistics kernel ran."""
    keys = {x.reads[0][0] for x in launches if x.kind == "triton" and x.name in CE_ELEMENTWISE and x.reads}
    stats = [x.reads[0][1] for x in launches if x.kind == "triton" and x.name == "ce_forward_kernel" and x.reads]
    by_op = defaultdict(int)
    for x in launches:
        touched = sum(b for k, b in x.reads if k in keys) + sum(b for k, b in x.writes if k in keys)
        if touched:
            by_op[x.name] += touched
    if not sum(stats):
        return {"chunks": 0, "passes": 0, "by_op": {}}
    logits = sum(stats)
    return {
        "chunks": len(stats),
        "passes": sum(by_op.values()) / logits,
        "by_op": {k: v / logits for k, v in by_op.items()},
    }


def _kernel_fn(kernel):
    """The Python function under a Triton kernel (JIT, interpreted, autotuned or heuristics wrappers)."""
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _kernel_name(kernel):
    return getattr(_kernel_fn(kernel), "__name__", type(kernel).__name__)


def _arg_names(kernel):
    try:
        return tuple(inspect.signature(_kernel_fn(kernel)).parameters)
    except (TypeError, ValueError):
        return ()


@contextlib.contextmanager
def record_triton(census: Census):
    """While active, ``kernel[grid](...)`` records a launch in ``census`` instead of running the kernel
    (compiled, autotuned or interpreted)."""
    from triton.runtime.jit import KernelInterface

    classes = [KernelInterface]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - older Triton
        pass
    saved = {cls: cls.__dict__.get("__getitem__") for cls in classes}

    def getitem(self, grid):
        def launch(*args, **kwargs):
            name = _kernel_name(self)
            names = _arg_names(self)
            flops, nbytes = triton_kernel_cost(census, name, args, kwargs, names)
            dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            reads = tuple(
                (census.storage_key(a), tensor_bytes(a))
                for a in {id(a): a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}.values()
            )
            writes = reads[:1] if _ce_writes_logits(name, kwargs) else ()
            tiles = attention_tile_flops(census, name, args, kwargs, names) if name in ATTENTION_PASSES else None
            census.add_launch(
                Launch(name, "triton", flops or 0, nbytes, dtype, reads=reads, writes=writes, tile_flops=tiles)
            )
            if flops is None:
                census.uncounted_flops += 1

        return launch

    for cls in classes:
        cls.__getitem__ = getitem
    try:
        yield census
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = fn


# ------------------------------------------------------------------------------------------ compiled code


class InfraCensus(Census):
    """A ``Census`` for code compiled by ``torch.compile`` running on real CPU tensors (which stand for the
    device): dynamo runs compiled frames only under "infra" dispatch modes, so this one says it is one. Use it
    after the code has compiled (warm-up calls outside the census), with ``record_inductor`` to see the fused
    kernels: inductor's generated kernels do not go through the dispatcher, its extern GEMMs and fallbacks
    do."""

    host_is_device = True

    @classmethod
    def is_infra_mode(cls):
        return True


class _KernelProbe:
    """Stands in for one generated kernel of an inductor module: records a launch, then runs it."""

    def __init__(self, name, kernel, sink):
        self.name, self.kernel, self.sink = name, kernel, sink

    def _record(self, args, kwargs):
        census = self.sink.get("census")
        if census is None:
            return
        tensors = {id(a): a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
        nbytes = sum(tensor_bytes(t) for t in tensors.values())
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        census.add_launch(Launch(f"inductor.{self.name}", "fused", 0, nbytes, dtype))

    def __call__(self, *args, **kwargs):
        self._record(args, kwargs)
        return self.kernel(*args, **kwargs)

    def run(self, *args, **kwargs):  # Triton kernels are launched with .run(...)
        self._record(args, kwargs)
        return self.kernel.run(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


_PROBE_SINK = {}
_KERNEL_PREFIXES = ("cpp_fused", "triton_", "cpp_kernel")


@contextlib.contextmanager
def record_inductor(census: Census):
    """While active, every call of an inductor-generated kernel (``cpp_fused_*`` on a CPU, ``triton_*`` on a
    GPU) records a ``fused`` launch in ``census`` with the bytes of its distinct tensor arguments."""
    from torch._inductor.output_code import CompiledFxGraph

    original = CompiledFxGraph.__call__

    def call(self, inputs):
        fn = self.current_callable
        namespace = getattr(getattr(fn, "__func__", fn), "__globals__", None)
        if namespace is not None:
            for key, value in list(namespace.items()):
                if key.startswith(_KERNEL_PREFIXES) and callable(value) and not isinstance(value, _KernelProbe):
                    namespace[key] = _KernelProbe(key, value, _PROBE_SINK)
        return original(self, inputs)

    CompiledFxGraph.__call__ = call
    _PROBE_SINK["census"] = census
    try:
        yield census
    finally:
        CompiledFxGraph.__call__ = original
        _PROBE_SINK.pop("census", None)


# ------------------------------------------------------------------------------------------ fusion model

# Reductions end a fused kernel (their consumers start the next one, as inductor schedules them mostly).
_REDUCTION_WORDS = (
    "sum",
    "mean",
    "norm",
    "softmax",
    "max",
    "min",
    "logsumexp",
    "var",
    "std",
    "nll_loss",
    "cumsum",
    "index_add",
    "scatter",
    "embedding_dense_backward",
    "_backward_data",
    "argmax",
    "all",
    "any",
    "prod",
)


def _is_anchor(x: Launch) -> bool:
    """Launches a compiler keeps as they are: GEMMs and attention (any op with FLOPs), our Triton kernels
    and custom ops, host copies."""
    return x.kind in ("triton", "memcpy") or x.parent is not None or x.flops > 0 or "attention" in x.name


def fusion_bound(launches) -> list:
    """A model of ideal fusion (what ``torch.compile`` could at best do to an eager launch list): every run
    of consecutive non-anchor launches (elementwise ops, norms, softmax, copies) between two anchors becomes
    ``max(1, reductions in it)`` kernels, reading each tensor it takes from outside once and writing only the
    tensors that something outside the run reads later (or nothing reads: results). Anchors stay. A bound to
    aim at, not the compiled engine's count."""
    consumers = defaultdict(list)
    for i, x in enumerate(launches):
        for key, _ in x.reads:
            consumers[key].append(i)
    out, run = [], []

    def flush(end):
        if not run:
            return
        members = set(run)
        produced, reads, writes = {}, {}, {}
        n_red = 0
        for i in run:
            x = launches[i]
            n_red += any(w in x.name for w in _REDUCTION_WORDS)
            for key, nbytes in x.reads:
                if key not in produced:
                    reads[key] = max(reads.get(key, 0), nbytes)
            for key, nbytes in x.writes:
                produced[key] = max(produced.get(key, 0), nbytes)
        for key, nbytes in produced.items():
            later = [j for j in consumers[key] if j not in members and j > run[0]]
            if later or not consumers[key]:
                writes[key] = nbytes
        kernels = max(1, n_red)
        total = sum(reads.values()) + sum(writes.values())
        dtype = launches[run[0]].dtype
        for k in range(kernels):  # the traffic split evenly over the run's kernels
            out.append(Launch("fused", "fused", 0, total // kernels + (total % kernels if k == 0 else 0), dtype))
        run.clear()

    for i, x in enumerate(launches):
        if _is_anchor(x):
            flush(i)
            out.append(x)
        else:
            run.append(i)
    flush(len(launches))
    return out


# ------------------------------------------------------------------------------------------ roofline


@dataclasses.dataclass(frozen=True)
class GPU:
    """Peak numbers of one GPU and the fractions of them a good kernel reaches (assumptions, stated)."""

    name: str
    bf16_tflops: float  # dense tensor-core peak, 16-bit inputs
    tf32_tflops: float
    fp32_tflops: float  # CUDA-core IEEE fp32 (torch's default fp32 matmul precision)
    hbm_tbps: float
    compute_fraction: float = 0.7  # large cuBLAS / FlashAttention GEMMs reach 60-75% of the dense peak
    bandwidth_fraction: float = 0.8  # streaming kernels reach 80-90% of the HBM peak
    launch_us: float = 4.5  # host cost of one eager launch (Python + dispatcher + driver)
    graph_launch_us: float = 1.0  # a launch replayed from a CUDA graph
    min_kernel_us: float = 2.0  # a launched kernel occupies the GPU at least this long (ramp-up, tail)
    sync_us: float = 15.0  # one host sync: the queue drains, the host waits, launch overlap is lost

    def peak_flops(self, dtype) -> float:
        if dtype in (torch.float16, torch.bfloat16):
            return self.bf16_tflops * 1e12
        if dtype == torch.float32:
            return self.fp32_tflops * 1e12
        if dtype == torch.float64:
            return self.fp32_tflops * 0.5e12
        return self.bf16_tflops * 1e12


# Datasheet peaks (dense, no sparsity): H100 SXM5 989 TFLOP/s bf16, 67 TFLOP/s fp32, HBM3 3.35 TB/s;
# H200 has the same compute and HBM3e at 4.8 TB/s.
H100 = GPU("H100 SXM", 989.0, 494.7, 67.0, 3.35)
H200 = GPU("H200", 989.0, 494.7, 67.0, 4.8)
GPUS = (H100, H200)


def roofline(launches, syncs: int, gpu: GPU, graphs: bool = False) -> dict:
    """Projected time of a list of ``Launch`` (one step) on ``gpu``, in microseconds.

    Each kernel takes ``max(flops / (peak * compute_fraction), bytes / (hbm * bandwidth_fraction),
    min_kernel_us)``; the GPU time is their sum. The host issues launches at ``launch_us`` each (``graph_launch_us``
    when replayed from a CUDA graph), overlapped with the GPU, so the step takes the larger of the two,
    plus ``sync_us`` per host sync. A projection, not a measurement.
    """
    gpu_us = compute_us = memory_us = 0.0
    for x in launches:
        if x.kind == "memcpy":
            t_c, t_m = 0.0, x.bytes / 25e9 * 1e6  # PCIe 5 pageable copies ~25 GB/s
        else:
            t_c = x.flops / (gpu.peak_flops(x.dtype) * gpu.compute_fraction) * 1e6
            t_m = x.bytes / (gpu.hbm_tbps * 1e12 * gpu.bandwidth_fraction) * 1e6
        compute_us += t_c
        memory_us += t_m
        gpu_us += max(t_c, t_m, gpu.min_kernel_us)
    host_us = len(launches) * (gpu.graph_launch_us if graphs else gpu.launch_us)
    total = max(gpu_us, host_us) + syncs * gpu.sync_us
    return {
        "gpu": gpu.name,
        "step_us": total,
        "gpu_busy_us": gpu_us,
        "host_launch_us": host_us,
        "compute_us": compute_us,
        "memory_us": memory_us,
        "bound": _bound(gpu_us, host_us, compute_us, memory_us),
    }


def _bound(gpu_us, host_us, compute_us, memory_us):
    if host_us >= gpu_us:
        return "launch"
    return "compute" if compute_us >= memory_us else "memory"


def is_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
