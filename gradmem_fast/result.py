"""WriteResult: what a WRITE returns."""

import dataclasses

import torch


@dataclasses.dataclass
class DocumentStats:
    """Per-document results of a write with a ``StopRule`` (``gradmem_fast.cramming``), tensors [B] on the CPU.

    Attributes:
        steps: update steps the document took (its memory is the result of exactly these updates).
        stopped: True when the stop rule held, False when the document ran out of steps.
        loss: mean reconstruction loss (nats per token) of the final memory.
        accuracy: teacher-forced greedy accuracy of the final memory, correct tokens / tokens.
        exact: whether greedy decoding from the final memory alone reproduces the document.
        prefix: tokens decoded exactly before the first wrong one (== tokens when exact).
        initial_loss: the loss with the initial memory (before any step).
        info_gain_bits: loss of tokens 1..n-1 without any memory minus with the final memory, in bits
            (``gradmem_fast.scoring``).
        tokens: the document's tokens.
        tokens_per_vector: prefix / m, tokens held exactly per memory vector.
    """

    steps: torch.Tensor
    stopped: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    exact: torch.Tensor
    prefix: torch.Tensor
    initial_loss: torch.Tensor
    info_gain_bits: torch.Tensor
    tokens: torch.Tensor
    tokens_per_vector: torch.Tensor


@dataclasses.dataclass
class WriteResult:
    """Result of writing a batch of B documents with K steps.

    Attributes:
        memory: [B, m, d] memories after the K updates (on the autograd graph for grad_mode first/second).
        losses: [K, B] fp32, each document's mean reconstruction loss *before* that step's update.
        grad_norms: [K, B] fp32, the raw (pre-clip) L2 norm of each document's memory gradient.
        stats: with a ``StopRule``, each document's ``DocumentStats`` (then ``losses``/``grad_norms`` are NaN
            at the steps a document did not take); None otherwise.
        last_loss: with ``keep_last_loss=True`` (meta-training), the last step's losses [B] on the autograd
            graph; None otherwise.
        alignment_losses: with ``alignment_weight > 0`` on the torch backend without a stop rule, [K, B] fp32,
            each document's activation-alignment term A_b before that step's update (``gradmem_fast.alignment``;
            ``losses`` stay the cross-entropy); None otherwise.
    """

    memory: torch.Tensor
    losses: torch.Tensor
    grad_norms: torch.Tensor
    stats: DocumentStats | None = None
    last_loss: torch.Tensor | None = None
    alignment_losses: torch.Tensor | None = None
