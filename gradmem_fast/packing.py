"""Packing a batch of documents, each behind its memory, into one varlen sequence (no padding FLOPs).

For B documents with n_b tokens and m memory vectors, document b occupies packed rows
``[s_b, s_b + m + n_b)`` with ``s_b = sum_{c<b} (m + n_c)``: first its m memory rows, then its tokens.

    cu_seqlens[b]  = s_b                      int32 [B+1], the attention's varlen offsets
    position_ids   = 0 .. m + n_b - 1 per document
    source_index   maps every packed row to a row of cat([memories.reshape(B*m, d), token_embeddings])
    loss_rows      = s_b + m - 1 + j for j < n_b   (row m-1+j predicts token j)
    cu_tokens[b]   = sum_{c<b} n_c            int32 [B+1], the loss's per-document offsets

Fixed shapes (for CUDA-graph replay): ``pack(..., shape=(B_fixed, N_fixed))`` appends filler documents
so the batch has exactly B_fixed documents and N_fixed tokens: filler documents are m memory rows plus
(for the last one) the remaining tokens, whose targets are ``IGNORE_INDEX`` so they add nothing to any
loss. A real document's result is unchanged: attention never crosses documents and the filler comes last.
"""
import dataclasses

import torch

IGNORE_INDEX = -100


@dataclasses.dataclass
class PackedBatch:
    lengths: list
    num_memory_tokens: int
    tokens: torch.Tensor  # [N] long, every document's tokens back to back (embedding ids)
    targets: torch.Tensor  # [N] long, the tokens, IGNORE_INDEX for filler
    real_batch: int  # documents before the filler
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    position_ids: torch.Tensor  # [1, T] long
    source_index: torch.Tensor  # [T] long
    loss_rows: torch.Tensor  # [N] long
    cu_tokens: torch.Tensor  # [B+1] int32

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def total_rows(self) -> int:
        return int(self.position_ids.shape[1])


def bucket_shape(num_docs: int, num_tokens: int, doc_step: int = 8, token_step: int = 1024) -> tuple:
    """A fixed (documents, tokens) shape >= the batch's, rounded up so few distinct shapes recur.

    Documents round up to a multiple of ``doc_step``; tokens to the next of token_step * 2^(k/2)
    (about 41% apart), a few buckets per octave of batch size.
    """
    docs = -(-num_docs // doc_step) * doc_step
    size = token_step
    while size < num_tokens:
        size = int(round(size * 2**0.5 / 64)) * 64
    return docs, size


def pack(documents, num_memory_tokens: int, device, shape=None) -> PackedBatch:
    """Pack ``documents`` (a list of 1-D long tensors with at least one token each).

    ``shape=(B_fixed, N_fixed)`` pads with filler documents to exactly that many documents and tokens.
    """
    m = num_memory_tokens
    lengths = [int(doc.numel()) for doc in documents]
    real_batch = len(lengths)
    targets = [doc.reshape(-1).long().cpu() for doc in documents]
    embed_ids = list(targets)
    if shape is not None:
        fixed_docs, fixed_tokens = shape
        if fixed_docs <= real_batch or fixed_tokens < sum(lengths):
            raise ValueError(f"pack: shape {shape} cannot hold {real_batch} documents and {sum(lengths)} tokens "
                             "plus at least one filler document")
        fill = [0] * (fixed_docs - real_batch)
        fill[-1] = fixed_tokens - sum(lengths)
        lengths += fill
        targets += [torch.full((n,), IGNORE_INDEX, dtype=torch.long) for n in fill]
        embed_ids += [torch.zeros(n, dtype=torch.long) for n in fill]
    B = len(lengths)
    N = sum(lengths)
    seq = torch.tensor([m + n for n in lengths], dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(seq, 0)
    cu_tok = torch.zeros(B + 1, dtype=torch.long)
    cu_tok[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    T = int(cu[-1])
    doc_of_row = torch.repeat_interleave(torch.arange(B), seq)
    offset = torch.arange(T) - cu[:-1][doc_of_row]  # position inside the document's sequence
    is_memory = offset < m
    # Memory rows come from memories.reshape(B*m, d); token rows from B*m + their token index.
    source = torch.where(is_memory, doc_of_row * m + offset, B * m + cu_tok[:-1][doc_of_row] + offset - m)
    tok_doc = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths, dtype=torch.long))
    j = torch.arange(N) - cu_tok[:-1][tok_doc]
    loss_rows = cu[:-1][tok_doc] + m - 1 + j
    return PackedBatch(
        lengths=lengths,
        num_memory_tokens=m,
        tokens=torch.cat(embed_ids).to(device),
        targets=torch.cat(targets).to(device),
        real_batch=real_batch,
        cu_seqlens=cu.to(torch.int32).to(device),
        max_seqlen=int(seq.max()),
        position_ids=offset.unsqueeze(0).to(device),
        source_index=source.to(device),
        loss_rows=loss_rows.to(device),
        cu_tokens=cu_tok.to(torch.int32).to(device),
    )


def documents_from_batch(ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Right-aligned ``ids``/``mask`` [B, S] to a list of per-document token tensors."""
    counts = mask.sum(dim=1).tolist()
    return [ids[b, :n] for b, n in enumerate(counts)]
