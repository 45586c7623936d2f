"""MemoryWriter: the user-facing batched WRITE (DESIGN.md, "The semantics contract").

    writer = MemoryWriter(model, WriteConfig(num_memory_tokens=8, steps=5, lr=1e-2))
    result = writer.write(input_ids, attention_mask)      # result.memory: [B, m, d]

The writer picks a backend (``gradmem_fast.backend.resolve_backend``): ``torch`` runs
``gradmem_fast.reference`` (eager autograd, full logits). The Triton write engine plugs in behind the
same API.
"""
import torch

from . import hf, reference
from .backend import resolve_backend
from .config import WriteConfig
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
    """

    def __init__(self, model, config: WriteConfig = None, backend: str = "auto", write_head=None):
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
        self.backend = self._pick_backend(backend, device)

    @staticmethod
    def _pick_backend(backend, device):
        resolved = resolve_backend(backend, device)
        if resolved == "triton":
            if backend == "auto":
                # Until the Triton write engine lands, "auto" keeps working everywhere on the reference.
                return "torch"
            raise NotImplementedError(
                "the Triton write engine is not available in this version; use backend='torch' "
                "(or GRADMEM_FAST_BACKEND=torch)"
            )
        return resolved

    def write(self, input_ids, attention_mask=None, memory=None) -> WriteResult:
        """Write every row of ``input_ids`` [B, S] into its own memory.

        ``attention_mask`` [B, S]: 1 = real token (Hugging Face convention); left or right padding.
        ``memory``: None (seeded N(0, init_std^2), shared by the batch), [m, d] shared initial memory (may
        require grad: with grad_mode first/second the result stays on its graph), or [B, m, d].
        """
        return reference.write(self.model, input_ids, attention_mask, memory, self.config, self.write_head)
