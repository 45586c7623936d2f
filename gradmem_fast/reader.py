"""MemoryReader: the READ side — answer queries from memories alone (DESIGN.md item 7).

    reader = MemoryReader(model, tokenizer)
    prefix = reader.prefix(memories)                  # [D, m, d] -> KV cache of the D memories, once
    tokens = reader.generate(prefix, doc_index, query_token_lists, max_new_tokens=32)
    texts  = reader.answer(memories, [(doc, "question"), ...])

How a batch of queries runs. Each document's memory is run through the model once (positions 0..m-1);
its key/value cache and its last logits (position m-1, which predicts the first token after the memory)
are kept. A batch of queries gathers its documents' cache rows (a query's row is a copy of its
document's cache, so one memory serves any number of queries) and appends the query tokens, left-padded
*between* the memory and the query:

    [ memory (m) | pad ... pad | query tokens | generated tokens ... ]
    positions:     0..m-1        (masked)       m .. m+q-1   m+q, m+q+1, ...

Pads are masked out and skipped by the explicit position ids, so every row sees exactly
``[M ; E(query)]`` at positions 0..m+q-1, as the oracle ``reference.read_logits`` does, and the newest
token of every row is at the end of the block, where the next-token logits are read. A query with no
tokens reads the memory's own last logits: decoding a document back from its memory alone is the empty
query.

The decoding loop is our own rather than Hugging Face ``generate``: ``generate`` with a pre-filled cache
expects its inputs to cover the cached positions too (here the memory, which has no token ids; it needs
the full-length embeddings), and given the query alone it silently produces wrong tokens. The loop also
keeps the explicit positions above, which ``generate`` would derive from the mask.
"""

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import hf
from .inputs import check_token_batch
from .ops.cross_entropy import postprocess_logits


@dataclasses.dataclass
class Prefix:
    """The memories of D documents run through the model once.

    Attributes:
        cache: the model's key/value cache of the D memories (batch D, length m).
        last_logits: [D, V] logits at position m-1 (predicting the first token after the memory).
        m: number of memory vectors.
    """

    cache: Any  # a transformers Cache (DynamicCache)
    last_logits: torch.Tensor
    m: int


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (torch types ``Module.__getattr__`` as ``Tensor | Module``)."""
    return cast(torch.Tensor, module.weight)


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    memory: torch.Tensor,
    documents: Sequence[torch.Tensor | Sequence[int]],
    chunk_rows: int = 1024,
    given_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How well each memory holds its document, with the true tokens fed in (teacher forcing).

    For document b with tokens c_1..c_n and memory M_b, on ``[M_b ; E(c)]`` (positions 0..m+n-1, causal):

        logit_j   = W h[m - 1 + j] (+ bias)                  predicts c_j
        loss_b    = sum_j CE(logit_j, c_j) / n                the WRITE's reconstruction loss
        correct_b = #{j : argmax logit_j == c_j}

    ``correct_b == n`` exactly when greedy decoding from the memory alone reproduces the document (each
    greedy token is then the true one, so the next step sees the true prefix). Documents are right-padded:
    with causal attention the pads after a document cannot change its rows. The head runs on
    ``chunk_rows`` rows at a time, so no [B, S, V] logits tensor is formed. ``given_tokens=g``
    (``WriteConfig.given_tokens``): the sums run over j >= g, the loss is divided by max(1, n - g), and
    ``correct_b == n - g`` means greedy decoding continues the given tokens with the rest of the document.

    Args: ``memory`` [B, m, d]; ``documents``: B non-empty token-id sequences. Returns ``(loss [B] float64,
    correct [B] int64)`` on the CPU.
    """
    emb = hf.input_embeddings(model)
    head = hf.output_head(model)
    transform = hf.logit_postprocessing(model)  # the model's own logit scale / soft-capping
    device = _weight(emb).device
    lengths = [len(d) for d in documents]
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[0] != len(documents):
        raise ValueError(f"memory must be a [{len(documents)}, m, d] tensor for {len(documents)} documents")
    if not lengths or min(lengths) < 1:
        raise ValueError("documents must be non-empty token-id sequences")
    B, m, S = len(documents), memory.shape[1], max(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, doc in enumerate(documents):
        ids[b, : lengths[b]] = torch.as_tensor(doc, dtype=torch.long)
    ids = ids.to(device)
    x = torch.cat([memory.to(device=device, dtype=_weight(emb).dtype), emb(ids)], dim=1)
    positions = torch.arange(m + S, device=device).unsqueeze(0).expand(B, -1)
    hidden = hf.backbone_hidden(model, x, torch.ones(B, m + S, dtype=torch.long, device=device), positions)
    bias = getattr(head, "bias", None)
    loss = torch.zeros(B, dtype=torch.float64)
    correct = torch.zeros(B, dtype=torch.int64)
    if isinstance(given_tokens, bool) or not isinstance(given_tokens, int) or given_tokens < 0:
        raise ValueError(f"given_tokens must be an int >= 0, got {given_tokens!r}")
    for b, n in enumerate(lengths):
        for lo in range(given_tokens, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            logits = postprocess_logits(F.linear(hidden[b, m - 1 + lo : m - 1 + hi], _weight(head), bias), *transform)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            target = ids[b, lo:hi]
            loss[b] += float(F.cross_entropy(logits, target, reduction="sum"))
            correct[b] += int((logits.argmax(dim=-1) == target).sum())
        loss[b] /= max(1, n - given_tokens)
    return loss, correct


def _cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new cache whose row i is row ``index[i]`` of ``cache`` (rows may repeat)."""
    rows = copy.deepcopy(cache)
    rows.batch_select_indices(index)
    return rows


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float | None) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class MemoryReader:
    """Reads from memories written by ``MemoryWriter``: logits, greedy or sampled generation, text answers.

    Args:
        model: the Hugging Face causal LM the memories were written with (its width must match).
        tokenizer: optional; needed only by ``answer`` (text in, text out).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Check the model's parts once (embeddings, an output head whose logit post-processing is known: the
        reader's logits are the model's own forward's, post-processing included)."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self._emb = hf.input_embeddings(model)
        hf.output_head(model)  # rejects models whose logit post-processing is unknown
        self.device = _weight(self._emb).device
        self.hidden_size = hf.hidden_size(model)

    def _check_memory(self, memory: torch.Tensor) -> None:
        """Memories must be [D, m, d] floats of the model's width."""
        if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or not memory.dtype.is_floating_point:
            raise ValueError(
                "memory must be a floating-point [num_docs, m, d] tensor, got "
                f"{tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__}"
            )
        if memory.shape[2] != self.hidden_size:
            raise ValueError(
                f"memory width {memory.shape[2]} does not match the model's hidden size "
                f"{self.hidden_size}: the memories were written with another model"
            )
        if memory.shape[0] == 0 or memory.shape[1] == 0:
            raise ValueError(f"memory must have at least one document and one vector, got {tuple(memory.shape)}")

    @torch.no_grad()
    def prefix(self, memory: torch.Tensor) -> Prefix:
        """Run ``memory`` [D, m, d] through the model once: its cache and last logits (see ``Prefix``)."""
        from transformers import DynamicCache

        self._check_memory(memory)
        D, m, _ = memory.shape
        x = memory.to(device=self.device, dtype=_weight(self._emb).dtype)
        cache = DynamicCache(config=cast(Any, self.model).config)
        out = self.model(
            inputs_embeds=x,
            attention_mask=torch.ones(D, m, dtype=torch.long, device=self.device),
            position_ids=torch.arange(m, device=self.device).unsqueeze(0).expand(D, -1),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return Prefix(cache=out.past_key_values, last_logits=out.logits[:, -1], m=m)

    def _step(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, keep_all: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """One cached forward: logits of the last position (or all) and the grown cache."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if keep_all else 1,
        )
        return out.logits, out.past_key_values

    @torch.no_grad()
    def logits(
        self,
        memory: torch.Tensor,
        query_ids: torch.Tensor | Sequence[Sequence[int]],
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """READ logits ``[B, Q+1, V]`` through the cache; equal to ``reference.read_logits``.

        Row j predicts query token j; the last valid row of document b (j = its query length) predicts the
        token after its query. Rows past a document's length are padding positions, as in the reference.
        """
        self._check_memory(memory)
        ids, mask = check_token_batch(
            query_ids.to(self.device) if isinstance(query_ids, torch.Tensor) else query_ids,
            query_mask,
            _weight(self._emb).shape[0],
            name="query_ids",
            mask_name="query_mask",
        )
        B, Q = ids.shape
        if memory.shape[0] != B:
            raise ValueError(f"memory has {memory.shape[0]} documents for {B} queries")
        pre = self.prefix(memory)
        m = pre.m
        full_mask = torch.cat([torch.ones(B, m, dtype=torch.long, device=self.device), mask.long()], dim=1)
        positions = torch.arange(m, m + Q, device=self.device).unsqueeze(0).expand(B, -1)
        logits, _ = self._step(ids, full_mask, positions, pre.cache, keep_all=True)
        return torch.cat([pre.last_logits.unsqueeze(1).to(logits.dtype), logits], dim=1)

    @torch.no_grad()
    def generate(
        self,
        prefix: Prefix,
        doc_index: Sequence[int] | torch.Tensor,
        queries: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Iterable[int] | None = None,
        generator: torch.Generator | None = None,
        max_length: int | None = None,
    ) -> list[list[int]]:
        """Generate a continuation of each query from its document's memory.

        Args:
            prefix: ``self.prefix(memories)`` of the documents.
            doc_index: for each query, the row of its document in ``prefix`` (ints).
            queries: for each query, a list of token ids (may be empty: decode from the memory alone).
            max_new_tokens: tokens to generate per query (fewer if it hits ``eos_token_id`` or ``max_length``).
            do_sample: sample with ``temperature``/``top_k``/``top_p`` (using ``generator``) instead of greedy.
            eos_token_id: an id or a collection of ids that end a row (not included in its output); None: never.
            max_length: the model's position limit; generation stops before passing it.
        Returns: one list of generated token ids per query.
        """
        B = len(queries)
        if len(doc_index) != B:
            raise ValueError(f"{len(doc_index)} document indices for {B} queries")
        if B == 0:
            return []
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = (
            set()
            if eos_token_id is None
            else ({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
        )
        m, dev = prefix.m, self.device
        vocab = _weight(self._emb).shape[0]
        lengths = [len(q) for q in queries]
        for i, q in enumerate(queries):
            if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in q):
                raise ValueError(f"queries[{i}] must be token ids in [0, {vocab})")
        index = torch.as_tensor(list(doc_index), dtype=torch.long, device=prefix.last_logits.device)
        cache = _cache_rows(prefix.cache, index.to(dev))
        L = max(lengths)
        budget = max_new_tokens
        if max_length is not None:
            budget = max(0, min(budget, max_length - m - L))
        # The attention mask covers every cache slot: memory, the (left-padded) query block, new tokens.
        mask = torch.ones(B, m, dtype=torch.long, device=dev)
        next_logits = prefix.last_logits.index_select(0, index).to(dev)
        if L > 0:
            block = torch.zeros(B, L, dtype=torch.long, device=dev)
            block_mask = torch.zeros(B, L, dtype=torch.long, device=dev)
            for r, q in enumerate(queries):
                if q:
                    block[r, L - len(q) :] = torch.as_tensor(q, dtype=torch.long)
                    block_mask[r, L - len(q) :] = 1
            positions = m + (block_mask.cumsum(dim=1) - 1).clamp_min(0)
            mask = torch.cat([mask, block_mask], dim=1)
            logits, cache = self._step(block, mask, positions, cache)
            has_query = torch.as_tensor([n > 0 for n in lengths], device=dev).unsqueeze(1)
            next_logits = torch.where(has_query, logits[:, -1], next_logits)
        next_pos = torch.as_tensor([m + n for n in lengths], dtype=torch.long, device=dev)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(budget):
            if do_sample:
                probs = torch.softmax(_filter_logits(next_logits.float() / temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(dev)
            else:
                token = next_logits.argmax(dim=-1)
            for r, tok in enumerate(token.tolist()):
                if not done[r]:
                    if tok in eos:
                        done[r] = True
                    else:
                        out[r].append(tok)
            if all(done) or t == budget - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
            logits, cache = self._step(token.unsqueeze(1), mask, next_pos.unsqueeze(1), cache)
            next_pos = next_pos + 1
            next_logits = logits[:, -1]
        return out

    def answer(
        self,
        memory: torch.Tensor,
        queries: Sequence[tuple[int, str]],
        max_new_tokens: int = 32,
        batch_size: int = 16,
        **options: Any,
    ) -> list[str]:
        """Text answers to ``queries`` = [(document row of ``memory``, query text), ...], in order.

        Each memory's cache is computed once (``prefix``) and reused by all of its queries; queries are
        run ``batch_size`` at a time. ``options`` go to ``generate`` (sampling, eos, generator, ...).
        """
        if self.tokenizer is None:
            raise ValueError("answer() needs a tokenizer: MemoryReader(model, tokenizer)")
        prefix = self.prefix(memory)
        options.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        answers: list[str | None] = [None] * len(queries)
        order = sorted(range(len(queries)), key=lambda i: queries[i][0])
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            tokens = [self.tokenizer(queries[i][1], add_special_tokens=False).input_ids for i in chunk]
            generated = self.generate(prefix, [queries[i][0] for i in chunk], tokens, max_new_tokens, **options)
            for i, gen in zip(chunk, generated):
                answers[i] = self.tokenizer.decode(gen, skip_special_tokens=True)
        return cast(list[str], answers)  # every slot is filled by its chunk
