"""Per-document scores of a memory, computed on the device: what the stopping rules and the reports read.

For document b with tokens c_0..c_{n-1}, the hidden state that predicts c_j (row m-1+j after the memory, or
row j-1 without a memory) gives ``logit_j = W h_j (+ bias)`` (then the model's own logit scale / soft-capping,
``inputs.head_logit_transform``, when W is its output head) and::

    ce_j        = logsumexp(logit_j) - logit_j[c_j]              nats
    ok_j        = argmax(logit_j) == c_j                         first maximum, as greedy decoding picks it
    loss_b      = sum_j ce_j / n_b                               the WRITE's reconstruction loss
    correct_b   = sum_j ok_j                                     teacher-forced accuracy = correct_b / n_b
    prefix_b    = min{j : not ok_j}  (n_b if none)               greedy decoding reproduces c_0..c_{prefix_b-1}
    tail_b      = sum_{j>=1} ce_j                                the tokens a model without memory can score

With ``WriteConfig.given_tokens = g`` the tokens j < g are inputs, not predictions: their targets are
negative (ignored) and every sum, ``n_b`` and ``prefix_b`` count from token g on (``prefix_b`` is then the
number of tokens after the given ones that greedy decoding reproduces, ``min{j >= g : not ok_j} - g``).

Information gain (the cramming paper's measure, in bits): the loss of the document's tokens c_1..c_{n-1}
without any memory minus their loss after the memory, ``(tail_nomem - tail_mem) / ln 2``. Token c_0 has no
prediction without a prefix, so it is left out of both sums (a gradmem-fast decision: the gain reported is
a lower bound by the bits of c_0).

The head runs on ``chunk_rows`` rows at a time: no [rows, V] logits beyond one chunk. Nothing here reads a
value back to the host; the caller reads the small [B] results once per check.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F

from . import hf
from .inputs import head_logit_transform
from .ops.cross_entropy import postprocess_logits

LN2 = math.log(2.0)


@dataclasses.dataclass
class DocumentScores:
    """Per-document scores [B] on the device (``loss``/``tail`` fp64, the counts int64)."""

    loss: torch.Tensor
    correct: torch.Tensor
    prefix: torch.Tensor
    tail: torch.Tensor
    tokens: torch.Tensor

    def to_host(self) -> "DocumentScores":
        """All five vectors on the CPU: one transfer (the caller's single host read of a check)."""
        stacked = torch.stack([self.loss, self.correct.double(), self.prefix.double(), self.tail, self.tokens.double()])
        loss, correct, prefix, tail, tokens = stacked.cpu().unbind(0)
        return DocumentScores(loss, correct.long(), prefix.long(), tail, tokens.long())

    def select(self, n: int) -> "DocumentScores":
        """The first ``n`` documents (the real ones, before any filler)."""
        return DocumentScores(self.loss[:n], self.correct[:n], self.prefix[:n], self.tail[:n], self.tokens[:n])

    @property
    def accuracy(self) -> torch.Tensor:
        return self.correct.double() / self.tokens.clamp_min(1).double()


class _Accumulator:
    """Per-document sums of the formulas above, filled one logits chunk at a time (device tensors)."""

    BIG = torch.iinfo(torch.int64).max

    def __init__(self, batch: int, device: torch.device) -> None:
        self.ce_sum = torch.zeros(batch, dtype=torch.float64, device=device)
        self.tail = torch.zeros_like(self.ce_sum)
        self.correct = torch.zeros(batch, dtype=torch.int64, device=device)
        self.tokens = torch.zeros_like(self.correct)
        self.first_wrong = torch.full((batch,), self.BIG, dtype=torch.int64, device=device)
        self.first_scored = torch.full((batch,), self.BIG, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, target: torch.Tensor, d: torch.Tensor, pos: torch.Tensor) -> None:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        real = target >= 0
        safe = torch.where(real, target, torch.zeros_like(target))
        ce = (torch.logsumexp(logits, dim=-1) - logits.gather(1, safe[:, None])[:, 0]).double()
        ce = torch.where(real, ce, torch.zeros_like(ce))
        ok = (logits.argmax(dim=-1) == target) & real
        wrong = real & ~ok
        d = torch.where(real, d, torch.zeros_like(d))
        self.ce_sum.index_add_(0, d, ce)
        self.tail.index_add_(0, d, torch.where(pos >= 1, ce, torch.zeros_like(ce)))
        self.correct.index_add_(0, d, ok.long())
        self.tokens.index_add_(0, d, real.long())
        never = torch.full_like(pos, self.BIG)
        self.first_wrong.scatter_reduce_(0, d, torch.where(wrong, pos, never), reduce="amin")
        # Ignored targets before a document's first scored token are its given tokens (a prefix).
        self.first_scored.scatter_reduce_(0, d, torch.where(real, pos, never), reduce="amin")

    def scores(self) -> DocumentScores:
        start = torch.where(self.tokens > 0, self.first_scored, torch.zeros_like(self.first_scored))
        prefix = torch.minimum(self.first_wrong - start, self.tokens)
        loss = self.ce_sum / self.tokens.clamp_min(1).double()
        return DocumentScores(loss, self.correct, prefix, self.tail, self.tokens)


def score_logits(
    logits: torch.Tensor, targets: torch.Tensor, doc: torch.Tensor, position: torch.Tensor, batch: int
) -> DocumentScores:
    """Scores of ``batch`` documents from logits already computed ([N, V], e.g. by a write step's own
    forward): row i predicts ``targets[i]``, token ``position[i]`` of document ``doc[i]`` (negative target:
    ignored)."""
    acc = _Accumulator(batch, logits.device)
    acc.add(logits, targets, doc, position)
    return acc.scores()


def score_rows(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    targets: torch.Tensor,
    doc: torch.Tensor,
    position: torch.Tensor,
    batch: int,
    chunk_rows: int = 2048,
    transform: tuple[float, float | None] = (1.0, None),
) -> DocumentScores:
    """Scores of ``batch`` documents from the hidden states that predict their tokens.

    ``hidden`` [N, d]: row i predicts ``targets[i]``, token ``position[i]`` (0-based) of document ``doc[i]``
    (rows with a negative target are ignored, e.g. filler). Formulas in the module docstring. ``transform``:
    the (logit scale, softcap) applied after the head (``inputs.head_logit_transform``).
    """
    acc = _Accumulator(batch, hidden.device)
    for lo in range(0, hidden.shape[0], chunk_rows):
        hi = min(hidden.shape[0], lo + chunk_rows)
        logits = postprocess_logits(F.linear(hidden[lo:hi], head_weight, head_bias), *transform)
        acc.add(logits, targets[lo:hi], doc[lo:hi], position[lo:hi])
    return acc.scores()


@torch.no_grad()
def no_memory_tail(
    model: torch.nn.Module,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    documents: list[torch.Tensor],
    batch_tokens: int = 8192,
    given_tokens: int = 0,
) -> torch.Tensor:
    """``tail_b`` of every document read by the model with no memory (fp64 [B] on the CPU, nats): the
    baseline of the information gain, over tokens ``max(1, given_tokens)..n-1`` (the tokens the memory's
    ``tail`` covers). Documents are right-padded in groups of about ``batch_tokens``."""
    emb = hf.input_embeddings(model)
    device = emb.weight.device
    out = torch.zeros(len(documents), dtype=torch.float64)
    order = sorted(range(len(documents)), key=lambda i: len(documents[i]))
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * len(documents[order[stop]]) <= batch_tokens:
            stop += 1
        group = order[start:stop]
        S = max(len(documents[i]) for i in group)
        ids = torch.zeros(len(group), S, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(documents[i])] = documents[i]
        ids = ids.to(device)
        positions = torch.arange(S, device=device).expand(len(group), S)
        hidden = hf.backbone_hidden(model, emb(ids), torch.ones_like(ids), positions)
        # Row j-1 predicts token j (j >= 1, and j >= given_tokens): keep each document's rows from there to n-2.
        first = max(0, given_tokens - 1)
        rows = [(row, j) for row, i in enumerate(group) for j in range(first, len(documents[i]) - 1)]
        if rows:
            r = torch.tensor(rows, dtype=torch.long, device=device)
            scores = score_rows(
                hidden[r[:, 0], r[:, 1]],
                head_weight,
                head_bias,
                ids[r[:, 0], r[:, 1] + 1],
                r[:, 0],
                r[:, 1] + 1,
                len(group),
                transform=head_logit_transform(model, head_weight),
            )
            out[group] = scores.tail.cpu()
        start = stop
    return out


@torch.no_grad()
def score_memories(
    model: torch.nn.Module,
    memory: torch.Tensor,
    documents: list[torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    given_tokens: int = 0,
) -> DocumentScores:
    """Scores of each memory ``memory[b]`` [B, m, d] on its document (one padded forward; CPU results);
    ``given_tokens``: as ``WriteConfig.given_tokens``."""
    emb = hf.input_embeddings(model)
    device = emb.weight.device
    lengths = [len(d) for d in documents]
    B, m, S = len(documents), memory.shape[1], max(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, doc in enumerate(documents):
        ids[b, : lengths[b]] = doc
    ids = ids.to(device)
    x = torch.cat([memory.to(device=device, dtype=emb.weight.dtype), emb(ids)], dim=1)
    positions = torch.arange(m + S, device=device).expand(B, m + S)
    hidden = hf.backbone_hidden(model, x, torch.ones(B, m + S, dtype=torch.long, device=device), positions)
    doc = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)]).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    targets = torch.where(pos >= given_tokens, ids[doc, pos], torch.full_like(pos, -1))
    transform = head_logit_transform(model, head_weight)
    return score_rows(
        hidden[doc, m - 1 + pos], head_weight, head_bias, targets, doc, pos, B, transform=transform
    ).to_host()
