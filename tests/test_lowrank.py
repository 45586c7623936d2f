"""Low-rank memories (``WriteConfig.memory_rank``, ``gradmem_fast.lowrank``) against an independent eager loop.

The oracle below shares no code with the package: the principal directions from ``torch.linalg.eigh`` of the
embedding covariance written out, each document's loss from ``eager_gradmem.doc_loss`` (the model's own
forward), the gradients w.r.t. z (and U, mu) by ``torch.autograd.grad`` through M = mu + z U^T (not the
package's g_M U), the optimisers written out as formulas.
"""

import pytest
import torch

from eager_gradmem import doc_loss
from gradmem_fast import MemoryWriter, WriteConfig, cli, fileio, reference
from gradmem_fast.config import StopRule
from gradmem_fast.reader import teacher_forced
from helpers import assert_close, random_documents, right_padded
from tiny_models import VOCAB, tiny_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# The oracle


def pca_written_out(weight, k):
    """(mu [d], U [d, k]) fp64: mean and top-k eigenvectors of the rows' covariance, each column's entry of
    largest magnitude positive."""
    E = weight.detach().double()
    mu = E.mean(0)
    C = (E - mu).T @ (E - mu) / (E.shape[0] - 1)
    values, vectors = torch.linalg.eigh(C)
    order = torch.argsort(values, descending=True)[:k]
    U = vectors[:, order]
    for j in range(k):
        if U[U[:, j].abs().argmax(), j] < 0:
            U[:, j] = -U[:, j]
    return mu, U


def _adam(p, g, mv, t, lr, betas):
    """Adam by formula (the contract's: v_hat floored at 1e-8, eps 1e-8 outside the root); ``mv`` updated in place."""
    b1, b2 = betas
    mv[0] = b1 * mv[0] + (1 - b1) * g
    mv[1] = b2 * mv[1] + (1 - b2) * g * g
    mh = mv[0] / (1 - b1**t)
    vh = torch.clamp(mv[1] / (1 - b2**t), min=1e-8)
    return p - lr * mh / (torch.sqrt(vh) + 1e-8)


def oracle(model, docs, M0, cfg):
    """(memories [B, m, d], losses [K, B], ||g_z|| [K, B]) of a low-rank write of ``docs`` (list of 1-D) from
    the shared [m, d] or per-document [B, m, d] ``M0``, fp64."""
    k, K, B = cfg.memory_rank, cfg.steps, len(docs)
    mu, U = pca_written_out(model.get_input_embeddings().weight, k)
    M0 = M0.double().expand(B, *M0.shape[-2:])
    z = [(M0[b] - mu) @ U for b in range(B)]  # U^T U = I: the least-squares coefficients
    learned = cfg.memory_basis == "learned"
    basis_lr = cfg.lr if cfg.basis_lr is None else cfg.basis_lr
    clip_value = cfg.clip_value if cfg.clip_value is not None or cfg.optimizer == "sgd" else 10.0
    z_state = [[torch.zeros_like(z[b]), torch.zeros_like(z[b])] for b in range(B)]
    U_state, mu_state = [torch.zeros_like(U)] * 2, [torch.zeros_like(mu)] * 2
    losses, norms = torch.zeros(K, B, dtype=torch.float64), torch.zeros(K, B, dtype=torch.float64)
    for step in range(K):
        zs = [zb.detach().requires_grad_(True) for zb in z]
        Ul, mul = U.detach().requires_grad_(learned), mu.detach().requires_grad_(learned)
        per_doc = [doc_loss(model, mul + zs[b] @ Ul.T, docs[b], given=cfg.given_tokens) for b in range(B)]
        wrt = zs + ([Ul, mul] if learned else [])
        grads = torch.autograd.grad(sum(per_doc), wrt)
        lr = cfg.lr_at(step)
        for b in range(B):
            g = grads[b]
            losses[step, b], norms[step, b] = per_doc[b].detach(), g.norm()
            if clip_value is not None:
                g = g.clamp(-clip_value, clip_value)
            if cfg.clip_norm is not None and g.norm() > cfg.clip_norm:
                g = g * (cfg.clip_norm / (g.norm() + 1e-6))
            if cfg.optimizer == "sgd":
                z[b] = z[b] - lr * g
            else:
                z[b] = _adam(z[b] * (1 - lr * cfg.weight_decay), g, z_state[b], step + 1, lr, cfg.adam_betas)
        if learned:
            U = _adam(U, grads[B], U_state, step + 1, basis_lr, cfg.adam_betas)
            mu = _adam(mu, grads[B + 1], mu_state, step + 1, basis_lr, cfg.adam_betas)
    return torch.stack([mu + zb @ U.T for zb in z]), losses, norms


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama")


def _docs(lengths, seed):
    return random_documents(lengths, VOCAB, seed)


def _m0(model, m, seed, batch=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (m, model.config.hidden_size) if batch is None else (batch, m, model.config.hidden_size)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3


def _assert_write(result, expected, dtype, name=""):
    memory, losses, norms = expected
    assert_close(result.memory, memory, dtype, name=f"{name} memory")
    # Reported statistics are fp32 (WriteResult), whatever the memory's precision.
    assert_close(result.losses, losses, torch.float32, name=f"{name} losses")
    assert_close(result.grad_norms, norms, torch.float32, name=f"{name} grad norms")


CASES = {
    # name: WriteConfig fields; ragged documents with a length-1 one
    "sgd-pca-clips": dict(optimizer="sgd", lr=0.7, clip_value=0.05, clip_norm=0.08, memory_rank=3),
    "adam-pca-rank1": dict(optimizer="adam", lr=0.05, memory_rank=1),
    "sgd-learned": dict(optimizer="sgd", lr=0.5, memory_rank=4, memory_basis="learned", basis_lr=0.02),
    "adam-learned-given": dict(
        optimizer="adam", lr=0.05, memory_rank=2, memory_basis="learned", given_tokens=1, clip_norm=0.3
    ),
    "adamw-learned": dict(optimizer="adamw", weight_decay=0.5, lr=0.05, memory_rank=5, memory_basis="learned"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_the_oracle_fp64(model64, case):
    """The torch backend: projection, chain rule g_z = g_M U, per-document optimiser on z, the learned basis's
    Adam on the summed gradient, given tokens."""
    cfg = WriteConfig(num_memory_tokens=2, steps=3, **CASES[case])
    docs = _docs([5, 1, 7], seed=1)
    M0 = _m0(model64, 2, seed=2)
    ids, mask = right_padded(docs)
    result = reference.write(model64, ids, mask, M0, cfg)
    _assert_write(result, oracle(model64, docs, M0, cfg), torch.float64, case)


@pytest.mark.parametrize("case", ["sgd-pca-clips", "adam-learned-given"])
def test_engine_torch_ops_match_the_oracle_fp64(model64, case):
    """The packed engine (its fused loss gives g_M, mapped to z), on the torch ops in fp64; per-document
    initial memories (a warm start) projected onto the subspace."""
    cfg = WriteConfig(num_memory_tokens=2, steps=3, **CASES[case])
    docs = _docs([4, 1, 6, 3], seed=3)
    M0 = _m0(model64, 2, seed=4, batch=4)
    writer = MemoryWriter(model64, cfg, backend="triton", compile=False)
    writer.ops_backend = "torch"
    result = writer.write(*right_padded(docs), memory=M0)
    _assert_write(result, oracle(model64, docs, M0, cfg), torch.float64, case)


def test_engine_triton_interpreter_fp32_matches_the_oracle():
    """The Triton kernels (update of z, Adam of the learned basis through the same kernel), fp32."""
    model32 = tiny_model("llama", dtype=torch.float32)
    model64 = tiny_model("llama")
    cfg = WriteConfig(num_memory_tokens=2, steps=2, lr=0.05, optimizer="adam", memory_rank=3, memory_basis="learned")
    docs = _docs([5, 2], seed=5)
    M0 = _m0(model64, 2, seed=6)
    writer = MemoryWriter(model32, cfg, backend="triton", compile=False)
    result = writer.write(*right_padded(docs), memory=M0.float())
    _assert_write(result, oracle(model64, docs, M0, cfg), torch.float32)


def test_engine_bucket_filler_leaves_a_learned_basis_alone(model64):
    """Bucket padding (the compiled/graphed engine's fixed shapes) adds filler documents: with a learned basis
    shared by the batch, the real documents' results are those of the unpadded batch."""
    from gradmem_fast import engine
    from gradmem_fast.inputs import check_token_batch
    from gradmem_fast.packing import documents_from_batch, pack

    cfg = WriteConfig(num_memory_tokens=2, steps=3, lr=0.05, optimizer="adam", memory_rank=3, memory_basis="learned")
    ids, mask = check_token_batch(*right_padded(_docs([6, 1, 3], seed=15)), VOCAB)
    docs = documents_from_batch(ids, mask)
    M = _m0(model64, 2, seed=16, batch=3)
    head = model64.get_output_embeddings()
    plain = engine.write_packed(model64, pack(docs, 2, "cpu"), M, cfg, head.weight, None, "torch")
    padded_pack = pack(docs, 2, "cpu", rows=41)
    assert padded_pack.batch > 3
    filler = M.new_zeros(padded_pack.batch - 3, *M.shape[1:])
    padded = engine.write_packed(model64, padded_pack, torch.cat([M, filler]), cfg, head.weight, None, "torch")
    _assert_write(padded, (plain.memory, plain.losses, plain.grad_norms), torch.float64)


def test_full_rank_pca_sgd_is_the_full_write(model64):
    """k = d is allowed: z = (M - mu) U is a rotation, so SGD with a norm clip on z is SGD on M."""
    d = model64.config.hidden_size
    docs = _docs([6, 3], seed=7)
    M0 = _m0(model64, 3, seed=8)
    common = dict(num_memory_tokens=3, steps=3, lr=0.4, clip_norm=0.1)
    low = reference.write(model64, *right_padded(docs), M0, WriteConfig(memory_rank=d, **common))
    full = reference.write(model64, *right_padded(docs), M0, WriteConfig(**common))
    _assert_write(low, (full.memory, full.losses, full.grad_norms), torch.float64)


def test_learned_basis_with_zero_lr_is_the_pca_basis(model64):
    """basis_lr = 0 leaves U and mu where the pca basis has them (and a trained basis moves the result)."""
    docs = _docs([5, 4], seed=9)
    common = dict(num_memory_tokens=2, steps=3, lr=0.05, optimizer="adam", memory_rank=3)
    pca = reference.write(model64, *right_padded(docs), None, WriteConfig(**common))
    frozen = reference.write(
        model64, *right_padded(docs), None, WriteConfig(memory_basis="learned", basis_lr=0.0, **common)
    )
    trained = reference.write(model64, *right_padded(docs), None, WriteConfig(memory_basis="learned", **common))
    _assert_write(frozen, (pca.memory, pca.losses, pca.grad_norms), torch.float64)
    assert (trained.memory - pca.memory).norm() > 1e-3 * pca.memory.norm()


def test_a_pca_memory_lies_in_its_subspace_and_warm_starts_exactly(model64):
    """The output M = mu + z U^T is in the affine subspace (rank of M - mu is <= k), and a warm start from it
    continues the same coefficients: 2 + 2 SGD steps equal 4 steps."""
    k = 2
    docs = _docs([5, 3], seed=10)
    common = dict(num_memory_tokens=4, lr=0.5, memory_rank=k)
    first = reference.write(model64, *right_padded(docs), None, WriteConfig(steps=2, **common))
    mu, U = pca_written_out(model64.get_input_embeddings().weight, k)
    centred = first.memory - mu
    assert_close(centred @ U @ U.T, centred, torch.float64, name="projection of the output")
    warm = reference.write(model64, *right_padded(docs), first.memory, WriteConfig(steps=2, **common))
    whole = reference.write(model64, *right_padded(docs), None, WriteConfig(steps=4, **common))
    assert_close(warm.memory, whole.memory, torch.float64, name="warm-started memory")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cramming_without_stops_equals_the_oracle(model64, backend):
    """The slot loop with a learned basis: every document takes all K updates (the rule never holds), the
    trailing check's update has lr 0 for all (no basis step): the oracle's K-step write."""
    cfg = WriteConfig(
        num_memory_tokens=2,
        steps=3,
        lr=0.05,
        optimizer="adam",
        memory_rank=3,
        memory_basis="learned",
        stop=StopRule(loss=0.0, exact=False, check_every=1),
    )
    docs = _docs([5, 1, 4], seed=11)
    writer = MemoryWriter(model64, cfg, backend=backend, compile=False)
    writer.ops_backend = "torch"
    M0 = _m0(model64, 2, seed=12)
    result = writer.write(*right_padded(docs), memory=M0)
    _assert_write(result, oracle(model64, docs, M0, cfg), torch.float64, backend)
    assert result.stats.steps.tolist() == [3, 3, 3]


@pytest.mark.parametrize("basis", ["pca", "learned"])
def test_continuous_batching_keeps_each_stopped_memory(model64, basis):
    """Documents stop at different steps and waiting ones take their slots while a learned basis keeps
    training: each returned memory is the one its stats describe (a stopped memory does not drift with the
    basis), on both backends identically; with the pca basis each equals writing the document alone."""
    cfg = WriteConfig(
        num_memory_tokens=2,
        steps=30,
        lr=0.3,
        optimizer="adam",
        memory_rank=6,
        memory_basis=basis,
        stop=StopRule(loss=3.0, exact=True, check_every=2),
    )
    docs = _docs([3, 1, 5, 2, 4], seed=13)
    results = {}
    for backend in ("torch", "triton"):
        writer = MemoryWriter(model64, cfg, backend=backend, compile=False)
        writer.ops_backend = "torch"
        results[backend] = list(writer.write_many(docs, slots=2, stats=True))
    steps = [r.steps for r in results["torch"]]
    assert len(set(steps)) > 1, steps  # the stream really refills
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert_close(b.memory, a.memory, torch.float64, name="engine vs torch")
        assert (a.steps, a.stopped) == (b.steps, b.stopped)
    memory = torch.stack([r.memory for r in results["torch"]])
    loss, correct = teacher_forced(model64, memory, docs)
    for i, r in enumerate(results["torch"]):
        assert r.loss == pytest.approx(float(loss[i]), rel=1e-9)
        assert r.accuracy == pytest.approx(float(correct[i]) / len(docs[i]), rel=1e-12)
    if basis == "pca":
        alone = MemoryWriter(model64, cfg, backend="torch")
        for i, doc in enumerate(docs):
            single = alone.write(doc[None])
            assert_close(results["torch"][i].memory, single.memory[0], torch.float64, name=f"alone {i}")


def test_rank_above_the_hidden_size_is_refused(model64):
    d = model64.config.hidden_size
    with pytest.raises(ValueError, match=rf"memory_rank must be in \[1, {d}\]"):
        reference.write(model64, torch.tensor([[1, 2, 3]]), config=WriteConfig(memory_rank=d + 1))
    with pytest.raises(ValueError, match=rf"memory_rank must be in \[1, {d}\]"):
        MemoryWriter(model64, WriteConfig(memory_rank=d + 1), backend="torch")  # before any work


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(memory_rank=0), "memory_rank must be >= 1"),
        (dict(memory_rank=2.0), "memory_rank must be an int"),
        (dict(memory_rank=2, memory_basis="random"), "memory_basis must be one of"),
        (dict(memory_basis="learned"), "memory_basis needs memory_rank"),
        (dict(memory_rank=2, basis_lr=0.1), "basis_lr is only meaningful with memory_basis='learned'"),
        (dict(memory_rank=2, memory_basis="learned", basis_lr=-1.0), "basis_lr must be >= 0"),
        (dict(memory_rank=2, grad_mode="first"), "memory_rank: low-rank memories are written with grad_mode='none'"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        WriteConfig(**fields)


def test_capacity_with_a_pca_basis(model64):
    """Progressive capacity warm-starts every stage from the last memory, which the pca basis holds exactly:
    the reported memory lies in the subspace and decodes its capacity prefix."""
    from gradmem_fast.capacity import progressive_capacity

    k = 8
    cfg = WriteConfig(
        num_memory_tokens=2, steps=60, lr=1.0, optimizer="adam", memory_rank=k, stop=StopRule(check_every=1)
    )
    doc = _docs([9], seed=14)[0]
    (found,) = progressive_capacity(MemoryWriter(model64, cfg, backend="torch"), [doc], first=1)
    mu, U = pca_written_out(model64.get_input_embeddings().weight, k)
    centred = found.memory - mu
    assert_close(centred @ U @ U.T, centred, torch.float64, name="capacity memory in the subspace")
    assert found.capacity >= 1, found
    _, correct = teacher_forced(model64, found.memory[None], [doc[: found.capacity]])
    assert int(correct[0]) == found.capacity


def test_capacity_refuses_a_learned_basis(model64):
    from gradmem_fast.capacity import progressive_capacity

    cfg = WriteConfig(memory_rank=2, memory_basis="learned", stop=StopRule(exact=True))
    with pytest.raises(ValueError, match="memory_basis='learned' is refused"):
        progressive_capacity(MemoryWriter(model64, cfg, backend="torch"), [torch.tensor([1, 2, 3])])


# ---------------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_local import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _input(tmp_path):
    import json

    from tiny_local import sentence

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": sentence(3 + 2 * i, i)}) + "\n" for i in range(3)))
    return str(path)


def test_cli_write_round_trip(model_dir, tmp_path):
    """``--memory-rank 3``: the stored config holds the rank and the memories are the API's (pca basis: every
    document alone gives the same memory)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "mem.safetensors")
    args = ["write", "--model", model_dir, "--input", _input(tmp_path), "--output", out, "--quiet"]
    assert cli.main([*args, "--steps", "3", "--memory-tokens", "2", "--lr", "0.05", "--memory-rank", "3"]) == 0
    f = fileio.MemoryFile(out)
    config = json.loads(f.metadata["config"])
    assert (config["memory_rank"], config["memory_basis"], config["basis_lr"]) == (3, "pca", None)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = WriteConfig(
        num_memory_tokens=2, steps=3, lr=0.05, optimizer="adam", memory_rank=3, stop=StopRule(check_every=1)
    )
    writer = MemoryWriter(model, cfg, backend="torch")
    for row, line in enumerate(open(_input(tmp_path))):
        text = json.loads(line)["text"]
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]])
        assert_close(f.rows([row])[0], writer.write(ids).memory[0], name=f"memory {row}")


def test_cli_learned_basis_runs_and_is_recorded(model_dir, tmp_path):
    import json

    out = str(tmp_path / "mem.safetensors")
    args = ["write", "--model", model_dir, "--input", _input(tmp_path), "--output", out, "--quiet", "--steps", "2"]
    assert cli.main([*args, "--memory-rank", "2", "--memory-basis", "learned", "--basis-lr", "0.01"]) == 0
    config = json.loads(fileio.MemoryFile(out).metadata["config"])
    assert (config["memory_rank"], config["memory_basis"], config["basis_lr"]) == (2, "learned", 0.01)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--memory-basis", "learned"], "--memory-basis and --basis-lr need --memory-rank"),
        (["--memory-rank", "0"], "--memory-rank"),
        (["--memory-rank", "2", "--basis-lr", "0.1"], "--basis-lr is for --memory-basis learned"),
        (["--memory-rank", "2", "--memory-basis", "learned", "--basis-lr", "nan"], "--basis-lr must be a finite"),
        (["--memory-rank", "33"], "--memory-rank 33 exceeds the model's hidden size 32"),
    ],
)
def test_cli_bad_flags_are_named(model_dir, tmp_path, capsys, extra, message):
    import os

    out = str(tmp_path / "mem.safetensors")
    args = ["write", "--model", model_dir, "--input", _input(tmp_path), "--output", out, "--quiet"]
    assert cli.main([*args, *extra]) != 0
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_capacity_refuses_a_learned_basis(model_dir, tmp_path, capsys):
    args = ["capacity", "--model", model_dir, "--input", _input(tmp_path), "--memory-tokens", "1", "--memory-rank", "2"]
    assert cli.main([*args, "--memory-basis", "learned"]) != 0
    assert "--memory-basis learned is not available here" in capsys.readouterr().err
