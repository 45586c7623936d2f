"""Packing a batch of documents, each behind its memory, into one varlen sequence (no padding FLOPs).

For B documents with n_b tokens and m memory vectors, document b occupies packed rows
``[s_b, s_b + m + n_b)`` with ``s_b = sum_{c<b} (m + n_c)``: first its m memory rows, then its tokens.

    cu_seqlens[b]  = s_b                      int32 [B+1], the attention's varlen offsets
    position_ids   = 0 .. m + n_b - 1 per document
    memory_rows    = s_b + i for i < m        (row of memory vector i of document b, in [B*m] order)
    token_rows     = s_b + m + j for j < n_b  (row of token j, in the order of ``tokens``)
    source_index   maps every packed row to a row of cat([memories.reshape(B*m, d), token_embeddings])
    loss_rows      = s_b + m - 1 + j for j < n_b   (row m-1+j predicts token j)
    targets[j]     = token j, IGNORE_INDEX for j < given_tokens (read, not predicted) and for filler
    cu_tokens[b]   = sum_{c<b} n_c            int32 [B+1], the loss's per-document offsets

Fixed shapes (compiled steps and CUDA-graph replay): ``pack(..., rows=R)`` appends filler documents so the
batch fills exactly R packed rows. Filler documents are m memory rows plus tokens whose targets are
``IGNORE_INDEX`` (they add nothing to any loss), and none is longer than the batch's longest real
document, so filler adds no attention work beyond what the real documents already need (attention is
quadratic per document: one long filler document would cost more than the batch). A real document's
result is unchanged: attention never crosses documents and the filler comes last.

Buckets: ``bucket_rows`` rounds a batch's rows up to one of 8 sizes per octave, so padding is below 1/8 of
the bucket; ``padding_waste`` reports what the writer's batching and bucketing waste on a length mix.

Everything is built on the CPU; ``PackedBatch.to`` uploads it in one pinned, non-blocking copy.
"""

import dataclasses

import torch

IGNORE_INDEX = -100

# Buckets per octave of packed rows: padding < 1/BUCKETS_PER_OCTAVE of the bucket (12.5%).
BUCKETS_PER_OCTAVE = 8
MIN_BUCKET_ROWS = 64


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
    memory_rows: torch.Tensor = None  # [B*m] long
    token_rows: torch.Tensor = None  # [N] long

    _LONG = ("tokens", "targets", "position_ids", "source_index", "loss_rows", "memory_rows", "token_rows")
    _INT32 = ("cu_seqlens", "cu_tokens")

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def total_rows(self) -> int:
        return int(self.position_ids.shape[1])

    def to(self, device) -> "PackedBatch":
        """This batch on ``device``: every index tensor in one host-to-device copy, pinned and non-blocking on
        CUDA (so packing the next batch on the CPU overlaps the current batch's kernels; no host sync)."""
        device = torch.device(device)
        if self.tokens.device == device:
            return self
        names = self._LONG + self._INT32
        parts = [getattr(self, n).reshape(-1).long() for n in names]
        flat = torch.cat(parts)
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        fields, start = {}, 0
        for name, part in zip(names, parts):
            view = flat[start : start + part.numel()].view(getattr(self, name).shape)
            fields[name] = view.to(torch.int32) if name in self._INT32 else view
            start += part.numel()
        return dataclasses.replace(self, **fields)


def bucket_rows(rows: int, num_memory_tokens: int = 1) -> int:
    """The packed length a batch of ``rows`` rows is padded to for a compiled step or a CUDA graph.

    ``rows`` rounds up to a multiple of ``2**(floor(log2(rows)) - 3)`` (8 sizes per octave), at least
    ``MIN_BUCKET_ROWS``; so for rows >= 64 the padding is < 1/8 of the bucket. Padding of 1..m-1 rows cannot
    hold a filler document (m memory rows each), so such a bucket moves up one size.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"bucket_rows: rows must be a positive int, got {rows!r}")
    size = max(rows, MIN_BUCKET_ROWS)
    step = max(1, (1 << (size.bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    size = -(-size // step) * step
    while 0 < size - rows < num_memory_tokens:
        size += max(1, (1 << (size.bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    return size


def seqlen_bucket(max_seqlen: int) -> int:
    """The attention's ``max_seqlen`` argument rounded up to a power of two (>= 64): an upper bound is all
    the kernels need (extra query tiles exit at once), and a compiled step specialises on it."""
    return 1 << max(6, (int(max_seqlen) - 1).bit_length())


def filler_lengths(
    filler_rows: int, num_memory_tokens: int, longest_tokens: int, real_docs: int = 0, doc_multiple: int = 1
) -> list:
    """Token counts of the filler documents that fill ``filler_rows`` packed rows.

    Each filler document has m memory rows and at most ``longest_tokens`` tokens (no filler document is longer
    than the batch's longest); as few documents as that allows, or, with ``doc_multiple`` > 1, the fewest that
    make ``real_docs + filler docs`` a multiple of it when possible (fixed batch sizes for CUDA graphs).
    Tokens are spread evenly.
    """
    m = num_memory_tokens
    if filler_rows == 0:
        return []
    if filler_rows < m:
        raise ValueError(f"filler_lengths: {filler_rows} filler rows cannot hold a filler document of {m} memory rows")
    longest = m + max(0, int(longest_tokens))
    fewest, most = -(-filler_rows // longest), filler_rows // m
    count = fewest
    if doc_multiple > 1:
        aligned = fewest + (-(real_docs + fewest)) % doc_multiple
        if aligned <= most:
            count = aligned
    tokens = filler_rows - count * m
    base, extra = divmod(tokens, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def plan_batches(lengths, num_memory_tokens: int, batch_tokens: int, padded: bool = False) -> list:
    """Batches (lists of indices into ``lengths``) of length-sorted documents with at most ``batch_tokens``
    packed rows each (memory rows included; a longer document gets a batch of its own).

    ``padded`` (batches padded to ``bucket_rows``): keep m rows free, so a batch that nearly fills a bucket-size
    ``batch_tokens`` still has room for a filler document instead of moving to the next bucket.
    """
    m = num_memory_tokens
    if padded and batch_tokens > 2 * m:
        batch_tokens -= m
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, batch, used = [], [], 0
    for i in order:
        need = m + lengths[i]
        if batch and used + need > batch_tokens:
            batches.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += need
    if batch:
        batches.append(batch)
    return batches


def padding_waste(lengths, num_memory_tokens: int, batch_tokens: int = 16384, window: int = 4096) -> dict:
    """What bucketing costs on a stream of documents with these token ``lengths``, batched as ``write_many``
    does (windows of ``window`` documents, length-sorted batches of at most ``batch_tokens`` rows, each
    padded to ``bucket_rows``).

    Returns ``real_rows``, ``bucket_rows`` (summed over batches), ``row_waste`` = 1 - real/bucket (the share of
    computed rows that are filler), ``batches`` and ``buckets``: the distinct (rows, seqlen bucket) shapes,
    which is the number of compiled steps the stream needs.
    """
    m = num_memory_tokens
    lengths = [int(n) for n in lengths]
    real = padded = 0
    shapes, count = set(), 0
    for start in range(0, len(lengths), window):
        chunk = lengths[start : start + window]
        for batch in plan_batches(chunk, m, batch_tokens, padded=True):
            rows = sum(m + chunk[i] for i in batch)
            size = bucket_rows(rows, m)
            real += rows
            padded += size
            count += 1
            shapes.add((size, seqlen_bucket(m + max(chunk[i] for i in batch))))
    return {
        "real_rows": real,
        "bucket_rows": padded,
        "row_waste": 1 - real / padded if padded else 0.0,
        "batches": count,
        "buckets": len(shapes),
    }


def pack(
    documents, num_memory_tokens: int, device, rows=None, doc_multiple: int = 1, given_tokens: int = 0
) -> PackedBatch:
    """Pack ``documents`` (a list of 1-D long tensors with at least one token each), on the CPU, then move
    the result to ``device`` (``PackedBatch.to``).

    ``rows=R`` pads with filler documents (``filler_lengths``) to exactly R packed rows; ``doc_multiple``
    asks for a document count that is a multiple of it where the filler allows. ``given_tokens=g``: the
    first g tokens of every document are inputs only (``WriteConfig.given_tokens``): their targets are
    ``IGNORE_INDEX``, so the loss and its per-document mean skip them.
    """
    m = num_memory_tokens
    lengths = [int(doc.numel()) for doc in documents]
    real_batch = len(lengths)
    embed_ids = [doc.reshape(-1).long().cpu() for doc in documents]
    targets = list(embed_ids)
    if given_tokens:
        targets = [t.clone() for t in targets]
        for t in targets:
            t[:given_tokens] = IGNORE_INDEX
    if rows is not None:
        used = sum(lengths) + m * real_batch
        if rows < used or 0 < rows - used < m:
            raise ValueError(
                f"pack: rows={rows} cannot hold {real_batch} documents in {used} rows plus filler "
                f"documents of at least {m} memory rows"
            )
        fill = filler_lengths(rows - used, m, max(lengths), real_batch, doc_multiple)
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
    memory_rows = (cu[:-1, None] + torch.arange(m)).reshape(-1)
    packed = PackedBatch(
        lengths=lengths,
        num_memory_tokens=m,
        tokens=torch.cat(embed_ids),
        targets=torch.cat(targets),
        real_batch=real_batch,
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=int(seq.max()),
        position_ids=offset.unsqueeze(0),
        source_index=source,
        loss_rows=loss_rows,
        cu_tokens=cu_tok.to(torch.int32),
        memory_rows=memory_rows,
        token_rows=loss_rows + 1,
    )
    return packed.to(device)


def documents_from_batch(ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Right-aligned ``ids``/``mask`` [B, S] to a list of per-document token tensors."""
    counts = mask.sum(dim=1).tolist()
    return [ids[b, :n] for b, n in enumerate(counts)]
