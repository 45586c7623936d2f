"""The meta-training step of ``GradMemModel`` beside the published GradMem code itself (issue 26).

The peer is the published repository's own model class (``grad_memgpt.py``, ``GradMemGPT``), imported from a
clone made by ``benchmarks/peers/setup_gradmem.sh`` (``--peer-dir``, default ``out/peers/gradmem``; never
committed). For every case:

1. the peer ``GradMemGPT`` is built from a backbone configuration, its memory-side parameters are moved away
   from their initial values (seeded), and it is saved with ``save_pretrained``; ``GradMemModel.from_pretrained``
   loads that checkpoint, so both sides hold the same weights;
2. both run the same batch (right-padded contexts, pad id 0 = the backbone's pad token, queries, labels on the
   query's second half) and their outer loss and every parameter gradient are compared (``check_equal``):
   first with both models in float64 (per parameter, relative error <= 1e-10, or 10 x the peer's own
   rounding floor where the model computes parts in float32), then in float32 (ours against the peer's
   float64 result, bounded by max(1e-5, 4 x the peer's own float32 error): our float32 rounding is no worse
   than the peer's); a mismatch stops the case before anything is timed;
3. one step = ``zero_grad`` + forward (WRITE, READ, loss) + ``loss.backward()``. The two sides are timed
   interleaved (A B A B ...) so that a neighbour's load on the shared cores hits both alike; per step we
   record the wall time and the process CPU time (``time.process_time``: the fairer figure on a shared
   machine), and report medians and the ratio ours / peer (< 1: we are faster).

Memory: on CPU the peak resident set during one step above the resident set before it (the kernel's
high-water mark, reset through ``/proc/self/clear_refs``); on CUDA the allocator's peak above what was
allocated before the step. ``saved_mb``: bytes of the distinct storages autograd saved for backward during
the forward (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded).

Cases (``CASES``): the KV example's recipe (4-layer 128-wide Llama, vocabulary 65, m=8, K=2, inner lr 0.04,
second order, write head, inner loss weight 0.5, batch 16, contexts 96, queries 8, float32), the same with
``grad_mode="first"`` and ``"none"``, and the published GPT-2 bAbI/SQuAD recipe (GPT-2 small shape: 12 layers,
768 wide, vocabulary 50257, m=8, K=2, second order, write head, ``mem_proj_mode="proj"``, no inner loss in the
outer loss). On CPU the GPT-2 case runs at batch 2, contexts 64, queries 8 (``--gpt2-batch``/``--gpt2-length``)
so that it fits in a few minutes; on CUDA at batch 16, 512 tokens.

    python -m benchmarks.bench_meta_peer --out benchmarks/results/2026-12-07-meta-peer [--device cuda]
"""

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

DEFAULT_PEER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "peers", "gradmem")
FP64_BOUND = 1e-10
FP32_BOUND = 1e-5


# ------------------------------------------------------------------------------------------- the peer
def import_peer(peer_dir: str | None = None):
    """The published ``grad_memgpt`` module from a clone at ``peer_dir`` (env ``GRADMEM_PEER_DIR``, default
    ``out/peers/gradmem``), or None when there is no clone there."""
    peer_dir = peer_dir or os.environ.get("GRADMEM_PEER_DIR") or DEFAULT_PEER_DIR
    if not os.path.isfile(os.path.join(peer_dir, "grad_memgpt.py")):
        return None
    if peer_dir not in sys.path:
        sys.path.insert(0, peer_dir)
    return importlib.import_module("grad_memgpt")


# ------------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass
class Case:
    """One meta-step workload. ``backbone`` is the transformers configuration (``model_type`` + fields)."""

    name: str
    backbone: dict
    batch: int
    length: int
    query: int
    n_mem_tokens: int = 8
    K: int = 2
    lr: float = 0.04
    grad_mode: str = "second"
    use_write_head: bool = True
    mem_proj_mode: str = "none"
    inner_loss_weight: float | None = 0.5
    note: str = ""

    def options(self) -> dict:
        """The memory options, with the published field names (both configurations take them)."""
        return dict(
            n_mem_tokens=self.n_mem_tokens,
            K=self.K,
            lr=self.lr,
            grad_mode=self.grad_mode,
            use_write_head=self.use_write_head,
            use_mem_proj=self.mem_proj_mode != "none",
            mem_proj_mode=self.mem_proj_mode,
            add_inner_loss_to_outer=self.inner_loss_weight is not None,
            inner_loss_weight=self.inner_loss_weight,
        )


def llama_backbone(vocab=65, hidden=128, layers=4, heads=4) -> dict:
    """The KV example's backbone (examples/train_kv_retrieval.py ``llama_config``), pad id 0."""
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def gpt2_backbone(layers=12, hidden=768, heads=12, vocab=50257) -> dict:
    """GPT-2 small's shape, dropout off (the timing compares the same computation; dropout masks differ)."""
    return dict(
        model_type="gpt2",
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
    )


def cases(device: str, gpt2_batch: int | None = None, gpt2_length: int | None = None) -> list:
    cuda = device.startswith("cuda")
    kv = dict(backbone=llama_backbone(), batch=16, length=96, query=8)
    gb = gpt2_batch or (16 if cuda else 2)
    gl = gpt2_length or (512 if cuda else 64)
    return [
        Case("kv_second", **kv, note="the KV example's recipe"),
        Case("kv_first", **kv, grad_mode="first"),
        Case("kv_none", **kv, grad_mode="none"),
        Case(
            "gpt2_second",
            backbone=gpt2_backbone(),
            batch=gb,
            length=gl,
            query=8 if not cuda else 32,
            mem_proj_mode="proj",
            inner_loss_weight=None,
            note="published bAbI/SQuAD recipe, GPT-2 small shape"
            + ("" if cuda else f" (CPU: batch {gb}, {gl} tokens)"),
        ),
    ]


# -------------------------------------------------------------------------------------- the two models
def build_pair(case: Case, peer_module, device="cpu", backend: str = "auto", seed: int = 0):
    """(peer GradMemGPT, our GradMemModel) on identical weights, both float32 on ``device``: the peer is built
    and saved with ``save_pretrained``; ours is ``GradMemModel.from_pretrained`` of that checkpoint."""
    import transformers

    from gradmem_fast import GradMemModel

    fields = dict(case.backbone)
    base = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = peer_module.GradMemGPTConfig(base_config=base, attn_implementation="eager", **case.options())
        peer = peer_module.GradMemGPT(cfg)
        with torch.no_grad():  # move the memory side off its initial values (identity projection, copied head)
            for name, p in peer.named_parameters():
                if not name.startswith("model."):
                    p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        ours = GradMemModel.from_pretrained(tmp, backend=backend)
    peer = peer.to(device=device, dtype=torch.float32).train()
    ours = ours.to(device=device, dtype=torch.float32).train()
    return peer, ours


def make_batch(case: Case, vocab: int, device="cpu", seed: int = 1) -> dict:
    """Right-padded contexts (lengths 3/4 S .. S, one of length S; pad id 0), queries [B, Q] (no padding),
    labels = the query with -100 on its first half."""
    gen = torch.Generator().manual_seed(seed)
    S, B = case.length, case.batch
    lengths = torch.randint(max(1, 3 * S // 4), S + 1, (B,), generator=gen)
    lengths[0] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab, (B, S), generator=gen) * mask
    query = torch.randint(1, vocab, (B, case.query), generator=gen)
    labels = query.clone()
    labels[:, : case.query // 2] = -100
    return dict(context_input_ids=ids.to(device), query_input_ids=query.to(device), labels=labels.to(device))


def peer_loss(peer, batch: dict) -> torch.Tensor:
    """The published forward's outer loss (it takes the two token tensors as a dict in ``input_ids``)."""
    ids = {"context_input_ids": batch["context_input_ids"], "query_input_ids": batch["query_input_ids"]}
    return peer(ids, labels=batch["labels"])["loss"]


def our_loss(ours, batch: dict) -> torch.Tensor:
    """Our forward on the same tensors (padding = the backbone's pad id, as the published code reads it)."""
    return ours(**batch).loss


# ------------------------------------------------------------------------------------------- equality
def loss_and_grads(model, loss_fn, batch) -> tuple:
    """(loss, {parameter name: gradient or None}) of one meta step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), {n: (None if g is None else g.detach()) for (n, _), g in zip(named, grads)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare(got: tuple, want: tuple) -> dict:
    """Relative errors of loss and gradients: {"loss": e, "grads": worst e, "worst": its name, "per": {name: e}};
    a gradient present on one side only is an error."""
    (lg, gg), (lw, gw) = got, want
    if set(gg) != set(gw):
        raise AssertionError(f"parameter names differ: {sorted(set(gg) ^ set(gw))}")
    per = {}
    for n in gw:
        if (gg[n] is None) != (gw[n] is None):
            raise AssertionError(f"{n}: gradient on one side only")
        if gw[n] is not None:
            per[n] = _rel(gg[n], gw[n]) if gw[n].norm() > 0 else float(gg[n].norm())
    name = max(per, key=per.get) if per else None
    return {"loss": _rel(lg, lw), "grads": per[name] if per else 0.0, "worst": name, "per": per}


def _summary(err: dict) -> dict:
    return {k: v for k, v in err.items() if k != "per"}


def _times3(loss_fn):
    """``loss_fn`` scaled by 3 (undone on the gradients by ``_third``): the same mathematics, other roundings."""
    return lambda model, batch: loss_fn(model, batch) * 3.0


def _third(result: tuple) -> tuple:
    loss, grads = result
    return loss / 3.0, {n: None if g is None else g / 3.0 for n, g in grads.items()}


def check_equal(peer, ours, batch: dict) -> dict:
    """Loss and every gradient of ours against the peer's; raises AssertionError on a mismatch, returns the errors.

    float64: both models in float64; the loss and each parameter's gradient within max(1e-10, 10 x the peer's
    own rounding floor of that quantity), the floor being how far the peer's float64 result moves when its loss
    is multiplied by 3 (and the gradients divided by 3). Why a floor: a Llama's RMSNorm computes in float32
    even in a float64 model (``hidden.to(torch.float32)``), so two orders of the same products differ there by
    float32 roundings (~1e-7 on the weights behind it), in the peer as in ours; elsewhere the floor is ~1e-16.
    float32: ours against the peer's float64 result, within max(1e-5, 4 x the peer's own float32 error)."""
    p64, o64 = copy.deepcopy(peer).double(), copy.deepcopy(ours).double()
    ref = loss_and_grads(p64, peer_loss, batch)
    e64 = compare(loss_and_grads(o64, our_loss, batch), ref)
    floor = compare(_third(loss_and_grads(p64, _times3(peer_loss), batch)), ref)
    del p64, o64
    bad = [] if e64["loss"] <= max(FP64_BOUND, 10 * floor["loss"]) else [f"loss {e64['loss']:.2e}"]
    bad += [
        f"{n} {e:.2e} (floor {floor['per'][n]:.1e})"
        for n, e in e64["per"].items()
        if e > max(FP64_BOUND, 10 * floor["per"][n])
    ]
    if bad:
        raise AssertionError(f"float64: ours differs from the published code: {'; '.join(bad[:6])}")
    peer32 = compare(loss_and_grads(peer, peer_loss, batch), ref)
    ours32 = compare(loss_and_grads(ours, our_loss, batch), ref)
    bound = max(FP32_BOUND, 4 * max(peer32["loss"], peer32["grads"]))
    if max(ours32["loss"], ours32["grads"]) > bound:
        raise AssertionError(
            f"float32: ours {_summary(ours32)} vs the peer's own float32 {_summary(peer32)} (bound {bound:.2e})"
        )
    peer.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return {
        "fp64": _summary(e64),
        "fp64_peer_floor": _summary(floor),
        "fp32_ours": _summary(ours32),
        "fp32_peer": _summary(peer32),
        "fp32_bound": bound,
    }


# -------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def saved_tensor_bytes(exclude: set):
    """{storage pointer: bytes} of every tensor autograd saves for backward inside the block (the graph that
    ``create_graph`` builds included), storages in ``exclude`` (the parameters) left out."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may then understate the peak
        pass


class PeakRSS:
    """Peak resident set during a block above the resident set at its start (MiB), after returning freed heap
    memory to the system (glibc ``malloc_trim``). Uses the kernel's
    high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs); where that reset is refused, a
    thread samples VmRSS every millisecond."""

    def __enter__(self):
        _malloc_trim()  # hand freed heap back first: otherwise the last step's retained memory hides this one's
        self.base = _rss_kb("VmRSS") or 0
        self.sampled = 0
        self.thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.sampled = max(self.sampled, _rss_kb("VmRSS") or 0)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.hwm:
            peak = _rss_kb("VmHWM") or 0
        else:
            self.stop.set()
            self.thread.join()
            peak = self.sampled
        self.mb = max(0, peak - self.base) / 1024.0
        return False


def make_step(model, loss_fn, batch):
    """One meta step (zero_grad, forward, backward); returns a function giving the loss value."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach()

    return step


def measure_memory(model, loss_fn, batch, device) -> dict:
    """Peak memory of one step (CPU RSS or CUDA allocator, MiB) and the bytes saved for backward (MiB)."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ctx = contextlib.nullcontext()
    else:
        ctx = PeakRSS()
    with ctx:
        with saved_tensor_bytes(exclude) as saved:
            loss = loss_fn(model, batch)
        loss.backward()
        del loss
    if cuda:
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = ctx.mb
    for p in params:
        p.grad = None
    kind = "cuda_allocated" if cuda else "cpu_rss"
    return {"peak_mb": peak, "peak_kind": kind, "saved_mb": sum(saved.values()) / 2**20}


def time_interleaved(steps: dict, device, rounds: int, warmup: int = 1) -> dict:
    """``steps``: {side: step function}. ``warmup`` untimed rounds, then ``rounds`` rounds A B A B ...;
    per side the median / min wall ms and median process CPU ms."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for side in order:
            if cuda:
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[side]()
            if cuda:
                torch.cuda.synchronize(device)
            wall[side].append((time.perf_counter() - t0) * 1e3)
            cpu[side].append((time.process_time() - c0) * 1e3)
    return {
        k: {
            "wall_ms": statistics.median(wall[k]),
            "wall_ms_min": min(wall[k]),
            "cpu_ms": statistics.median(cpu[k]),
            "cpu_ms_min": min(cpu[k]),
            "runs": rounds,
        }
        for k in steps
    }


def run_case(
    case: Case, peer_module, device="cpu", rounds: int = 5, backend: str = "auto", check: bool = True, check_rows=None
) -> dict:
    """Build, check equality (on the first ``check_rows`` documents of the batch, all when None), measure
    memory, time; one record."""
    peer, ours = build_pair(case, peer_module, device, backend)
    vocab = peer.model.config.vocab_size
    batch = make_batch(case, vocab, device)
    rec = {"case": case.name, "note": case.note, **dataclasses.asdict(case), "device": str(device)}
    rec["backend"] = ours._backend()
    if check:
        rows = slice(None) if check_rows is None else slice(0, check_rows)
        rec["equality"] = check_equal(peer, ours, {k: v[rows] for k, v in batch.items()})
        rec["check_rows"] = check_rows or case.batch
    sides = {"peer": (peer, peer_loss), "ours": (ours, our_loss)}
    rec["memory"] = {k: measure_memory(m, fn, batch, device) for k, (m, fn) in sides.items()}
    rec["time"] = time_interleaved({k: make_step(m, fn, batch) for k, (m, fn) in sides.items()}, device, rounds)
    t = rec["time"]
    rec["ratio_cpu"] = t["ours"]["cpu_ms"] / t["peer"]["cpu_ms"]
    rec["ratio_wall"] = t["ours"]["wall_ms"] / t["peer"]["wall_ms"]
    mem = rec["memory"]
    rec["ratio_peak"] = mem["ours"]["peak_mb"] / mem["peer"]["peak_mb"] if mem["peer"]["peak_mb"] else None
    rec["ratio_saved"] = mem["ours"]["saved_mb"] / mem["peer"]["saved_mb"] if mem["peer"]["saved_mb"] else None
    return rec


# -------------------------------------------------------------------------------------------- report
def markdown(records: list, meta: dict) -> str:
    lines = [
        "# Meta step: GradMemModel vs the published GradMemGPT (same weights, same batch)",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, threads "
        f"{meta['threads']}; peer commit {meta['peer_commit']}. Medians of {meta['rounds']} interleaved rounds "
        "(A B A B) after one warm-up round. ratio = ours / peer (< 1: ours faster).",
        "",
        "| case | backend | peer CPU ms | ours CPU ms | ratio CPU | peer wall ms | ours wall ms | ratio wall "
        "| peak MiB peer / ours | saved MiB peer / ours | fp64 err loss / grads | fp32 err ours / peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * 10)
            continue
        t, m, e = r["time"], r["memory"], r.get("equality", {})
        f64 = e.get("fp64", {})
        o32, p32 = e.get("fp32_ours", {}), e.get("fp32_peer", {})
        lines.append(
            f"| {r['case']} | {r['backend']} | {t['peer']['cpu_ms']:.0f} | {t['ours']['cpu_ms']:.0f} | "
            f"{r['ratio_cpu']:.2f} | {t['peer']['wall_ms']:.0f} | {t['ours']['wall_ms']:.0f} | {r['ratio_wall']:.2f} | "
            f"{m['peer']['peak_mb']:.0f} / {m['ours']['peak_mb']:.0f} | "
            f"{m['peer']['saved_mb']:.0f} / {m['ours']['saved_mb']:.0f} | "
            f"{f64.get('loss', float('nan')):.1e} / {f64.get('grads', float('nan')):.1e} | "
            f"{max(o32.get('loss', 0), o32.get('grads', 0)):.1e} / {max(p32.get('loss', 0), p32.get('grads', 0)):.1e} |"
        )
    lines += ["", "Cases:", ""]
    for r in records:
        lines.append(
            f"- `{r['case']}`: {r.get('note') or ''} batch {r['batch']}, context {r['length']}, query {r['query']}, "
            f"m={r['n_mem_tokens']}, K={r['K']}, grad_mode={r['grad_mode']}, write head {r['use_write_head']}, "
            f"mem_proj {r['mem_proj_mode']}, inner loss weight {r['inner_loss_weight']}."
        )
    return "\n".join(lines) + "\n"


def _peer_commit(peer_dir: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", peer_dir, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    """Time the meta step of both sides per case; write results.json and report.md under --out."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_meta_peer", description=main.__doc__)
    p.add_argument("--out", required=True, help="results folder (results.json, report.md)")
    p.add_argument("--peer-dir", default=None, help="clone of the published repository (setup_gradmem.sh)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="auto", help="GradMemModel backend: auto | torch | triton")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--gpt2-batch", type=int, default=None)
    p.add_argument("--gpt2-length", type=int, default=None)
    p.add_argument(
        "--check-rows",
        type=int,
        default=None,
        help="documents of the batch in the equality check (default: all on CPU, 2 on CUDA, where float64 "
        "GPT-2 logits of the whole batch would not fit)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    peer_dir = args.peer_dir or os.environ.get("GRADMEM_PEER_DIR") or DEFAULT_PEER_DIR
    peer_module = import_peer(peer_dir)
    if peer_module is None:
        p.error(f"--peer-dir: no grad_memgpt.py in {peer_dir}; run benchmarks/peers/setup_gradmem.sh first")
    import transformers

    wanted = None if args.cases is None else set(args.cases.split(","))
    todo = [c for c in cases(args.device, args.gpt2_batch, args.gpt2_length) if wanted is None or c.name in wanted]
    if wanted is not None and len(todo) != len(wanted):
        p.error(f"--cases: unknown names {sorted(wanted - {c.name for c in todo})}")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    meta = dict(
        device=device_name,
        torch=torch.__version__,
        transformers=transformers.__version__,
        threads=args.threads,
        rounds=args.rounds,
        peer_commit=_peer_commit(peer_dir),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    os.makedirs(args.out, exist_ok=True)
    records = []
    for case in todo:
        t0 = time.time()
        try:
            check_rows = args.check_rows or (2 if args.device.startswith("cuda") else None)
            rec = run_case(case, peer_module, args.device, args.rounds, args.backend, check_rows=check_rows)
        except Exception as exc:  # noqa: BLE001 - recorded; an equality failure is an error of the case
            rec = {"case": case.name, "error": f"{type(exc).__name__}: {exc}"}
        rec["seconds"] = time.time() - t0
        records.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("case", "ratio_cpu", "ratio_wall", "error", "seconds")}), flush=True)
        tmp = os.path.join(args.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        os.replace(tmp, os.path.join(args.out, "results.json"))
    text = markdown(records, meta)
    tmp = os.path.join(args.out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.out, "report.md"))
    print(text)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
