"""``score_memories`` and ``no_memory_tail`` (gradmem_fast/scoring.py) against each document scored alone.

The oracle runs the model's own forward on one document at a time (``[M_b ; E(c_b)]``, or ``c_b`` without a
memory), fp64, and writes out the module docstring's formulas: per-token cross-entropy, first-maximum
argmax, loss over the predicted tokens, teacher-forced count, greedy prefix, tail from token max(1, g).
Documents of several lengths (one of length 1) in one padded call, with and without given tokens; the
no-memory baseline with a token budget small enough to split the documents into several groups.
Mutation testing (scripts/mutation.py) found these functions reached only through the command line.
"""

import math

import pytest
import torch

from gradmem_fast.scoring import LN2, no_memory_tail, score_memories
from helpers import assert_close, random_documents
from tiny_models import VOCAB, tiny_model

F64 = torch.float64
LENGTHS = (6, 1, 9, 4, 2)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=F64, initializer_range=0.3)


@torch.no_grad()
def alone(model, memory, doc, given):
    """(loss, correct, prefix, tail, tokens) of one document in fp64, from the model's own logits."""
    x = model.get_input_embeddings()(doc)
    m = 0 if memory is None else memory.shape[0]
    if memory is not None:
        x = torch.cat([memory, x])
    logits = model(inputs_embeds=x[None]).logits[0]
    n = len(doc)
    # Row m-1+j predicts token j (without a memory there is no row for token 0).
    ce, ok = [], []
    for j in range(n):
        row = m - 1 + j
        if row < 0:
            ce.append(None)
            ok.append(None)
            continue
        z = logits[row]
        ce.append(float(torch.logsumexp(z, 0) - z[doc[j]]))
        ok.append(int(torch.argmax(z)) == int(doc[j]))
    tail = sum(ce[j] for j in range(max(1, given), n))
    if memory is None:
        return None, None, None, tail, None
    scored = [j for j in range(n) if j >= given]
    loss = sum(ce[j] for j in scored) / max(1, len(scored))
    correct = sum(ok[j] for j in scored)
    prefix = next((i for i, j in enumerate(scored) if not ok[j]), len(scored))
    return loss, correct, prefix, tail, len(scored)


def test_nats_to_bits():
    assert math.isclose(math.exp(LN2), 2.0, rel_tol=1e-15)


@pytest.mark.parametrize("given", [0, 2])
def test_score_memories_matches_each_document_alone(model64, given):
    docs = random_documents(LENGTHS, VOCAB, seed=5)
    d = model64.config.hidden_size
    memory = torch.randn(len(docs), 3, d, dtype=F64)
    head = model64.get_output_embeddings()
    got = score_memories(model64, memory, docs, head.weight, head.bias, given_tokens=given)
    want = [alone(model64, memory[b], doc, given) for b, doc in enumerate(docs)]
    assert_close(got.loss.to(F64), torch.tensor([w[0] for w in want], dtype=F64), F64, name="loss")
    assert got.correct.tolist() == [w[1] for w in want]
    assert got.prefix.tolist() == [w[2] for w in want]
    assert_close(got.tail.to(F64), torch.tensor([w[3] for w in want], dtype=F64), F64, name="tail")
    assert got.tokens.tolist() == [w[4] for w in want]


def test_score_memories_prefix_stops_at_the_first_wrong_token(model64):
    """Documents built from the model's own greedy continuation after the memory, then one wrong token: the
    prefix is the position of that token (a mutant that misreads positions or the argmax is caught)."""
    d = model64.config.hidden_size
    memory = torch.randn(2, 2, d, dtype=F64)
    head = model64.get_output_embeddings()
    docs = []
    for b, (n_good, n) in enumerate(((3, 6), (0, 4))):
        x = memory[b]
        tokens = []
        for _ in range(n):
            z = model64(inputs_embeds=x[None]).logits[0, -1]
            nxt = int(torch.argmax(z))
            if len(tokens) == n_good:
                nxt = (nxt + 1) % VOCAB
            tokens.append(nxt)
            x = torch.cat([x, model64.get_input_embeddings()(torch.tensor([nxt]))])
        docs.append(torch.tensor(tokens))
    got = score_memories(model64, memory, docs, head.weight, head.bias)
    assert got.prefix.tolist() == [3, 0]


@pytest.mark.parametrize("given", [0, 1, 3])
def test_no_memory_tail_matches_each_document_alone(model64, given):
    docs = random_documents(LENGTHS, VOCAB, seed=6)
    head = model64.get_output_embeddings()
    want = torch.tensor([alone(model64, None, doc, given)[3] for doc in docs], dtype=F64)
    for budget in (10**6, 12, 1):  # one group; several groups of padded documents; one document per group
        got = no_memory_tail(model64, head.weight, head.bias, docs, batch_tokens=budget, given_tokens=given)
        assert_close(got, want, F64, name=f"tail with batch_tokens={budget}")
