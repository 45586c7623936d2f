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
import dataclasses

import torch

from . import hf
from .backend import use_backend
from .config import WriteConfig
from .ops.cross_entropy import linear_cross_entropy
from .ops.update import memory_update
from .packing import IGNORE_INDEX, PackedBatch
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


def _step_loss(model, memories, token_embeds, packed: PackedBatch, head_weight, head_bias, ones_mask=None,
               second_order=False):
    B, m, d = memories.shape
    rows = torch.cat([memories.reshape(B * m, d).to(token_embeds.dtype), token_embeds])
    x = rows.index_select(0, packed.source_index).unsqueeze(0)
    cu = packed.cu_seqlens
    if ones_mask is None:
        ones_mask = torch.ones(1, x.shape[1], dtype=torch.long, device=x.device)
    # The all-ones 2-D mask keeps transformers from inspecting position_ids for packed sequences (a host
    # synchronisation); the varlen offsets below are what the attention actually uses. transformers
    # forwards these keyword arguments to the attention function (FlashAttentionKwargs).
    out = hf.backbone(model)(
        inputs_embeds=x, attention_mask=ones_mask, position_ids=packed.position_ids, use_cache=False,
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[0].index_select(0, packed.loss_rows)
    if not second_order:
        # Only a second-order step differentiates through the head. A custom autograd op cannot tell which
        # of its inputs the current autograd.grad call needs, so hand it a frozen head: no dW/db work.
        head_weight = head_weight.detach()
        head_bias = None if head_bias is None else head_bias.detach()
    # A second-order step differentiates the loss's backward, so the gradient must not be pre-formed.
    return linear_cross_entropy(h, head_weight, packed.targets, head_bias, reduction="sample_mean",
                                cu_seqlens=packed.cu_tokens, ignore_index=IGNORE_INDEX,
                                precompute_grad=None if not second_order else False)


def _write_loop(model, packed, memory, config, head_weight, head_bias, lr, losses, norms, ones_mask=None,
                on_step=None):
    """The K steps; writes per-step stats into ``losses``/``norms`` [K, B] and returns the final memory.

    Nothing here reads a tensor back to the host, so the loop can be captured in a CUDA graph (``on_step``,
    a per-step callback ``on_step(k, losses[k])``, is for uncaptured loops only; unset, it costs nothing).
    """
    clip_value = config.effective_clip_value
    emb = hf.input_embeddings(model)
    M, state = memory, None
    token_embeds = emb(packed.tokens)
    if ones_mask is None:  # built once per write, not once per step
        ones_mask = torch.ones(1, packed.total_rows, dtype=torch.long, device=token_embeds.device)
    if config.grad_mode == "none":
        token_embeds = token_embeds.detach()
    for k in range(config.steps):
        second = config.second_order_step(k)
        Mk = M.detach().requires_grad_(True) if config.grad_mode == "none" or not M.requires_grad else M
        loss = _step_loss(model, Mk, token_embeds, packed, head_weight, head_bias, ones_mask, second)
        (grad,) = torch.autograd.grad(loss.sum(), Mk, create_graph=second)
        losses[k].copy_(loss.detach())
        if on_step is not None:
            on_step(k, losses[k])
        with torch.set_grad_enabled(config.grad_mode != "none"):
            result = memory_update(Mk, grad if second else grad.detach(), lr=lr, optimizer=config.optimizer,
                                   clip_value=clip_value, clip_norm=config.clip_norm, state=state, step=k + 1,
                                   betas=config.adam_betas)
        norms[k].copy_(result.grad_norm)
        M, state = result.memory, result.state
        if config.grad_mode == "none":
            M = M.detach()
    return M


def write_packed(model, packed: PackedBatch, memory: torch.Tensor, config: WriteConfig, head_weight, head_bias,
                 backend: str, on_step=None) -> WriteResult:
    """Run ``config.steps`` WRITE steps on a packed batch; ``memory`` is [B, m, d] (B = packed.batch).

    ``on_step(k, losses)``: optional callback after step k's loss (the real documents' [B], detached).
    """
    losses = torch.empty(config.steps, packed.batch, dtype=torch.float32, device=memory.device)
    norms = torch.empty_like(losses)
    with use_backend(backend), gradmem_attention(model), torch.enable_grad():
        step_hook = None if on_step is None else (lambda k, loss: on_step(k, loss[: packed.real_batch]))
        M = _write_loop(model, packed, memory, config, head_weight, head_bias, config.lr, losses, norms,
                        on_step=step_hook)
    B = packed.real_batch
    return WriteResult(memory=M[:B], losses=losses[:, :B], grad_norms=norms[:, :B])


class GraphedWriteLoop:
    """The whole K-step loop (grad_mode "none") captured once per fixed shape and replayed (CUDA only).

    Batches are padded to a bucket shape (``packing.bucket_shape``) so a handful of graphs serve every
    batch; each replay copies the new batch into the graph's static buffers.
    """

    def __init__(self, model, config: WriteConfig, head_weight, head_bias, backend: str):
        if config.grad_mode != "none":
            raise ValueError("CUDA graphs capture detached writes only: grad_mode must be 'none'")
        self.model, self.config = model, config
        self.head_weight, self.head_bias = head_weight, head_bias
        self.backend = backend
        self.graphs = {}

    @staticmethod
    def key(packed: PackedBatch):
        max_seqlen = 1 << max(6, (packed.max_seqlen - 1).bit_length())
        return packed.batch, int(packed.tokens.numel()), max_seqlen

    def _capture(self, packed: PackedBatch, memory: torch.Tensor):
        key = self.key(packed)
        static = dataclasses.replace(
            packed, tokens=packed.tokens.clone(), targets=packed.targets.clone(),
            cu_seqlens=packed.cu_seqlens.clone(), position_ids=packed.position_ids.clone(),
            source_index=packed.source_index.clone(), loss_rows=packed.loss_rows.clone(),
            cu_tokens=packed.cu_tokens.clone(), max_seqlen=key[2],
        )
        state = {
            "packed": static,
            "memory": memory.detach().clone(),
            "lr": torch.full((1,), float(self.config.lr), dtype=torch.float32, device=memory.device),
            "ones": torch.ones(1, static.total_rows, dtype=torch.long, device=memory.device),
            "losses": torch.empty(self.config.steps, static.batch, dtype=torch.float32, device=memory.device),
        }
        state["norms"] = torch.empty_like(state["losses"])

        def run():
            return _write_loop(self.model, static, state["memory"], self.config, self.head_weight, self.head_bias,
                               state["lr"], state["losses"], state["norms"], state["ones"])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles and autotunes every kernel before capture
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            state["out"] = run()
        state["graph"] = graph
        self.graphs[key] = state
        return state

    def __call__(self, packed: PackedBatch, memory: torch.Tensor) -> WriteResult:
        with use_backend(self.backend), gradmem_attention(self.model), torch.enable_grad():
            state = self.graphs.get(self.key(packed)) or self._capture(packed, memory)
            static = state["packed"]
            for name in ("tokens", "targets", "cu_seqlens", "position_ids", "source_index", "loss_rows",
                         "cu_tokens"):
                getattr(static, name).copy_(getattr(packed, name))
            state["memory"].copy_(memory)
            state["graph"].replay()
        B = packed.real_batch
        return WriteResult(memory=state["out"][:B].clone(), losses=state["losses"][:, :B].clone(),
                           grad_norms=state["norms"][:, :B].clone())
