"""Many-step writing ("cramming"): every document stops when it is learned; waiting documents take its slot.

A frozen pretrained LM needs hundreds of Adam steps to store a document in a few memory vectors, and
documents converge at very different speeds. ``cram`` writes a stream of documents with a ``StopRule``:

    tick t = 0, 1, 2, ...          one optimisation step of every document in flight: forward, loss,
                                   gradient, fused update with lr_b = lr * schedule(age_b), Adam step age_b + 1
                                   (age_b: the updates document b has taken; a document that has taken all
                                   WriteConfig.steps gets lr_b = 0 and stays frozen until the next check)
    every c-th tick (a check),     the step's own forward also scores every document on the memory it
    c = min(check_every,           started the tick with (``gradmem_fast.scoring``: teacher-forced argmax,
        WriteConfig.steps + 1)     loss, exact prefix, from the logits the step computed anyway on the
                                   torch backend, from its hidden rows with one head product on the engine);
                                   a document whose rule holds gets lr_b = 0 in this tick's update, so it
                                   keeps exactly the memory that was scored; then the loop's only host read,
                                   one small [7, B] transfer, retires the stopped documents and those out of
                                   steps, and waiting documents take the freed slots (fresh memory, zero Adam
                                   moments, their own age and schedule)

Documents enter only right after a check, so every document is checked in the forward of its own steps
c, 2c, 3c, ...: on the memories of c - 1, 2c - 1, 3c - 1, ... updates (``steps`` reports the updates
taken). Its computation depends only on its own tokens, memory and age, so its memory and stopping step
are those of writing it alone with the same rule (the tests check this, fp64 on the torch backend and
fp32 on the engine). No forward runs only to check: a check costs the scoring of logits (torch backend)
or one head product (engine), and one host read.

Capacity of a batch: at most ``slots`` documents and ``batch_tokens`` packed rows (memory rows included)
in flight. The backends: the torch reference (padded batch, eager autograd) or the engine (documents
packed back to back, fused ops, the compiled backbone on CUDA); a new batch is built only when its
composition changes, at a check.
"""

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import alignment as align
from . import engine, hf, lowrank
from .backend import use_backend
from .inputs import head_logit_transform
from .ops.cross_entropy import postprocess_logits
from .ops.update import AdamState, memory_update
from .packing import IGNORE_INDEX
from .result import DocumentStats
from .scoring import LN2, DocumentScores, no_memory_tail, score_logits, score_rows

# on_check(done, in_flight, waiting, steps): after every check, with the counts of documents and the number
# of document-steps taken so far (the progress bar's input).
CheckCallback = Callable[[int, int, int, int], object]
# on_document_check(index, step, loss, accuracy, exact, prefix): every document at every check, from the
# check's own host read (``--logdir``).
DocumentCheckCallback = Callable[[int, int, float, float, bool, int], object]


@dataclasses.dataclass
class CrammedDocument:
    """One document's result: its final memory [m, d] and its statistics (see ``DocumentStats``)."""

    memory: torch.Tensor
    steps: int
    stopped: bool
    loss: float
    accuracy: float
    exact: bool
    prefix: int
    initial_loss: float
    info_gain_bits: float
    tokens: int
    # With cram(moments=...): (exp_avg, exp_avg_sq [m, d], Adam steps taken in all) after its last update.
    moments: tuple[torch.Tensor, torch.Tensor, int] | None = None


def stack_stats(documents: Sequence[CrammedDocument], num_memory_tokens: int) -> DocumentStats:
    """The ``DocumentStats`` [B] of a list of results, in that order (CPU tensors)."""

    def column(name, dtype):
        return torch.tensor([getattr(d, name) for d in documents], dtype=dtype)

    tokens = column("tokens", torch.int64)
    prefix = column("prefix", torch.int64)
    return DocumentStats(
        steps=column("steps", torch.int64),
        stopped=column("stopped", torch.bool),
        loss=column("loss", torch.float64),
        accuracy=column("accuracy", torch.float64),
        exact=column("exact", torch.bool),
        prefix=prefix,
        initial_loss=column("initial_loss", torch.float64),
        info_gain_bits=column("info_gain_bits", torch.float64),
        tokens=tokens,
        tokens_per_vector=prefix.double() / num_memory_tokens,
    )


class _Batch:
    """The documents in flight, their memories, Adam moments, ages and initial losses; ``run`` steps them.

    Backend-specific parts (inputs, one step's loss and scores) live in the two subclasses.
    Rows past ``real`` are filler (the engine's bucket padding): lr 0, never reported.
    """

    def __init__(
        self,
        writer,
        docs: list[torch.Tensor],
        memory,
        state: AdamState | None,
        ages,
        initial,
        head,
        low=None,
        z=None,
        offsets=None,
    ):
        self.writer, self.config = writer, writer.config
        self.model = writer.model
        self.head_weight, self.head_bias = head
        self.transform = head_logit_transform(self.model, self.head_weight)  # the model's logit post-processing
        self.docs = docs
        self.real = len(docs)
        self._build(docs)
        rows = self.rows
        filler = rows - self.real
        self.memory = torch.cat([memory, memory.new_zeros(filler, *memory.shape[1:])]) if filler else memory
        # Low-rank memories (gradmem_fast.lowrank): the basis shared by the stream and each row's coefficients
        # z (the Adam state is then z's); ``memory`` stays the rows' full memories, what the forward reads.
        self.low: lowrank.LowRankBasis | None = low
        self.z = None if z is None else (torch.cat([z, z.new_zeros(filler, *z.shape[1:])]) if filler else z)
        if self.config.optimizer in ("adam", "adamw"):
            assert state is not None
            self.state: AdamState | None = AdamState(
                *(torch.cat([s, s.new_zeros(filler, *s.shape[1:])]) if filler else s for s in state)
            )
        else:
            self.state = None
        device = memory.device
        K = self.config.steps
        lr_dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
        # lr of step k: table[k]; a document past its last step (or filler, age K) gets table[K] = 0.
        table = [self.config.lr_at(k) for k in range(K)] + [0.0]
        self.lr_table = torch.tensor(table, dtype=lr_dtype, device=device)
        self.ages = torch.tensor(list(ages) + [K] * filler, dtype=torch.int64, device=device)
        # The loss of each document's first step (its initial memory), filled in by that step on the device.
        self.initial = torch.cat([initial, initial.new_full((filler,), math.nan)]) if filler else initial
        # cram(moments=...): each row's Adam steps before this write (its bias correction continues from them);
        # its moments then change only in the steps it updates. None: every write starts Adam afresh.
        self.offsets = None if offsets is None else torch.cat([offsets, offsets.new_zeros(filler)])

    rows: int

    def _build(self, docs: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _loss(self, M: torch.Tensor, score: bool) -> tuple[torch.Tensor, torch.Tensor, DocumentScores | None]:
        """The objective [rows] the step differentiates, the losses [rows] of memories ``M`` (the reported
        cross-entropy; the objective adds alpha times the alignment term on the torch backend, else it is the
        loss) and, if ``score``, the scores of ``M`` (detached) from the same forward."""
        raise NotImplementedError

    def _contexts(self):
        raise NotImplementedError

    def run(self, steps: int, rule) -> "RunOutput":
        """``steps`` optimisation steps of every document, the last of them a check; nothing is read back to
        the host. The batch moves on to the returned memories, moments, ages and initial losses; the output
        also holds the scores of the memories the check step started from, the flags of the documents whose
        ``rule`` held there (their update was skipped: their memory is still the scored one) and the per-step
        record (ages, losses, grad norms)."""
        out = self.steps(self.memory, self.state, self.ages, self.initial, steps, rule, self.z)
        self.memory, self.state, self.ages, self.initial = out.memory, out.state, out.ages, out.initial
        self.z = out.z
        return out

    def steps(self, memory, state, ages, initial, steps: int, rule, z=None) -> "RunOutput":
        """``run`` as a function of the batch's changing state (no attribute changes): what a CUDA graph
        captures, with the packing, embeddings and weights as its fixed inputs."""
        K = self.config.steps
        logged_ages, losses, norms = [], [], []
        with self._contexts(), torch.enable_grad():
            for t in range(steps):
                check = t == steps - 1
                Mk = memory.detach().requires_grad_(True)
                objective, loss, scores = self._loss(Mk, check)
                (grad,) = torch.autograd.grad(objective.sum(), Mk)
                index = ages.clamp(max=K)
                lr = self.lr_table[index]
                logged = ages
                with torch.no_grad():
                    initial = torch.where(ages == 0, loss.detach().to(initial.dtype), initial)
                    if check:
                        assert scores is not None
                        stop = _satisfied_on_device(rule, scores)
                        lr = torch.where(stop, torch.zeros_like(lr), lr)
                        # A stopped document's check step took no update: its record goes to the row K.
                        logged = torch.where(stop, K, ages)
                    if self.low is not None:
                        # A stopped or frozen document (lr 0) keeps its memory and does not train the basis.
                        z, new_memory, norm, state = self.low.step(
                            z,
                            Mk.detach(),
                            grad.detach(),
                            lr=lr,
                            state=state,
                            step=index + 1,
                            config=self.config,
                            active=lr > 0,
                        )
                    else:
                        result = memory_update(
                            Mk.detach(),
                            grad.detach(),
                            lr=lr,
                            optimizer=self.config.optimizer,
                            clip_value=self.config.effective_clip_value,
                            clip_norm=self.config.clip_norm,
                            state=state,
                            step=index + 1 if self.offsets is None else index + 1 + self.offsets,
                            betas=self.config.adam_betas,
                            weight_decay=self.config.weight_decay,
                        )
                        new_memory, norm = result.memory, result.grad_norm
                        if self.offsets is not None and state is not None and result.state is not None:
                            # kept moments: a row out of steps or stopped at this check takes no update
                            moving = (ages < K) if not check else (ages < K) & ~stop
                            moving = moving.view(-1, 1, 1)
                            state = AdamState(*(torch.where(moving, n, o) for n, o in zip(result.state, state)))
                        else:
                            state = result.state
                logged_ages.append(logged)
                losses.append(loss.detach().float())
                norms.append(norm.float())
                memory = new_memory.detach()
                ages = ages + 1
        assert scores is not None
        record = torch.stack(logged_ages), torch.stack(losses), torch.stack(norms)
        return RunOutput(memory, state, ages, initial, scores, stop, *record, z=z)


@dataclasses.dataclass
class RunOutput:
    """What ``_Batch.run`` leaves on the device: the batch's new state, the check's scores [rows] and stop
    flags [rows], and the per-step record [steps, rows] (ages, with stopped documents' check step at K)."""

    memory: torch.Tensor
    state: AdamState | None
    ages: torch.Tensor
    initial: torch.Tensor
    scores: DocumentScores
    stop: torch.Tensor
    logged_ages: torch.Tensor
    losses: torch.Tensor
    norms: torch.Tensor
    z: torch.Tensor | None = None  # low-rank coefficients [rows, m, k] (gradmem_fast.lowrank), else None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order (what a graph replay overwrites in place)."""
        state = [] if self.state is None else list(self.state)
        sc = self.scores
        scores = [sc.loss, sc.correct, sc.prefix, sc.tail, sc.tokens]
        record = [self.logged_ages, self.losses, self.norms]
        return [self.memory, *state, self.ages, self.initial, *scores, self.stop, *record]


class _PaddedBatch(_Batch):
    """The torch backend: documents right-padded to the longest, eager autograd and full logits."""

    def _build(self, docs):
        from . import reference

        self._math_dtype = reference._math_dtype
        emb = hf.input_embeddings(self.model)
        device = cast(torch.Tensor, emb.weight).device
        lengths = [len(d) for d in docs]
        S = max(lengths)
        ids = torch.zeros(len(docs), S, dtype=torch.long)
        mask = torch.zeros(len(docs), S, dtype=torch.bool)
        for b, d in enumerate(docs):
            ids[b, : len(d)], mask[b, : len(d)] = d, True
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.embeds = emb(self.ids).detach()
        self.rows = len(docs)
        b_idx = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)])
        j_idx = torch.cat([torch.arange(n) for n in lengths])
        self.doc, self.position = b_idx.to(device), j_idx.to(device)
        # Given tokens (WriteConfig.given_tokens) are inputs only: ignored targets, left out of the count.
        given = self.config.given_tokens
        ids = self.ids[self.doc, self.position]
        self.targets = torch.where(self.position >= given, ids, torch.full_like(ids, IGNORE_INDEX))
        self.counts = torch.tensor([max(0, n - given) for n in lengths], device=device)
        self.alignment = self._alignment_targets(docs, lengths) if self.config.alignment_weight else None

    def _alignment_targets(self, docs, lengths) -> align.AlignmentTargets:
        """The text run's hidden states of the batch (``gradmem_fast.alignment``), once per document: a document
        kept from the previous batch reuses its rows. The writer holds those of the current batch only (the
        documents that left are done), keyed by the document tensor itself (``cram`` passes the same objects
        from one batch to the next; the identity check makes a reused ``id`` harmless)."""
        cache = getattr(self.writer, "_alignment_text", {})
        new = [b for b, d in enumerate(docs) if cache.get(id(d), (None,))[0] is not d]
        if new:
            rows = torch.tensor(new, device=self.ids.device)
            states = align.text_states(self.model, self.embeds[rows], self.mask[rows], self.config.alignment_layers)
            for i, b in enumerate(new):
                cache[id(docs[b])] = (docs[b], states[:, i, : lengths[b]])
        self.writer._alignment_text = {id(d): cache[id(d)] for d in docs}
        first = cache[id(docs[0])][1]
        full = first.new_zeros(first.shape[0], len(docs), self.ids.shape[1], first.shape[-1])
        for b, d in enumerate(docs):
            full[:, b, : lengths[b]] = cache[id(d)][1]
        scored = self.mask & (torch.arange(self.ids.shape[1], device=self.ids.device) >= self.config.given_tokens)
        return align.AlignmentTargets(full, scored, self.config.alignment_weight)

    def _contexts(self):
        return use_backend("torch")

    def _loss(self, M, score):
        # The reference's loss (reference.write_losses) on the real tokens only, keeping the logits to score.
        B, m = M.shape[0], M.shape[1]
        S = self.ids.shape[1]
        x = torch.cat([M.to(self.embeds.dtype), self.embeds], dim=1)
        full = torch.cat([torch.ones(B, m, dtype=torch.long, device=x.device), self.mask.long()], dim=1)
        positions = torch.arange(m + S, device=x.device).unsqueeze(0).expand(B, -1)
        if self.alignment is None:
            hidden = hf.backbone_hidden(self.model, x, full, positions)[self.doc, m - 1 + self.position]
        else:
            last, states = align.backbone_states(self.model, x, full, positions, self.config.alignment_layers)
            hidden = last[self.doc, m - 1 + self.position]
            # Token j: row m + j of the memory run, row j of the text run.
            aligned = align.alignment_losses([h[:, m:] for h in states], self.alignment, self._math_dtype(last.dtype))
        logits = F.linear(hidden, self.head_weight.detach(), _detached(self.head_bias))
        logits = postprocess_logits(logits, *self.transform)
        math_logits = logits.to(self._math_dtype(logits.dtype))
        ce = F.cross_entropy(math_logits, self.targets, reduction="none")
        loss = ce.new_zeros(B).index_add(0, self.doc, ce) / self.counts.clamp_min(1).to(ce.dtype)
        scores = None
        if score:
            scores = score_logits(math_logits.detach(), self.targets, self.doc, self.position, B)
        objective = loss if self.alignment is None else loss + self.config.alignment_weight * aligned
        return objective, loss, scores


class _PackedBatch(_Batch):
    """The engine: documents packed back to back (bucket-padded when the step is compiled), fused ops."""

    def _build(self, docs):
        emb = hf.input_embeddings(self.model)
        device = cast(torch.Tensor, emb.weight).device
        self.packed = self.writer._pack(docs, device)
        self.rows = self.packed.batch
        self.backbone = self.writer._step_backbone()
        self.weights = None if self.backbone is None else self.backbone.frozen_weights()
        self.x0 = engine.packed_input(self.packed, emb(self.packed.tokens).detach())
        self.ones = torch.ones(1, self.packed.total_rows, dtype=torch.long, device=device)
        lengths = self.packed.lengths
        self.doc = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)]).to(device)
        self.position = torch.cat([torch.arange(n) for n in lengths]).to(device)
        self.targets = self.packed.targets

    def _contexts(self):
        backend = self.writer.ops_backend
        stack = contextlib.ExitStack()
        stack.enter_context(use_backend(backend))
        stack.enter_context(engine.gradmem_attention(self.model, backend))
        return stack

    def _loss(self, M, score):
        loss, hidden = engine._step_loss(
            self.model,
            M,
            self.x0,
            self.packed,
            self.head_weight,
            self.head_bias,
            self.ones,
            False,
            self.backbone,
            self.weights,
            return_hidden=True,
        )
        scores = None
        if score:
            # The fused cross-entropy keeps no logits: one more head product on the step's own hidden rows.
            with torch.no_grad():
                scores = score_rows(
                    hidden.detach(),
                    self.head_weight,
                    self.head_bias,
                    self.targets,
                    self.doc,
                    self.position,
                    self.rows,
                    transform=self.transform,
                )
        return loss, loss, scores


class GraphedSlots:
    """``_Batch.run`` of the engine's batches captured as CUDA graphs and replayed: one capture per bucket
    shape and run length, so the steps between two checks are one replay, however often refills rebuild the
    batch (the writer's bucket padding keeps the shapes to a handful).

    The first batch of a shape becomes that graph's static batch: the graph reads its packing, embeddings,
    per-row document/position indices and lr table, and the static input buffers of the changing state
    (memory, Adam moments, ages, initial losses). A later batch of the same shape is copied into those
    buffers (device copies, no host read) before its replay; a batch that continues copies the previous
    replay's outputs back in. The batch then refers to the graph's outputs, which stay valid until the
    next replay, the only time they are read. ``capture(fn) -> (replay, outputs)``: CUDA capture by
    default; the tests pass an eager stand-in that runs the same buffer discipline on a CPU.
    """

    _PACKED = engine.GraphedWriteLoop._STATIC

    def __init__(self, capture: Callable | None = None) -> None:
        self.capture = capture or engine.capture_cuda_graph
        self.entries: dict[tuple, dict] = {}

    def run(self, batch: "_PackedBatch", steps: int, rule) -> RunOutput:
        key = (engine.GraphedWriteLoop.key(batch.packed), steps)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._capture(batch, key, steps, rule)
        elif entry["batch"] is not batch:
            self._load(entry["static"], batch)
        entry["batch"] = batch
        for buffer, value in zip(entry["inputs"], _state_tensors(batch), strict=True):
            if buffer is not value:
                buffer.copy_(value)
        entry["replay"]()
        out: RunOutput = entry["out"]
        batch.memory, batch.state, batch.ages, batch.initial = out.memory, out.state, out.ages, out.initial
        return out

    def _capture(self, batch: "_PackedBatch", key: tuple, steps: int, rule) -> dict:
        # The batch becomes the static one: its max_seqlen is the bucket's, as every batch of this shape gets.
        batch.packed = dataclasses.replace(batch.packed, max_seqlen=key[0][3])
        inputs = [t.clone() for t in _state_tensors(batch)]
        memory, ages, initial = inputs[0], inputs[-2], inputs[-1]
        state = AdamState(inputs[1], inputs[2]) if batch.state is not None else None
        if engine.attention_dropout_active(batch.model):
            engine.dropout_generator(memory.device)  # exists before the capture: replays read and advance it
        replay, out = self.capture(lambda: batch.steps(memory, state, ages, initial, steps, rule))
        return {"static": batch, "inputs": inputs, "replay": replay, "out": out, "batch": batch}

    def _load(self, static: "_PackedBatch", batch: "_PackedBatch") -> None:
        """Copy a new batch's fixed inputs into the static batch's tensors (the same shapes by the key)."""
        for name in self._PACKED:
            getattr(static.packed, name).copy_(getattr(batch.packed, name))
        for name in ("x0", "doc", "position", "lr_table"):
            getattr(static, name).copy_(getattr(batch, name))


def _state_tensors(batch: "_Batch") -> list[torch.Tensor]:
    """The batch's changing state in a fixed order: memory, Adam moments (if any), ages, initial losses."""
    state = [] if batch.state is None else list(batch.state)
    return [batch.memory, *state, batch.ages, batch.initial]


def _detached(x):
    return None if x is None else x.detach()


def _satisfied_on_device(rule, scores: DocumentScores) -> torch.Tensor:
    """[B] whether any criterion of ``rule`` that is set holds (on the device: no host read)."""
    held = torch.zeros_like(scores.tokens, dtype=torch.bool)
    if rule.loss is not None:
        held |= scores.loss <= rule.loss
    if rule.accuracy is not None:
        held |= scores.accuracy >= rule.accuracy
    if rule.exact:
        held |= scores.prefix == scores.tokens
    return held


def cram(
    writer,
    documents: Sequence[torch.Tensor],
    memory: torch.Tensor,
    head: tuple,
    slots: int | None = None,
    batch_tokens: int | None = None,
    on_check: CheckCallback | None = None,
    step_log: dict | None = None,
    on_document_check: DocumentCheckCallback | None = None,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Iterator[tuple[int, CrammedDocument]]:
    """Write ``documents`` (validated 1-D CPU token tensors) with ``writer.config.stop``; yield ``(index,
    result)`` as each document finishes (not in input order).

    ``memory``: the initial memory on the model's device, shared [m, d] or per document [len(documents), m, d].
    ``head``: (weight, bias) of the write head. ``slots``/``batch_tokens``: the most documents / packed rows in
    flight (None: no limit; a document longer than ``batch_tokens`` gets the batch alone). ``step_log``: optional
    dict that receives ``losses``/``grad_norms`` [steps, len(documents)] (NaN where a document took no such
    step; device tensors, filled without host reads). ``on_document_check``: see ``DocumentCheckCallback``.
    ``moments``: (exp_avg, exp_avg_sq [len(documents), m, d], Adam steps taken [len(documents)]): each
    document's Adam state to continue from (its bias correction counts on from those steps; Adam and AdamW, full
    memories, eager slots); each result then carries its state after its last update (``CrammedDocument.moments``).
    """
    config = writer.config
    if moments is not None and (config.optimizer not in ("adam", "adamw") or config.memory_rank is not None):
        raise ValueError("moments: continuing Adam state needs optimizer adam or adamw and full-rank memories")
    offsets_host = None if moments is None else [int(v) for v in moments[2].tolist()]
    rule = config.stop
    assert rule is not None
    m, K = config.num_memory_tokens, config.steps
    # Ticks between checks. A document's checks fall in its steps c, 2c, ...; c <= K + 1 puts one at or
    # before the step after its last, so a write of K < check_every steps is checked on its final memory.
    interval = min(rule.check_every, K + 1)
    head_weight, head_bias = head
    device = memory.device
    baseline = no_memory_tail(writer.model, head_weight, head_bias, list(documents), given_tokens=config.given_tokens)
    batch_class = _PackedBatch if writer.backend == "triton" else _PaddedBatch
    initial_dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
    waiting = list(range(len(documents)))
    waiting.reverse()  # pop() takes the next in input order
    active: list[int] = []
    ages: list[int] = []  # updates taken by each document in flight, at the start of the next run
    batch: _Batch | None = None
    done, steps_taken = 0, 0
    doc_ids: torch.Tensor | None = None  # the documents of the batch's real rows, on the device
    if step_log is not None:
        n = len(documents)
        # Row K collects the steps of frozen documents and the skipped update of stopped ones (discarded).
        losses = torch.full((K + 1, n), math.nan, dtype=torch.float32, device=device)
        norms = torch.full_like(losses, math.nan)
        step_log["losses"], step_log["grad_norms"] = losses[:K], norms[:K]
    graphs = writer._slot_graphs() if batch_class is _PackedBatch and moments is None else None
    # Low-rank memories: one basis for the whole stream; a learned one keeps training as documents come and go.
    low = None if config.memory_rank is None else lowrank.LowRankBasis.start(config, writer.model, memory)

    scores: DocumentScores | None = None
    stop: torch.Tensor | None = None
    while True:
        # After a check: retire the documents whose rule held and those out of steps.
        keep = []
        if batch is not None:
            assert scores is not None and stop is not None
            host = _to_host(scores, stop, batch.initial[: batch.real])
            for row, index in enumerate(active):
                checked_at = ages[row] + interval - 1  # updates taken when the check's forward ran
                if on_document_check is not None:
                    n_row, prefix_row = int(host["tokens"][row]), int(host["prefix"][row])
                    on_document_check(
                        index,
                        min(checked_at, K),
                        float(host["loss"][row]),
                        float(host["correct"][row]) / max(1, n_row),
                        prefix_row == n_row,
                        prefix_row,
                    )
                stopped = bool(host["stop"][row])
                if not stopped and checked_at < K:
                    keep.append(row)
                    continue
                done += 1
                tokens = int(host["tokens"][row])
                yield (
                    index,
                    CrammedDocument(
                        memory=batch.memory[row].clone(),
                        steps=min(checked_at, K),
                        stopped=stopped,
                        loss=float(host["loss"][row]),
                        accuracy=float(host["correct"][row]) / max(1, tokens),
                        exact=bool(host["prefix"][row] == tokens),
                        prefix=int(host["prefix"][row]),
                        initial_loss=float(host["initial"][row]),
                        info_gain_bits=(float(baseline[index]) - float(host["tail"][row])) / LN2,
                        tokens=tokens,
                        moments=None
                        if offsets_host is None or batch.state is None
                        else (
                            batch.state.exp_avg[row].clone(),
                            batch.state.exp_avg_sq[row].clone(),
                            offsets_host[index] + min(checked_at, K),
                        ),
                    ),
                )
            ages = [a + interval for a in ages]
        # Refill the freed capacity with waiting documents, in input order.
        new: list[int] = []
        rows_used = sum(m + len(documents[active[r]]) for r in keep)
        while waiting and (slots is None or len(keep) + len(new) < slots):
            need = m + len(documents[waiting[-1]])
            if batch_tokens is not None and rows_used + need > batch_tokens and (keep or new):
                break
            new.append(waiting.pop())
            rows_used += need
        if on_check is not None:
            on_check(done, len(keep) + len(new), len(waiting), steps_taken)
        if not keep and not new:
            return
        if batch is None or new or len(keep) != len(active):
            ages = [ages[r] for r in keep] + [0] * len(new)
            active = [active[r] for r in keep] + new
            fresh = (
                memory[torch.tensor(new, dtype=torch.long, device=device)]
                if memory.dim() == 3
                else memory.expand(len(new), m, -1)
            )
            docs = [documents[i] for i in active]
            carried = None
            if moments is not None:
                picked = torch.tensor(new, dtype=torch.long)
                carried = tuple(t.index_select(0, picked.to(t.device)).to(device) for t in moments)
            batch = _rebuild(writer, batch, batch_class, docs, keep, ages, fresh, head, initial_dtype, low, carried)
            doc_ids = torch.tensor(active, dtype=torch.long, device=device)
        out = batch.run(interval, rule) if graphs is None else graphs.run(batch, interval, rule)
        real = batch.real
        scores, stop = out.scores.select(real), out.stop[:real]
        if step_log is not None:
            assert doc_ids is not None
            rows = out.logged_ages[:, :real].clamp(max=K)
            cols = doc_ids.expand_as(rows)
            losses[rows, cols] = out.losses[:, :real]
            norms[rows, cols] = out.norms[:, :real]
        steps_taken += interval * len(active)


def _to_host(scores: DocumentScores, stop: torch.Tensor, initial: torch.Tensor) -> dict[str, torch.Tensor]:
    """A check's single host read: the scores, stop flags and initial losses [B] in one transfer."""
    names = ("loss", "correct", "prefix", "tail", "tokens", "stop", "initial")
    parts = (scores.loss, scores.correct, scores.prefix, scores.tail, scores.tokens, stop, initial)
    stacked = torch.stack([p.double() for p in parts]).cpu()
    return dict(zip(names, stacked.unbind(0), strict=True))


def _moment_dtype(memory: torch.Tensor) -> torch.dtype:
    """Adam moments: fp64 for fp64 memories, fp32 otherwise (as ``memory_update`` keeps them)."""
    return torch.float64 if memory.dtype == torch.float64 else torch.float32


def _rebuild(writer, batch, batch_class, docs, keep, ages, fresh, head, initial_dtype, low=None, carried=None):
    """The next batch: rows ``keep`` of the current one (memories, moments, initial losses), then the new
    documents starting from ``fresh`` [new, m, d] with zero moments. ``docs``/``ages``: every document of the
    batch, in row order. ``low``: the stream's low-rank basis (new documents start from their projection onto
    it, with moments of their coefficients), or None. ``carried``: the new documents' (exp_avg, exp_avg_sq,
    Adam steps taken) to continue from instead of zero moments (``cram(moments=...)``)."""
    device = fresh.device
    fresh = fresh.clone()
    z = None
    if low is not None:
        z = low.project(fresh)
        fresh = low.memory(z)
    moments = torch.zeros((fresh if z is None else z).shape, dtype=_moment_dtype(fresh), device=device)
    first_moments = moments if carried is None else carried[0].to(moments.dtype)
    second_moments = moments.clone() if carried is None else carried[1].to(moments.dtype)
    offsets = None if carried is None else carried[2].to(torch.int64)
    unknown = torch.full((fresh.shape[0],), math.nan, dtype=initial_dtype, device=device)
    if batch is None:
        M, initial = fresh, unknown
        state = AdamState(first_moments, second_moments) if writer.config.optimizer in ("adam", "adamw") else None
    else:
        kept = torch.tensor(keep, dtype=torch.long, device=device)
        M = torch.cat([batch.memory.index_select(0, kept), fresh])
        if z is not None:
            z = torch.cat([batch.z.index_select(0, kept), z])
        initial = torch.cat([batch.initial.index_select(0, kept), unknown])
        state = None
        if batch.state is not None:
            state = AdamState(
                *(torch.cat([s.index_select(0, kept), f]) for s, f in zip(batch.state, (first_moments, second_moments)))
            )
        if offsets is not None:
            offsets = torch.cat([batch.offsets.index_select(0, kept), offsets])
    return batch_class(writer, docs, M, state, ages, initial, head, low, z, offsets)


class ProgressBar:
    """A tqdm bar of documents done for ``cram``'s ``on_check``, with in flight / waiting counts and the rate
    of document-steps per second in its postfix (tqdm's ETA follows the documents done)."""

    def __init__(self, total: int | None, disable: bool = False, desc: str = "write") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="doc", desc=desc, dynamic_ncols=True, disable=disable)
        self.base_done = 0  # documents of earlier windows
        self.base_steps = 0
        self.last_done = 0
        self.last_steps = 0
        self.start = time.perf_counter()

    def __call__(self, done: int, in_flight: int, waiting: int, steps: int) -> None:
        total_done = self.base_done + done
        self.bar.update(total_done - self.bar.n)
        self.last_done, self.last_steps = done, steps
        rate = (self.base_steps + steps) / max(1e-9, time.perf_counter() - self.start)
        self.bar.set_postfix_str(f"in flight {in_flight}, waiting {waiting}, {rate:.1f} doc-steps/s", refresh=False)

    def next_window(self, size: int) -> None:
        """Move the counts on past a finished window of ``size`` documents."""
        self.base_done += size
        self.base_steps += self.last_steps
        self.last_done = self.last_steps = 0

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
