"""Second-order meta-training step: time and peak memory against the eager reference.

One step = WRITE with ``grad_mode="second"`` (K steps, the graph of every gradient kept) from a learnable
initial memory ``M0``, then a READ loss on a query (next-token cross-entropy of the query from
``[M ; E(query)]``) and ``loss.backward()`` into ``M0`` and the model's weights (meta-training trains both).

Shape: GPT-2 small (bf16), K = 2, batch 32, 512 context tokens, m = 8, 32 query tokens.

Implementations: ``reference`` (``MemoryWriter(backend="torch")``, eager attention: the S x S matrices of
every head are kept for the double backward) and ``gradmem_fast`` (``MemoryWriter(backend="triton")``
with ``grad_mode="second"``; recorded as skipped until the engine and the attention double backward
land). ``rel_err`` compares ``M0``'s meta-gradient with the reference's. No FLOP formula yet: time and
memory only.
"""

import dataclasses

import torch
import torch.nn.functional as F

from .bench_write import build_model
from .common import Skip, is_cuda, synchronize, time_calls_ms

IMPLS = ("reference", "gradmem_fast")


@dataclasses.dataclass
class SecondOrderSpec:
    name: str
    config: dict
    dtype: torch.dtype
    batch: int
    length: int
    query: int
    memory_tokens: int
    steps: int


def specs(dry_run: bool) -> list:
    if dry_run:
        return [
            SecondOrderSpec(
                "gpt2_124m",
                dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=61),
                torch.float32,
                2,
                8,
                4,
                2,
                2,
            )
        ]
    return [SecondOrderSpec("gpt2_124m", dict(n_positions=1024), torch.bfloat16, 32, 512, 32, 8, 2)]


def _case(name, model, spec, ids, query, device, dry_run, state):
    from gradmem_fast import MemoryWriter, WriteConfig, reference

    def measure():
        if name == "gradmem_fast" and not is_cuda(device):
            from gradmem_fast.backend import interpreting

            if not interpreting():
                raise Skip("the triton write engine needs CUDA or TRITON_INTERPRET=1")
        model.set_attn_implementation("eager")
        config = WriteConfig(
            num_memory_tokens=spec.memory_tokens, steps=spec.steps, lr=1e-2, clip_norm=1.0, grad_mode="second"
        )
        writer = MemoryWriter(model, config, backend="torch" if name == "reference" else "triton")
        gen = torch.Generator().manual_seed(3)
        d = model.get_input_embeddings().weight.shape[1]
        M0 = torch.nn.Parameter((torch.randn(spec.memory_tokens, d, generator=gen) * 0.02).to(device))
        holder = {}

        def step():
            M0.grad = None
            model.zero_grad(set_to_none=True)
            memory = writer.write(ids, memory=M0).memory
            logits = reference.read_logits(model, memory, query)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), query.flatten())
            loss.backward()
            holder["grad"] = M0.grad.detach().clone()

        runs = (
            dict(min_runs=1, max_runs=1, max_seconds=0) if dry_run else dict(min_runs=2, max_runs=5, max_seconds=10.0)
        )
        base = None
        warmup = 0 if dry_run else 1
        if is_cuda(device):
            step()
            warmup = 0
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        out = time_calls_ms(step, device, warmup=warmup, **runs)
        if base is not None:
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["docs_per_s"] = spec.batch / (out["ms"] * 1e-3)
        out["tokens_per_s"] = spec.batch * spec.length / (out["ms"] * 1e-3)
        if name == "reference":
            state.update(grad=holder["grad"], ms=out["ms"], mem=out.get("peak_mem_mb"))
        elif state.get("grad") is not None:
            ref = state["grad"].double()
            out["rel_err"] = float((holder["grad"].double() - ref).norm() / ref.norm().clamp_min(1e-30))
            out["speedup_vs_reference"] = state["ms"] / out["ms"]
            if state.get("mem") and out.get("peak_mem_mb"):
                out["memory_vs_reference"] = out["peak_mem_mb"] / state["mem"]
        synchronize(device)
        model.zero_grad(set_to_none=True)
        return out

    return measure


def run(rec, device, dry_run: bool) -> None:
    for spec in specs(dry_run):
        params = dict(
            case=spec.name,
            dtype=str(spec.dtype).replace("torch.", ""),
            batch=spec.batch,
            seqlen=spec.length,
            query=spec.query,
            memory_tokens=spec.memory_tokens,
            steps=spec.steps,
            mode="meta-step",
        )
        try:
            model = build_model("gpt2", spec.config, spec.dtype, device)
            gen = torch.Generator().manual_seed(2)
            vocab = model.config.vocab_size
            ids = torch.randint(0, vocab, (spec.batch, spec.length), generator=gen).to(device)
            query = torch.randint(0, vocab, (spec.batch, spec.query), generator=gen).to(device)
        except Exception as exc:  # noqa: BLE001
            rec.add(
                dict(
                    section=rec.section_name,
                    bench="second_order",
                    impl="model",
                    status="error",
                    reason=f"building {spec.name}: {type(exc).__name__}: {exc}",
                    **params,
                )
            )
            continue
        state = {}
        for name in IMPLS:
            rec.case(
                "second_order",
                name,
                _case(name, model, spec, ids, query, device, dry_run, state),
                device=device,
                min_seconds=0.0 if dry_run else 10.0,
                **params,
            )
        del model, state
        if is_cuda(device):
            torch.cuda.empty_cache()
