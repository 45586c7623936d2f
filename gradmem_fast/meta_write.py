"""The WRITE of ``GradMemModel``'s ``torch`` backend: the reference's padded eager step, minus work whose result
no gradient or loss ever reads.

It computes what ``gradmem_fast.reference.write`` computes (the same per-document losses, gradients, updates
and statistics; tests/test_model_class.py checks both against an independent loop in fp64), on the padded batch
through the model's own eager forward, with two differences in how:

1. The loss can go through the fused linear cross-entropy (``ops.cross_entropy.linear_cross_entropy``, torch
   backend, chunked, no ``[B, S, V]`` logits) instead of full logits + ``F.cross_entropy``, from a vocabulary of
   ``FUSED_CE_MIN_VOCAB`` on. Off by default: measured on CPU (GPT-2 small shape, V = 50257, second order, one
   thread) the fused torch path took 16.1 s of CPU per meta step against 12.2 s with full logits
   (benchmarks/results/2026-12-07-meta-peer/README.md); it saves memory, not time, there.
2. With ``keep_last_loss`` and a first-order last step (grad_mode "first" or "none", or a step before
   ``last_k_second_order``): the last step's one backward computes the memory gradient *and* the gradients of
   ``sum_b L_b`` with respect to the weights (``params``), and the kept loss carries them (``_CarriedGrad``).
   The outer backward then never re-traverses that step's forward: it multiplies the carried gradients by the
   (uniform) cotangent of the loss, ``w / B`` in ``GradMemModel``. Before, that forward was traversed twice
   (memory gradient, then weights); its activations are also freed right after the step.

What ``write`` returns is a ``WriteResult`` as the reference's: memory [B, m, d] (on the graph per grad_mode),
losses and raw gradient norms [K, B] (detached, fp32), ``last_loss`` [B] on the graph when asked for.
"""

import torch
import torch.nn.functional as F

from . import hf, reference
from .config import WriteConfig
from .inputs import head_logit_transform
from .ops.cross_entropy import linear_cross_entropy, postprocess_logits
from .result import WriteResult

# Vocabulary size from which the fused linear cross-entropy replaces full logits (point 1 of the docstring);
# None: never (the measured CPU default).
FUSED_CE_MIN_VOCAB: int | None = None


def _math_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def losses(model, rows, ids, mask, embeds, head_weight, head_bias, transform, fused, causal, second=True):
    """Per-document mean reconstruction loss [B] of ``[rows ; E(c)]``: position r-1+j predicts token j.

    ``rows`` [B, r, d] (the memory as it enters the model), ``ids``/``mask`` [B, S] right-padded (real tokens
    first, as ``inputs.prepare_write`` returns them), ``embeds`` = E(ids), ``transform`` = (logit scale, softcap).
    ``fused``: the loss via ``linear_cross_entropy`` (docstring point 1); ``causal``: ``hf.is_causal(model)``;
    ``second``: its backward will build a graph (then no gradient is formed in its forward). All positions are
    fed, the last one too: dropping it (it predicts nothing) would change a Llama's rotary tables, computed in
    fp32 for the sequence length, by a rounding."""
    B, S = ids.shape
    r = rows.shape[1]
    x = torch.cat([rows.to(embeds.dtype), embeds], dim=1)
    att = None
    if not causal:
        att = torch.cat([torch.ones(B, r, dtype=torch.long, device=mask.device), mask.long()], dim=1)
    # As the reference, without its [B, r+S] tensors: under causal attention no padding mask (real tokens come
    # first in every row, so padding changes no real position; Hugging Face builds the causal mask alone), and
    # positions [1, r+S], broadcast over the batch as Hugging Face's default: rotary tables are then formed once,
    # not once per document (the same values, 1/B of the memory traffic in every rotary product).
    positions = torch.arange(r + S, device=ids.device).unsqueeze(0)
    hidden = hf.backbone_hidden(model, x, att, positions)[:, r - 1 : r - 1 + S]
    scale, cap = transform
    scored = mask.bool()
    if fused:
        targets = torch.where(scored, ids, torch.full_like(ids, -100))
        return linear_cross_entropy(
            hidden,
            head_weight,
            targets,
            head_bias,
            reduction="sample_mean",
            backend="torch",
            precompute_grad=not second,
            logit_scale=scale,
            softcap=cap,
        )
    logits = postprocess_logits(F.linear(hidden, head_weight, head_bias), scale, cap)
    ce = F.cross_entropy(logits.to(_math_dtype(logits.dtype)).flatten(0, 1), ids.flatten(), reduction="none")
    ce = torch.where(scored, ce.view(B, S), torch.zeros((), dtype=ce.dtype, device=ce.device))
    return ce.sum(dim=1) / scored.sum(dim=1).clamp_min(1).to(ce.dtype)


class _CarriedGrad(torch.autograd.Function):
    """``value`` [B] (detached losses) on the graph of ``inputs``, whose gradients of ``sum_b value_b`` were
    computed already (``grads``): backward returns ``c * grads`` for a uniform cotangent ``c``."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, gout):
        c = gout.reshape(-1)[0]
        if not torch.equal(gout, c.expand_as(gout)):
            raise RuntimeError(
                "GradMemModel (backend 'torch'): the kept inner loss carries the gradient of its sum; it must be "
                "used through its sum or mean (got a non-uniform cotangent)"
            )
        return (None, None, *[None if g is None else g * c for g in ctx.grads])


def write(model, ids, mask, M, config: WriteConfig, head_weight, head_bias, memory_input, keep_last_loss, params):
    """K WRITE steps from M [B, m, d] (validated inputs, as ``inputs.prepare_write`` returns them).

    ``memory_input(M)`` maps the memory to the rows before the context (None: M itself); ``params``: the tensors
    (leaves, none upstream of M) whose gradients the kept last loss may carry (docstring point 2)."""
    emb = hf.input_embeddings(model)
    causal = hf.is_causal(model)
    fused = FUSED_CE_MIN_VOCAB is not None and head_weight.shape[0] >= FUSED_CE_MIN_VOCAB
    transform = head_logit_transform(model, head_weight)
    carry = keep_last_loss and torch.is_grad_enabled()  # under no_grad nobody differentiates the kept loss
    steps = config.steps
    out_losses, norms, state, kept = [], [], None, None
    with torch.enable_grad():
        embeds = emb(ids)
        for k in range(steps):
            second = config.second_order_step(k)
            last = k == steps - 1
            keep = keep_last_loss and last
            if config.grad_mode == "none" or not M.requires_grad:
                Mk = M.detach().requires_grad_(True)
            else:
                Mk = M
            rows = Mk if memory_input is None else memory_input(Mk)
            use_embeds = embeds if config.grad_mode != "none" or keep else embeds.detach()
            loss = losses(model, rows, ids, mask, use_embeds, head_weight, head_bias, transform, fused, causal, second)
            if keep and carry and not second:
                sources = [p for p in params if p.requires_grad]
                grads = torch.autograd.grad(loss.sum(), [Mk, *sources], allow_unused=True)
                grad = grads[0]
                # "none": M_k is a fresh leaf, nothing upstream of it wants a gradient
                carried = (None if config.grad_mode == "none" else grad, *grads[1:])
                kept = _CarriedGrad.apply(loss.detach(), carried, Mk, *sources)
            else:
                (grad,) = torch.autograd.grad(loss.sum(), Mk, create_graph=second, retain_graph=second or keep)
                if keep:
                    kept = loss
            out_losses.append(loss.detach().float())
            norms.append(grad.detach().flatten(1).norm(dim=1).float())
            if not second:
                grad = grad.detach()
            M, state = reference.memory_step(Mk, grad, config, k, state)
    return WriteResult(memory=M, losses=torch.stack(out_losses), grad_norms=torch.stack(norms), last_loss=kept)
