"""An independent, deliberately naive GradMem for checking gradmem_fast.reference.

One document at a time, no padding, logits from the model's own forward (or hidden states times a
write head), log-softmax written out, the optimizer formulas written out again. Shares no code with
the package.
"""

import torch


def _logits(model, x, write_head):
    if write_head is None:
        return model(inputs_embeds=x[None]).logits[0]
    weight, bias = write_head
    hidden = model.base_model(inputs_embeds=x[None]).last_hidden_state[0]
    out = hidden @ weight.t()
    return out + bias if bias is not None else out


def doc_loss(model, memory, tokens, write_head=None, given=0):
    """Mean next-token cross-entropy of ``tokens`` predicted from [memory ; E(tokens)]; the first ``given``
    tokens are read but not predicted (0 when nothing is left to predict)."""
    m, n = memory.shape[0], tokens.shape[0]
    if n <= given:
        return (memory * 0).sum()
    x = torch.cat([memory.to(model.get_input_embeddings().weight.dtype), model.get_input_embeddings()(tokens)])
    pred = _logits(model, x, write_head)[m - 1 + given : m - 1 + n]
    logp = pred - pred.logsumexp(dim=-1, keepdim=True)
    return -logp[torch.arange(n - given), tokens[given:]].sum() / (n - given)


def _clip(g, clip_value, clip_norm):
    if clip_value is not None:
        g = torch.maximum(torch.minimum(g, torch.full_like(g, clip_value)), torch.full_like(g, -clip_value))
    if clip_norm is not None:
        norm = torch.sqrt((g * g).sum())
        if norm > clip_norm:
            g = g * (clip_norm / (norm + 1e-6))
    return g


def write_one(
    model,
    tokens,
    memory,
    steps,
    lr,
    optimizer="sgd",
    clip_value=None,
    clip_norm=None,
    grad_mode="none",
    last_k=None,
    write_head=None,
    betas=(0.9, 0.999),
    given=0,
):
    """Returns (memory, [loss per step], [grad norm per step]) for one document.

    ``lr``: one step size, or a list with the step size of every step (a schedule)."""
    if optimizer == "adam" and clip_value is None:
        clip_value = 10.0
    last_k = steps if last_k is None else last_k
    M = memory
    losses, norms = [], []
    m1 = v1 = None
    for k in range(steps):
        second = grad_mode == "second" and k >= steps - last_k
        if grad_mode == "none" or not M.requires_grad:
            M = M.detach().requires_grad_(True)
        loss = doc_loss(model, M, tokens, write_head, given)
        (g,) = torch.autograd.grad(loss, M, create_graph=second)
        losses.append(float(loss.detach()))
        norms.append(float(torch.sqrt((g.detach() ** 2).sum())))
        if not second:
            g = g.detach()
        g = _clip(g, clip_value, clip_norm)
        lr_k = lr[k] if isinstance(lr, (list, tuple)) else lr
        if optimizer == "sgd":
            M = M - lr_k * g
        else:
            b1, b2 = betas
            m1 = (1 - b1) * g if m1 is None else b1 * m1 + (1 - b1) * g
            v1 = (1 - b2) * g * g if v1 is None else b2 * v1 + (1 - b2) * g * g
            mh = m1 / (1 - b1 ** (k + 1))
            vh = torch.clamp(v1 / (1 - b2 ** (k + 1)), min=1e-8)
            M = M - lr_k * mh / (torch.sqrt(vh) + 1e-8)
        if grad_mode == "none":
            M = M.detach()
    return M, losses, norms


def read_logits_one(model, memory, query):
    """Logits [Q+1, V] at positions m-1 .. m+Q-1 of [memory ; E(query)]."""
    m = memory.shape[0]
    x = torch.cat([memory.to(model.get_input_embeddings().weight.dtype), model.get_input_embeddings()(query)])
    return model(inputs_embeds=x[None]).logits[0, m - 1 :]
