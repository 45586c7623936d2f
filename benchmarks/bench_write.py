"""End-to-end WRITE throughput: documents/s, context tokens/s and MFU of a whole K-step write.

Models have random weights built from a config (no downloads):

* ``tiny_kv``: the paper's key-value model, Llama-style, 4 layers, 128 wide, 4 heads (head dim 32),
  MLP 512, vocabulary 256 (the synthetic task's vocabulary is small; 256 is our assumption), fp32,
  batch 64, 240 context tokens, m = 8, K = 2.
* ``gpt2_124m``: GPT-2 small's shape (12 layers, 768 wide, 12 heads, vocabulary 50257), bf16, batch 64,
  ragged contexts of 100-450 tokens (uniform, seeded), m = 8, K = 5.
* ``llama_1b``: Llama-3.2-1B's shape (16 layers, 2048 wide, 32 query / 8 key-value heads, MLP 8192,
  vocabulary 128256, tied head), bf16, batch 32, contexts of 100-450 tokens, m = 8, K = 2.

Implementations (same inputs, same initial memory, SGD with lr 1e-2 and clip_norm 1):

* ``reference``: ``MemoryWriter(backend="torch")`` = ``gradmem_fast.reference`` with eager attention
  and full logits (the published method's loop);
* ``torch_sdpa``: a plain torch loop, Hugging Face SDPA attention (right padding and no mask, so SDPA
  takes its causal flash path), ``F.linear`` + ``F.cross_entropy``, ``torch.autograd.grad`` wrt the memory;
* ``torch_sdpa_compiled``: the same loop with its loss function under ``torch.compile``;
* ``gradmem_ops``: the same loop on our ops (attention registered as "gradmem_fast", fused linear
  cross-entropy, fused update), before the write engine exists;
* ``gradmem_fast``: ``MemoryWriter(backend="triton")``, the write engine;
* ``gradmem_fast_graphs``: the engine with ``cuda_graphs=True`` (the K-step loop captured and replayed).
* ``gradmem_fast_eager``: the engine with ``compile=False`` (``gradmem_fast`` compiles its step on CUDA).

Metrics: median time of one whole write (K steps) over several calls, ``docs_per_s = B / t``,
``tokens_per_s = sum(n_b) / t`` (context tokens written per second), ``tflops = K * write_step_flops / t``
(``gradmem_fast.flops``: useful FLOPs of forward + memory-gradient backward, causal attention, no padding)
and ``mfu`` = that over the measured dense matmul peak of the model's dtype (``peak`` section), the peak
memory of the timed calls, and ``rel_err`` = ||M - M_ref|| / ||M_ref|| of the written memories.
"""

import dataclasses

import torch
import torch.nn.functional as F

from .bench_kernels import gradmem_op, our_backend
from .bench_peak import dtype_key
from .common import Skip, is_cuda, synchronize, tflops, time_calls_ms

LR = 1e-2
CLIP_NORM = 1.0
# The compiled baseline goes last: its compilation is the slowest case, and a tight budget should cost it,
# not our numbers.
IMPLS = (
    "reference",
    "torch_sdpa",
    "gradmem_fast",
    "gradmem_fast_graphs",
    "gradmem_fast_eager",
    "gradmem_ops",
    "torch_sdpa_compiled",
)


@dataclasses.dataclass
class WriteSpec:
    name: str
    family: str
    config: dict
    dtype: torch.dtype
    batch: int
    min_len: int
    max_len: int
    memory_tokens: int
    steps: int
    compile_min_seconds: float = 120.0


def write_specs(dry_run: bool) -> list:
    if dry_run:
        tiny = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            vocab_size=61,
        )
        return [
            WriteSpec("tiny_kv", "llama", dict(tiny, num_key_value_heads=4), torch.float32, 3, 6, 6, 2, 2, 0),
            WriteSpec(
                "gpt2_124m",
                "gpt2",
                dict(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=61),
                torch.float32,
                3,
                3,
                9,
                2,
                2,
                0,
            ),
            WriteSpec("llama_1b", "llama", dict(tiny, num_key_value_heads=2), torch.float32, 3, 3, 9, 2, 2, 0),
        ]
    return [
        WriteSpec(
            "tiny_kv",
            "llama",
            dict(
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                vocab_size=256,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
            ),
            torch.float32,
            64,
            240,
            240,
            8,
            2,
            60,
        ),
        WriteSpec("gpt2_124m", "gpt2", dict(n_positions=1024), torch.bfloat16, 64, 100, 450, 8, 5, 120),
        WriteSpec(
            "llama_1b",
            "llama",
            dict(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                vocab_size=128256,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                rope_theta=500000.0,
            ),
            torch.bfloat16,
            32,
            100,
            450,
            8,
            2,
            150,
        ),
    ]


def build_model(family: str, config: dict, dtype, device, seed: int = 0, attn: str = "eager"):
    """A random-weight causal LM in eval mode, built directly on ``device`` when possible."""
    import transformers

    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[family]
    extra = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if family == "gpt2" else {}
    cfg = cls(**{**extra, **config})
    with torch.random.fork_rng(devices=[torch.device(device)] if is_cuda(device) else []):
        torch.manual_seed(seed)
        try:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
        except Exception:  # noqa: BLE001 - some versions cannot build under a device context
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
            model = model.to(device=device, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(spec: WriteSpec, vocab: int, device, seed: int = 0):
    """Right-padded token ids [B, S], mask [B, S] (bool) and lengths (list) of ragged documents."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(spec.min_len, spec.max_len + 1, (spec.batch,), generator=gen)
    width = int(lengths.max())
    ids = torch.randint(0, vocab, (spec.batch, width), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    return ids.to(device), mask.to(device), lengths.tolist()


def initial_memory(spec: WriteSpec, hidden: int, device, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(spec.memory_tokens, hidden, generator=gen) * 0.02).to(device)


class PlainLoop:
    """A K-step WRITE in plain torch: backbone -> slice -> loss [B] -> autograd.grad wrt the memory -> SGD.

    ``loss``: "torch" (``F.linear`` + ``F.cross_entropy`` on fp32 logits) or "fused" (our
    ``linear_cross_entropy``); ``update``: "torch" (the reference formula) or "fused" (``memory_update``);
    ``compile``: None or a ``torch.compile`` backend name for the loss function. The batch must be right
    padded: the backbone then runs without a mask (causal attention ignores the trailing padding).
    """

    def __init__(
        self, model, ids, mask, steps, memory_tokens, loss="torch", update="torch", compile=None, backend="torch"
    ):
        from gradmem_fast.ops.update import sgd_torch

        self.model, self.steps, self.m = model, steps, memory_tokens
        self.backbone = model.base_model
        head = model.get_output_embeddings()
        self.weight, self.bias = head.weight, getattr(head, "bias", None)
        self.dtype = self.weight.dtype
        B, S = ids.shape
        self.targets = torch.where(mask, ids, torch.full_like(ids, -100))
        self.loss_dtype = torch.promote_types(self.dtype, torch.float32)  # fp32 logits for 16-bit models
        self.counts = mask.sum(1).clamp_min(1).to(self.loss_dtype)
        with torch.no_grad():
            self.embeds = model.get_input_embeddings()(ids)
        self.positions = torch.arange(memory_tokens + S, device=ids.device).unsqueeze(0).expand(B, -1)
        self.backend = backend
        self.loss_kind, self.update_kind = loss, update
        self._torch_sgd = sgd_torch
        self.loss_fn = self._losses if compile is None else torch.compile(self._losses, backend=compile, dynamic=False)
        if loss == "fused":
            self._lce = gradmem_op("linear_cross_entropy")
        if update == "fused":
            self._update = gradmem_op("memory_update")

    def _losses(self, memory):
        m, S = self.m, self.embeds.shape[1]
        x = torch.cat([memory.to(self.dtype), self.embeds], dim=1)
        out = self.backbone(inputs_embeds=x, position_ids=self.positions, use_cache=False)
        hidden = out.last_hidden_state[:, m - 1 : m + S - 1]
        if self.loss_kind == "fused":
            return self._lce(
                hidden, self.weight, self.targets, self.bias, reduction="sample_mean", backend=self.backend
            )
        logits = F.linear(hidden, self.weight, self.bias)
        ce = F.cross_entropy(logits.to(self.loss_dtype).flatten(0, 1), self.targets.flatten(), reduction="none")
        return ce.view(self.targets.shape).sum(1) / self.counts

    def __call__(self, memory):
        B = self.targets.shape[0]
        M = memory.expand(B, *memory.shape[-2:]) if memory.dim() == 2 else memory
        for _ in range(self.steps):
            M = M.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.loss_fn(M).sum(), M)
            with torch.no_grad():
                if self.update_kind == "fused":
                    M = self._update(M, g, lr=LR, clip_norm=CLIP_NORM, backend=self.backend).memory
                else:
                    M = self._torch_sgd(M, g, LR, None, CLIP_NORM)[0]
        return M.detach()


def _set_attention(model, name):
    try:
        model.set_attn_implementation(name)
    except Exception as exc:  # noqa: BLE001 - an unknown or unsupported attention is a skip
        raise Skip(f"attention implementation {name!r} unavailable: {type(exc).__name__}: {exc}") from None


def _writer(model, spec, backend, cuda_graphs=False, compile="auto"):
    from gradmem_fast import MemoryWriter, WriteConfig

    config = WriteConfig(num_memory_tokens=spec.memory_tokens, steps=spec.steps, lr=LR, clip_norm=CLIP_NORM)
    return MemoryWriter(model, config, backend=backend, cuda_graphs=cuda_graphs, compile=compile)


def make_impl(name, model, spec, ids, mask, device, dry_run):
    """A callable ``f(initial memory [m, d]) -> memory [B, m, d]`` for implementation ``name``."""
    compile_backend = "eager" if dry_run else "inductor"
    if name == "reference":
        _set_attention(model, "eager")
        writer = _writer(model, spec, "torch")
        return lambda M0: writer.write(ids, mask, memory=M0).memory
    if name == "torch_sdpa":
        _set_attention(model, "sdpa")
        return PlainLoop(model, ids, mask, spec.steps, spec.memory_tokens)
    if name == "torch_sdpa_compiled":
        _set_attention(model, "sdpa")
        return PlainLoop(model, ids, mask, spec.steps, spec.memory_tokens, compile=compile_backend)
    if name == "gradmem_ops":
        register = gradmem_op("register_attention")
        register()
        _set_attention(model, "gradmem_fast")
        return PlainLoop(
            model, ids, mask, spec.steps, spec.memory_tokens, loss="fused", update="fused", backend=our_backend(device)
        )
    if name == "gradmem_fast_graphs":
        if not is_cuda(device):
            raise Skip("CUDA graphs need a GPU")
        _set_attention(model, "eager")
        writer = _writer(model, spec, "triton", cuda_graphs=True)
        return lambda M0: writer.write(ids, mask, memory=M0).memory
    if name in ("gradmem_fast", "gradmem_fast_eager"):
        _set_attention(model, "eager")
        if not is_cuda(device):
            from gradmem_fast.backend import interpreting

            if not interpreting():
                raise Skip("the triton write engine needs CUDA or TRITON_INTERPRET=1")
        # gradmem_fast_eager: the engine with its step left eager (compile=False), beside the default
        # (compiled on CUDA), so one run measures what compiling the step buys.
        writer = _writer(model, spec, "triton", compile=False if name == "gradmem_fast_eager" else "auto")
        return lambda M0: writer.write(ids, mask, memory=M0).memory
    raise ValueError(f"unknown implementation {name!r}")


def _rel_err(out, ref):
    if ref is None or out is None:
        return None
    ref = ref.detach().double()
    return float((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _write_case(name, model, spec, ids, mask, lengths, M0, device, dry_run, peaks, state):
    from gradmem_fast.flops import write_step_flops

    def measure():
        impl = make_impl(name, model, spec, ids, mask, device, dry_run)
        holder = {}

        def call():
            holder["memory"] = impl(M0)

        warmup = 0 if dry_run and not is_cuda(device) else (2 if name.endswith("compiled") else 1)
        runs = (
            dict(min_runs=1, max_runs=1, max_seconds=0) if dry_run else dict(min_runs=3, max_runs=10, max_seconds=5.0)
        )
        synchronize(device)
        base = None
        if is_cuda(device):
            for _ in range(max(1, warmup)):  # compile / autotune before the peak-memory window
                call()
            warmup = 0
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        timing = time_calls_ms(call, device, warmup=warmup, **runs)
        ms = timing["ms"]
        out = dict(timing)
        if base is not None:
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        seconds = ms * 1e-3
        flop_count = spec.steps * write_step_flops(model, lengths, spec.memory_tokens)
        out.update(
            docs_per_s=spec.batch / seconds,
            tokens_per_s=sum(lengths) / seconds,
            flops=flop_count,
            tflops=tflops(flop_count, ms),
        )
        key = dtype_key(spec.dtype)
        if peaks.get(key):
            out.update(mfu=out["tflops"] / peaks[key], peak_key=key)
        if name == "reference":
            state["reference_memory"], state["reference_ms"] = holder["memory"], ms
        else:
            out["rel_err"] = _rel_err(holder.get("memory"), state.get("reference_memory"))
            if state.get("reference_ms"):
                out["speedup_vs_reference"] = state["reference_ms"] / ms
        return out

    return measure


def run(rec, device, dry_run: bool, peaks: dict) -> None:
    for spec in write_specs(dry_run):
        if not rec.wants(case=spec.name):
            continue  # not selected for this run (benchmarks.run --plan/--select): no model built
        state = {}
        params = dict(
            case=spec.name,
            dtype=dtype_key(spec.dtype),
            batch=spec.batch,
            min_len=spec.min_len,
            max_len=spec.max_len,
            memory_tokens=spec.memory_tokens,
            steps=spec.steps,
            mode="write",
        )
        try:
            model = build_model(spec.family, spec.config, spec.dtype, device)
            model.requires_grad_(False)
            ids, mask, lengths = make_batch(spec, model.config.vocab_size, device)
            M0 = initial_memory(spec, model.get_input_embeddings().weight.shape[1], device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next model
            rec.add(
                dict(
                    section=rec.section_name,
                    bench="write",
                    impl="model",
                    status="error",
                    reason=f"building {spec.name}: {type(exc).__name__}: {exc}",
                    **params,
                )
            )
            continue
        params["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        for name in IMPLS:
            min_seconds = spec.compile_min_seconds if name.endswith("compiled") else 5.0
            rec.case(
                "write",
                name,
                _write_case(name, model, spec, ids, mask, lengths, M0, device, dry_run, peaks, state),
                device=device,
                min_seconds=0.0 if dry_run else min_seconds,
                **params,
            )
        del model, state
        if is_cuda(device):
            torch.cuda.empty_cache()
