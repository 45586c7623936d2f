"""The pure-torch oracle of a GradMem WRITE and READ (DESIGN.md, "The semantics contract").

Plain autograd, eager attention (whatever the model is set to), full logits. Every fast path must
reproduce these numbers; it is also the ``torch`` backend of ``MemoryWriter``.

For a batch of B documents c_b with n_b real tokens and memories M_b [m, d]:

    x_b      = [M_b ; E(c_b)]                       positions 0 .. m + n_b - 1, causal
    h_b      = backbone(x_b)                        final hidden states
    logit_bj = phi(s (W h_b[m - 1 + j] (+ bias)))   position m-1+j predicts token j; s, phi: the model's own
                                                    logit post-processing (inputs.head_logit_transform:
                                                    phi(x) = c tanh(x / c) or x) for its own head, none
                                                    for a separate write head
    L_b      = sum_j CE(logit_bj, c_bj) / max(1, n_b)
               (with ``config.given_tokens = g``: sums over j >= g, divided by max(1, n_b - g))
    g_b      = d(sum_b L_b) / d M_b                 each memory gets its own document's gradient
               (with ``config.alignment_weight = alpha``: d(sum_b L_b + alpha A_b) / d M_b, A_b the
               activation-alignment term of ``gradmem_fast.alignment``; L_b stays the reported loss)
    SGD:  g <- clamp(g, +-clip_value); g_b <- g_b * clip_norm / (||g_b|| + 1e-6) if ||g_b|| > clip_norm;
          M_b <- M_b - lr g_b
    Adam: g <- clamp(g, +-clip_value or 10); [norm clip]; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
          M <- M - lr * (m / (1-b1^k)) / (sqrt(max(v / (1-b2^k), 1e-8)) + 1e-8)

The update is the torch backend of ``gradmem_fast.ops.update`` (``sgd_torch`` / ``adam_torch``), whose
tests check it against the formula; the whole write is checked against an independent naive
implementation in tests/eager_gradmem.py.
"""

import torch
import torch.nn.functional as F

from . import alignment as align
from . import hf, lowrank
from .config import WriteConfig
from .inputs import check_token_batch, head_logit_transform, prepare_write
from .ops import update as update_ops
from .ops.cross_entropy import postprocess_logits
from .result import WriteResult


def _math_dtype(dtype):
    """fp32 math for 16-bit tensors, the tensor's own precision otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def write_losses(model, memory, ids, mask, head_weight, head_bias=None, embeds=None, given_tokens=0):
    """Per-document mean reconstruction loss [B] (fp32 or fp64) with full logits.

    ``ids``/``mask`` [B, S] are right-aligned (see ``inputs.check_token_batch``); ``memory`` [B, m, d].
    ``given_tokens=g``: tokens j < g are inputs only, left out of the sum and of the count.
    """
    return write_terms(model, memory, ids, mask, head_weight, head_bias, embeds, given_tokens)[0]


def write_terms(
    model, memory, ids, mask, head_weight, head_bias=None, embeds=None, given_tokens=0, alignment=None, layers=None
):
    """``write_losses`` [B] and, with ``alignment`` (``alignment.AlignmentTargets`` of the same batch), the
    activation-alignment term A [B] at the last ``layers`` layers from the same forward (else None)."""
    B, S = ids.shape
    m = memory.shape[1]
    if embeds is None:
        embeds = hf.input_embeddings(model)(ids)
    x = torch.cat([memory.to(embeds.dtype), embeds], dim=1)
    full_mask = torch.cat([torch.ones(B, m, dtype=mask.dtype, device=mask.device), mask], dim=1)
    if hf.is_causal(model):
        # Real tokens come first in every row, so under causal attention no real position sees padding and
        # the padding mask changes nothing they compute. Passing it anyway gives padding rows beyond a
        # sliding window no visible key at all: NaN there, which then reaches real rows as 0 * NaN in P @ V.
        full_mask = torch.ones_like(full_mask)
    positions = torch.arange(m + S, device=ids.device).unsqueeze(0).expand(B, -1)
    aligned = None
    if alignment is None:
        hidden = hf.backbone_hidden(model, x, full_mask.long(), positions)
    else:
        hidden, states = align.backbone_states(model, x, full_mask.long(), positions, layers)
        # Token j sits at row m + j of the memory run and at row j of the text run.
        aligned = align.alignment_losses([h[:, m:] for h in states], alignment, _math_dtype(hidden.dtype))
    logits = F.linear(hidden[:, m - 1 : m + S - 1], head_weight, head_bias)
    logits = postprocess_logits(logits, *head_logit_transform(model, head_weight))
    ce = F.cross_entropy(logits.to(_math_dtype(logits.dtype)).flatten(0, 1), ids.flatten(), reduction="none").view(B, S)
    scored = mask.bool() & (torch.arange(S, device=ids.device) >= given_tokens)
    ce = torch.where(scored, ce, torch.zeros_like(ce))
    return ce.sum(dim=1) / scored.sum(dim=1).clamp_min(1).to(ce.dtype), aligned


def memory_step(Mk, grad, config: WriteConfig, k: int, state):
    """Step ``k`` (0-based) of the contract's update (module docstring: SGD, or Adam/AdamW with ``state``) of
    the memory ``Mk`` with ``grad``; returns (M_{k+1}, state). The graph of the update is kept unless grad_mode
    is "none". The formula lives once, as the torch backend of the update op."""
    clip_value = config.effective_clip_value
    with torch.set_grad_enabled(config.grad_mode != "none"):
        if config.optimizer == "sgd":
            M, _ = update_ops.sgd_torch(Mk, grad, config.lr_at(k), clip_value, config.clip_norm)
        else:
            M, _, state = update_ops.adam_torch(
                Mk,
                grad,
                config.lr_at(k),
                clip_value,
                config.clip_norm,
                state,
                k + 1,
                config.adam_betas,
                config.weight_decay,
            )
    return (M.detach() if config.grad_mode == "none" else M), state


def write(
    model,
    input_ids,
    attention_mask=None,
    memory=None,
    config: WriteConfig = None,
    write_head=None,
    on_step=None,
    memory_input=None,
    keep_last_loss=False,
):
    """Write each row of ``input_ids`` into its own memory with ``config.steps`` gradient steps.

    ``memory``: None (seeded N(0, init_std^2), shared), [m, d] shared initial memory (may be a leaf that
    requires grad), or [B, m, d]. Returns a ``WriteResult``. ``on_step(k, losses)``, if given, is called
    after step k's loss [B] (detached, before its update) is known.

    Hooks for the meta-training model class (``gradmem_fast.model``): ``memory_input(M)`` maps the memory
    [B, m, d] to the rows placed before the context ([B, m', d]: e.g. control vectors around a projected
    memory; the gradient is still taken w.r.t. M); ``keep_last_loss=True`` returns the last step's losses
    [B] on the autograd graph (weights, head, M) as ``WriteResult.last_loss``.
    """
    config = WriteConfig() if config is None else config
    if not isinstance(config, WriteConfig):
        raise TypeError(f"config must be a WriteConfig, got {type(config).__name__}")
    emb = hf.input_embeddings(model)
    ids, mask, M, head_weight, head_bias = prepare_write(model, input_ids, attention_mask, memory, config, write_head)
    low = None
    if config.memory_rank is not None:  # low-rank memories: the update acts on z (gradmem_fast.lowrank)
        low, z, M = lowrank.start(config, model, M, memory_input)

    losses, norms, state, kept = [], [], None, None
    aligned_log: list[torch.Tensor] = []
    with torch.enable_grad():
        embeds = emb(ids)
        targets = None
        if config.alignment_weight:
            # The text run does not depend on the memory: once per write, without gradient.
            targets = align.targets(
                model, embeds, mask, config.alignment_layers, config.given_tokens, config.alignment_weight
            )
        for k in range(config.steps):
            second = config.second_order_step(k)
            keep = keep_last_loss and k == config.steps - 1
            if config.grad_mode == "none" or not M.requires_grad:
                # A fresh leaf: only the memory's gradient is needed, nothing upstream is tracked.
                Mk = M.detach().requires_grad_(True)
            else:
                Mk = M
            loss, aligned = write_terms(
                model,
                Mk if memory_input is None else memory_input(Mk),
                ids,
                mask,
                head_weight,
                head_bias,
                embeds=embeds if config.grad_mode != "none" or keep_last_loss else embeds.detach(),
                given_tokens=config.given_tokens,
                alignment=targets,
                layers=config.alignment_layers,
            )
            # The step differentiates L_b + alpha A_b; the cross-entropy L_b stays the reported loss.
            objective = loss if aligned is None else loss + config.alignment_weight * aligned
            if aligned is not None:
                aligned_log.append(aligned.detach().float())
            (grad,) = torch.autograd.grad(objective.sum(), Mk, create_graph=second, retain_graph=second or keep)
            if keep:
                kept = loss
            losses.append(loss.detach().float())
            if on_step is not None:
                on_step(k, losses[-1])
            if low is not None:
                z, M, norm, state = low.step(
                    z, Mk.detach(), grad.detach(), lr=config.lr_at(k), state=state, step=k + 1, config=config
                )
                norms.append(norm.float())
                continue
            norms.append(grad.detach().flatten(1).norm(dim=1).float())
            if not second:
                grad = grad.detach()
            M, state = memory_step(Mk, grad, config, k, state)
    return WriteResult(
        memory=M,
        losses=torch.stack(losses),
        grad_norms=torch.stack(norms),
        last_loss=kept,
        alignment_losses=torch.stack(aligned_log) if aligned_log else None,
    )


def read_logits(model, memory, query_ids, query_mask=None):
    """READ: logits [B, Q+1, V] at positions m-1 .. m+Q-1 of ``[memory ; E(query)]``.

    Row j predicts query token j (the last row predicts the token after the query). Queries are
    right-aligned first (see ``inputs.check_token_batch``), so with padding, row j of a document follows
    its j-th real token; rows past a document's length are padding positions.
    """
    emb = hf.input_embeddings(model)
    head = hf.output_head(model)
    device = emb.weight.device
    ids, mask = check_token_batch(
        query_ids.to(device) if isinstance(query_ids, torch.Tensor) else query_ids,
        query_mask,
        emb.weight.shape[0],
        name="query_ids",
        mask_name="query_mask",
    )
    B, Q = ids.shape
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[0] != B:
        raise ValueError(
            f"memory must be a [batch={B}, m, d] tensor, got "
            f"{tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__}"
        )
    if memory.shape[2] != hf.hidden_size(model):
        raise ValueError(
            f"memory width {memory.shape[2]} does not match the model's hidden size {hf.hidden_size(model)}"
        )
    m = memory.shape[1]
    embeds = emb(ids)
    x = torch.cat([memory.to(device=device, dtype=embeds.dtype), embeds], dim=1)
    full_mask = torch.cat([torch.ones(B, m, dtype=torch.long, device=device), mask.long()], dim=1)
    positions = torch.arange(m + Q, device=device).unsqueeze(0).expand(B, -1)
    hidden = hf.backbone_hidden(model, x, full_mask, positions)
    logits = F.linear(hidden[:, m - 1 :], head.weight, getattr(head, "bias", None))
    return postprocess_logits(logits, *hf.logit_postprocessing(model))
