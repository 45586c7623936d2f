"""Varlen packing of [memory ; document] sequences."""

import pytest
import torch

from gradmem_fast.packing import pack


def test_pack_layout_by_hand():
    docs = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    p = pack(docs, num_memory_tokens=2, device="cpu")
    assert p.cu_seqlens.tolist() == [0, 5, 8] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 5 and p.total_rows == 8
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # sources: memories rows 0..3 (doc0: 0,1; doc1: 2,3), tokens at 4 + token index
    assert p.source_index.tolist() == [0, 1, 4, 5, 6, 2, 3, 7]
    assert p.loss_rows.tolist() == [1, 2, 3, 6]
    assert p.tokens.tolist() == [5, 6, 7, 9]
    assert p.cu_tokens.tolist() == [0, 3, 4]
    assert p.memory_rows.tolist() == [0, 1, 5, 6]
    assert p.token_rows.tolist() == [2, 3, 4, 7]


def test_pack_gathers_the_right_rows():
    m, d = 3, 4
    lengths = [1, 6, 2, 9]
    docs = [torch.randint(0, 50, (n,)) for n in lengths]
    p = pack(docs, m, "cpu")
    memories = torch.randn(len(docs), m, d)
    emb = torch.randn(50, d)
    x = torch.cat([memories.reshape(-1, d), emb[p.tokens]])[p.source_index]
    for b, doc in enumerate(docs):
        s = int(p.cu_seqlens[b])
        expected = torch.cat([memories[b], emb[doc]])
        assert torch.equal(x[s : s + m + len(doc)], expected)
        rows = p.loss_rows[p.cu_tokens[b] : p.cu_tokens[b + 1]]
        assert rows.tolist() == list(range(s + m - 1, s + m - 1 + len(doc)))


def test_fixed_rows_add_ignored_filler_no_longer_than_the_longest_document():
    from gradmem_fast.packing import IGNORE_INDEX

    docs = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    p = pack(docs, 2, "cpu", rows=22)  # 8 real rows; 14 filler rows in documents of <= 2 + 3 rows
    assert p.real_batch == 2 and p.total_rows == 22
    assert p.lengths[:2] == [3, 1] and p.lengths[2:] == [3, 3, 2]
    assert p.max_seqlen == 5
    assert p.tokens.numel() == p.targets.numel() == sum(p.lengths)
    assert p.targets[:4].tolist() == [5, 6, 7, 9] and (p.targets[4:] == IGNORE_INDEX).all()
    assert (p.tokens[4:] == 0).all()
    with pytest.raises(ValueError, match="rows"):
        pack(docs, 2, "cpu", rows=7)  # fewer than the real rows
    with pytest.raises(ValueError, match="rows"):
        pack(docs, 2, "cpu", rows=9)  # one filler row cannot hold a document's 2 memory rows


def test_filler_lengths_split_and_align():
    from gradmem_fast.packing import filler_lengths

    for rows, m, longest in [(1000, 8, 50), (9, 8, 1), (8, 8, 3), (97, 3, 7), (5, 5, 0)]:
        fill = filler_lengths(rows, m, longest)
        assert sum(n + m for n in fill) == rows
        assert max(fill) <= longest and max(fill) - min(fill) <= 1
        assert len(fill) == -(-rows // (m + longest))  # the fewest documents the length cap allows
    aligned = filler_lengths(1000, 8, 50, real_docs=13, doc_multiple=8)
    assert (13 + len(aligned)) % 8 == 0 and sum(n + 8 for n in aligned) == 1000 and max(aligned) <= 50
    assert filler_lengths(0, 4, 10) == []


def test_bucket_rows_pads_less_than_an_eighth():
    from gradmem_fast.packing import bucket_rows

    for m in (1, 8, 32):
        sizes = set()
        for rows in range(64, 20000, 7):
            size = bucket_rows(rows, m)
            assert size >= rows and not 0 < size - rows < m
            if m == 1:
                assert size - rows < size / 8
            sizes.add(size)
        assert len(sizes) < 8 * 9  # 8 sizes per octave
    with pytest.raises(ValueError, match="rows"):
        bucket_rows(0)


def test_padding_waste_on_the_uniform_100_450_mix_is_below_one_eighth():
    """DESIGN.md's WRITE shape: uniform 100-450 token documents, m=8, the writer's default batching, and a
    small-batch setting; bucket padding wastes < 12.5% of the packed rows, and a 20k-document stream needs
    few distinct shapes (compiled steps)."""
    from gradmem_fast.packing import padding_waste

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 451, (20000,), generator=gen).tolist()
    for batch_tokens, window in [(16384, 4096), (4096, 512)]:
        waste = padding_waste(lengths, 8, batch_tokens=batch_tokens, window=window)
        assert waste["real_rows"] == sum(lengths) + 8 * len(lengths)
        assert 0 < waste["row_waste"] < 0.125, waste
        assert waste["buckets"] <= 16, waste
    # The measure can fail: single short documents in large buckets waste most rows.
    assert padding_waste([1] * 10, 8, batch_tokens=9, window=10)["row_waste"] > 0.125


def test_packed_batch_upload_keeps_every_field():
    docs = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    p = pack(docs, 2, "cpu", rows=22)
    q = p.to("meta")
    for name in p._LONG + p._INT32:
        a, b = getattr(p, name), getattr(q, name)
        assert a.shape == b.shape and a.dtype == b.dtype and b.device.type == "meta"
