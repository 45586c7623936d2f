"""MemoryWriter: the user-facing batched WRITE (DESIGN.md, "The semantics contract").

    writer = MemoryWriter(model, WriteConfig(num_memory_tokens=8, steps=5, lr=1e-2))
    result = writer.write(input_ids, attention_mask)      # result.memory: [B, m, d]

The writer picks a backend (``gradmem_fast.backend.resolve_backend``): ``torch`` runs
``gradmem_fast.reference`` (eager autograd, full logits); ``triton`` runs ``gradmem_fast.engine``
(documents packed back to back, fused attention / linear cross-entropy / update ops).

``write_many`` streams any iterable of documents: it reads a window of documents, sorts it by length,
writes batches of at most ``batch_tokens`` packed rows, and yields the memories in input order, so
memory use is bounded by the window whatever the number of documents.
"""
import itertools

import torch

from . import engine, hf, reference
from .backend import resolve_backend
from .config import WriteConfig
from .inputs import prepare_write
from .packing import bucket_shape, documents_from_batch, pack
from .result import WriteResult

__all__ = ["MemoryWriter", "WriteResult"]


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
            once per bucket shape (batches padded to a few fixed sizes) and replay it. Off by default until
            it has been validated on a GPU (see README, Limits).
    """

    def __init__(self, model, config: WriteConfig = None, backend: str = "auto", write_head=None,
                 cuda_graphs: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
        hf.input_embeddings(model)
        hf.backbone(model)
        config = WriteConfig() if config is None else config
        if not isinstance(config, WriteConfig):
            raise TypeError(f"config must be a WriteConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.write_head = write_head
        device = hf.input_embeddings(model).weight.device
        self.backend = resolve_backend(backend, device)
        if self.backend == "triton":
            engine.check_model_supported(model)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        self.cuda_graphs = (cuda_graphs and self.backend == "triton" and device.type == "cuda"
                            and config.grad_mode == "none")
        self._graphed = None

    def write(self, input_ids, attention_mask=None, memory=None, on_step=None) -> WriteResult:
        """Write every row of ``input_ids`` [B, S] into its own memory.

        ``attention_mask`` [B, S]: 1 = real token (Hugging Face convention); left or right padding.
        ``memory``: None (seeded N(0, init_std^2), shared by the batch), [m, d] shared initial memory (may
        require grad: with grad_mode first/second the result stays on its graph), or [B, m, d].
        ``on_step(k, losses)``: optional callback after each step's loss [B] (detached, on the device; reading
        it is the caller's host sync). Not called inside a captured CUDA graph (``cuda_graphs=True``).
        """
        if self.backend == "torch":
            return reference.write(self.model, input_ids, attention_mask, memory, self.config, self.write_head,
                                   on_step=on_step)
        ids, mask, M, head_weight, head_bias = prepare_write(self.model, input_ids, attention_mask, memory,
                                                             self.config, self.write_head)
        device = M.device
        docs = documents_from_batch(ids, mask)
        if self.cuda_graphs:
            shape = bucket_shape(len(docs) + 1, int(mask.sum()))
            packed = pack(docs, self.config.num_memory_tokens, device, shape=shape)
            filler = M.new_zeros(shape[0] - len(docs), *M.shape[1:])
            if self._graphed is None:
                self._graphed = engine.GraphedWriteLoop(self.model, self.config, head_weight, head_bias,
                                                        self.backend)
            return self._graphed(packed, torch.cat([M, filler]))
        packed = pack(docs, self.config.num_memory_tokens, device)
        return engine.write_packed(self.model, packed, M, self.config, head_weight, head_bias, self.backend,
                                   on_step=on_step)

    def write_many(self, documents, batch_tokens: int = 16384, window: int = 4096, memory=None, on_step=None):
        """Write an iterable of documents (1-D token-id sequences); yield each memory [m, d] in input order.

        Documents are read ``window`` at a time, sorted by length and grouped into batches of at most
        ``batch_tokens`` packed rows (memory rows included; a longer document gets a batch of its own).
        ``memory``: None or a shared initial memory [m, d]. Memories are detached (grad_mode must be
        "none"). Results equal writing each batch with ``write``. ``on_step`` is passed to every batch's
        ``write`` (k restarts at 0 with each batch; batches follow ``plan_batches``).
        """
        if self.config.grad_mode != "none":
            raise ValueError("write_many streams detached memories: use grad_mode='none' (or call write())")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if memory is not None and (not isinstance(memory, torch.Tensor) or memory.dim() != 2):
            raise ValueError("memory must be None or a shared [m, d] initial memory for write_many")
        iterator = iter(documents)
        position = 0
        while True:
            chunk = list(itertools.islice(iterator, window))
            if not chunk:
                return
            docs = [self._as_document(doc, position + i) for i, doc in enumerate(chunk)]
            position += len(chunk)
            out = [None] * len(docs)
            for batch in self.plan_batches(docs, batch_tokens):
                width = max(len(docs[i]) for i in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(docs[i])] = docs[i]
                    mask[row, : len(docs[i])] = 1
                with torch.no_grad():
                    result = self.write(ids, mask, memory, on_step=on_step)
                for row, i in enumerate(batch):
                    out[i] = result.memory[row].detach()
            yield from out

    @staticmethod
    def _as_document(doc, index):
        tensor = doc if isinstance(doc, torch.Tensor) else torch.as_tensor(list(doc), dtype=torch.long)
        if tensor.dim() != 1 or tensor.numel() == 0:
            raise ValueError(f"documents[{index}] must be a non-empty 1-D sequence of token ids, "
                             f"got shape {tuple(tensor.shape)}")
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise TypeError(f"documents[{index}] must hold integer token ids, got dtype {tensor.dtype}")
        return tensor.long().cpu()

    def plan_batches(self, docs, batch_tokens):
        """The batches (lists of indices into ``docs``) that ``write_many`` writes for one window, in order."""
        m = self.config.num_memory_tokens
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
        batch, used = [], 0
        for i in order:
            need = m + len(docs[i])
            if batch and used + need > batch_tokens:
                yield batch
                batch, used = [], 0
            batch.append(i)
            used += need
        if batch:
            yield batch
