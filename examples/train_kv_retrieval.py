"""Meta-train GradMem on synthetic associative key-value retrieval, reading answers from memory alone.

The task. A context is a string of random filler characters with ``pairs`` key-value pairs written as
``!key:value!`` between filler segments, e.g. ``cab!eb:fd!a!ce:ab!db``. Keys are unique within a
context. The query is one of its keys, written ``!key:``; the answer is that key's value followed by the
closing ``!`` (``fd!``), so greedy decoding knows where a value ends.

The model. ``gradmem_fast.GradMemModel`` (the meta-training model class, a Hugging Face ``PreTrainedModel``)
around a randomly initialised Llama-style backbone (``transformers.LlamaConfig``: 4 layers, 128 wide, 4 heads,
head dim 32, fp32) and a character tokenizer defined below; nothing is downloaded. The recipe is the paper's
(GradMem, Kuratov et al., ICML 2026): 8 memory vectors, K=2 inner SGD steps with lr 0.04 on the context's
reconstruction loss through a separate write head, ``grad_mode="second"`` (the outer gradient flows through
the K inner gradients into the weights, the write head and the initial memory), and the last inner loss
added to the outer loss with weight 0.5. The outer loss is the cross-entropy of the answer tokens read from
``[memory ; query + answer]`` (teacher forcing, context removed); AdamW updates everything. Evaluation writes
held-out contexts with ``grad_mode="none"``, greedily decodes the value from ``[memory ; query]`` and counts
exact matches.

Curriculum. ``--save DIR`` writes the model with ``save_pretrained`` at the end of a run; ``--init-from DIR``
starts the next stage (more pairs) from it with ``GradMemModel.from_pretrained`` (the stage's K, inner lr,
inner loss weight are set on the loaded configuration; the architecture and the alphabet must stay):

    python examples/train_kv_retrieval.py --pairs 1 --target 0.99 --save runs/p1
    python examples/train_kv_retrieval.py --pairs 2 --init-from runs/p1 --save runs/p2

``--time-limit`` counts process CPU seconds (fair on a shared machine); ``--curve-out FILE`` writes the
evaluation curve (step, exact match, wall s, CPU s) as JSON for ``examples/plot_kv_curves.py``. Measured
curves, the runs tried and the GPU configurations (``examples/kv_gpu_curriculum.sh``: 16 -> 96 pairs) are in
examples/README.md. The CPU runs the model class's ``torch`` backend (the pure-torch reference); the Triton
interpreter is correct but far too slow for training. On CUDA the backend is the Triton write engine.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

try:
    import gradmem_fast  # noqa: F401
except ImportError:  # a source checkout run without installing: the package is one directory up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from gradmem_fast import GradMemConfig, GradMemModel  # noqa: E402

PAD, OPEN_CLOSE, SEP = "_", "!", ":"


# --------------------------------------------------------------------------------------------- task
class CharTokenizer:
    """One token per character: the padding symbol, the delimiters ``!`` and ``:``, then the alphabet."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet) or any(c in alphabet for c in (PAD, OPEN_CLOSE, SEP)):
            raise ValueError(
                f"alphabet must have distinct characters other than {PAD!r}, {OPEN_CLOSE!r}, {SEP!r}; got {alphabet!r}"
            )
        self.chars = PAD + OPEN_CLOSE + SEP + alphabet
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.pad_id = self.index[PAD]
        self.end_id = self.index[OPEN_CLOSE]

    def __len__(self):
        return len(self.chars)

    def encode(self, text: str) -> list:
        """Token ids of ``text`` (every character must be in the vocabulary)."""
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        """The characters of ``ids`` (a list or a 1-D tensor)."""
        return "".join(self.chars[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Shape of the synthetic task: ``pairs`` pairs of ``key_len``/``value_len`` characters over
    ``alphabet``, separated by filler segments of 0..``filler`` random characters of the same alphabet."""

    pairs: int = 1
    key_len: int = 2
    value_len: int = 2
    alphabet: str = "abcdef"
    filler: int = 1

    def __post_init__(self):
        if self.pairs < 1 or self.key_len < 1 or self.value_len < 1 or self.filler < 0:
            raise ValueError(f"invalid task configuration {self}")
        if len(self.alphabet) ** self.key_len < self.pairs:
            raise ValueError(
                f"{self.pairs} unique keys of {self.key_len} characters over {len(self.alphabet)} letters do not exist"
            )


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance: the context string, the queried key and its value."""

    context: str
    key: str
    value: str

    @property
    def query(self) -> str:
        """What the READ sees after the memory: the key between the pair delimiters."""
        return f"{OPEN_CLOSE}{self.key}{SEP}"

    @property
    def answer(self) -> str:
        """What the READ must produce: the value and the closing delimiter."""
        return f"{self.value}{OPEN_CLOSE}"


def generate_sample(rng: random.Random, task: TaskConfig) -> Sample:
    """Draw one context with ``task.pairs`` unique keys; the query is one of them, chosen uniformly."""
    keys = set()
    while len(keys) < task.pairs:
        keys.add("".join(rng.choice(task.alphabet) for _ in range(task.key_len)))
    keys = list(keys)
    rng.shuffle(keys)  # a set's order is not random; shuffle so key order carries no information
    values = ["".join(rng.choice(task.alphabet) for _ in range(task.value_len)) for _ in keys]

    def filler():
        return "".join(rng.choice(task.alphabet) for _ in range(rng.randint(0, task.filler)))

    parts = [filler()]
    for k, v in zip(keys, values):
        parts.append(f"{OPEN_CLOSE}{k}{SEP}{v}{OPEN_CLOSE}")
        parts.append(filler())
    i = rng.randrange(task.pairs)
    return Sample(context="".join(parts), key=keys[i], value=values[i])


def parse_pairs(context: str) -> dict:
    """The ``{key: value}`` pairs written in ``context`` (used by tests to check the generator)."""
    out, pos = {}, 0
    while True:
        start = context.find(OPEN_CLOSE, pos)
        if start < 0:
            return out
        sep = context.find(SEP, start)
        end = context.find(OPEN_CLOSE, start + 1)
        if sep < 0 or end < 0 or sep > end:
            return out
        out[context[start + 1 : sep]] = context[sep + 1 : end]
        pos = end + 1


class SampleStream:
    """Training samples from one seed, never one whose context is in ``exclude`` (the held-out set)."""

    def __init__(self, task: TaskConfig, seed: int, exclude=()):
        self.task, self.rng, self.exclude = task, random.Random(seed), set(exclude)

    def batch(self, size: int) -> list:
        out = []
        while len(out) < size:
            s = generate_sample(self.rng, self.task)
            if s.context not in self.exclude:
                out.append(s)
        return out


def encode_batch(samples, tok: CharTokenizer, device):
    """Tensors of a batch: contexts right-padded [B, S] with their mask, and the READ input
    ``query + answer`` [B, Q + A] (every key and value has the same length, so no padding)."""
    ctx = [tok.encode(s.context) for s in samples]
    width = max(len(c) for c in ctx)
    ids = torch.full((len(ctx), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(ctx), width, dtype=torch.long)
    for i, c in enumerate(ctx):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    read = torch.tensor([tok.encode(s.query + s.answer) for s in samples], dtype=torch.long)
    return ids.to(device), mask.to(device), read.to(device)


# -------------------------------------------------------------------------------------------- model
def llama_config(vocab_size: int, layers=4, hidden=128, heads=4, max_positions=2048):
    """The backbone: a randomly initialised fp32 Llama-style causal LM (no download), eager attention
    (on the ``torch`` backend the WRITE differentiates through attention twice, which torch SDPA's fused
    kernels cannot; the Triton engine uses its own attention)."""
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def build_model(args, vocab_size: int, device) -> GradMemModel:
    """A fresh ``GradMemModel`` (``--init-from`` unset) or the previous curriculum stage's checkpoint.

    The memory options of this run (K, inner lr, write head, inner loss weight, ...) are set on the loaded
    configuration, so a stage may change them; the architecture (backbone, m) comes from the checkpoint."""
    options = dict(
        K=args.inner_steps,
        lr=args.inner_lr,
        grad_mode="second",
        last_K_second_order=args.last_k_second_order,
        inner_clip_norm=args.inner_clip_norm,
        use_write_head=args.write_head,
        add_inner_loss_to_outer=args.inner_loss_weight > 0,
        inner_loss_weight=args.inner_loss_weight if args.inner_loss_weight > 0 else None,
        backend=args.backend,
    )
    if args.init_from:
        model = GradMemModel.from_pretrained(args.init_from)
        if model.config.base_config.get("vocab_size") != vocab_size:
            raise ValueError(
                f"--init-from {args.init_from}: its vocabulary has {model.config.base_config.get('vocab_size')} "
                f"tokens, this task's alphabet gives {vocab_size} (use the same --alphabet in every stage)"
            )
        if args.write_head != model.config.use_write_head:
            raise ValueError(f"--init-from {args.init_from}: use_write_head={model.config.use_write_head} there")
        for name, value in options.items():
            setattr(model.config, name, value)
        last = args.inner_steps if args.last_k_second_order is None else args.last_k_second_order
        model.config.last_K_second_order = max(0, min(last, args.inner_steps))  # as GradMemConfig clamps it
        return model.to(device=device, dtype=torch.float32)
    base = llama_config(vocab_size, args.layers, args.hidden, args.heads, args.max_positions)
    config = GradMemConfig(base_config=base.to_dict(), n_mem_tokens=args.memory, **options)
    return GradMemModel(config).to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ training
def model_batch(samples, tok: CharTokenizer, device) -> dict:
    """The batch of ``GradMemModel.forward``: contexts, the READ input ``query + answer`` (teacher forcing)
    and labels on the answer tokens only (-100 on the query; label j is predicted by READ row j)."""
    ids, mask, read = encode_batch(samples, tok, device)
    labels = read.clone()
    labels[:, : len(samples[0].query)] = -100
    return dict(context_input_ids=ids, context_attention_mask=mask, query_input_ids=read, labels=labels)


def meta_step(model, optimizer, samples, tok, device, grad_clip=1.0):
    """One outer step: forward (K second-order WRITE steps, READ) -> loss -> backward -> AdamW.

    Returns (outer loss, READ answer loss, inner losses [K] averaged over the batch)."""
    out = model(**model_batch(samples, tok, device))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip:
        # Second-order gradients spike early on; a norm clip keeps AdamW stable.
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out.loss.item(), out.target_loss.item(), out.inner_losses.mean(dim=1).tolist()


@contextlib.contextmanager
def inference_write(model):
    """WRITE without the meta-gradient: grad_mode "none" (each step detached, no graph kept) and no inner
    loss kept for the outer loss; the model's configuration is restored afterwards."""
    cfg = model.config
    saved = cfg.grad_mode, cfg.last_K_second_order, cfg.add_inner_loss_to_outer
    was_training = model.training
    cfg.grad_mode, cfg.last_K_second_order, cfg.add_inner_loss_to_outer = "none", 0, False
    model.eval()
    try:
        yield
    finally:
        cfg.grad_mode, cfg.last_K_second_order, cfg.add_inner_loss_to_outer = saved
        model.train(was_training)


@torch.no_grad()
def greedy_values(model, memory, samples, tok, device):
    """Decode each value from ``[read_st ; P(memory) ; read_end ; query]`` alone, one greedy token at a time."""
    cur = torch.tensor([tok.encode(s.query) for s in samples], dtype=torch.long, device=device)
    value_len = len(samples[0].value)
    for _ in range(value_len + 1):  # the value and its closing delimiter
        nxt = model.read_logits(memory, cur)[:, -1].argmax(dim=-1, keepdim=True)
        cur = torch.cat([cur, nxt], dim=1)
    out = []
    for row in cur[:, len(samples[0].query) :].tolist():
        text = tok.decode(row)
        out.append(text.split(OPEN_CLOSE, 1)[0] if OPEN_CLOSE in text else text)
    return out


def evaluate(model, samples, tok, device, batch=128, by_pair=None):
    """Exact-match rate of the greedily decoded value on ``samples`` (the context is never shown to the
    READ); the WRITE runs with grad_mode="none" (``inference_write``). ``by_pair``, a dict, receives the rate
    per position of the queried pair in its context (0 = first pair): a model that decodes memory by
    position rather than by key scores well on the first pair only."""
    hits, per = 0, {}
    with inference_write(model):
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            ids, mask, _ = encode_batch(chunk, tok, device)
            memory = model.write(ids, mask).memory.detach()
            for p, s in zip(greedy_values(model, memory, chunk, tok, device), chunk):
                hits += p == s.value
                index = list(parse_pairs(s.context)).index(s.key)
                per.setdefault(index, []).append(p == s.value)
    if by_pair is not None:
        by_pair.update({i: sum(v) / len(v) for i, v in sorted(per.items())})
    return hits / len(samples)


def lr_factor(step: int, args) -> float:
    """The outer learning-rate multiplier at ``step``: linear warm-up, then constant or cosine to 0.1."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("task")
    g.add_argument("--pairs", type=int, default=1)
    g.add_argument("--key-len", type=int, default=2)
    g.add_argument("--value-len", type=int, default=2)
    g.add_argument("--alphabet", default="abcdef")
    g.add_argument("--filler", type=int, default=1, help="max filler characters between pairs")
    g = p.add_argument_group("model and memory (GradMemModel; the architecture is ignored with --init-from)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--max-positions", type=int, default=2048)
    g.add_argument("--memory", type=int, default=8, help="memory vectors (n_mem_tokens)")
    g.add_argument("--inner-steps", type=int, default=2, help="K, WRITE steps")
    g.add_argument("--inner-lr", type=float, default=0.04)
    g.add_argument("--inner-clip-norm", type=float, default=None)
    g.add_argument("--last-k-second-order", type=int, default=None)
    g.add_argument(
        "--write-head", action=argparse.BooleanOptionalAction, default=True, help="separate [V, d] WRITE head"
    )
    g.add_argument(
        "--inner-loss-weight", type=float, default=0.5, help="weight of the inner loss in the outer loss (0: off)"
    )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=3000, help="outer steps (upper bound)")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="after the warm-up: constant, or cosine decay to 10%% of --lr at --steps",
    )
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-size", type=int, default=256)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--target", type=float, default=0.9, help="stop once eval exact match reaches this")
    g.add_argument("--time-limit", type=float, default=900.0, help="seconds of process CPU time; 0 = no limit")
    g.add_argument("--init-from", default=None, help="GradMemModel checkpoint of the previous curriculum stage")
    g.add_argument(
        "--save", default=None, help="directory: save_pretrained the model at every evaluation and at the end"
    )
    g.add_argument("--curve-out", default=None, help="JSON file: the evaluation curve and the run's settings")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--backend", default=None, help="torch | triton | auto (default: torch on CPU, auto else)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    """Train, log and return the list of (step, eval exact match, wall seconds, process CPU seconds)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.backend = args.backend or ("torch" if device.type == "cpu" else "auto")
    if device.type == "cuda" and args.backend != "torch":
        # The Triton attention's double backward has no spill-free IEEE-fp32 configuration on GPUs yet
        # (see README, limits); TF32 tensor-core dots serve this fp32 model (DESIGN.md tolerance 5e-4).
        torch.backends.cuda.matmul.allow_tf32 = True
    task = TaskConfig(args.pairs, args.key_len, args.value_len, args.alphabet, args.filler)
    tok = CharTokenizer(task.alphabet)

    # Held-out samples come from their own seed, and training never draws one of their contexts.
    eval_samples = SampleStream(task, seed=10_000 + args.seed).batch(args.eval_size)
    train = SampleStream(task, seed=args.seed, exclude={s.context for s in eval_samples})

    model = build_model(args, len(tok), device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "mem"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "mem"]  # norms and M0: no decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"task {task} | vocab {len(tok)} | GradMemModel {n_params / 1e6:.2f}M params"
        f"{' from ' + args.init_from if args.init_from else ''} | m={cfg.n_mem_tokens} K={cfg.K} inner lr {cfg.lr} "
        f"write head {cfg.use_write_head} inner loss weight {cfg.outer_inner_weight} | batch {args.batch} "
        f"lr {args.lr} warmup {args.warmup} | {device} backend {args.backend} threads {torch.get_num_threads()}",
        flush=True,
    )
    print(
        f"example: context {eval_samples[0].context!r} query {eval_samples[0].query!r} "
        f"answer {eval_samples[0].answer!r}",
        flush=True,
    )

    curve, recent = [], []
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def record(step):
        by_pair = {}
        em = evaluate(model, eval_samples, tok, device, by_pair=by_pair)
        if len(by_pair) > 1:
            print("  exact match by queried pair: " + ", ".join(f"#{i + 1} {v:.1%}" for i, v in by_pair.items()))
        curve.append((step, em, time.perf_counter() - wall0, time.process_time() - cpu0))
        if args.curve_out:  # rewritten at every evaluation, so a stopped run leaves its curve so far
            path = Path(args.curve_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = {k: v for k, v in vars(args).items() if k != "curve_out"}
            doc = {"settings": settings, "columns": ["step", "exact_match", "wall_s", "cpu_s"], "curve": curve}
            path.with_suffix(".tmp").write_text(json.dumps(doc, indent=1))
            path.with_suffix(".tmp").replace(path)
        if args.save and step:  # a stopped or plateaued run can still seed the next stage
            model.save_pretrained(args.save)
        return em

    em = record(0)
    print(f"step     0 | eval exact match {em:6.1%}", flush=True)
    for step in range(1, args.steps + 1):
        loss, read_loss, inner = meta_step(model, optimizer, train.batch(args.batch), tok, device, args.grad_clip)
        schedule.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"outer loss became {loss} at step {step}; lower --lr or --inner-lr")
        recent.append((loss, read_loss, inner[0], inner[-1]))
        line = None
        if step % args.log_every == 0:
            avg = [sum(x) / len(recent) for x in zip(*recent)]
            recent = []
            line = (
                f"step {step:5d} | outer {avg[0]:.3f} (read {avg[1]:.3f}) | inner {avg[2]:.3f} -> {avg[3]:.3f} | "
                f"cpu {time.process_time() - cpu0:6.0f}s wall {time.perf_counter() - wall0:6.0f}s"
            )
        out_of_time = args.time_limit and time.process_time() - cpu0 >= args.time_limit
        if step % args.eval_every == 0 or out_of_time or step == args.steps:
            em = record(step)
            line = (line or f"step {step:5d}") + f" | eval exact match {em:6.1%}"
            if em >= args.target:
                print(line, flush=True)
                print(
                    f"reached {em:.1%} >= {args.target:.0%} held-out exact match at step {step} "
                    f"(cpu {curve[-1][3]:.0f}s, wall {curve[-1][2]:.0f}s)",
                    flush=True,
                )
                break
        if line:
            print(line, flush=True)
        if out_of_time:
            print(
                f"time limit {args.time_limit:.0f}s of CPU reached at step {step}; best exact match "
                f"{max(c[1] for c in curve):.1%}",
                flush=True,
            )
            break
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved {args.save}", flush=True)
    return curve


if __name__ == "__main__":
    main()
