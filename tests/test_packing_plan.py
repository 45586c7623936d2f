"""``packing.plan_batches`` against its contract, written out here: every document in exactly one batch,
length-sorted, at most ``batch_tokens`` packed rows per batch (memory rows included) unless a document alone
exceeds it, and no batch that could have taken the next document closed early. A mutation tool's survivor
(``used -= need``) put every document into one batch: the values stay right, the memory budget does not.
"""

import random

import pytest

from gradmem_fast.packing import plan_batches


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_plan_batches_respects_the_token_budget(seed, padded):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 7, 30, 61, 130]) for _ in range(40)]
    m, budget = 3, 128
    batches = plan_batches(lengths, m, budget, padded=padded)
    limit = budget - m if padded and budget > 2 * m else budget
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for k, batch in enumerate(batches):
        rows = sum(m + lengths[i] for i in batch)
        assert rows <= limit or len(batch) == 1, f"batch {k}: {rows} rows > {limit}"
        if k + 1 < len(batches):
            nxt = m + lengths[batches[k + 1][0]]
            assert rows + nxt > limit, f"batch {k} closed with room for the next document"
