"""The kernel-backed WRITE loop: packed documents, frozen weights, fused loss and update.

One step for B documents packed into one varlen sequence (``gradmem_fast.packing``):

    x      = cat(M.reshape(B*m, d), E(tokens))[source_index]        [1, T, d], T = sum_b (m + n_b)
    h      = backbone(x, positions restarting per document, varlen attention on cu_seqlens)
    L_b    = linear_cross_entropy(h[loss_rows], W, tokens, reduction="sample_mean", cu_seqlens=cu_tokens)
    g      = d(sum_b L_b)/dM                 (only the memories' gradient: no weight-gradient matmuls)
    M, |g| = memory_update(M, g, ...)        (fused clip + SGD/Adam, per-document norms on the device)

Attention goes through the model's own layers with the attention implementation switched to the
registered ``"gradmem_fast"`` entry for the duration of the call (transformers' AttentionInterface); the
varlen offsets travel as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments that
transformers forwards to attention functions. ``with use_backend(...)`` makes every op reached this way run
on the engine's backend. Inside the K-step loop nothing reads a value back to the host.
"""
import contextlib

import torch

from . import hf
from .backend import use_backend
from .config import WriteConfig
from .ops.cross_entropy import linear_cross_entropy
from .ops.update import memory_update
from .packing import PackedBatch
from .result import WriteResult

ATTENTION_NAME = "gradmem_fast"


def check_model_supported(model) -> None:
    """Raise a ValueError unless ``model`` routes attention through transformers' AttentionInterface."""
    supports = getattr(model, "_supports_attention_backend", False)
    if not supports or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"model: {type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so the triton write engine cannot run it; use backend='torch'"
        )


@contextlib.contextmanager
def gradmem_attention(model):
    """Temporarily switch ``model`` to the registered gradmem_fast attention."""
    from .hf import register_attention

    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _step_loss(model, memories, token_embeds, packed: PackedBatch, head_weight, head_bias):
    B, m, d = memories.shape
    rows = torch.cat([memories.reshape(B * m, d).to(token_embeds.dtype), token_embeds])
    x = rows.index_select(0, packed.source_index).unsqueeze(0)
    cu = packed.cu_seqlens
    # transformers forwards these keyword arguments to the attention function (FlashAttentionKwargs).
    out = hf.backbone(model)(
        inputs_embeds=x, position_ids=packed.position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[0].index_select(0, packed.loss_rows)
    return linear_cross_entropy(h, head_weight, packed.tokens, head_bias, reduction="sample_mean",
                                cu_seqlens=packed.cu_tokens)


def write_packed(model, packed: PackedBatch, memory: torch.Tensor, config: WriteConfig, head_weight, head_bias,
                 backend: str) -> WriteResult:
    """Run ``config.steps`` WRITE steps on a packed batch; ``memory`` is [B, m, d]."""
    if config.grad_mode == "second":
        raise NotImplementedError("grad_mode='second' is not available on the triton write engine yet; "
                                  "use backend='torch'")
    B = packed.batch
    losses = torch.empty(config.steps, B, dtype=torch.float32, device=memory.device)
    norms = torch.empty_like(losses)
    clip_value = config.effective_clip_value
    emb = hf.input_embeddings(model)
    M, state = memory, None
    with use_backend(backend), gradmem_attention(model), torch.enable_grad():
        token_embeds = emb(packed.tokens)
        if config.grad_mode == "none":
            token_embeds = token_embeds.detach()
        for k in range(config.steps):
            Mk = M.detach().requires_grad_(True) if config.grad_mode == "none" or not M.requires_grad else M
            loss = _step_loss(model, Mk, token_embeds, packed, head_weight, head_bias)
            (grad,) = torch.autograd.grad(loss.sum(), Mk)
            losses[k] = loss.detach()
            with torch.set_grad_enabled(config.grad_mode != "none"):
                result = memory_update(Mk, grad.detach(), lr=config.lr, optimizer=config.optimizer,
                                       clip_value=clip_value, clip_norm=config.clip_norm, state=state,
                                       step=k + 1, betas=config.adam_betas)
            norms[k] = result.grad_norm
            M, state = result.memory, result.state
            if config.grad_mode == "none":
                M = M.detach()
    return WriteResult(memory=M, losses=losses, grad_norms=norms)
