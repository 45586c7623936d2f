"""READ path: the cached MemoryReader against the uncached oracle ``reference.read_logits``."""

import pytest
import torch

from gradmem_fast import reference
from gradmem_fast.reader import MemoryReader
from helpers import DEVICE, assert_close
from tiny_models import FAMILIES, VOCAB, tiny_model


def _memory(B, m, d=32, dtype=torch.float64):
    """Random memories [B, m, d] in fp64 (the oracle's precision)."""
    return torch.randn(B, m, d, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_uncached_forward(family):
    """Prefill once + query through the cache == a full forward over [M ; E(query)], ragged queries."""
    model = tiny_model(family).to(DEVICE)
    B, m, Q = 3, 5, 7
    memory = _memory(B, m)
    query = torch.randint(0, VOCAB, (B, Q), device=DEVICE)
    mask = torch.ones(B, Q, dtype=torch.long, device=DEVICE)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # a one-token query
    ours = MemoryReader(model).logits(memory, query, mask)
    ref = reference.read_logits(model, memory, query, mask)
    assert ours.shape == ref.shape == (B, Q + 1, VOCAB)
    for b in range(B):
        n = int(mask[b].sum())
        assert_close(ours[b, : n + 1], ref[b, : n + 1], name=f"{family} row {b}")


def _greedy_oracle(model, memory, query, steps):
    """Greedy decoding by repeated *uncached* full forwards (the definition the cache must reproduce)."""
    tokens = list(query)
    for _ in range(steps):
        if tokens:
            logits = reference.read_logits(model, memory, torch.tensor([tokens], device=DEVICE))[0, -1]
        else:  # no text at all: the memory's last position predicts the first token
            logits = reference.read_logits(model, memory, torch.zeros(1, 1, dtype=torch.long, device=DEVICE))[0, 0]
        tokens.append(int(logits.argmax()))
    return tokens[len(query) :]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_equals_uncached_loop(family):
    """Several queries per memory, ragged and empty queries in one batch, each memory prefilled once."""
    model = tiny_model(family).to(DEVICE)
    memory = _memory(2, 3)
    queries = [[5, 9, 11, 2], [], [7], [3, 3, 8], []]
    docs = [0, 0, 1, 1, 1]
    reader = MemoryReader(model)
    prefix = reader.prefix(memory)
    out = reader.generate(prefix, docs, queries, max_new_tokens=6)
    for q, d, got in zip(queries, docs, out):
        assert got == _greedy_oracle(model, memory[d : d + 1], q, 6), (q, d)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    """top-k 1 and a tiny top-p reduce to greedy; a seed reproduces samples."""
    model = tiny_model("llama").to(DEVICE)
    reader = MemoryReader(model)
    prefix = reader.prefix(_memory(2, 4))
    queries, docs = [[1, 2], [4]], [0, 1]
    greedy = reader.generate(prefix, docs, queries, max_new_tokens=5)
    top1 = reader.generate(
        prefix, docs, queries, max_new_tokens=5, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert top1 == greedy
    nucleus = reader.generate(
        prefix, docs, queries, max_new_tokens=5, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(1)
    )
    assert nucleus == greedy
    a = reader.generate(
        prefix,
        docs,
        queries,
        max_new_tokens=5,
        do_sample=True,
        temperature=5.0,
        generator=torch.Generator().manual_seed(3),
    )
    b = reader.generate(
        prefix,
        docs,
        queries,
        max_new_tokens=5,
        do_sample=True,
        temperature=5.0,
        generator=torch.Generator().manual_seed(3),
    )
    assert a == b and all(len(x) == 5 for x in a)


def test_eos_stops_a_row_and_length_limit_caps_generation():
    """An end token ends a row; the position limit caps generation."""
    model = tiny_model("llama").to(DEVICE)
    reader = MemoryReader(model)
    prefix = reader.prefix(_memory(1, 4))
    free = reader.generate(prefix, [0], [[1]], max_new_tokens=6)[0]
    stopped = reader.generate(prefix, [0], [[1]], max_new_tokens=6, eos_token_id=free[2])[0]
    assert stopped == free[: free.index(free[2])]
    # max_length counts memory + query + generated positions.
    assert len(reader.generate(prefix, [0], [[1]], max_new_tokens=6, max_length=4 + 1 + 3)[0]) == 3


def test_memory_of_another_width_is_rejected():
    """Memories of another width are refused."""
    reader = MemoryReader(tiny_model("llama"))
    with pytest.raises(ValueError, match="width 48 does not match"):
        reader.prefix(torch.randn(1, 4, 48, dtype=torch.float64))


def test_answer_decodes_text_with_a_tokenizer():
    """Text in, text out through the tokenizer."""
    from tiny_local import tiny_tokenizer

    model = tiny_model("llama", dtype=torch.float32, attn_implementation="eager")
    reader = MemoryReader(model, tiny_tokenizer())
    answers = reader.answer(
        torch.randn(2, 3, 32), [(1, "the cat"), (0, ""), (1, "dog")], max_new_tokens=3, eos_token_id=None
    )
    # Special tokens the random model may produce are dropped from the text, so at most 3 words.
    assert len(answers) == 3 and all(isinstance(a, str) and len(a.split()) <= 3 for a in answers)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_forced_scores_equal_the_oracle(family):
    """Per-document loss and correct-token count, ragged batch, head in chunks of 2 rows, vs full logits of
    each document on its own (``reference.read_logits``)."""
    import torch.nn.functional as F

    from gradmem_fast.reader import teacher_forced

    model = tiny_model(family).to(DEVICE)
    lengths = [5, 1, 3]
    memory = _memory(3, 4)
    docs = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    # One document made predictable: its tokens are the model's own greedy continuation of the memory.
    greedy = MemoryReader(model).generate(MemoryReader(model).prefix(memory[:1]), [0], [[]], max_new_tokens=5)[0]
    docs[0] = greedy
    loss, correct = teacher_forced(model, memory, docs, chunk_rows=2)
    for b, doc in enumerate(docs):
        ids = torch.tensor([doc], device=DEVICE)
        logits = reference.read_logits(model, memory[b : b + 1], ids)[0, :-1]
        expect_loss = F.cross_entropy(logits, ids[0])
        assert_close(loss[b], expect_loss.cpu(), name=f"loss {b}")
        assert int(correct[b]) == int((logits.argmax(-1) == ids[0]).sum())
    assert int(correct[0]) == 5  # greedy decoding reproduces it: every teacher-forced argmax is right
