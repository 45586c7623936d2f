"""Validation and normalisation of user inputs shared by the writer and the reader.

Everything here runs once per call, outside the K-step loop: the few host synchronisations it needs
(checking token ranges and empty rows) never happen inside the loop.
"""

import torch

from . import hf


def check_token_batch(input_ids, attention_mask, vocab_size: int, name: str = "input_ids", mask_name="attention_mask"):
    """Validate ``input_ids`` [B, S] and its mask; return (ids, mask) right-aligned.

    A mask follows the Hugging Face convention (1 = real token). Real tokens of each row are moved to the
    front in their original order (a stable sort), so left-padded batches give the same result as
    right-padded ones: a document is its real tokens, at positions m, m+1, ... after the memory.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [batch, seq] with batch, seq >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"{mask_name} must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"{mask_name} must have the shape of {name} {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"{mask_name} must be bool or integer (1 = real token), got dtype {attention_mask.dtype}")
        mask = attention_mask.to(input_ids.device)
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{mask_name} must contain only 0 and 1")
        mask = mask.bool()
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"{mask_name}: rows {rows[:10]} have no real token; every document needs at least one token "
            "(drop empty documents before writing)"
        )
    real_ids = input_ids[mask]
    if real_ids.numel() and (real_ids.min() < 0 or real_ids.max() >= vocab_size):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab_size}), got values in "
            f"[{int(real_ids.min())}, {int(real_ids.max())}]"
        )
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(mask, 1, order)
    # Padding ids are arbitrary (often -100 or pad ids beyond the vocabulary): make them embeddable.
    ids = torch.where(mask, ids, torch.zeros_like(ids)).long()
    return ids, mask


def initial_memory(memory, batch: int, config, model, device):
    """[B, m, d] starting memory from the user's ``memory`` (None, [m, d] or [B, m, d]).

    ``None`` draws ``config.init`` (default N(0, init_std^2); ``gradmem_fast.init``) of shape [m, d] on the
    CPU from a generator seeded with ``config.seed`` (the same numbers on every device), shared by the batch.
    Its dtype is the embedding dtype, except that 16-bit models get fp32 memories (small updates would be
    rounded away in 16 bits); the memory is cast to the model's dtype when it enters the model.
    """
    m, d = config.num_memory_tokens, hf.hidden_size(model)
    emb_dtype = hf.input_embeddings(model).weight.dtype
    if memory is None:
        dtype = torch.float32 if emb_dtype in (torch.float16, torch.bfloat16) else emb_dtype
        from .init import initial_memory as draw_initial

        init = draw_initial(config, model)
        return init.to(device=device, dtype=dtype).expand(batch, m, d)
    if not isinstance(memory, torch.Tensor):
        raise TypeError(f"memory must be a torch.Tensor or None, got {type(memory).__name__}")
    if not memory.dtype.is_floating_point:
        raise TypeError(f"memory must be a floating-point tensor, got dtype {memory.dtype}")
    if memory.dim() == 2:
        if tuple(memory.shape) != (m, d):
            raise ValueError(
                f"memory must have shape [num_memory_tokens={m}, hidden={d}] or [batch={batch}, {m}, {d}], "
                f"got {tuple(memory.shape)}"
            )
        return memory.to(device).expand(batch, m, d)
    if memory.dim() == 3:
        if tuple(memory.shape) != (batch, m, d):
            raise ValueError(
                f"memory must have shape [batch={batch}, num_memory_tokens={m}, hidden={d}] or [{m}, {d}], "
                f"got {tuple(memory.shape)}"
            )
        return memory.to(device)
    raise ValueError(f"memory must be 2-D [m, d] or 3-D [B, m, d], got {memory.dim()}-D")


def resolve_write_head(write_head, model):
    """(weight [V, d], bias or None) of the write head, or of the model's own output head."""
    if write_head is None:
        head = hf.output_head(model)
        return head.weight, getattr(head, "bias", None)
    d = hf.hidden_size(model)
    if isinstance(write_head, torch.Tensor):
        weight, bias = write_head, None
    elif isinstance(write_head, torch.nn.Module) and isinstance(getattr(write_head, "weight", None), torch.Tensor):
        weight, bias = write_head.weight, getattr(write_head, "bias", None)
    else:
        raise TypeError("write_head must be None, a [vocab, hidden] tensor or a Linear module")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"write_head weight must have shape [vocab, hidden={d}], got {tuple(weight.shape)}")
    return weight, bias


def head_logit_transform(model, head_weight) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a loss formed through ``head_weight``: the model's own logit post-processing
    (``hf.logit_postprocessing``) when ``head_weight`` is its output head's weight (``write_head`` None, or the
    model's head itself passed as the write head), and none, ``(1.0, None)``, for a separate write head: that is
    the caller's own ``[V, d]`` linear (GradMemModel's trainable write head included), not the model's logits."""
    head = hf.get_output_embeddings(model)
    if head is not None and getattr(head, "weight", None) is head_weight:
        return hf.logit_postprocessing(model)
    return 1.0, None


def prepare_write(model, input_ids, attention_mask, memory, config, write_head):
    """Everything a WRITE needs from the user's arguments, validated once:
    (right-aligned ids, mask, initial memory [B, m, d], head weight, head bias)."""
    emb = hf.input_embeddings(model)
    head_weight, head_bias = resolve_write_head(write_head, model)
    device = emb.weight.device
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.to(device)
    ids, mask = check_token_batch(input_ids, attention_mask, min(emb.weight.shape[0], head_weight.shape[0]))
    M = initial_memory(memory, ids.shape[0], config, model, device)
    return ids, mask, M, head_weight, head_bias
