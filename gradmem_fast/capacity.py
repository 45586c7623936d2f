"""Capacity of N memory vectors: per text, the longest prefix that greedy decoding reproduces exactly.

    gradmem-fast capacity --model M --memory-tokens N --input texts.jsonl [--output results.json]
    torchrun --nproc-per-node G -m gradmem_fast capacity ...      (texts round robin over G processes, one
                                                                  report from rank 0: gradmem_fast.distributed)

The measure is the one of Kuratov et al. 2025 ("Cramming 1568 tokens into a single vector and back again"):
a frozen LM reads ``[M ; c_0 .. c_{t-1}]``, only the memory M (N vectors) is optimised with Adam, and the text
counts as stored when greedy decoding from M alone reproduces its first t tokens exactly. The capacity of
a text is the largest such t; tokens per vector = capacity / N.

Search: progressive. Stage s writes the target t_s = min(T_s, n) (n: the text's tokens) with
``StopRule(exact=True)`` and at most ``--max-steps`` steps, starting from the memory that decodes the longest
prefix proven so far (warm start; the config's initial memory before any):

    T_0 = --first (16)
    growth factor (default):  T_{s+1} = max(T_s + 1, ceil(T_s * --grow))        (grow 1.5 by default)
    growth linear:            T_{s+1} = T_s + --step
    stage s exact  ->  lo = t_s; if t_s == n the whole text is stored (capacity n, stop); else grow
    stage s fails  ->  hi = t_s, lo = max(lo, prefix_s); then the back-off (``--backoff``):
        none (default):  stop; capacity = lo
        bisect:  probe (lo + hi) // 2 until hi - lo <= 1 (an exact probe sets lo, a failed one sets hi and
                 lifts lo to its prefix); capacity = lo, and the target lo + 1 failed
        linear:  probe lo + 1, lo + 2, ... until the first failure (or lo + 1 == hi); capacity = lo

where ``prefix_s`` is how many leading tokens the failed stage's final memory decodes exactly (teacher-forced
argmax, which equals greedy decoding): that memory proves ``prefix_s`` tokens, so it becomes the warm start
of the back-off probes when it decodes more than the last exact stage. Every back-off probe starts from the
memory that proves lo, never from a failed probe's (as progressive_cramming's ``_run_geometric_stages``
restores its last converged state), so a probe below the capacity does not inherit a memory pulled towards a
longer target. ``x2`` growth with bisect back-off is the peer's "geometric growth"; linear growth with
``--step 1`` is its default. Every stage is recorded with its kind (grow, bisect or linear).

Why progressive: a memory that holds t tokens is most of the way to holding 1.5 t (exactness is monotone
enough in practice: a memory that decodes t tokens decodes every shorter prefix, and a longer target mostly
extends what the warm memory holds; when a failing stage's memory decodes less than its warm start did, seen
once in 8 texts on SmolLM2, the last exact memory is kept), so each stage reuses the previous stage's work and
only the last, failing stage runs its full budget. Bisection from scratch would restart every probe and spend
a full failing budget at each probe above the capacity (about log2(n) of them). Why 1.5 by default: a larger
factor means fewer stages (each stage costs at least one check and its Adam restart) but more new tokens to
learn per stage, so a stage may fail within its budget at a target the memory could reach in smaller steps;
the failed stage's ``prefix`` recovers most of an overshoot, which is what lets the factor be coarse, and a
back-off recovers the rest at the cost of more failing probes.

Adam moments (``moments``, ``--moments``): ``reset`` (default): only the memory carries over between
stages; Adam's moments and step counter restart at zero (``write`` gives each document fresh optimizer
state), so the first steps of a stage are bias-corrected full-size steps from the warm memory. ``keep``: a
stage also continues the Adam state of the memory it starts from (its moments, and its step count for the
bias correction: step t of the text in all, not of the stage), as progressive_cramming does: it builds one
optimizer per sample before its first stage (``_setup_batch`` -> ``_build_per_sample_optimizers``), steps it
through every stage, and its back-off restores a snapshot of the moments with the memory
(``_snapshot_optimization_state``); here a back-off probe continues the state of the memory proving lo. A
text's moments change only in the steps that update it (not in its stopping check, not once out of steps).
Adam and AdamW with full-rank memories; the learning-rate schedule still restarts each stage (the peer's
cosine schedule spans the sample's whole budget); eager slots (no CUDA-graph replay).

Resume (``resume``, CLI ``--resume-from``): a text may start from a memory known to decode its first lo
tokens (a stage of an earlier run's dataset output): lo counts as proven and the search starts at the growth
target after lo from that memory; lo == n is complete without a stage.

Batching: all texts progress together, one ``MemoryWriter.write`` per stage over the texts still searching,
each at its own target (texts in the growth ramp and in a back-off share a stage). Inside a stage each text
stops on its own (a stopped text leaves the batch's computation at the next check); a text waits for the
stage to end before its next probe; a text whose search is done drops out for good. The wall time of a stage
is its slowest text's, but the computation is only what each text needs.

Reported per text: tokens of the text, capacity, tokens per vector, information gain of the capacity prefix
in bits (loss of its tokens 1..t-1 without memory minus with the memory that decodes it,
``gradmem_fast.scoring``), total Adam steps over all stages, and every stage's target, steps, exact flag,
prefix and kind. The capacity is verified at the end: the memory that decodes it is scored again on exactly that
prefix (a write with step size 0 that stops at its first check), which also yields the information gain.

Texts are tokenized without special tokens and without an end-of-text token (the memory takes the place of
a BOS token; a prefix has no end). A text longer than the model's positions minus N is cut there (note).

Given tokens (``WriteConfig.given_tokens = g``, ``--given-tokens``): the first g tokens of every text are
inputs after the memory, not predictions (the cramming paper's convention with g = 1: the text starts with
BOS, or here its own first token, and the memory's own position predicts nothing). Targets, capacities and
prefixes then count the tokens after the given ones: a stage of target t writes ``c_0 .. c_{g+t-1}``, and the
capacity is the number of tokens after ``c_{g-1}`` that greedy decoding continues exactly; every such token
has a prediction without memory, so the information gain covers all of them.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

DEFAULT_FIRST = 16
DEFAULT_GROW = 1.5
DEFAULT_STEP = 1
DEFAULT_MAX_STEPS = 250
DEFAULT_LR = 0.2
PROG = "gradmem-fast capacity"
GROWTHS = ("factor", "linear")  # T * grow (today's default) or T + step
BACKOFFS = ("none", "bisect", "linear")  # after the first failing stage
MOMENTS = ("reset", "keep")  # Adam moments across stages (module docstring)

# on_stage(stage, target, texts, exact, seconds): after every stage, for progress lines (target: the largest
# target of the stage's texts).
StageCallback = Callable[[int, int, int, int, float], object]


@dataclasses.dataclass
class Stage:
    """One stage of one text: the target (tokens), the steps it took, whether it ended exact, its prefix, and
    its kind: ``grow`` (the growth ramp), ``bisect`` or ``linear`` (a back-off probe after the first failure)."""

    target: int
    steps: int
    exact: bool
    prefix: int
    kind: str = "grow"


@dataclasses.dataclass
class Capacity:
    """One text's result.

    Attributes:
        tokens: the text's tokens.
        capacity: the longest prefix decoded exactly (tokens).
        complete: whether the whole text is decoded exactly (then capacity == tokens: a lower bound of what
            the memory could hold).
        tokens_per_vector: capacity / N.
        info_gain_bits: information gain of the capacity prefix with ``memory`` (bits; 0 when capacity < 2).
        steps: Adam steps over all stages.
        stages: every stage, in order.
        memory: [N, d] the memory that decodes the capacity prefix (the initial memory when capacity is 0).
        stage_memories: with ``keep_stage_memories=True``, every stage's final memory [N, d], in order.
    """

    tokens: int
    capacity: int
    complete: bool
    tokens_per_vector: float
    info_gain_bits: float
    steps: int
    stages: list[Stage]
    memory: torch.Tensor
    stage_memories: list[torch.Tensor] | None = None


def next_target(target: int, grow: float = DEFAULT_GROW, growth: str = "factor", step: int = DEFAULT_STEP) -> int:
    """The growth target after ``target``: ``max(target + 1, ceil(target * grow))`` (``growth="factor"``) or
    ``target + step`` (``growth="linear"``)."""
    if growth == "linear":
        return target + step
    return max(target + 1, math.ceil(target * grow))


@dataclasses.dataclass
class _Search:
    """The search state of one text (module docstring, "Search"); ``probe`` is the target it writes next."""

    limit: int  # the longest target: the text's tokens after the given ones
    probe: int
    phase: str = "grow"  # grow, then bisect or linear (the back-off) after the first failure
    lo: int = 0  # the longest target proven: an exact stage, or the prefix a failed stage decodes
    hi: int | None = None  # the shortest target that failed
    anchor: torch.Tensor | None = None  # the memory that decodes lo tokens; None: the initial memory
    anchor_state: tuple | None = None  # moments="keep": the anchor's Adam state (exp_avg, exp_avg_sq, steps)
    best: torch.Tensor | None = None  # the reported memory (the anchor, else the last failed stage's)
    done: bool = False
    complete: bool = False

    def record(self, exact: bool, prefix: int, memory: torch.Tensor, growth: str, grow: float, step: int,
               backoff: str, state: tuple | None = None) -> None:  # fmt: skip
        """Move on after a stage of target ``self.probe`` (``state``: its final Adam state with moments="keep"):
        the next probe, or ``done``."""
        t = self.probe
        if exact:
            self.lo, self.anchor, self.best, self.anchor_state = t, memory, memory, state
            if t == self.limit:
                self.done = self.complete = True
            elif self.phase == "grow":
                self.probe = min(next_target(t, grow, growth, step), self.limit)
            else:
                self._back_off()
            return
        self.hi = t
        if prefix > self.lo or self.best is None:
            self.best = memory
        if prefix > self.lo:
            self.lo, self.anchor, self.anchor_state = prefix, memory, state
        if backoff == "none" or self.phase == "linear":
            self.done = True  # linear back-off: the first failure pins the capacity at lo
            return
        self.phase = backoff
        self._back_off()

    def _back_off(self) -> None:
        """The next back-off probe inside the bracket (lo, hi), or ``done`` when the bracket is closed."""
        assert self.hi is not None
        if self.hi - self.lo <= 1:
            self.done = True
        elif self.phase == "bisect":
            self.probe = (self.lo + self.hi) // 2
        else:
            self.probe = self.lo + 1


def _check_writer(writer) -> None:
    stop = writer.config.stop
    if stop is None or not stop.exact or stop.loss is not None or stop.accuracy is not None:
        raise ValueError(
            "capacity needs a writer whose config stops on exact decoding only: "
            "WriteConfig(stop=StopRule(exact=True)) without loss or accuracy criteria"
        )
    if writer.config.memory_basis == "learned":
        raise ValueError(
            "capacity: memory_basis='learned' is refused: every stage warm-starts from the earlier memories, which "
            "a basis restarted per write cannot hold (memory_basis='pca' holds them exactly)"
        )


def _check_search(first, grow, growth, step, backoff, moments) -> None:
    """Every search option, each bad one named."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"first must be an int >= 1, got {first!r}")
    if isinstance(grow, bool) or not isinstance(grow, (int, float)) or not (1.0 < grow < float("inf")):
        raise ValueError(f"grow must be a finite number > 1, got {grow!r}")
    if growth not in GROWTHS:
        raise ValueError(f"growth must be one of {GROWTHS}, got {growth!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    if backoff not in BACKOFFS:
        raise ValueError(f"backoff must be one of {BACKOFFS}, got {backoff!r}")
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")


def _batch(docs: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask [B, S] of 1-D token tensors."""
    S = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), S, dtype=torch.long)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, : len(d)], mask[b, : len(d)] = d, 1
    return ids.to(device), mask.to(device)


def progressive_capacity(
    writer,
    documents: Sequence[torch.Tensor | Sequence[int]],
    first: int = DEFAULT_FIRST,
    grow: float = DEFAULT_GROW,
    on_stage: StageCallback | None = None,
    keep_stage_memories: bool = False,
    on_text_stage: Callable[[int, int, Stage, float], object] | None = None,
    growth: str = "factor",
    step: int = DEFAULT_STEP,
    backoff: str = "none",
    moments: str = "reset",
    resume: Sequence[tuple[int, torch.Tensor] | None] | None = None,
) -> list[Capacity]:
    """The capacity of ``writer.config.num_memory_tokens`` vectors for every document (module docstring).

    ``writer``: a ``MemoryWriter`` whose config has ``stop=StopRule(exact=True)`` (no other criterion);
    ``config.steps`` is each stage's budget. ``documents``: non-empty 1-D token-id sequences.
    ``growth``/``grow``/``step``: the growth rule (``next_target``); ``backoff``: none, bisect or linear
    (after the first failing stage); ``moments``: reset (Adam restarts every stage).
    ``resume``: per document None or ``(lo, memory)``: ``memory`` [m, d] decodes the first ``lo`` tokens
    (after the given ones) exactly, e.g. a stage of an earlier run; the search starts from it at the growth
    target after ``lo``.
    ``keep_stage_memories``: also return every stage's final memory (``Capacity.stage_memories``).
    ``on_text_stage(index, stage, Stage, seconds)``: after every stage, for each text it wrote.
    """
    _check_writer(writer)
    _check_search(first, grow, growth, step, backoff, moments)
    if moments == "keep" and (
        writer.config.optimizer not in ("adam", "adamw") or writer.config.memory_rank is not None
    ):
        raise ValueError(
            "moments='keep' continues each text's Adam state: it needs optimizer adam or adamw and full-rank "
            "memories (memory_rank None)"
        )
    docs = [writer._as_document(d, i) for i, d in enumerate(documents)]
    if not docs:
        raise ValueError("documents must hold at least one document")
    g = writer.config.given_tokens
    short = [i for i, d in enumerate(docs) if len(d) <= g]
    if short:
        raise ValueError(
            f"documents: document {short[0]} has {len(docs[short[0]])} tokens, no more than given_tokens={g} "
            "(nothing left to decode)"
        )
    n = len(docs)
    if resume is not None and len(resume) != n:
        raise ValueError(f"resume must hold one entry per document ({n}), got {len(resume)}")
    device = writer.model.get_input_embeddings().weight.device
    emb_dtype = writer.model.get_input_embeddings().weight.dtype
    memory_dtype = torch.float32 if emb_dtype in (torch.float16, torch.bfloat16) else emb_dtype  # as write's
    searches = []
    for i, d in enumerate(docs):
        limit = len(d) - g
        s = _Search(limit=limit, probe=min(first, limit))
        point = None if resume is None else resume[i]
        if point is not None:
            lo, start_memory = point
            if isinstance(lo, bool) or not isinstance(lo, int) or not 0 <= lo <= limit:
                raise ValueError(f"resume: document {i} resumes from {lo!r} tokens; it has {limit} to decode")
            s.lo, s.anchor = lo, start_memory.to(device=device, dtype=memory_dtype)
            s.best = s.anchor
            s.probe = min(next_target(lo, grow, growth, step), limit) if lo > 0 else s.probe
            s.done = s.complete = lo == limit
        searches.append(s)
    steps = [0] * n
    stages: list[list[Stage]] = [[] for _ in range(n)]
    kept: list[list[torch.Tensor]] = [[] for _ in range(n)]
    init: torch.Tensor | None = None  # the config's initial memory, for a stage that mixes starts
    active = [i for i in range(n) if not searches[i].done]
    stage = 0
    while active:
        start = time.perf_counter()
        probes = [searches[i].probe for i in active]
        ids, mask = _batch([docs[i][: g + t] for i, t in zip(active, probes)], device)
        anchors = [searches[i].anchor for i in active]
        memory = None  # every text from the config's seeded initial memory (stage 0 without resume)
        if any(a is not None for a in anchors):
            if init is None and any(a is None for a in anchors):
                from .inputs import initial_memory

                init = initial_memory(None, 1, writer.config, writer.model, device)[0]
            memory = torch.stack([init if a is None else a for a in anchors])  # type: ignore[misc]
        if moments == "keep":
            result, states = _write_keeping(writer, ids, mask, memory, [searches[i].anchor_state for i in active])
        else:
            with torch.no_grad():
                result = writer.write(ids, mask, memory=memory)
            states = [None] * len(active)
        st = result.stats
        for row, i in enumerate(active):
            s, t = searches[i], probes[row]
            exact, prefix = bool(st.exact[row]), int(st.prefix[row])
            steps[i] += int(st.steps[row])
            stages[i].append(Stage(t, int(st.steps[row]), exact, prefix, s.phase))
            M = result.memory[row].detach()
            if keep_stage_memories:
                kept[i].append(M.cpu())
            s.record(exact, prefix, M, growth, grow, step, backoff, states[row])
        if on_text_stage is not None:
            seconds = time.perf_counter() - start
            for i in active:
                on_text_stage(i, len(stages[i]) - 1, stages[i][-1], seconds)
        if on_stage is not None:
            on_stage(
                stage,
                max(probes),
                len(active),
                sum(stages[i][-1].exact for i in active),
                time.perf_counter() - start,
            )
        active = [i for i in active if not searches[i].done]
        stage += 1
    capacity = [s.lo for s in searches]
    best = [s.best for s in searches]
    gains = _verify(writer, docs, capacity, best)
    m = writer.config.num_memory_tokens
    return [
        Capacity(
            tokens=len(docs[i]),
            capacity=capacity[i],
            complete=searches[i].complete and g + capacity[i] == len(docs[i]),
            tokens_per_vector=capacity[i] / m,
            info_gain_bits=gains[i],
            steps=steps[i],
            stages=stages[i],
            memory=best[i],  # type: ignore[arg-type]
            stage_memories=kept[i] if keep_stage_memories else None,
        )
        for i in range(n)
    ]


def _write_keeping(writer, ids, mask, memory, states):
    """One stage with ``moments="keep"``: the write of ``writer.write`` with a StopRule (``cramming.cram``),
    each row continuing from its Adam state (None: zero moments, no steps taken); returns the write's result
    (memory and stats) and each row's final state."""
    from . import cramming
    from .inputs import prepare_write
    from .packing import documents_from_batch
    from .result import WriteResult

    ids, mask, M, head_weight, head_bias = prepare_write(
        writer.model, ids, mask, memory, writer.config, writer.write_head
    )
    docs = [doc.cpu() for doc in documents_from_batch(ids, mask)]
    zero = torch.zeros(M.shape[1:], dtype=torch.float64 if M.dtype == torch.float64 else torch.float32)
    first = torch.stack([zero if s is None else s[0].cpu() for s in states])
    second = torch.stack([zero if s is None else s[1].cpu() for s in states])
    taken = torch.tensor([0 if s is None else s[2] for s in states], dtype=torch.int64)
    with torch.no_grad():
        done = dict(cramming.cram(writer, docs, M.detach(), (head_weight, head_bias), moments=(first, second, taken)))
    ordered = [done[i] for i in range(len(docs))]
    stats = cramming.stack_stats(ordered, writer.config.num_memory_tokens)
    nan = torch.full((0, len(docs)), math.nan)
    result = WriteResult(memory=torch.stack([r.memory for r in ordered]), losses=nan, grad_norms=nan, stats=stats)
    return result, [r.moments for r in ordered]


def _verify(writer, docs, capacity: list[int], best: list) -> list[float]:
    """Score every capacity prefix with the memory that decodes it; shrink a capacity the scoring does not
    confirm (a near tie of two logits may flip between batch shapes in low precision), and return the
    information gain of each prefix in bits (0 for capacity < 2 without given tokens: no token has a
    prediction without memory; with given tokens every decoded token has one).

    The scoring is a write with step size 0 stopping on exact decoding: its first check reads the given
    memory; a prefix that does not decode exactly gets one step of size 0 (no change) and the final check
    reports its prefix.
    """
    from .writer import MemoryWriter

    # Scoring reads the memory as it is: no alignment term (it changes no score, and its text run would be
    # wasted work) and no low-rank parametrisation (which would score its projection onto a basis).
    config = dataclasses.replace(
        writer.config,
        steps=1,
        lr=0.0,
        schedule=None,
        alignment_weight=0.0,
        alignment_layers=None,
        memory_rank=None,
        memory_basis="pca",
        basis_lr=None,
    )
    scorer = MemoryWriter(writer.model, config, backend=writer.backend, write_head=writer.write_head, compile=False)
    gains = [0.0] * len(docs)
    device = writer.model.get_input_embeddings().weight.device
    g = config.given_tokens
    gain_from = 2 if g == 0 else 1
    todo = [i for i in range(len(docs)) if capacity[i] >= 1]
    while todo:
        ids, mask = _batch([docs[i][: g + capacity[i]] for i in todo], device)
        with torch.no_grad():
            st = scorer.write(ids, mask, memory=torch.stack([best[i] for i in todo])).stats
        again = []
        for row, i in enumerate(todo):
            prefix = int(st.prefix[row])
            if prefix < capacity[i]:
                capacity[i] = prefix
                if prefix >= 1:
                    again.append(i)
            else:
                gains[i] = float(st.info_gain_bits[row]) if capacity[i] >= gain_from else 0.0
        todo = again
    return gains


def summary(results: Sequence[Capacity]) -> dict:
    """Mean and median capacity, tokens per vector and information gain over the texts."""
    tpv = [r.tokens_per_vector for r in results]
    cap = [r.capacity for r in results]
    gain = [r.info_gain_bits for r in results]
    return {
        "texts": len(results),
        "complete": sum(r.complete for r in results),
        "mean_tokens_per_vector": statistics.fmean(tpv),
        "median_tokens_per_vector": statistics.median(tpv),
        "mean_capacity": statistics.fmean(cap),
        "median_capacity": statistics.median(cap),
        "mean_info_gain_bits": statistics.fmean(gain),
        "median_info_gain_bits": statistics.median(gain),
        "total_steps": sum(r.steps for r in results),
    }


# --- command line ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """Options of ``gradmem-fast capacity``."""
    from . import datasets_io

    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face model name, a local directory, or smollm2-135m-instruct (the embedded GGUF model)",
    )
    p.add_argument("--memory-tokens", type=int, required=True, help="memory vectors per text (N)")
    datasets_io.add_source_arguments(p, "text")
    p.add_argument(
        "--output",
        default=None,
        help="results file (JSON, written when complete), or a folder with --output-format dataset; default: none",
    )
    p.add_argument(
        "--output-format",
        choices=["json", "dataset"],
        default="json",
        help="json (default): the report; dataset: a Hugging Face Dataset folder (save_to_disk) with one row per "
        "stage of every text (id, stage, target, steps, converged, prefix, memory), the report beside it",
    )
    p.add_argument("--force", action="store_true", help="replace --output if it exists (never an input file)")
    p.add_argument("--text-field", default="text", help="field holding a text (default: text)")
    p.add_argument("--id-field", default="id", help="field holding a text's id (default: id, else the line number)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help=f"Adam steps at most per stage (default {DEFAULT_MAX_STEPS})",
    )
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam step size (default {DEFAULT_LR})")
    p.add_argument(
        "--optimizer",
        choices=["adam", "adamw"],
        default="adam",
        help="adam (default) or adamw (decoupled --weight-decay, as torch.optim.AdamW)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="--optimizer adamw: decoupled weight decay")
    p.add_argument(
        "--check-every",
        type=int,
        default=None,
        help="steps between exact-decoding checks (default 1 on a CPU, where a check costs nothing; 10 on a GPU)",
    )
    p.add_argument("--first", type=int, default=DEFAULT_FIRST, help=f"first target, tokens (default {DEFAULT_FIRST})")
    p.add_argument(
        "--grow",
        type=float,
        default=DEFAULT_GROW,
        help=f"--growth factor: factor from one exact target to the next (> 1, default {DEFAULT_GROW})",
    )
    p.add_argument(
        "--growth",
        choices=list(GROWTHS),
        default="factor",
        help="factor (default): the next target is max(T + 1, ceil(T * --grow)); linear: T + --step",
    )
    p.add_argument(
        "--step",
        type=int,
        default=DEFAULT_STEP,
        help=f"--growth linear: tokens added per stage (default {DEFAULT_STEP})",
    )
    p.add_argument(
        "--backoff",
        choices=list(BACKOFFS),
        default="none",
        help="after the first failing stage: none (default; stop, capacity = the longest prefix proven), bisect "
        "(bisect between it and the failed target) or linear (+1 token per stage until a stage fails); "
        "every back-off probe starts from the memory of the longest prefix proven",
    )
    p.add_argument(
        "--moments",
        choices=list(MOMENTS),
        default="reset",
        help="Adam moments across stages: reset (default: each stage starts Adam afresh) or keep (a stage "
        "continues the moments and step count of the memory it starts from, as progressive_cramming does)",
    )
    p.add_argument(
        "--resume-from",
        default=None,
        help="a dataset folder of an earlier capacity run (--output-format dataset): each text (by id) starts from "
        "the memory of its stage proving the longest prefix (a converged stage's target, else its prefix)",
    )
    p.add_argument(
        "--resume-stage",
        type=int,
        default=None,
        help="--resume-from: consider only the stages up to this index (default: all)",
    )
    p.add_argument("--init-std", type=float, default=0.02, help="std of the initial memory (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial memory (default 0)")
    from .cli_common import add_init_arguments

    add_init_arguments(p, warm=False)
    from .cli_common import add_alignment_arguments

    add_alignment_arguments(p)
    p.add_argument(
        "--given-tokens",
        type=int,
        default=0,
        help="leading tokens of each text given after the memory, not decoded (1: the cramming paper's "
        "convention; default 0: the memory decodes the text from its first token)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, float64",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="auto: triton kernels on CUDA, the torch reference on CPU",
    )
    p.add_argument("--quiet", action="store_true", help="no per-stage lines")
    from .runlog import add_argument as add_logdir

    add_logdir(p)


def _config(args):
    """The WriteConfig of the options (every bad value named by its flag), checked before anything loads."""
    from .config import StopRule, WriteConfig, default_check_every
    from .errors import UserError
    from .models import resolve_device

    if args.check_every is None:
        args.check_every = default_check_every(resolve_device(args.device))
    for flag, value in (
        ("--memory-tokens", args.memory_tokens),
        ("--max-steps", args.max_steps),
        ("--check-every", args.check_every),
        ("--first", args.first),
        ("--step", args.step),
    ):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.given_tokens < 0:
        raise UserError(f"--given-tokens must be >= 0, got {args.given_tokens}")
    if not 0 < args.lr < float("inf"):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 1 < args.grow < float("inf"):
        raise UserError(f"--grow must be a finite number > 1, got {args.grow}")
    if args.resume_stage is not None and (args.resume_from is None or args.resume_stage < 0):
        raise UserError("--resume-stage needs --resume-from and must be >= 0")
    if not 0 <= args.init_std < float("inf"):
        raise UserError(f"--init-std must be a finite number >= 0, got {args.init_std}")
    from .cli_common import check_init_arguments, check_weight_decay

    check_init_arguments(args)
    check_weight_decay(args)
    if args.moments == "keep" and getattr(args, "memory_rank", None) is not None:
        raise UserError("--moments keep needs full-rank memories (no --memory-rank)")
    from .cli_common import lowrank_options

    lowrank = lowrank_options(args, learned=False)
    from .cli_common import alignment_options

    alignment = alignment_options(args)
    return WriteConfig(
        num_memory_tokens=args.memory_tokens,
        steps=args.max_steps,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        init_std=args.init_std,
        seed=args.seed,
        init=args.init,
        init_rank=args.init_rank,
        **lowrank,
        stop=StopRule(exact=True, check_every=args.check_every),
        given_tokens=args.given_tokens,
        **alignment,
    )


def run(args) -> int:
    """``gradmem-fast capacity`` with parsed arguments; returns the exit status (errors raise UserError)."""
    from . import cli_common, datasets_io, distributed, fileio, runlog
    from .errors import UserError
    from .models import load_model, load_tokenizer, max_positions, quiet_transformers

    # 1. Everything that needs no model: options, paths, the input file, the device.
    config = _config(args)
    if args.output is not None and args.output_format == "dataset":
        from .dataset_files import check_folder_output

        datasets_io._import_datasets()  # missing library: an error now, not after the search
        check_folder_output(args.output, [("--input", args.input)], args.force)
    elif args.output is not None:
        fileio.check_output(args.output, [("--input", args.input)], args.force)
    elif args.output_format == "dataset":
        raise UserError("--output-format dataset needs --output FOLDER")
    records = datasets_io.read_records(args)
    runlog.check_logdir(args.logdir, args.log_format)
    if args.resume_from is not None:
        _resume_metadata(args.resume_from)
    ctx = distributed.from_environment()  # torchrun: this process searches its share of the texts
    device = cli_common.device_and_dtype(args, ctx.local_rank)

    # 2. The tokenizer: every text is checked before the weights load.
    quiet_transformers()
    tokenizer, model_config = load_tokenizer(args.model)
    cli_common.check_memory_rank(config, model_config)
    positions = max_positions(model_config)
    limit = None if positions is None else positions - config.num_memory_tokens
    if limit is not None and limit < 1:
        raise UserError(f"--memory-tokens {config.num_memory_tokens} leaves no room for text in {positions} positions")
    token_lists = tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]
    docs, cut = [], 0
    for record, tokens in zip(records, token_lists):
        if not record.text.strip() or not tokens:
            raise UserError(f"{datasets_io.source_name(args)}:{record.line}: empty text (id {json.dumps(record.id)})")
        if len(tokens) <= config.given_tokens:
            raise UserError(
                f"{datasets_io.source_name(args)}:{record.line}: text of {len(tokens)} token(s) has nothing after "
                f"--given-tokens {config.given_tokens} (id {json.dumps(record.id)})"
            )
        if limit is not None and len(tokens) > limit:
            tokens, cut = tokens[:limit], cut + 1
        docs.append(torch.tensor(tokens, dtype=torch.long))
    if cut:
        cli_common.note(
            "capacity", f"note: {cut} text(s) cut to {limit} tokens (the model's positions minus the memory)"
        )
    resume = None
    if args.resume_from is not None:
        resume = _resume_points(args, records, docs, config)

    # 3. The weights.
    from .writer import MemoryWriter

    model, tokenizer = load_model(args.model, args.dtype, device, tokenizer=tokenizer)
    try:
        writer = MemoryWriter(model, config, backend=args.backend)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"cannot write with model {args.model!r}: {exc}") from None

    def on_stage(stage, target, texts, exact, seconds):
        if not args.quiet and ctx.is_main:
            cli_common.note(
                "capacity",
                f"stage {stage}: target {target} tokens, {texts} text(s), {exact} exact, {seconds:.1f} s",
            )

    start = time.perf_counter()
    dataset_out = args.output is not None and args.output_format == "dataset"
    ctx = distributed.start(ctx, device)
    mine = ctx.my_shards(len(docs))  # the texts this process searches (all of them without torchrun)

    # the longest prefix proven so far per text (the search's lo; an exact stage's target, a failed one's prefix)
    proven = [0 if resume is None or resume[i] is None else resume[i][0] for i in mine]

    def on_text_stage(j, stage, st, seconds):
        proven[j] = max(proven[j], st.target if st.exact else st.prefix)
        log.record("stage", id=records[mine[j]].id, stage=stage, target=st.target, steps=st.steps, exact=st.exact,
                   prefix=st.prefix, kind=st.kind, proven=proven[j], seconds=round(seconds, 3))  # fmt: skip

    log = runlog.open_log(args.logdir, "capacity", vars(args), ctx.rank)
    try:
        searched = (
            []
            if not mine
            else progressive_capacity(  # more processes than texts: nothing to do
                writer,
                [docs[i] for i in mine],
                first=args.first,
                grow=args.grow,
                on_stage=on_stage,
                keep_stage_memories=dataset_out,
                on_text_stage=on_text_stage if args.logdir is not None else None,
                growth=args.growth,
                step=args.step,
                backoff=args.backoff,
                moments=args.moments,
                resume=None if resume is None else [resume[i] for i in mine],
            )
        )
        for r in searched:  # pickled to rank 0 under torchrun: CPU tensors
            r.memory = r.memory.cpu()
        if ctx.world_size > 1 and not args.quiet:
            print(f"rank {ctx.rank}/{ctx.world_size}: searched {len(mine)} text(s)", file=sys.stderr, flush=True)
        shares = distributed.gather_to_main(ctx, (mine, searched))
    finally:
        log.close()
        distributed.stop(ctx)
    if shares is None:
        return 0  # not rank 0: rank 0 reports
    merged: list = [None] * len(docs)
    for indices, share in shares:
        for i, r in zip(indices, share):
            merged[i] = r
    results: list[Capacity] = merged
    wall = time.perf_counter() - start
    report = {
        "format": "gradmem-fast.capacity",
        "model": args.model,
        "memory_tokens": config.num_memory_tokens,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(device),
        "backend": writer.backend,
        "threads": torch.get_num_threads(),
        "processes": ctx.world_size,
        "method": "progressive",
        "settings": {
            "first": args.first,
            "grow": args.grow,
            "growth": args.growth,
            "step": args.step,
            "backoff": args.backoff,
            "moments": args.moments,
            "resume_from": args.resume_from,
            "resume_stage": args.resume_stage,
            "max_steps_per_stage": config.steps,
            "lr": config.lr,
            "optimizer": config.optimizer,
            "weight_decay": config.weight_decay,
            "check_every": args.check_every,
            "init_std": config.init_std,
            "init": config.init,
            "init_rank": config.init_rank,
            "seed": config.seed,
            "given_tokens": config.given_tokens,
            "alignment_weight": config.alignment_weight,
            "alignment_layers": config.alignment_layers,
        },
        "versions": cli_common.versions(),
        "wall_seconds": wall,
        "summary": summary(results),
        "texts": [
            {
                "id": record.id,
                "tokens": r.tokens,
                "capacity": r.capacity,
                "complete": r.complete,
                "tokens_per_vector": r.tokens_per_vector,
                "info_gain_bits": r.info_gain_bits,
                "steps": r.steps,
                "stages": [dataclasses.asdict(s) for s in r.stages],
            }
            for record, r in zip(records, results)
        ],
    }
    if dataset_out:
        from .dataset_files import write_capacity_dataset

        write_capacity_dataset(args.output, report, [r.id for r in records], results)
    elif args.output is not None:
        with fileio.atomic_output(args.output) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=1)
                fh.write("\n")
    print(format_table(report))
    return 0


def _resume_points(args, records, docs, config) -> list:
    """``--resume-from``: per text, None or (lo, memory) from an earlier run's dataset folder: the stage (up to
    ``--resume-stage``) proving the longest prefix: a converged stage's target, else its prefix."""
    from . import datasets_io
    from .errors import UserError

    path = args.resume_from
    meta = _resume_metadata(path)
    earlier = json.loads(meta["report"])
    for key, value in (("memory_tokens", config.num_memory_tokens), ("model", args.model)):
        if earlier.get(key) != value:
            raise UserError(f"--resume-from {path!r} was run with {key} {earlier.get(key)!r}, this run with {value!r}")
    if earlier["settings"].get("given_tokens") != config.given_tokens:
        raise UserError(
            f"--resume-from {path!r} was run with --given-tokens {earlier['settings'].get('given_tokens')}, "
            f"this run with {config.given_tokens}"
        )
    ds = datasets_io._import_datasets().load_from_disk(path).with_format("torch")
    best: dict = {}  # id (as JSON) -> (lo, row)
    for row, (doc_id, stage, target, converged, prefix) in enumerate(
        zip(ds["id"], ds["stage"], ds["target"], ds["converged"], ds["prefix"])
    ):
        if args.resume_stage is not None and int(stage) > args.resume_stage:
            continue
        key = doc_id if meta.get("ids_format") == "json" else json.dumps(_plain_id(doc_id))
        lo = int(target) if bool(converged) else int(prefix)
        if lo > 0 and lo > best.get(key, (0, None))[0]:
            best[key] = (lo, row)
    points: list[tuple[int, torch.Tensor] | None] = []
    for record, doc in zip(records, docs):
        found = best.get(json.dumps(record.id))
        if found is None:
            points.append(None)
            continue
        lo, row = found
        if lo > len(doc) - config.given_tokens:
            raise UserError(
                f"--resume-from {path!r}: text {json.dumps(record.id)} resumes from {lo} tokens; it has only "
                f"{len(doc) - config.given_tokens} to decode"
            )
        points.append((lo, ds[row]["memory"]))
    return points


def _resume_metadata(path: str) -> dict:
    """The metadata of a ``--resume-from`` folder (checked before anything loads)."""
    from .dataset_files import MARKER, is_dataset_folder
    from .errors import UserError

    if not is_dataset_folder(path):
        raise UserError(f"--resume-from {path!r} is not a dataset folder of `capacity --output-format dataset`")
    with open(os.path.join(path, MARKER), encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != "gradmem-fast.capacity":
        raise UserError(f"--resume-from {path!r} holds {meta.get('format')!r}, not a capacity run")
    return meta


def _plain_id(value):
    """A dataset id cell as a plain int or str."""
    item = getattr(value, "item", None)
    return item() if item is not None else value


def format_table(report: dict) -> str:
    """The per-text table and the summary line of a report."""
    lines = [f"{'id':>12} {'tokens':>6} {'capacity':>8} {'tok/vec':>8} {'gain bits':>9} {'steps':>6}"]
    for t in report["texts"]:
        mark = "*" if t["complete"] else " "
        lines.append(
            f"{str(t['id']):>12} {t['tokens']:>6} {t['capacity']:>7}{mark} {t['tokens_per_vector']:>8.1f} "
            f"{t['info_gain_bits']:>9.1f} {t['steps']:>6}"
        )
    s = report["summary"]
    lines.append(
        f"tokens per vector: mean {s['mean_tokens_per_vector']:.1f}, median {s['median_tokens_per_vector']:.1f} "
        f"over {s['texts']} text(s) ({s['complete']} decoded whole, marked *: a lower bound); "
        f"{report['wall_seconds']:.0f} s"
    )
    return "\n".join(lines)
