"""``WriteConfig.given_tokens``: leading tokens read but not predicted (the cramming papers' convention).

Each fast path is checked against an oracle that does not use the option: the independent eager loop with
its own loss slice (tests/eager_gradmem.py), and causality (the predictions of tokens 0..g-1 do not depend on
later tokens, so the loss of tokens g..n-1 is the whole document's loss minus its first g tokens' loss).
"""

import copy

import pytest
import torch

from eager_gradmem import write_one
from gradmem_fast import MemoryWriter, WriteConfig, reference
from gradmem_fast.capacity import progressive_capacity
from gradmem_fast.config import StopRule
from gradmem_fast.packing import IGNORE_INDEX, pack
from gradmem_fast.reader import teacher_forced
from gradmem_fast.scoring import no_memory_tail, score_logits
from helpers import assert_close, random_documents, seeded_initial_memory
from helpers import right_padded as padded
from tiny_models import VOCAB, tiny_model

LEARNABLE = dict(initializer_range=0.3)
# Lengths around g = 2: a document with nothing to predict (1, 2), one predicted token (3), longer ones.
LENGTHS = (5, 1, 3, 2, 7)


def documents(lengths=LENGTHS, seed=3):
    return random_documents(lengths, VOCAB, seed)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, **LEARNABLE)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (True, TypeError), (1.0, TypeError)])
def test_config_names_the_argument(value, error):
    with pytest.raises(error, match="given_tokens"):
        WriteConfig(given_tokens=value)


@torch.no_grad()
@pytest.mark.parametrize("g", [1, 2, 4])
def test_reference_loss_is_the_loss_after_the_given_tokens(model64, g):
    """Causality: sum of the CE of tokens g..n-1 = n * L(whole, 0) - g * L(first g tokens, 0)."""
    docs = [d for d in documents((9, 6, 5)) if len(d) > g]
    M = torch.randn(len(docs), 3, model64.config.hidden_size, dtype=torch.float64)
    head = model64.get_output_embeddings()

    def losses(ds, given=0):
        ids, mask = padded(ds)
        return reference.write_losses(model64, M, ids, mask.bool(), head.weight, head.bias, given_tokens=given)

    n = torch.tensor([len(d) for d in docs], dtype=torch.float64)
    want = (n * losses(docs) - g * losses([d[:g] for d in docs])) / (n - g)
    assert_close(losses(docs, g), want, torch.float64, name=f"loss with {g} given tokens")


def test_packing_ignores_the_given_targets():
    docs = documents((4, 1, 3))
    packed = pack(docs, 2, "cpu", given_tokens=2)
    targets = packed.targets.tolist()
    assert targets == [IGNORE_INDEX] * 2 + docs[0][2:].tolist() + [IGNORE_INDEX] + [IGNORE_INDEX] * 2 + [
        int(docs[2][2])
    ]
    assert packed.tokens.tolist() == torch.cat(docs).tolist()  # every token is still read


@pytest.mark.parametrize("g", [1, 2])
def test_reference_write_equals_the_eager_loop(model64, g):
    config = WriteConfig(num_memory_tokens=3, steps=4, lr=0.05, optimizer="adam", init_std=0.5, given_tokens=g)
    docs = documents()
    out = MemoryWriter(model64, config, backend="torch").write(*padded(docs))
    for i, d in enumerate(docs):
        memory, losses, _ = write_one(
            model64, d, seeded_initial_memory(model64, config), 4, 0.05, optimizer="adam", given=g
        )
        assert_close(out.memory[i], memory, torch.float64, name=f"memory {i}")
        assert_close(out.losses[:, i], torch.tensor(losses), torch.float64, name=f"losses {i}")
        if len(d) <= g:  # nothing to predict: no gradient, the memory stays where it started
            assert torch.equal(out.memory[i], seeded_initial_memory(model64, config))


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_engine_write_equals_the_reference(ops):
    """The packed engine (fp32; ``triton``: kernels in the interpreter) = the torch reference (fp64)."""
    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE)
    config = WriteConfig(num_memory_tokens=3, steps=3, lr=0.05, optimizer="adam", init_std=0.5, given_tokens=2)
    docs = documents((5, 2, 3)) if ops == "triton" else documents()
    writer = MemoryWriter(model, config, backend="triton", compile=False)
    writer.ops_backend = ops
    got = writer.write(*padded(docs))
    want = MemoryWriter(copy.deepcopy(model).double(), config, backend="torch").write(*padded(docs))
    assert_close(got.memory, want.memory, torch.float32, name="memory")
    assert_close(got.losses, want.losses, torch.float32, name="losses")


def test_scores_count_from_the_first_predicted_token():
    """prefix = tokens after the given ones that decode exactly; loss, accuracy over those tokens only."""
    V, g = 5, 2
    # document 0: 6 tokens, wrong at position 4 -> prefix 2 of 4; document 1: 3 tokens, all right -> 1 of 1;
    # document 2: 2 tokens, all given -> nothing scored.
    tokens = [[1, 2, 3, 4, 0, 1], [3, 3, 2], [4, 1]]
    wrong = {(0, 4)}
    rows, targets, doc, pos = [], [], [], []
    for b, toks in enumerate(tokens):
        for j, t in enumerate(toks):
            logits = torch.full((V,), -1.0, dtype=torch.float64)
            logits[(t + 1) % V if (b, j) in wrong else t] = 2.0
            rows.append(logits)
            targets.append(t if j >= g else IGNORE_INDEX)
            doc.append(b)
            pos.append(j)
    logits = torch.stack(rows)
    s = score_logits(logits, torch.tensor(targets), torch.tensor(doc), torch.tensor(pos), 3)
    assert s.tokens.tolist() == [4, 1, 0]
    assert s.prefix.tolist() == [2, 1, 0]
    assert s.correct.tolist() == [3, 1, 0]
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="none")
    assert_close(s.loss[:2], torch.stack([ce[2:6].mean(), ce[8]]), torch.float64, name="loss")
    assert float(s.loss[2]) == 0.0


@torch.no_grad()
@pytest.mark.parametrize("g", [1, 3])
def test_no_memory_baseline_covers_the_predicted_tokens(model64, g):
    """tail(g) = tail(0) - tail of the first g tokens alone (causality), for tokens max(1, g)..n-1."""
    docs = documents((6, 4, 8))
    head = model64.get_output_embeddings()
    full = no_memory_tail(model64, head.weight, head.bias, docs)
    first = no_memory_tail(model64, head.weight, head.bias, [d[:g] for d in docs])
    got = no_memory_tail(model64, head.weight, head.bias, docs, given_tokens=g)
    assert_close(got, full - first, torch.float64, name="tail")


@pytest.mark.parametrize("backend, ops", [("torch", None), ("triton", "torch")])
def test_cramming_stops_on_the_tokens_after_the_given_ones(backend, ops):
    """Continuous batching with given tokens = each document alone with the eager loop, and the reported
    stats describe the returned memory on tokens g..n-1 (teacher forcing with the same g)."""
    g = 1
    dtype = torch.float64 if backend == "torch" else torch.float32
    model = tiny_model("llama", dtype=dtype, **LEARNABLE)
    config = WriteConfig(
        num_memory_tokens=3,
        steps=80,
        lr=0.1,
        optimizer="adam",
        init_std=0.5,
        stop=StopRule(check_every=1),
        given_tokens=g,
    )
    docs = documents((5, 1, 3, 4))
    writer = MemoryWriter(model, config, backend=backend, compile=False)
    if ops is not None:
        writer.ops_backend = ops
    stream = list(writer.write_many(docs, slots=2, stats=True))
    steps = [d.steps for d in stream]
    assert len(set(steps)) >= 2 and max(steps) < config.steps, steps  # the rule fired, at different steps
    memory = torch.stack([d.memory for d in stream])
    loss, correct = teacher_forced(model, memory, docs, given_tokens=g)
    oracle = copy.deepcopy(model).double()
    for i, d in enumerate(docs):
        r = stream[i]
        assert r.tokens == max(0, len(d) - g)
        assert r.exact and int(correct[i]) == r.tokens
        assert r.loss == pytest.approx(float(loss[i]), rel=1e-4 if dtype == torch.float32 else 1e-9)
        lrs = [config.lr_at(k) for k in range(r.steps)]
        want, _, _ = write_one(oracle, d, seeded_initial_memory(model, config), r.steps, lrs, optimizer="adam", given=g)
        assert_close(r.memory, want, dtype, name=f"memory {i} after {r.steps} steps")


def test_capacity_counts_tokens_after_the_given_ones(model64):
    """Stage targets count decoded tokens: a stage of target t writes g + t tokens; the capacity prefix with
    the given tokens in front decodes exactly (teacher forcing with the same g)."""
    g = 1
    config = WriteConfig(
        num_memory_tokens=1,
        steps=100,
        lr=0.1,
        optimizer="adam",
        init_std=0.5,
        stop=StopRule(exact=True, check_every=5),
        given_tokens=g,
    )
    docs = documents((30, 4), seed=5)
    writer = MemoryWriter(model64, config, backend="torch")
    results = progressive_capacity(writer, docs, first=2, grow=2.0)
    for d, r in zip(docs, results):
        assert r.stages[0].target == min(2, len(d) - g)
        assert r.capacity <= len(d) - g and r.complete == (r.capacity == len(d) - g)
        assert r.capacity >= 1, "the test needs a text that stores something"
        _, correct = teacher_forced(model64, r.memory[None], [d[: g + r.capacity]], given_tokens=g)
        assert int(correct[0]) == r.capacity
    assert results[1].complete  # 3 tokens after the given one fit


def test_capacity_refuses_texts_with_nothing_after_the_given_tokens(model64):
    config = WriteConfig(num_memory_tokens=1, steps=5, stop=StopRule(exact=True), given_tokens=3)
    with pytest.raises(ValueError, match="given_tokens=3"):
        progressive_capacity(MemoryWriter(model64, config, backend="torch"), documents((5, 3)))
