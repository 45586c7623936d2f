"""Second-order meta-training step of ``GradMemModel``: time and memory against the published code's path.

One step = ``GradMemModel.forward`` with ``grad_mode="second"`` (K WRITE steps, the graph of every inner
gradient kept) from the learnable initial memory, the READ loss on the query's last tokens plus the weighted
inner loss (the paper's recipe: write head, ``inner_loss_weight`` 0.5), and ``loss.backward()`` into every
parameter (backbone, write head, memory).

Implementations (the same model object, so the same weights):

- ``reference``: the published GradMem code's path, re-implemented here (``eager_meta_loss``): padded batch,
  eager attention (S x S score matrices of every head kept for the double backward), the full
  ``[B, r+S, V]`` logits of every WRITE step and of the READ, ``torch.autograd.grad(create_graph=True)``,
  the SGD update as tensor ops.
- ``gradmem_fast``: ``GradMemModel`` on our engine (``backend="triton"``: packed varlen documents, fused
  linear cross-entropy without logits, O(S) second-order attention, fused update). On CPU only in the
  Triton interpreter at the dry run's tiny size.
- ``gradmem_torch``: ``GradMemModel`` on its pure-torch backend (``gradmem_fast.reference``; what the model
  class runs on CPU). CPU only.

Shapes: GPT-2 small (config only, random weights, bf16), K=2, batch 32, 512 context tokens, m=8, 32 query
tokens; the tiny KV model of the paper (Llama, 4 layers, 128 wide, 4 heads, fp32, vocabulary 65), K=2,
batch 64, 240 tokens. ``python -m benchmarks.bench_second_order --out DIR`` measures small CPU versions
(``cpu_specs``) and writes ``results.json``/``report.md`` there.

Metrics: ``ms`` (median step), ``peak_mem_mb`` (CUDA: peak allocated during a step above what was allocated
before), ``saved_mb`` (every device: bytes of the distinct storages autograd saved for backward during a
step, parameters excluded; CPU has no allocator peak, and this is where the S x S matrices live),
``rel_err`` (all parameter gradients against the reference's), ``cpu_ms`` (CPU only: median process CPU time
of a step, fair when other jobs share the cores), ``speedup_vs_reference``, ``cpu_speedup_vs_reference``,
``memory_vs_reference`` (peak) and ``saved_vs_reference``.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .bench_write import build_model
from .common import Skip, is_cuda, synchronize, time_calls_ms

IMPLS = ("reference", "gradmem_fast", "gradmem_torch")


@dataclasses.dataclass
class SecondOrderSpec:
    name: str
    family: str
    config: dict
    dtype: torch.dtype
    batch: int
    length: int
    query: int
    memory_tokens: int
    steps: int
    inner_lr: float = 0.04


def specs(dry_run: bool) -> list:
    if dry_run:
        return [
            SecondOrderSpec(
                "gpt2_124m",
                "gpt2",
                dict(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=61),
                torch.float32,
                2,
                8,
                4,
                2,
                2,
            ),
            SecondOrderSpec("tiny_kv", "llama", _llama(32, 1, 2, 13), torch.float32, 2, 7, 3, 2, 2),
        ]
    return [
        SecondOrderSpec("gpt2_124m", "gpt2", dict(n_positions=1024), torch.bfloat16, 32, 512, 32, 8, 2),
        SecondOrderSpec("tiny_kv", "llama", _llama(128, 4, 4, 65), torch.float32, 64, 240, 8, 8, 2),
    ]


def cpu_specs() -> list:
    """Small CPU versions: GPT-2 at 4 layers 256 wide with its full 50257-token vocabulary (the logits are
    what the reference materialises), the tiny KV model at its real size with a smaller batch."""
    return [
        SecondOrderSpec(
            "gpt2_small_cpu",
            "gpt2",
            dict(n_embd=256, n_layer=4, n_head=4, n_positions=512),
            torch.float32,
            4,
            128,
            8,
            8,
            2,
        ),
        SecondOrderSpec("tiny_kv_cpu", "llama", _llama(128, 4, 4, 65), torch.float32, 8, 120, 8, 8, 2),
    ]


def _llama(hidden, layers, heads, vocab):
    return dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def gradmem_model(lm, spec: SecondOrderSpec, backend: str):
    """The paper's meta-training recipe around ``lm``: K second-order SGD steps, write head, inner loss 0.5."""
    from gradmem_fast import GradMemConfig, GradMemModel

    config = GradMemConfig(
        n_mem_tokens=spec.memory_tokens,
        K=spec.steps,
        lr=spec.inner_lr,
        grad_mode="second",
        use_write_head=True,
        add_inner_loss_to_outer=True,
        inner_loss_weight=0.5,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(4)
    model = GradMemModel(config, model=lm)
    with torch.no_grad():
        model.mem.copy_(torch.randn(model.mem.shape, generator=gen) * 0.02)
    return model.train()


def eager_meta_loss(gm, ids, mask, query, labels):
    """The published code's meta step, batched and padded: eager attention, full logits [B, r+S, V] at every
    WRITE step and in the READ, per-document mean reconstruction loss, ``M <- M - lr * dL/dM`` with the graph
    of the gradient (``create_graph``) for the last ``last_K_second_order`` steps.

    loss = CE(READ logits of the labelled query tokens) + w * mean_b L_b(M_{K-1})"""
    cfg, lm = gm.config, gm.model
    emb = lm.get_input_embeddings()
    head = gm.write_head.weight if gm.write_head is not None else lm.get_output_embeddings().weight
    B, S = ids.shape
    embeds = emb(ids)
    M = gm.mem.unsqueeze(0).expand(B, -1, -1)
    n = mask.sum(dim=1).clamp_min(1)
    per_doc = None
    for k in range(cfg.K):
        second = cfg.grad_mode == "second" and k >= cfg.K - cfg.last_K_second_order
        rows = gm.write_prefix(M)
        r = rows.shape[1]
        x = torch.cat([rows.to(embeds.dtype), embeds], dim=1)
        att = torch.cat([torch.ones(B, r, dtype=mask.dtype, device=mask.device), mask], dim=1)
        hidden = lm.base_model(inputs_embeds=x, attention_mask=att).last_hidden_state
        logits = hidden @ head.t()  # every position, as the published code computes them
        pred = logits[:, r - 1 : r - 1 + S]
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # fp32 softmax for 16-bit models
        ce = F.cross_entropy(pred.transpose(1, 2), ids, reduction="none")
        per_doc = (ce * mask).sum(dim=1) / n
        (g,) = torch.autograd.grad(per_doc.sum(), M, create_graph=second, retain_graph=True)
        M = M - cfg.lr * (g if second else g.detach())
    rows = gm.read_prefix(M)
    r = rows.shape[1]
    logits = lm(inputs_embeds=torch.cat([rows.to(embeds.dtype), emb(query)], dim=1)).logits
    read = logits[:, r - 1 : -1]
    read = read.to(torch.promote_types(read.dtype, torch.float32))
    loss = F.cross_entropy(read.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss + cfg.outer_inner_weight * per_doc.sum() / B


@contextlib.contextmanager
def saved_tensor_bytes(exclude):
    """Collects {storage pointer: bytes} of every tensor autograd saves for backward inside the block (the
    double-backward graph built by ``create_graph`` included), except the storages in ``exclude``."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def make_inputs(spec: SecondOrderSpec, vocab: int, device):
    """Ragged contexts (lengths 3/4 S .. S, right-padded, pad id 0), queries [B, Q], labels on the query's
    second half (-100 before)."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(max(1, 3 * spec.length // 4), spec.length + 1, (spec.batch,), generator=gen)
    lengths[0] = spec.length
    mask = (torch.arange(spec.length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (spec.batch, spec.length), generator=gen) * mask
    query = torch.randint(1, vocab, (spec.batch, spec.query), generator=gen)
    labels = query.clone()
    labels[:, : spec.query // 2] = -100
    return ids.to(device), mask.to(device), query.to(device), labels.to(device)


def _case(name, gm, inputs, device, runs, state):
    def measure():
        if name == "gradmem_fast" and not is_cuda(device):
            from gradmem_fast.backend import interpreting

            if not interpreting() or not state["dry_run"]:
                raise Skip("the triton engine needs CUDA (the Triton interpreter only at the dry run's tiny size)")
        if name == "gradmem_torch" and is_cuda(device):
            raise Skip("the model class's pure-torch backend is its CPU path")
        gm.config.backend = {"gradmem_fast": "triton", "gradmem_torch": "torch"}.get(name, "auto")
        ids, mask, query, labels = inputs
        params = [p for p in gm.parameters() if p.requires_grad]
        exclude = {p.untyped_storage().data_ptr() for p in gm.parameters()}
        holder = {}

        def step():
            gm.zero_grad(set_to_none=True)
            with saved_tensor_bytes(exclude) as saved:
                if name == "reference":
                    loss = eager_meta_loss(gm, ids, mask, query, labels)
                else:
                    loss = gm(
                        context_input_ids=ids, context_attention_mask=mask, query_input_ids=query, labels=labels
                    ).loss
            loss.backward()
            holder["saved"] = sum(saved.values())
            holder["loss"] = float(loss.detach())

        base = None
        warmup = 0 if state["dry_run"] else 1
        if is_cuda(device):
            step()  # compiles the kernels and warms the allocator
            warmup = 0
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        cpu_ms = []

        def timed():  # process CPU time beside the wall clock: fair on a shared CPU machine
            t0 = time.process_time()
            step()
            cpu_ms.append((time.process_time() - t0) * 1e3)

        out = time_calls_ms(timed, device, warmup=warmup, **runs)
        if not is_cuda(device):
            out["cpu_ms"] = statistics.median(cpu_ms[-out["runs"] :])
        if base is not None:
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["saved_mb"] = holder["saved"] / 2**20
        out["loss"] = holder["loss"]
        out["docs_per_s"] = ids.shape[0] / (out["ms"] * 1e-3)
        out["tokens_per_s"] = int(mask.sum()) / (out["ms"] * 1e-3)
        grads = torch.cat([p.grad.detach().double().flatten() for p in params])
        if name == "reference":
            state.update(
                grad=grads, ms=out["ms"], cpu_ms=out.get("cpu_ms"), mem=out.get("peak_mem_mb"), saved=out["saved_mb"]
            )
        elif state.get("grad") is not None:
            ref = state["grad"]
            out["rel_err"] = float((grads - ref).norm() / ref.norm().clamp_min(1e-30))
            out["speedup_vs_reference"] = state["ms"] / out["ms"]
            if state.get("cpu_ms") and out.get("cpu_ms"):
                out["cpu_speedup_vs_reference"] = state["cpu_ms"] / out["cpu_ms"]
            if state.get("mem") and out.get("peak_mem_mb"):
                out["memory_vs_reference"] = out["peak_mem_mb"] / state["mem"]
            if state.get("saved"):
                out["saved_vs_reference"] = out["saved_mb"] / state["saved"]
        synchronize(device)
        gm.zero_grad(set_to_none=True)
        return out

    return measure


def run(rec, device, dry_run: bool, spec_list=None) -> None:
    if spec_list is not None:
        runs = dict(min_runs=2, max_runs=3, max_seconds=20.0)
    elif dry_run:
        runs = dict(min_runs=1, max_runs=1, max_seconds=0)
    else:  # the GPU suite gives this section 30 s: two timed steps after the warm-up per implementation
        runs = dict(min_runs=2, max_runs=3, max_seconds=3.0)
    for spec in spec_list or specs(dry_run):
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
        if not rec.wants(bench="second_order", case=spec.name):
            continue
        try:
            lm = build_model(spec.family, spec.config, spec.dtype, device)
            gm = gradmem_model(lm, spec, "auto")
            inputs = make_inputs(spec, lm.config.vocab_size, device)
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
        state = {"dry_run": dry_run}
        for name in IMPLS:
            rec.case(
                "second_order",
                name,
                _case(name, gm, inputs, device, runs, state),
                device=device,
                min_seconds=0.0 if dry_run or spec_list is not None else 5.0,
                **params,
            )
        del gm, lm, state
        if is_cuda(device):
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    """CPU measurement at small sizes (``cpu_specs``), one torch thread: results.json and report.md in --out."""
    from . import common, report

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_second_order", description=main.__doc__)
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    out_dir = os.path.abspath(args.out)
    meta = common.run_metadata(device, False)
    meta.update(sections_requested=["second_order"], label="CPU, small sizes (cpu_specs)", threads=args.threads)
    rec = common.Recorder(out_dir, meta, sections_now=["second_order"], merge=False)
    with rec.section("second_order", 3600):
        run(rec, device, False, cpu_specs())
    rec.flush()
    common.write_text(out_dir, "report.md", report.render(out_dir))
    print(report.summary(rec.records, rec.section_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
