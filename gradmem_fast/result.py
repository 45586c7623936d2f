"""WriteResult: what a WRITE returns."""

import dataclasses

import torch


@dataclasses.dataclass
class WriteResult:
    """Result of writing a batch of B documents with K steps.

    Attributes:
        memory: [B, m, d] memories after the K updates (on the autograd graph for grad_mode first/second).
        losses: [K, B] fp32, each document's mean reconstruction loss *before* that step's update.
        grad_norms: [K, B] fp32, the raw (pre-clip) L2 norm of each document's memory gradient.
    """

    memory: torch.Tensor
    losses: torch.Tensor
    grad_norms: torch.Tensor
