"""Varlen packing of [memory ; document] sequences."""
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


def test_fixed_shape_adds_ignored_filler():
    from gradmem_fast.packing import IGNORE_INDEX, bucket_shape

    docs = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    p = pack(docs, 2, "cpu", shape=(4, 10))
    assert p.real_batch == 2 and p.batch == 4
    assert p.lengths == [3, 1, 0, 6]
    assert p.tokens.numel() == p.targets.numel() == 10
    assert p.targets[:4].tolist() == [5, 6, 7, 9] and (p.targets[4:] == IGNORE_INDEX).all()
    assert (p.tokens[4:] == 0).all()
    assert p.total_rows == 10 + 4 * 2
    assert bucket_shape(3, 700) == (8, 1024)
    b, n = bucket_shape(9, 5000)
    assert b == 16 and n >= 5000 and n < 5000 * 1.5
    import pytest

    with pytest.raises(ValueError, match="shape"):
        pack(docs, 2, "cpu", shape=(2, 10))
