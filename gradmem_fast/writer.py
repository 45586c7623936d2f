"""MemoryWriter: the user-facing batched WRITE (DESIGN.md, "The semantics contract").

    writer = MemoryWriter(model, WriteConfig(num_memory_tokens=8, steps=5, lr=1e-2))
    result = writer.write(input_ids, attention_mask)      # result.memory: [B, m, d]

The writer picks a backend (``gradmem_fast.backend.resolve_backend``): ``torch`` runs
``gradmem_fast.reference`` (eager autograd, full logits); ``triton`` runs ``gradmem_fast.engine``
(documents packed back to back, fused attention / linear cross-entropy / update ops, optionally a compiled
backbone and CUDA-graph replay).

With a ``StopRule`` in the config (many-step writing, ``gradmem_fast.cramming``) every document stops when it
is learned; in ``write_many`` a waiting document then takes its slot (continuous batching), and results
carry per-document statistics (``DocumentStats``).

``write_many`` streams any iterable of documents: it reads a window of documents, sorts it by length,
writes batches of at most ``batch_tokens`` packed rows, and yields the memories in input order, so
memory use is bounded by the window whatever the number of documents. On the engine it validates and
packs each batch on the CPU and uploads it in one pinned non-blocking copy while the previous batch's
kernels run: no host synchronisation per batch (the yielded memories stay on the device until read).
"""

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, Literal, cast

import torch

from . import alignment, cramming, engine, hf, reference
from .backend import check_interpreter_dtype, resolve_backend
from .config import WriteConfig
from .inputs import initial_memory, prepare_write, resolve_write_head
from .packing import PackedBatch, bucket_rows, documents_from_batch, pack, plan_batches
from .result import DocumentStats, WriteResult

__all__ = ["DocumentStats", "MemoryWriter", "WriteResult"]

# on_step(k, losses): called after step k with the detached per-document losses [B].
StepCallback = Callable[[int, torch.Tensor], object]


class MemoryWriter:
    """Writes batches of documents into per-document memories of a frozen causal LM.

    Args:
        model: a Hugging Face causal LM (``get_input_embeddings``/``get_output_embeddings``/``base_model``).
        config: a ``WriteConfig`` (default ``WriteConfig()``).
        backend: "auto" (triton on CUDA, torch elsewhere; env GRADMEM_FAST_BACKEND overrides), "torch"
            or "triton".
        write_head: optional separate head for the write loss: a [V, d] tensor or a Linear module;
            default: the model's own output head.
        cuda_graphs: on the triton backend on CUDA with grad_mode "none", capture the whole K-step loop
            once per bucket shape (batches padded to a few fixed sizes) and replay it, with the compiled step
            inside when ``compile`` is on; with a stop rule, the steps between two checks of the slot loop
            (``cramming.GraphedSlots``). Off by default until it has been validated on a GPU (see README,
            Limits).
        compile: compile the backbone of every first-order step (grad_mode "none"/"first"; second-order steps
            stay eager) with ``torch.compile(fullgraph=True)`` on the engine (``engine.CompiledBackbone``);
            batches are then padded to ``packing.bucket_rows`` sizes (< 12.5% filler) so a stream compiles a
            few times only. "auto" (default): on for the triton backend on CUDA, off elsewhere. Why: on a GPU
            the compiled step fuses the model's eager elementwise work (about half a GPT-2 step's time) for a
            one-off compile per bucket (tens of seconds), which a stream of writes repays; on the CPU the
            kernels run in the Triton interpreter, where inductor's C++ compile (minutes on 2 cores) buys
            nothing. Attention dropout (a model in training mode) compiles too: its seed is a device tensor
            advanced per call, so compiled steps draw new masks. ``compile=True`` needs backend="triton"
            (the torch backend is the eager reference).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: WriteConfig | None = None,
        backend: str = "auto",
        write_head: torch.Tensor | torch.nn.Module | None = None,
        cuda_graphs: bool = False,
        compile: bool | Literal["auto"] = "auto",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
        hf.input_embeddings(model)
        hf.backbone(model)
        config = WriteConfig() if config is None else config
        if not isinstance(config, WriteConfig):
            raise TypeError(f"config must be a WriteConfig, got {type(config).__name__}")
        hidden = hf.hidden_size(model)
        if config.memory_rank is not None and config.memory_rank > hidden:
            raise ValueError(f"memory_rank must be in [1, {hidden}] (the model's width), got {config.memory_rank}")
        self.model = model
        self.config = config
        self.write_head = write_head
        device = cast(torch.Tensor, hf.input_embeddings(model).weight).device
        self.backend = resolve_backend(backend, device)
        # The ops the engine runs on: the backend, except in tests that run the engine on the torch ops.
        self.ops_backend = self.backend
        alignment.check_backend(config, self.backend)  # the alignment term exists on the torch backend only
        if self.backend == "triton":
            engine.check_model_supported(model)
            check_interpreter_dtype(cast(torch.Tensor, hf.input_embeddings(model).weight))
        if write_head is None:
            hf.check_logits_are_head_on_backbone(model)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        if not (compile is True or compile is False or (isinstance(compile, str) and compile == "auto")):
            raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
        if compile is True and self.backend != "triton":
            raise ValueError(
                "compile=True compiles the write engine, which runs on backend='triton'; the torch "
                "backend is the eager reference (use compile=False or backend='triton')"
            )
        self.compile = compile
        self.backbone = (
            engine.CompiledBackbone(model)
            if compile is True or (compile == "auto" and self.backend == "triton" and device.type == "cuda")
            else None
        )
        self.cuda_graphs = (
            cuda_graphs and self.backend == "triton" and device.type == "cuda" and config.grad_mode == "none"
        )
        if self.cuda_graphs and config.memory_rank is not None:
            raise ValueError(
                "cuda_graphs: low-rank memories (memory_rank) keep their basis state on the host and are not "
                "captured; use cuda_graphs=False"
            )
        self._graphed: engine.GraphedWriteLoop | None = None
        self._graphed_slots: cramming.GraphedSlots | None = None

    def _slot_graphs(self) -> "cramming.GraphedSlots | None":
        """The CUDA-graph replayer of the cramming slot loop (with ``cuda_graphs``), or None (eager)."""
        if not self.cuda_graphs:
            return None
        if self._graphed_slots is None:
            self._graphed_slots = cramming.GraphedSlots()
        return self._graphed_slots

    def _step_backbone(self) -> engine.CompiledBackbone | None:
        """The compiled backbone for this write, or None (eager)."""
        return self.backbone

    def write(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        on_step: StepCallback | None = None,
        progress: bool = False,
    ) -> WriteResult:
        """Write every row of ``input_ids`` [B, S] into its own memory.

        ``attention_mask`` [B, S]: 1 = real token (Hugging Face convention); left or right padding.
        ``memory``: None (seeded N(0, init_std^2), shared by the batch), [m, d] shared initial memory (may
        require grad: with grad_mode first/second the result stays on its graph), or [B, m, d].
        ``on_step(k, losses)``: optional callback after each step's loss [B] (detached, on the device; reading
        it is the caller's host sync). Not called inside a captured CUDA graph (``cuda_graphs=True``).

        With ``config.stop`` set, each document stops when the rule holds (at most ``config.steps`` steps):
        ``result.stats`` holds each document's steps, final loss, accuracy, exact-decode flag and information
        gain, and ``losses``/``grad_norms`` are NaN at steps a document did not take. ``on_step`` is then not
        available (documents are at different steps); ``progress=True`` shows a bar of documents done.
        """
        if self.config.stop is not None:
            return self._write_stopping(input_ids, attention_mask, memory, on_step, progress)
        if progress:
            bar = _StepBar(self.config.steps, on_step)
            try:
                return self.write(input_ids, attention_mask, memory, bar)
            finally:
                bar.close()
        if self.backend == "torch":
            return reference.write(
                self.model, input_ids, attention_mask, memory, self.config, self.write_head, on_step=on_step
            )
        ids, mask, M, head_weight, head_bias = prepare_write(
            self.model, input_ids, attention_mask, memory, self.config, self.write_head
        )
        docs = [doc.cpu() for doc in documents_from_batch(ids, mask)]
        packed = self._pack(docs, M.device)
        return self._write_packed(packed, M, head_weight, head_bias, on_step)

    def _write_stopping(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        memory: torch.Tensor | None,
        on_step: StepCallback | None,
        progress: bool,
    ) -> WriteResult:
        """``write`` with a StopRule: the whole batch in flight, each document stopping on its own."""
        if on_step is not None:
            raise ValueError("on_step: a write with a StopRule has no common step (use progress=True)")
        ids, mask, M, head_weight, head_bias = prepare_write(
            self.model, input_ids, attention_mask, memory, self.config, self.write_head
        )
        docs = [doc.cpu() for doc in documents_from_batch(ids, mask)]
        log: dict = {}
        bar = cramming.ProgressBar(len(docs), disable=not progress)
        with torch.no_grad(), bar:
            results = dict(cramming.cram(self, docs, M.detach(), (head_weight, head_bias), on_check=bar, step_log=log))
        ordered = [results[i] for i in range(len(docs))]
        return WriteResult(
            memory=torch.stack([r.memory for r in ordered]),
            losses=log["losses"],
            grad_norms=log["grad_norms"],
            stats=cramming.stack_stats(ordered, self.config.num_memory_tokens),
        )

    def _padded(self) -> bool:
        """Whether batches are padded to bucket sizes (a compiled or graphed step)."""
        return self.backend == "triton" and (self.cuda_graphs or self._step_backbone() is not None)

    def _pack(self, docs: list[torch.Tensor], device: torch.device) -> PackedBatch:
        """Pack CPU documents (padded to a bucket when the step is compiled or graphed) and upload them."""
        m = self.config.num_memory_tokens
        rows = None
        if self._padded():
            rows = bucket_rows(sum(len(doc) for doc in docs) + m * len(docs), m)
        return pack(
            docs,
            m,
            device,
            rows=rows,
            doc_multiple=8 if self.cuda_graphs else 1,
            given_tokens=self.config.given_tokens,
        )

    def _write_packed(
        self,
        packed: PackedBatch,
        M: torch.Tensor,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor | None,
        on_step: StepCallback | None = None,
    ) -> WriteResult:
        filler = packed.batch - M.shape[0]
        if filler:
            M = torch.cat([M, M.new_zeros(filler, *M.shape[1:])])
        if self.cuda_graphs:
            if self._graphed is None:
                self._graphed = engine.GraphedWriteLoop(
                    self.model, self.config, head_weight, head_bias, self.ops_backend, backbone=self._step_backbone()
                )
            return self._graphed(packed, M)
        return engine.write_packed(
            self.model,
            packed,
            M,
            self.config,
            head_weight,
            head_bias,
            self.ops_backend,
            on_step=on_step,
            backbone=self._step_backbone(),
        )

    def write_many(
        self,
        documents: Iterable[torch.Tensor | Sequence[int]],
        batch_tokens: int = 16384,
        window: int = 4096,
        memory: torch.Tensor | None = None,
        on_step: StepCallback | None = None,
        slots: int | None = None,
        stats: bool = False,
        progress: bool = False,
        on_document_check: cramming.DocumentCheckCallback | None = None,
    ) -> Iterator[Any]:
        """Write an iterable of documents (1-D token-id sequences); yield each memory [m, d] in input order.

        With ``config.stop`` set (continuous batching, ``gradmem_fast.cramming``): at most ``slots`` documents
        (None: no limit) and ``batch_tokens`` packed rows are in flight; a document leaves when its rule holds
        or its steps run out, and the next waiting document of the window takes its place. ``stats=True``
        yields ``cramming.CrammedDocument`` (memory and per-document statistics) instead of the memory.
        ``progress=True`` shows a tqdm bar (documents done, in flight, waiting, steps per second).
        ``on_document_check(index, step, loss, accuracy, exact, prefix)``: with a StopRule, called for every
        document (``index`` into ``documents``) at every check, from the check's own host read.

        Documents are read ``window`` at a time, sorted by length and grouped into batches of at most
        ``batch_tokens`` packed rows (memory rows included; a longer document gets a batch of its own).
        ``memory``: None, a shared initial memory [m, d], or one per document [N, m, d] when ``documents``
        is a sequence of N documents (a warm start from earlier memories). Memories are detached (grad_mode
        must be "none"). Results equal writing each batch with ``write``. ``on_step`` is passed to every batch's
        ``write`` (k restarts at 0 with each batch; batches follow ``plan_batches``).
        """
        if self.config.grad_mode != "none":
            raise ValueError("write_many streams detached memories: use grad_mode='none' (or call write())")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if memory is not None and (not isinstance(memory, torch.Tensor) or memory.dim() not in (2, 3)):
            raise ValueError("memory must be None, a shared [m, d] or a per-document [N, m, d] initial memory")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ValueError(f"slots must be None or a positive int, got {slots!r}")
        if self.config.stop is None and (slots is not None or stats or on_document_check is not None):
            raise ValueError(
                "slots, stats and on_document_check need a StopRule in the config (WriteConfig(stop=StopRule(...)))"
            )
        if memory is not None and memory.dim() == 3:
            count = len(documents) if isinstance(documents, Sized) else None
            if count is None or memory.shape[0] != count:
                raise ValueError(
                    "memory: a per-document initial memory [N, m, d] needs a sequence of N documents, got "
                    f"{memory.shape[0]} memories for {'an iterable of' if count is None else count} documents"
                )
            if self.config.stop is not None and on_step is not None:
                raise ValueError("on_step: a write with a StopRule has no common step (use progress=True)")
            yield from self._write_many_each(
                documents, batch_tokens, window, memory, on_step, slots, stats, progress, on_document_check
            )
            return
        if self.config.stop is not None:
            if on_step is not None:
                raise ValueError("on_step: a write with a StopRule has no common step (use progress=True)")
            yield from self._write_many_stopping(
                documents, batch_tokens, window, memory, slots, stats, progress, on_document_check
            )
            return
        if progress:
            bar = _StepBar(None, on_step)
            try:
                yield from self.write_many(documents, batch_tokens, window, memory, bar)
            finally:
                bar.close()
            return
        if self.backend == "triton":
            yield from self._write_many_engine(documents, batch_tokens, window, memory, on_step)
            return
        for docs in self._windows(documents, window):
            out: list[torch.Tensor | None] = [None] * len(docs)
            for batch in self.plan_batches(docs, batch_tokens):
                ids, mask = _right_padded(docs, batch)
                with torch.no_grad():
                    result = self.write(ids, mask, memory, on_step=on_step)
                for row, i in enumerate(batch):
                    out[i] = result.memory[row].detach()
            yield from cast(list[torch.Tensor], out)  # every slot is filled by its batch

    def _write_many_each(
        self,
        documents: Iterable[torch.Tensor | Sequence[int]],
        batch_tokens: int,
        window: int,
        memory: torch.Tensor,
        on_step: StepCallback | None,
        slots: int | None,
        stats: bool,
        progress: bool,
        on_document_check: cramming.DocumentCheckCallback | None = None,
    ) -> Iterator[Any]:
        """write_many with one initial memory per document: each window is written from its rows of
        ``memory`` (continuous batching with a StopRule; ``write`` of each planned batch otherwise)."""
        head_weight, head_bias = resolve_write_head(self.write_head, self.model)
        emb_weight = cast(torch.Tensor, hf.input_embeddings(self.model).weight)
        vocab = min(emb_weight.shape[0], head_weight.shape[0])
        start = 0
        for docs in self._windows(documents, window, vocab):
            rows = memory[start : start + len(docs)].detach().to(emb_weight.device)
            start += len(docs)
            if self.config.stop is None:
                yield from self._write_window_rows(docs, rows, batch_tokens, on_step)
                continue
            checked = _offset(on_document_check, start - len(docs))
            with torch.no_grad(), cramming.ProgressBar(len(docs), disable=not progress) as bar:
                found = dict(
                    cramming.cram(
                        self,
                        docs,
                        rows,
                        (head_weight, head_bias),
                        slots=slots,
                        batch_tokens=batch_tokens,
                        on_check=bar,
                        on_document_check=checked,
                    )
                )
            for i in range(len(docs)):
                yield found[i] if stats else found[i].memory

    def _write_window_rows(
        self, docs: list[torch.Tensor], rows: torch.Tensor, batch_tokens: int, on_step: StepCallback | None
    ) -> Iterator[torch.Tensor]:
        """One window without a stop rule, each document from its own row of ``rows``."""
        out: list[torch.Tensor | None] = [None] * len(docs)
        for batch in self.plan_batches(docs, batch_tokens):
            ids, mask = _right_padded(docs, batch)
            with torch.no_grad():
                result = self.write(ids, mask, rows[batch], on_step=on_step)
            for row, i in enumerate(batch):
                out[i] = result.memory[row].detach()
        yield from cast(list[torch.Tensor], out)

    def _write_many_stopping(
        self,
        documents: Iterable[torch.Tensor | Sequence[int]],
        batch_tokens: int,
        window: int,
        memory: torch.Tensor | None,
        slots: int | None,
        stats: bool,
        progress: bool,
        on_document_check: cramming.DocumentCheckCallback | None = None,
    ) -> Iterator[Any]:
        """write_many with a StopRule: continuous batching over each window, results in input order."""
        head_weight, head_bias = resolve_write_head(self.write_head, self.model)
        emb_weight = cast(torch.Tensor, hf.input_embeddings(self.model).weight)
        vocab = min(emb_weight.shape[0], head_weight.shape[0])
        M0 = initial_memory(memory, 1, self.config, self.model, emb_weight.device)[0].detach()
        total = len(documents) if isinstance(documents, Sized) else None
        with cramming.ProgressBar(total, disable=not progress) as bar:
            start = 0
            for docs in self._windows(documents, window, vocab):
                ready: dict[int, cramming.CrammedDocument] = {}
                position = 0
                checked = _offset(on_document_check, start)
                start += len(docs)
                with torch.no_grad():
                    for index, result in cramming.cram(
                        self,
                        docs,
                        M0,
                        (head_weight, head_bias),
                        slots=slots,
                        batch_tokens=batch_tokens,
                        on_check=bar,
                        on_document_check=checked,
                    ):
                        ready[index] = result
                        while position in ready:
                            done = ready.pop(position)
                            yield done if stats else done.memory
                            position += 1
                bar.next_window(len(docs))

    def _write_many_engine(
        self,
        documents: Iterable[torch.Tensor | Sequence[int]],
        batch_tokens: int,
        window: int,
        memory: torch.Tensor | None,
        on_step: StepCallback | None,
    ) -> Iterator[torch.Tensor]:
        """write_many on the engine: validation and packing on the CPU, one pinned non-blocking upload per
        batch, the next batch packed while the current one's kernels run; no host sync per batch."""
        head_weight, head_bias = resolve_write_head(self.write_head, self.model)
        emb = hf.input_embeddings(self.model)
        emb_weight = cast(torch.Tensor, emb.weight)
        device = emb_weight.device
        vocab = min(emb_weight.shape[0], head_weight.shape[0])
        M0 = initial_memory(memory, 1, self.config, self.model, device).detach()  # once per stream
        for docs in self._windows(documents, window, vocab):
            out: list[torch.Tensor | None] = [None] * len(docs)
            batches = self.plan_batches(docs, batch_tokens)
            upcoming = self._pack([docs[i] for i in batches[0]], device)
            for index, batch in enumerate(batches):
                packed = upcoming
                with torch.no_grad():
                    result = self._write_packed(
                        packed, M0.expand(len(batch), *M0.shape[1:]), head_weight, head_bias, on_step
                    )
                if index + 1 < len(batches):  # CPU work that overlaps the kernels just queued
                    upcoming = self._pack([docs[i] for i in batches[index + 1]], device)
                for row, i in enumerate(batch):
                    out[i] = result.memory[row].detach()
            yield from cast(list[torch.Tensor], out)  # every slot is filled by its batch

    def _windows(
        self, documents: Iterable[torch.Tensor | Sequence[int]], window: int, vocab: int | None = None
    ) -> Iterator[list[torch.Tensor]]:
        """Lists of at most ``window`` validated CPU documents, in input order."""
        iterator = iter(documents)
        position = 0
        while True:
            chunk = list(itertools.islice(iterator, window))
            if not chunk:
                return
            yield [self._as_document(doc, position + i, vocab) for i, doc in enumerate(chunk)]
            position += len(chunk)

    @staticmethod
    def _as_document(doc: torch.Tensor | Sequence[int], index: int, vocab: int | None = None) -> torch.Tensor:
        tensor = doc if isinstance(doc, torch.Tensor) else torch.as_tensor(list(doc), dtype=torch.long)
        if tensor.dim() != 1 or tensor.numel() == 0:
            raise ValueError(
                f"documents[{index}] must be a non-empty 1-D sequence of token ids, got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise TypeError(f"documents[{index}] must hold integer token ids, got dtype {tensor.dtype}")
        tensor = tensor.long().cpu()
        if vocab is not None and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab):
            raise ValueError(
                f"documents[{index}] must be token ids in [0, {vocab}), got values in "
                f"[{int(tensor.min())}, {int(tensor.max())}]"
            )
        return tensor

    def plan_batches(self, docs: Sequence[torch.Tensor], batch_tokens: int) -> list[list[int]]:
        """The batches (lists of indices into ``docs``) that ``write_many`` writes for one window, in order."""
        return plan_batches(
            [len(doc) for doc in docs], self.config.num_memory_tokens, batch_tokens, padded=self._padded()
        )


def _offset(callback: cramming.DocumentCheckCallback | None, start: int) -> cramming.DocumentCheckCallback | None:
    """``callback`` with window-local document indices turned into indices of the whole stream."""
    if callback is None:
        return None
    inner = callback
    return lambda index, *rest: inner(start + index, *rest)


class _StepBar:
    """on_step callback that advances a tqdm bar per optimisation step (then calls the user's callback)."""

    def __init__(self, steps_per_batch: int | None, inner: StepCallback | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=steps_per_batch, unit="step", desc="write", dynamic_ncols=True)
        self.inner = inner

    def __call__(self, k: int, losses: torch.Tensor) -> None:
        self.bar.update(1)
        if self.inner is not None:
            self.inner(k, losses)

    def close(self) -> None:
        self.bar.close()


def _right_padded(docs: list[torch.Tensor], batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` [len(batch), longest]: the batch's documents right-padded with zeros (mask 1 = token)."""
    width = max(len(docs[i]) for i in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, i in enumerate(batch):
        ids[row, : len(docs[i])] = docs[i]
        mask[row, : len(docs[i])] = 1
    return ids, mask
