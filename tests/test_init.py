"""WriteConfig.init: each draw's statistics against formulas computed here with numpy from the embedding matrix;
normal unchanged; seeded and the same on both backends; warm start (--init warm) continues a previous run."""

import json

import numpy as np
import pytest
import torch

from gradmem_fast import cli, dataset_files, fileio, init
from gradmem_fast.config import WriteConfig
from gradmem_fast.inputs import initial_memory
from gradmem_fast.writer import MemoryWriter
from tiny_local import save_tiny, sentence
from tiny_models import tiny_model

N = 40000  # draws per statistic: standard errors ~ 1/sqrt(N) = 0.5%


def _embedding(V=3000, d=6, seed=0):
    """Correlated rows with distinct per-coordinate means and scales."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * rng.uniform(0.2, 2.0, size=d)
    return rng.normal(size=(V, d)) @ mixing + rng.normal(size=d) * 3


def _draw(kind, E, **kw):
    return init.draw(kind, N, E.shape[1], kw.pop("std", 0.02), kw.pop("seed", 0), torch.from_numpy(E), **kw).numpy()


def test_normal_is_the_former_default():
    model = tiny_model("llama", dtype=torch.float64)
    config = WriteConfig(num_memory_tokens=5, init_std=0.3, seed=7)
    former = torch.randn(5, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.3
    assert torch.equal(initial_memory(None, 1, config, model, "cpu")[0], former)


@pytest.mark.parametrize("std", [0.02, 1.5])
def test_normal_and_uniform_have_variance_std_squared(std):
    E = _embedding()
    for kind in ("normal", "uniform"):
        M = _draw(kind, E, std=std)
        assert abs(M.mean()) < 5 * std / np.sqrt(M.size)
        assert abs(M.var() / std**2 - 1) < 5 * np.sqrt(2 / M.size) * (1 if kind == "normal" else 0.5)
    M = _draw("uniform", E, std=std)
    bound = std * np.sqrt(3)
    assert M.min() >= -bound and M.max() < bound and M.max() > 0.99 * bound and M.min() < -0.99 * bound


def test_embedding_diag_fits_each_coordinate():
    E = _embedding()
    mu, sigma = E.mean(0), E.std(0, ddof=1)
    M = _draw("embedding-diag", E)
    assert np.all(np.abs(M.mean(0) - mu) < 5 * sigma / np.sqrt(N))
    assert np.all(np.abs(M.std(0) / sigma - 1) < 5 / np.sqrt(2 * N))
    # coordinates drawn independently, though the embeddings' are correlated
    corr = np.corrcoef(M.T) - np.eye(E.shape[1])
    assert np.abs(corr).max() < 5 / np.sqrt(N) and np.abs(np.corrcoef(E.T) - np.eye(E.shape[1])).max() > 0.2


def test_embedding_full_fits_the_covariance():
    E = _embedding()
    mu, C = E.mean(0), np.cov(E.T)
    M = _draw("embedding-full", E)
    # whitened by the true covariance, the sample mean is ~N(0, I/N) and the covariance ~I
    W = np.linalg.inv(np.linalg.cholesky(C))
    Z = (M - mu) @ W.T
    assert np.abs(Z.mean(0)).max() < 5 / np.sqrt(N)
    assert np.abs(np.cov(Z.T) - np.eye(E.shape[1])).max() < 5 * np.sqrt(2 / N)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pca_spans_the_top_directions_with_their_variances(k):
    E = _embedding()
    mu, C = E.mean(0), np.cov(E.T)
    values, vectors = np.linalg.eigh(C)
    values, vectors = values[::-1], vectors[:, ::-1]
    M = _draw("pca", E, rank=k) - mu
    top, rest = vectors[:, :k], vectors[:, k:]
    # nothing outside the top-k subspace (up to rounding), and the variance lambda_r along q_r
    assert np.abs(M @ rest).max() < 1e-10 * np.abs(M).max()
    along = M @ top
    assert np.all(np.abs(along.var(0) / values[:k] - 1) < 5 * np.sqrt(2 / N))
    if k > 1:
        assert np.abs(np.corrcoef(along.T) - np.eye(k)).max() < 5 / np.sqrt(N)


def test_pca_eigenvector_signs_are_fixed():
    """The draw does not depend on the eigensolver's arbitrary signs: the largest entry of each q_r is > 0."""
    E = _embedding()
    _, Q = init.principal_directions(init.embedding_statistics(torch.from_numpy(E))[1], 4)
    pivot = Q.abs().argmax(0)
    assert (Q[pivot, torch.arange(4)] > 0).all()
    _, Q2 = init.principal_directions(init.embedding_statistics(torch.from_numpy(-E))[1], 4)
    assert torch.allclose(Q, Q2, atol=1e-12)  # C(-E) = C(E): the same directions, the same signs


@pytest.mark.parametrize("kind", init.INITS)
def test_seeded_and_deterministic(kind):
    E = torch.from_numpy(_embedding(V=50, d=8))
    a, b = (init.draw(kind, 3, 8, 0.1, 5, E) for _ in range(2))
    c = init.draw(kind, 3, 8, 0.1, 6, E)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_singular_covariance_still_draws():
    """Fewer rows than dimensions: C is singular, Cholesky gets the smallest jitter that works."""
    E = torch.from_numpy(_embedding(V=4, d=8))
    M = init.draw("embedding-full", 2000, 8, 0.0, 0, E)
    assert torch.isfinite(M).all()
    # still inside the rows' affine span (up to the jitter): the component outside it is tiny
    centred = E - E.mean(0)
    basis = torch.linalg.svd(centred, full_matrices=True).Vh
    outside = (M - E.mean(0)) @ basis[3:].T
    assert outside.abs().max() < 1e-3 * (M - E.mean(0)).abs().max()


def test_bad_init_options():
    with pytest.raises(ValueError, match="init must be one of"):
        WriteConfig(init="xavier")
    with pytest.raises(ValueError, match="init_rank is only meaningful"):
        WriteConfig(init="normal", init_rank=3)
    with pytest.raises(ValueError, match=r"init_rank must be in \[1, 8\]"):
        init.draw("pca", 2, 8, 0.0, 0, torch.zeros(10, 8), rank=9)
    with pytest.raises(ValueError, match=r"needs the input embedding matrix \[V, 8\]"):
        init.draw("pca", 2, 8, 0.0, 0, torch.zeros(10, 7))


@pytest.mark.parametrize("kind", ["uniform", "embedding-diag", "embedding-full", "pca"])
def test_the_same_initial_memory_on_both_backends(kind):
    """lr 0: the written memory is the initial one, the draw from the model's own embedding matrix."""
    model = tiny_model("llama", dtype=torch.float64)
    config = WriteConfig(num_memory_tokens=3, steps=1, lr=0.0, init=kind, seed=3)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = init.draw(kind, 3, 32, 0.02, 3, model.get_input_embeddings().weight)
    for backend in ("torch", "triton"):
        memory = MemoryWriter(model, config, backend=backend).write(ids).memory
        assert torch.equal(memory[0], expected) and torch.equal(memory[1], expected), backend


# ---------------------------------------------------------------------------------------------------------
# Warm start through the command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _write(model_dir, inp, out, steps, *extra):
    base = ["write", "--model", model_dir, "--input", inp, "--output", out, "--memory-tokens", "2", "--quiet"]
    args = ["--steps", str(steps), "--optimizer", "sgd", "--lr", "0.5", "--stop", "none", "--dtype", "float64"]
    return cli.main([*base, *args, *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "dataset"])
def test_warm_start_continues_a_previous_run(model_dir, tmp_path, fmt):
    """SGD without a schedule keeps no state: 3 steps, then 3 more from those memories = 6 steps (fp64). The
    second run lists the documents in another order, so the memories are matched by id."""
    docs = [{"id": f"d{i}", "text": sentence(4 + i, i)} for i in range(4)]
    inp = tmp_path / "d.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    rev = tmp_path / "r.jsonl"
    rev.write_text("".join(json.dumps(d) + "\n" for d in docs[::-1]))
    six, three, more = str(tmp_path / "six"), str(tmp_path / "three"), str(tmp_path / "more")
    assert _write(model_dir, str(inp), six, 6) == 0
    assert _write(model_dir, str(inp), three, 3, "--output-format", fmt) == 0
    assert _write(model_dir, str(rev), more, 3, "--init", "warm", "--init-from", three) == 0
    a, b = fileio.MemoryFile(six), fileio.MemoryFile(more)
    assert b.ids == a.ids[::-1]
    ref, got = a.rows(range(4)), b.rows(range(4)).flip(0)
    assert ((got - ref).norm() / ref.norm()) < 1e-10
    # ... and differs from a cold 3-step run
    assert not torch.allclose(dataset_files.open_memories(three).rows(range(4)), ref)


def test_warm_start_errors_name_the_flag_and_the_id(model_dir, tmp_path, capsys):
    inp = tmp_path / "d.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": sentence(4)}) + "\n")
    prev = str(tmp_path / "prev")
    assert _write(model_dir, str(inp), prev, 1) == 0
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"id": i, "text": sentence(4)}) + "\n" for i in ("a", "zz")))
    out = str(tmp_path / "o")
    assert _write(model_dir, str(more), out, 1, "--init", "warm", "--init-from", prev) == 2
    assert 'no memory for document id(s) "zz"' in capsys.readouterr().err
    assert _write(model_dir, str(inp), out, 1, "--init", "warm") == 2
    assert "--init warm needs --init-from" in capsys.readouterr().err
    assert _write(model_dir, str(inp), out, 1, "--init-from", prev) == 2
    assert "--init-from is read with --init warm only" in capsys.readouterr().err
    assert _write(model_dir, str(inp), out, 1, "--init", "uniform", "--init-rank", "2") == 2
    assert "--init-rank is for --init pca" in capsys.readouterr().err
    assert _write(model_dir, str(inp), out, 1, "--init", "warm", "--init-from", prev, "--memory-tokens", "3") == 2
    assert "holds 2 memory vectors per document, not 3" in capsys.readouterr().err


def test_cli_init_pca_is_recorded(model_dir, tmp_path):
    inp = tmp_path / "d.jsonl"
    inp.write_text(json.dumps({"text": sentence(4)}) + "\n")
    out = str(tmp_path / "o")
    assert _write(model_dir, str(inp), out, 1, "--init", "pca", "--init-rank", "3") == 0
    config = fileio.MemoryFile(out).config()
    assert config["init"] == "pca" and config["init_rank"] == 3


@pytest.mark.parametrize("stop", [True, False])
def test_write_many_per_document_initial_memories(stop):
    """write_many(memory=[N, m, d]) writes each document from its own row, as a write of it alone does."""
    from gradmem_fast.config import StopRule

    model = tiny_model("llama", dtype=torch.float64)
    rule = StopRule(check_every=2) if stop else None
    config = WriteConfig(num_memory_tokens=2, steps=5, lr=0.1, optimizer="adam", stop=rule)
    writer = MemoryWriter(model, config, backend="torch")
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 50, (n,), generator=gen) for n in (5, 1, 9, 3)]
    rows = torch.randn(4, 2, 32, generator=gen, dtype=torch.float64)
    got = list(writer.write_many(docs, batch_tokens=24, window=3, memory=rows))
    for i, doc in enumerate(docs):
        alone = writer.write(doc[None], memory=rows[i : i + 1]).memory[0]
        assert ((got[i] - alone).norm() / alone.norm()) < 1e-10, i
    with pytest.raises(ValueError, match="needs a sequence of N documents, got 3 memories for 4"):
        list(writer.write_many(docs, memory=rows[:3]))
