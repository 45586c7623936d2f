"""GradMemModel (gradmem_fast.model): meta-training forward/backward against an independent eager loop,
checkpoint key layout, Hugging Face Trainer resume, and 2-process data-parallel gradients."""

import datetime
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
import transformers

from gradmem_fast import meta_write
from gradmem_fast.model import GradMemConfig, GradMemModel
from helpers import assert_close
from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny ops: a second torch thread on a busy 2-core machine mostly waits for a core. Restored after
    the module so other test files keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# An independent implementation: one document at a time, full logits, log-softmax written out, the
# optimizer formulas written out, plain torch.autograd. Shares no code with the package.


def _rows(model, M, start, end):
    """[start ; P(M) ; end] for one document's memory M [m, d]."""
    x = M if model.mem_proj is None else M @ model.mem_proj.weight.t() + model.mem_proj.bias
    if model.config.n_ctrl_tokens:
        x = torch.cat([getattr(model, start), x, getattr(model, end)])
    return x


def naive_meta_loss(model, contexts, queries, labels):
    """The outer loss for lists of 1-D context/query tensors and labels [B, Q] (right-padded queries)."""
    cfg = model.config
    lm = model.model
    emb = lm.get_input_embeddings()
    head = model.write_head.weight if model.write_head is not None else lm.get_output_embeddings().weight
    K, lr = cfg.K, cfg.lr
    last_k = cfg.last_K_second_order
    clip_value = cfg.inner_clip_value
    if cfg.use_adam and clip_value is None:
        clip_value = 10.0
    memories, last_losses = [], []
    for doc in contexts:
        M, m1, v1, loss = model.mem, None, None, None
        for k in range(K):
            second = cfg.grad_mode == "second" and k >= K - last_k
            if cfg.grad_mode == "none":
                M = M.detach().requires_grad_(True)
            rows = _rows(model, M, "write_st", "write_end")
            r, n = rows.shape[0], doc.shape[0]
            h = lm.base_model(inputs_embeds=torch.cat([rows, emb(doc)])[None]).last_hidden_state[0]
            z = h[r - 1 : r - 1 + n] @ head.t()
            logp = z - z.logsumexp(dim=-1, keepdim=True)
            loss = -logp[torch.arange(n), doc].sum() / n
            (g,) = torch.autograd.grad(loss, M, create_graph=second, retain_graph=True)
            if not second:
                g = g.detach()
            if clip_value is not None:
                g = g.clamp(-clip_value, clip_value)
            if cfg.inner_clip_norm is not None:
                norm = g.pow(2).sum().sqrt()
                if norm > cfg.inner_clip_norm:
                    g = g * (cfg.inner_clip_norm / (norm + 1e-6))
            if cfg.use_adam:
                m1 = 0.1 * g if m1 is None else 0.9 * m1 + 0.1 * g
                v1 = 0.001 * g * g if v1 is None else 0.999 * v1 + 0.001 * g * g
                mh, vh = m1 / (1 - 0.9 ** (k + 1)), (v1 / (1 - 0.999 ** (k + 1))).clamp(min=1e-8)
                M = M - lr * mh / (vh.sqrt() + 1e-8)
            else:
                M = M - lr * g
            if cfg.grad_mode == "none":
                M = M.detach()
        memories.append(M)
        last_losses.append(loss)
    logits = []
    for M, q in zip(memories, queries):
        rows = _rows(model, M, "read_st", "read_end")
        r = rows.shape[0]
        logits.append(lm(inputs_embeds=torch.cat([rows, emb(q)])[None]).logits[0, r - 1 : r - 1 + q.shape[0]])
    logits = torch.stack(logits)
    target = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    if cfg.add_inner_loss_to_outer:
        target = target + cfg.inner_loss_weight * torch.stack(last_losses).sum() / len(contexts)
    return target


def _batch(lengths, Q=4, pad_id=0):
    """Right-padded contexts with their mask, queries [B, Q] and labels (-100 on the first two positions)."""
    B, S = len(lengths), max(lengths)
    ctx = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    docs = []
    for b, n in enumerate(lengths):
        doc = torch.randint(1, VOCAB, (n,))
        ctx[b, :n], mask[b, :n] = doc, 1
        docs.append(doc)
    queries = torch.randint(1, VOCAB, (B, Q))
    labels = torch.randint(1, VOCAB, (B, Q))
    labels[:, :2] = -100
    return ctx, mask, docs, queries, labels


def _randomise(model):
    """Move every memory-side parameter away from its initial value (identity projection, copied head)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model."):
                p.add_(torch.randn_like(p) * 0.3)


SECOND_ALL_OPTIONS = dict(
    grad_mode="second",
    n_ctrl_tokens=1,
    use_mem_proj=True,
    mem_proj_mode="proj",
    use_write_head=True,
    add_inner_loss_to_outer=True,
    inner_loss_weight=0.5,
    inner_clip_norm=0.3,
)

CASES = {
    # name: (family, GradMemConfig options)
    "second-all-options": ("llama", SECOND_ALL_OPTIONS),
    "second-last1-clipvalue": (
        "gpt2",
        dict(grad_mode="second", last_K_second_order=1, inner_clip_value=0.05, n_ctrl_tokens=2),
    ),
    "first-adam-inner-loss": (
        "llama",
        dict(
            grad_mode="first", use_adam=True, add_inner_loss_to_outer=True, inner_loss_weight=0.7, use_write_head=True
        ),
    ),
    "first-sgd-ctrl-proj": (
        "llama",
        dict(grad_mode="first", n_ctrl_tokens=1, use_mem_proj=True, mem_proj_mode="proj", inner_clip_norm=0.2),
    ),
    "none-inner-loss": ("llama", dict(grad_mode="none", add_inner_loss_to_outer=True, inner_loss_weight=1.0)),
    # grad_mode "second" with no second-order step: the memory stays on the graph through first-order steps, and
    # the kept loss carries the gradients of the projection and control vectors (meta_write point 2)
    "second-last0-inner-loss-proj": (
        "gpt2",
        dict(
            grad_mode="second",
            last_K_second_order=0,
            add_inner_loss_to_outer=True,
            inner_loss_weight=0.3,
            n_ctrl_tokens=1,
            use_mem_proj=True,
            mem_proj_mode="proj",
            use_write_head=True,
        ),
    ),
}

# Every case on the torch backend; on the Triton engine (interpreter, ~20 s a case on 2 cores) the
# all-options case in fp64, or every case in fp64 and fp32 with GRADMEM_TEST_MODEL_SWEEP=1.
_SWEEP = os.environ.get("GRADMEM_TEST_MODEL_SWEEP") == "1"
BACKEND_CASES = [(case, backend) for case in CASES for backend in ("torch", "reference", "torch-fusedce")] + [
    (case, backend)
    for case in CASES
    for backend in ("triton", "triton-fp32")
    if _SWEEP or (case, backend) == ("second-all-options", "triton")
]


@pytest.mark.parametrize("case, backend", BACKEND_CASES)
def test_forward_and_gradients_match_naive_loop(case, backend, monkeypatch):
    """Loss and the gradients w.r.t. every parameter (initial memory, control vectors, projection, write
    head, every backbone weight) equal the independent eager loop's in fp64: within the fp64 bound on the
    torch (``meta_write``; "torch-fusedce": its fused linear cross-entropy forced on the tiny vocabulary),
    reference and Triton backends in fp64, within the fp32 bound with the model in fp32 ("triton-fp32")."""
    family, options = CASES[case]
    dtype = torch.float32 if backend.endswith("fp32") else torch.float64
    if backend == "torch-fusedce":
        monkeypatch.setattr(meta_write, "FUSED_CE_MIN_VOCAB", 1)
    cfg = GradMemConfig(n_mem_tokens=2, K=2, lr=0.4, backend=backend.split("-")[0], **options)
    model = GradMemModel(cfg, model=tiny_model(family))
    _randomise(model)
    ctx, mask, docs, queries, labels = _batch([5, 1, 3])
    params = list(model.parameters())
    names = [n for n, p in model.named_parameters()]
    want_loss = naive_meta_loss(model, docs, list(queries), labels)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    model.to(dtype)
    out = model(context_input_ids=ctx, query_input_ids=queries, labels=labels, context_attention_mask=mask)
    assert out.logits.shape == (3, 5, VOCAB) and out.logits.dtype == dtype
    assert out.inner_losses.shape == (2, 3) and out.inner_grad_norms.shape == (2, 3)
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    assert_close(out.loss.detach(), want_loss.detach(), dtype=dtype, name="loss")
    for name, g, w in zip(names, got, want):
        if w is None or g is None:
            assert g is None and w is None, f"{name}: gradient present on one side only"
            continue
        assert_close(g, w, dtype=dtype, name=name)
    if cfg.grad_mode == "none":
        assert got[names.index("mem")] is None  # detached memory: M0 gets no outer gradient
    else:
        assert got[names.index("mem")].abs().sum() > 0


def test_kept_loss_carrying_its_gradients():
    """meta_write point 2: the kept last loss (first-order last step) carries the gradients of its sum. A
    non-uniform use of the kept [B] losses is refused
    rather than given a wrong gradient; the carried gradients scale with a uniform cotangent (the mean)."""
    options = dict(grad_mode="first", add_inner_loss_to_outer=True, inner_loss_weight=0.7, use_write_head=True)
    cfg = GradMemConfig(n_mem_tokens=2, K=2, lr=0.4, backend="torch", **options)
    model = GradMemModel(cfg, model=tiny_model("llama"))
    _randomise(model)
    ctx, mask, _, _, _ = _batch([5, 1, 3])
    params = [p for n, p in model.named_parameters() if n != "mem"]
    result = model.write(ctx, mask)
    with pytest.raises(RuntimeError, match="non-uniform"):
        torch.autograd.grad((result.last_loss * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), params[-1])
    result = model.write(ctx, mask)
    got = torch.autograd.grad(result.last_loss.mean(), model.write_head.weight)[0]
    model.config.backend = "reference"
    want = torch.autograd.grad(model.write(ctx, mask).last_loss.mean(), model.write_head.weight)[0]
    assert_close(got, want, dtype=torch.float64, name="write head gradient of the kept loss's mean")


def test_published_batch_format_and_k0():
    """input_ids as the published dict, padding from the pad id; K=0 reads the initial memory."""
    lm = tiny_model("gpt2")
    lm.config.pad_token_id = 0
    model = GradMemModel(GradMemConfig(n_mem_tokens=2, K=1, lr=0.3, backend="torch"), model=lm)
    ctx, mask, docs, queries, labels = _batch([4, 2], pad_id=0)
    a = model(input_ids={"context_input_ids": ctx, "query_input_ids": queries}, labels=labels)
    b = model(context_input_ids=ctx, context_attention_mask=mask, query_input_ids=queries, labels=labels)
    assert torch.equal(a.loss, b.loss)
    # A right-padded query (masked): its real rows equal the same query read alone.
    qmask = torch.ones_like(queries)
    qmask[1, 3:] = 0
    padded = model(
        context_input_ids=ctx, context_attention_mask=mask, query_input_ids=queries, query_attention_mask=qmask
    )
    alone = model(context_input_ids=ctx[1:], context_attention_mask=mask[1:], query_input_ids=queries[1:, :3])
    assert_close(padded.logits[1, :4], alone.logits[0], dtype=torch.float64, name="padded query logits")
    model.config.K = 0
    out = model(context_input_ids=ctx, query_input_ids=queries, labels=labels, return_mem=True)
    assert out.inner_losses is None
    assert torch.equal(out.memory, model.mem.expand(2, -1, -1))
    frozen = GradMemModel(GradMemConfig(n_mem_tokens=2, K=1, backend="torch", freeze_backbone=True), model=lm)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["mem"]
    with pytest.raises(ValueError, match="labels"):
        model(context_input_ids=ctx, query_input_ids=queries, labels=labels[:, :2])
    with pytest.raises(ValueError, match="use_adam"):
        GradMemConfig(use_adam=True, grad_mode="second")
    with pytest.raises(ValueError, match="mem_proj_mode"):
        GradMemConfig(use_mem_proj=True, mem_proj_mode="per_sample")


# ----------------------------------------------------------------------------------------------------
# Checkpoints

ALL_OPTIONS = dict(n_mem_tokens=3, K=2, lr=0.2, backend="torch", **SECOND_ALL_OPTIONS)


def _base_config(family):
    cfg = tiny_model(family, dtype=torch.float32).config.to_dict()
    cfg.pop("_attn_implementation", None)
    return cfg


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # gpt2: tied input/output embeddings
def test_save_pretrained_round_trip(tmp_path, family):
    model = GradMemModel(GradMemConfig(base_config=_base_config(family), **ALL_OPTIONS)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    loaded = GradMemModel.from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ctx, mask, _, queries, labels = _batch([4, 2])
    a = model(context_input_ids=ctx, context_attention_mask=mask, query_input_ids=queries, labels=labels)
    b = loaded(context_input_ids=ctx, context_attention_mask=mask, query_input_ids=queries, labels=labels)
    assert torch.equal(a.loss, b.loss)


def test_loads_published_key_layout(tmp_path):
    """A checkpoint written here in the published layout (config.json with the published field names and
    model_type, model.safetensors with keys model.*, mem, mem_proj.*, write_st/write_end/read_st/read_end,
    write_head.weight) loads with from_pretrained and with load_state_dict(strict=True)."""
    from safetensors.torch import save_file

    lm = tiny_model("llama", dtype=torch.float32)
    d, m, c = 32, 3, 2
    tensors = {f"model.{k}": v.clone() + 0.01 for k, v in lm.state_dict().items()}
    tensors.update(
        {
            "mem": torch.randn(m, d),
            "mem_proj.weight": torch.randn(d, d),
            "mem_proj.bias": torch.randn(d),
            "write_st": torch.randn(c, d),
            "write_end": torch.randn(c, d),
            "read_st": torch.randn(c, d),
            "read_end": torch.randn(c, d),
            "write_head.weight": torch.randn(VOCAB, d),
        }
    )
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
    )
    published = {
        "model_type": "grad_memgpt",
        "architectures": ["GradMemGPT"],
        "pretrained_model": None,
        "base_config": _base_config("llama"),
        "n_mem_tokens": m,
        "K": 2,
        "lr": 0.04,
        "use_adam": False,
        "grad_mode": "second",
        "last_K_second_order": 2,
        "n_ctrl_tokens": c,
        "inner_clip_value": None,
        "inner_clip_norm": None,
        "use_mem_proj": True,
        "mem_proj_mode": "proj",
        "use_write_head": True,
        "use_write_lora": False,
        "freeze_backbone": False,
        "use_gradient_checkpointing": False,
        "attn_implementation": "eager",
        "add_inner_loss_to_outer": True,
        "inner_loss_weight": 0.5,
        "use_hopfield_memory": False,
        "hopfield_n_segments": 1,
        "memory_update": "gradient",
        "use_mem_residual": False,
        "use_reconstruction_loss": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    loaded = GradMemModel.from_pretrained(tmp_path)
    got = loaded.state_dict()
    assert loaded.config.n_ctrl_tokens == c and loaded.config.inner_loss_weight == 0.5
    for key, value in tensors.items():
        assert torch.equal(got[key], value), key
    fresh = GradMemModel(GradMemConfig(base_config=_base_config("llama"), **{**ALL_OPTIONS, "n_ctrl_tokens": c}))
    fresh.load_state_dict(tensors, strict=True)
    for key, value in tensors.items():
        assert torch.equal(fresh.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------------------
# Hugging Face Trainer


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n, S=6, Q=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ctx = torch.randint(1, VOCAB, (n, S), generator=gen)
        self.qry = torch.randint(1, VOCAB, (n, Q), generator=gen)
        self.lab = self.qry.clone()
        self.lab[:, :2] = -100

    def __len__(self):
        return len(self.ctx)

    def __getitem__(self, i):
        return {"context_input_ids": self.ctx[i], "query_input_ids": self.qry[i], "labels": self.lab[i]}


def _trainer(model, out_dir, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Samples(16))


def _trainer_model(seed=0):
    torch.manual_seed(seed)
    cfg = GradMemConfig(base_config=_base_config("llama"), **{**ALL_OPTIONS, "K": 1})
    return GradMemModel(cfg)


def test_trainer_trains_and_resumes(tmp_path):
    """Trainer runs 3 steps (checkpoint at step 2); a fresh Trainer resumed from that checkpoint ends with
    the uninterrupted run's weights."""
    full = _trainer_model()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    state = _trainer(full, tmp_path / "a", 3).train()
    assert state.global_step == 3
    assert not torch.equal(before["mem"], full.state_dict()["mem"])
    resumed = _trainer_model(seed=1)  # different initial weights: only the checkpoint can make them agree
    _trainer(resumed, tmp_path / "b", 3).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = full.state_dict(), resumed.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------------
# Data parallel: 2 gloo processes give the gradients of one process on the union of their batches


def _dp_model():
    torch.manual_seed(1)
    cfg = GradMemConfig(base_config=_base_config("llama"), **{**ALL_OPTIONS, "K": 2})
    return GradMemModel(cfg)


def _dp_worker(rank, world, port, batch, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    model = torch.nn.parallel.DistributedDataParallel(_dp_model())
    half = len(batch["labels"]) // world
    local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
    model(**local).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
    dist.barrier()
    # Exit without tearing down: destroying the gloo process group (from DDP's reducer) can deadlock in torch
    # 2.13 (the destructor joins gloo's thread while holding the GIL that thread waits for); seen here ~1 in 3.
    os._exit(0)


def test_two_process_data_parallel_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    ctx, mask, _, queries, labels = _batch([5, 5, 5, 5])
    batch = {"context_input_ids": ctx, "query_input_ids": queries, "labels": labels}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _dp_worker, args=(2, port, batch, str(tmp_path / "grads.pt")), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240  # a hung collective fails the test instead of hanging the suite
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process data-parallel workers did not finish within 240 s")
    got = torch.load(tmp_path / "grads.pt")
    model = _dp_model()
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("case", ["second-all-options", "first-adam-inner-loss"])
def test_forward_under_no_grad_equals_the_differentiable_forward(case, backend):
    """Evaluation under torch.no_grad (the Trainer's eval loop) gives the loss, inner losses and logits of the
    differentiable forward; first/second-order writes raised there before (they need the outer graph)."""
    family, options = CASES[case]
    model = GradMemModel(
        GradMemConfig(n_mem_tokens=2, K=2, lr=0.4, backend=backend, **options), model=tiny_model(family)
    )
    _randomise(model)
    ctx, mask, docs, queries, labels = _batch([5, 1, 3])
    kwargs = dict(context_input_ids=ctx, query_input_ids=queries, labels=labels, context_attention_mask=mask)
    want = model(**kwargs)
    with torch.no_grad():
        got = model(**kwargs)
    assert not got.loss.requires_grad
    assert_close(got.loss, want.loss.detach(), dtype=torch.float64, name="outer loss under no_grad")
    assert_close(got.inner_losses, want.inner_losses.detach(), dtype=torch.float64, name="inner losses under no_grad")
    assert_close(got.logits, want.logits.detach(), dtype=torch.float64, name="logits under no_grad")
