"""Many-step writing: schedules, stop rules, continuous batching (gradmem_fast.cramming)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from eager_gradmem import write_one
from gradmem_fast import MemoryReader, MemoryWriter, WriteConfig, reference
from gradmem_fast.config import Schedule, StopRule
from gradmem_fast.reader import teacher_forced
from gradmem_fast.scoring import LN2, no_memory_tail, score_rows
from helpers import (
    assert_close,
    eager_capture,
    packed_attention_without_host_reads,
    random_documents,
    seeded_initial_memory,
)
from helpers import right_padded as padded
from tiny_models import VOCAB, tiny_model

# A tiny model with large random weights and a large initial memory: its memories learn short random
# documents in tens of Adam steps, at different speeds, so stop rules fire at different steps (a test of
# continuous batching needs that).
LEARNABLE = dict(initializer_range=0.3)
LENGTHS = (3, 6, 2, 8, 5, 1, 4)


def documents(lengths=LENGTHS, seed=1):
    return random_documents(lengths, VOCAB, seed)


def cram_config(**over):
    base = dict(
        num_memory_tokens=4,
        steps=60,
        lr=0.05,
        init_std=0.5,
        optimizer="adam",
        stop=StopRule(check_every=5),
        schedule=Schedule("cosine", warmup=3, final=0.1),
    )
    base.update(over)
    return WriteConfig(**base)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, **LEARNABLE)


# ---------------------------------------------------------------------------------------------------------
# Schedules


def expected_factor(kind, warmup, final, k, total):
    """The schedule formulas, written out independently of config.Schedule."""
    if k < warmup:
        return (k + 1) / warmup
    p = min(1.0, (k - warmup) / max(1, total - warmup))
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return final + (1 - final) * (math.cos(math.pi * p) + 1) / 2
    return final + (1 - final) * (1 - p)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup,final,total", [(0, 0.0, 10), (3, 0.1, 10), (4, 0.5, 5), (0, 0.2, 1)])
def test_schedule_matches_its_formula(kind, warmup, final, total):
    config = WriteConfig(steps=total, lr=0.3, schedule=Schedule(kind, warmup=warmup, final=final))
    got = [config.lr_at(k) for k in range(total)]
    want = [0.3 * expected_factor(kind, warmup, final, k, total) for k in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    if kind != "constant" and total - warmup > 1:
        assert got[-1] > 0.3 * final  # the last step still moves the memory
        assert got[warmup] == pytest.approx(0.3)  # the decay starts at the full step size


def test_schedule_points():
    """Hand-computed points: warmup reaches lr at its last step; cosine is at the midpoint halfway."""
    cos = Schedule("cosine", warmup=2)
    assert [cos.factor(k, 12) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cos.factor(7, 12) == pytest.approx(0.5)  # p = (7 - 2) / 10
    assert Schedule("linear").factor(3, 4) == pytest.approx(0.25)
    assert Schedule().factor(99, 3) == 1.0


def test_scheduled_reference_write_equals_a_naive_loop(model64):
    """reference.write with a cosine schedule = the independent eager loop fed the per-step lrs."""
    config = WriteConfig(num_memory_tokens=2, steps=6, lr=0.05, optimizer="adam", schedule=Schedule("cosine", 2, 0.2))
    doc = documents((6,))[0]
    M0 = torch.randn(2, model64.config.hidden_size, dtype=torch.float64) * 0.1
    result = reference.write(model64, doc[None], None, M0, config)
    lrs = [0.05 * expected_factor("cosine", 2, 0.2, k, 6) for k in range(6)]
    memory, losses, _ = write_one(model64, doc, M0, 6, lrs, optimizer="adam")
    assert_close(result.memory[0], memory, torch.float64, name="memory")
    assert_close(result.losses[:, 0], torch.tensor(losses, dtype=torch.float32), torch.float32, name="losses (fp32)")


def test_engine_write_follows_the_schedule(model64):
    """The engine's fixed-step loop (torch ops) uses lr_at(k), as the reference does."""
    config = WriteConfig(num_memory_tokens=2, steps=4, lr=0.2, schedule=Schedule("linear", warmup=1))
    ids, mask = padded(documents((4, 7)))
    ref = MemoryWriter(model64, config, backend="torch").write(ids, mask)
    writer = MemoryWriter(model64, config, backend="triton", compile=False)
    writer.ops_backend = "torch"
    assert_close(writer.write(ids, mask).memory, ref.memory, torch.float64, name="memory")


# ---------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: StopRule(exact=False), "needs a criterion"),
        (lambda: StopRule(accuracy=1.5), "accuracy must be in"),
        (lambda: StopRule(check_every=0), "check_every must be >= 1"),
        (lambda: StopRule(loss=-1.0), "loss must be >= 0"),
        (lambda: Schedule("step"), "schedule kind must be one of"),
        (lambda: Schedule("cosine", final=2.0), "final must be in"),
        (lambda: Schedule(warmup=-1), "warmup must be >= 0"),
        (lambda: WriteConfig(grad_mode="first", stop=StopRule()), "needs grad_mode='none'"),
        (lambda: WriteConfig(stop="exact"), "stop must be a StopRule"),
    ],
)
def test_bad_settings_name_the_argument(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_options_that_need_a_stop_rule_are_refused(model64):
    writer = MemoryWriter(model64, WriteConfig(num_memory_tokens=2, steps=2), backend="torch")
    with pytest.raises(ValueError, match="need a StopRule"):
        list(writer.write_many(documents((3,)), slots=2))
    stopping = MemoryWriter(model64, cram_config(), backend="torch")
    with pytest.raises(ValueError, match="on_step"):
        stopping.write(*padded(documents((3,))), on_step=lambda k, loss: None)
    with pytest.raises(ValueError, match="slots must be"):
        list(stopping.write_many(documents((3,)), slots=0))


# ---------------------------------------------------------------------------------------------------------
# Scores


@torch.no_grad()
def test_scores_match_teacher_forcing_and_a_direct_computation(model64):
    """score_rows on a padded forward = reader.teacher_forced (loss, correct); prefix = first wrong token."""
    docs = documents((6, 1, 9))
    M = torch.randn(3, 3, model64.config.hidden_size, dtype=torch.float64)
    loss, correct = teacher_forced(model64, M, docs)
    ids, mask = padded(docs)
    x = torch.cat([M, model64.get_input_embeddings()(ids)], dim=1)
    hidden = model64.model(inputs_embeds=x).last_hidden_state
    b = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    j = torch.cat([torch.arange(len(d)) for d in docs])
    head = model64.get_output_embeddings()
    scores = score_rows(hidden[b, 2 + j], head.weight, head.bias, ids[b, j], b, j, 3, chunk_rows=4)
    assert_close(scores.loss, loss, torch.float64, name="loss")
    assert scores.correct.tolist() == correct.tolist()
    logits = head(hidden[b, 2 + j])
    for i, d in enumerate(docs):
        ok = (logits[b == i].argmax(-1) == d).tolist() + [False]
        assert int(scores.prefix[i]) == ok.index(False)
        ce = F.cross_entropy(logits[b == i], d, reduction="none")
        assert float(scores.tail[i]) == pytest.approx(float(ce[1:].sum()), rel=1e-10, abs=1e-12)
    assert scores.tokens.tolist() == [6, 1, 9]


def test_ignored_rows_count_nothing():
    """Rows with a negative target (filler) add no loss, no token and no error."""
    h = torch.randn(5, 4, dtype=torch.float64)
    W = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.tensor([1, -100, 2, -100, 3])
    doc = torch.tensor([0, 0, 0, 1, 1])
    pos = torch.tensor([0, 1, 1, 0, 0])
    full = score_rows(h, W, None, targets, doc, pos, 2)
    assert full.tokens.tolist() == [2, 1]
    keep = targets >= 0
    alone = score_rows(h[keep], W, None, targets[keep], doc[keep], pos[keep], 2)
    assert_close(full.loss, alone.loss, torch.float64, name="loss")


@torch.no_grad()
def test_no_memory_baseline_is_the_plain_model_loss(model64):
    docs = documents((5, 1, 8))
    head = model64.get_output_embeddings()
    tail = no_memory_tail(model64, head.weight, head.bias, docs, batch_tokens=8)
    for i, d in enumerate(docs):
        logits = model64(d[None]).logits[0]
        want = F.cross_entropy(logits[:-1], d[1:], reduction="sum") if len(d) > 1 else torch.tensor(0.0)
        assert float(tail[i]) == pytest.approx(float(want), rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Stopping and continuous batching (fp64, torch backend)


@pytest.fixture(scope="module")
def crammed(model64):
    """The same documents written three ways: one batch, continuous batching with 3 slots, and alone."""
    config = cram_config()
    writer = MemoryWriter(model64, config, backend="torch")
    docs = documents()
    batch = writer.write(*padded(docs))
    stream = list(writer.write_many(docs, slots=3, stats=True))
    alone = [writer.write(d[None]) for d in docs]
    return config, writer, docs, batch, stream, alone


def test_documents_stop_at_different_steps(crammed):
    """The premise of the other tests: the rule fires, at several different steps."""
    config, _, _, batch, _, _ = crammed
    steps = batch.stats.steps.tolist()
    assert len(set(steps)) >= 3, steps
    # Checks run in the forward of a document's steps c, 2c, ...: on the memory of c - 1, 2c - 1, ... updates.
    c = config.stop.check_every
    assert batch.stats.stopped.any() and all((s + 1) % c == 0 or s == config.steps for s in steps), steps


def test_continuous_batching_equals_writing_each_document_alone(crammed):
    _, _, docs, batch, stream, alone = crammed
    for i in range(len(docs)):
        assert stream[i].steps == int(alone[i].stats.steps[0]) == int(batch.stats.steps[i])
        assert stream[i].stopped == bool(alone[i].stats.stopped[0])
        assert_close(stream[i].memory, alone[i].memory[0], torch.float64, name=f"memory {i}")
        assert_close(batch.memory[i], alone[i].memory[0], torch.float64, name=f"batch memory {i}")
        assert stream[i].loss == pytest.approx(float(alone[i].stats.loss[0]), rel=1e-9)


def test_a_stopped_memory_is_the_one_its_steps_produced(model64, crammed):
    """A document stopped after s steps returns the memory of exactly s updates (not s + 1, not the last),
    checked against the independent eager loop with the same per-step lrs (the schedule over config.steps)."""
    config, _, docs, batch, _, _ = crammed
    checked = 0
    for i, s in enumerate(batch.stats.steps.tolist()):
        if 0 < s < config.steps:
            lrs = [config.lr_at(k) for k in range(s)]
            memory, _, _ = write_one(model64, docs[i], seeded_initial_memory(model64, config), s, lrs, optimizer="adam")
            assert_close(batch.memory[i], memory, torch.float64, name=f"memory of document {i} after {s} steps")
            checked += 1
    assert checked >= 2


def _fields(config):
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def test_stats_describe_the_returned_memory(model64, crammed):
    """Loss, accuracy, exactness and information gain recomputed from the returned memories."""
    config, _, docs, batch, _, _ = crammed
    loss, correct = teacher_forced(model64, batch.memory, docs)
    assert_close(batch.stats.loss, loss, torch.float64, name="loss")
    tokens = torch.tensor([len(d) for d in docs])
    assert batch.stats.accuracy.tolist() == pytest.approx((correct / tokens).tolist())
    assert batch.stats.exact.tolist() == (correct == tokens).tolist()
    assert batch.stats.tokens.tolist() == tokens.tolist()
    assert batch.stats.tokens_per_vector.tolist() == pytest.approx(
        (batch.stats.prefix.double() / config.num_memory_tokens).tolist()
    )
    head = model64.get_output_embeddings()
    base = no_memory_tail(model64, head.weight, head.bias, docs)
    for i, d in enumerate(docs):
        x = torch.cat([batch.memory[i : i + 1], model64.get_input_embeddings()(d[None])], dim=1)
        logits = head(model64.model(inputs_embeds=x).last_hidden_state[0, 4 - 1 : 4 - 1 + len(d)])
        with_memory = F.cross_entropy(logits[1:], d[1:], reduction="sum")
        assert float(batch.stats.info_gain_bits[i]) == pytest.approx(float(base[i] - with_memory) / LN2, abs=1e-9)
    initial = MemoryWriter(model64, _one_step(config), backend="torch").write(*padded(docs)).losses[0]
    assert_close(batch.stats.initial_loss.float(), initial, torch.float32, name="initial_loss (fp32 step losses)")


def _one_step(config):
    return WriteConfig(**{**_fields(config), "steps": 1, "stop": None})


def test_exact_means_greedy_decoding_reproduces_the_document(model64, crammed):
    """The exact flag is checked with teacher forcing; greedy decoding by the reader must agree."""
    _, _, docs, batch, _, _ = crammed
    reader = MemoryReader(model64)
    prefix = reader.prefix(batch.memory)
    generated = reader.generate(prefix, list(range(len(docs))), [[] for _ in docs], max_new_tokens=max(LENGTHS))
    for i, d in enumerate(docs):
        assert bool(batch.stats.exact[i]) == (generated[i][: len(d)] == d.tolist())
    assert batch.stats.exact.any() and not batch.stats.exact.all()


def test_step_log_has_nan_after_a_document_stops(crammed):
    config, _, _, batch, _, alone = crammed
    steps = batch.stats.steps
    for i, s in enumerate(steps.tolist()):
        assert not batch.losses[:s, i].isnan().any()
        assert batch.losses[s:, i].isnan().all()
        assert_close(batch.losses[:s, i], alone[i].losses[:s, 0], torch.float32, name="losses")


def test_a_token_budget_limits_what_is_in_flight(model64, crammed):
    """batch_tokens instead of slots: same memories (each document is independent of its neighbours)."""
    _, writer, docs, batch, _, _ = crammed
    stream = list(writer.write_many(docs, batch_tokens=24, stats=True))
    for i in range(len(docs)):
        assert stream[i].steps == int(batch.stats.steps[i])
        assert_close(stream[i].memory, batch.memory[i], torch.float64, name=f"memory {i}")


def test_loss_and_accuracy_rules(model64):
    """A loss threshold that the initial memory already meets stops every document at 0 steps with its
    initial memory; an accuracy level stops a document as soon as a check sees it."""
    docs = documents((4, 6))
    lax = MemoryWriter(model64, cram_config(stop=StopRule(loss=1e3, exact=False, check_every=1)), backend="torch")
    result = lax.write(*padded(docs))
    assert result.stats.steps.tolist() == [0, 0] and result.stats.stopped.all()
    assert_close(result.memory[0], seeded_initial_memory(model64, lax.config), torch.float64, name="memory")
    level = MemoryWriter(model64, cram_config(stop=StopRule(accuracy=0.5, exact=False, check_every=1)), backend="torch")
    result = level.write(*padded(docs))
    assert (result.stats.accuracy >= 0.5).all()
    for i, s in enumerate(result.stats.steps.tolist()):
        assert s == 0 or float(level_accuracy_before(model64, level, docs[i], s)) < 0.5


def level_accuracy_before(model, writer, doc, steps):
    """Teacher-forced accuracy after steps - 1 updates (the previous check, with check_every=1)."""
    config = WriteConfig(**{**_fields(writer.config), "stop": None, "steps": steps - 1}) if steps > 1 else None
    M = seeded_initial_memory(model, writer.config)[None] if config is None else None
    if config is not None:
        lrs = [writer.config.lr_at(k) for k in range(steps - 1)]
        M = write_one(model, doc, seeded_initial_memory(model, writer.config), steps - 1, lrs, optimizer="adam")[0][
            None
        ]
    _, correct = teacher_forced(model, M, [doc])
    return correct[0] / len(doc)


def test_a_check_reuses_the_steps_forward(model64, monkeypatch):
    """One backbone forward per step, checks included: a check scores the logits its step computed anyway
    (a separate scoring forward per check would add one per check)."""
    from gradmem_fast import cramming, hf

    writer = MemoryWriter(model64, cram_config(steps=12, stop=StopRule(check_every=4)), backend="torch")
    monkeypatch.setattr(
        cramming, "no_memory_tail", lambda model, w, b, docs, **kw: torch.zeros(len(docs), dtype=torch.float64)
    )
    calls = {"forward": 0, "ticks": 0}
    forward, run = hf.backbone_hidden, cramming._Batch.run

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counting_run(self, steps, *args, **kwargs):
        calls["ticks"] += steps
        return run(self, steps, *args, **kwargs)

    monkeypatch.setattr(hf, "backbone_hidden", counting_forward)
    monkeypatch.setattr(cramming._Batch, "run", counting_run)
    list(writer.write_many(documents((3, 5, 2)), slots=2, stats=True))
    assert calls["ticks"] >= 8 and calls["forward"] == calls["ticks"]


def test_documents_out_of_steps_are_reported_as_not_stopped(model64):
    """With a rule that never holds, every document takes exactly `steps` steps and equals a plain write."""
    config = cram_config(steps=7, stop=StopRule(loss=0.0, exact=False, check_every=3), schedule=None)
    docs = documents((5, 3))
    result = MemoryWriter(model64, config, backend="torch").write(*padded(docs))
    assert result.stats.steps.tolist() == [7, 7] and not result.stats.stopped.any()
    plain = MemoryWriter(model64, WriteConfig(**{**_fields(config), "stop": None}), backend="torch")
    assert_close(result.memory, plain.write(*padded(docs)).memory, torch.float64, name="memory")


# ---------------------------------------------------------------------------------------------------------
# The engine (fp32): packed documents, bucket-padded batches rebuilt at every refill


# The Triton case runs the kernels in the interpreter (~45 s): make test-compile runs it, make test does not
# (its 20-minute budget); the kernels have their own tests and the engine's slot logic runs with the torch ops.
_SLOW = pytest.mark.skipif(
    not os.environ.get("GRADMEM_TEST_SLOW_INTEGRATION"), reason="slow: make test-compile runs it"
)


@pytest.mark.parametrize("ops", ["torch", pytest.param("triton", marks=_SLOW)])
def test_engine_continuous_batching_equals_alone_and_the_reference(ops):
    """Continuous batching on the engine = each document alone on the engine = the torch reference (fp32).
    ``ops="triton"`` runs the kernels in the interpreter (slow: two short documents); ``"torch"`` runs the
    engine's packing and slot logic on the torch ops, with bucket padding (filler rows) on."""
    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE)
    lengths, slots = ((3, 1, 5, 2, 6), 2) if ops == "torch" else ((3, 1), 1)
    config = cram_config(steps=40 if ops == "torch" else 10)
    docs = documents(lengths)
    writer = MemoryWriter(model, config, backend="triton", compile=False)
    writer.ops_backend = ops
    if ops == "torch":
        writer._padded = lambda: True  # filler documents, as a compiled step gets (without compiling on CPU)
    stream = list(writer.write_many(docs, slots=slots, stats=True))
    alone = [writer.write(d[None]) for d in docs]
    ref = MemoryWriter(model, config, backend="torch").write(*padded(docs))
    if ops == "torch":
        assert len({d.steps for d in stream}) >= 3
    for i in range(len(docs)):
        assert stream[i].steps == int(alone[i].stats.steps[0]) == int(ref.stats.steps[i])
        assert stream[i].exact == bool(ref.stats.exact[i])
        assert_close(stream[i].memory, alone[i].memory[0], torch.float32, name=f"memory {i}")
        assert_close(stream[i].memory, ref.memory[i], torch.float32, name=f"memory {i} vs reference")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-synchronisation check needs a GPU")
def test_cramming_has_no_host_sync_between_checks(monkeypatch):
    """On CUDA the steps, the check's scoring and its stop decision run with synchronisation forbidden
    (torch.cuda sync debug mode "error"); the check's single small read is the only host read."""
    from gradmem_fast import cramming

    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE).cuda()
    writer = MemoryWriter(model, cram_config(steps=20), backend="triton", compile=False)
    docs = documents((3, 1, 5, 2))
    warm = list(writer.write_many(docs, slots=2, stats=True))  # Triton compiles and autotunes outside the check
    guarded = []

    def strict(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                guarded.append(fn.__name__)

        return wrapped

    monkeypatch.setattr(cramming._Batch, "run", strict(cramming._Batch.run))  # the steps and the check's scoring
    again = list(writer.write_many(docs, slots=2, stats=True))
    assert "run" in guarded
    assert [d.steps for d in again] == [d.steps for d in warm]


def test_engine_continuous_batching_with_the_compiled_step():
    """The slot loop on the compiled backbone (aot_eager here: dynamo + AOTAutograd graphs without inductor's
    C++ build; the engine compiles with inductor on CUDA): same steps and memories as the eager engine, and
    one compile per bucket shape however often the batch is rebuilt."""
    from gradmem_fast import engine

    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE)
    config = cram_config(steps=20)
    docs = documents((3, 1, 5, 2))
    eager = MemoryWriter(model, config, backend="triton", compile=False)
    eager.ops_backend = "torch"
    eager._padded = lambda: True  # the same bucket-padded batches as the compiled writer
    compiled = MemoryWriter(model, config, backend="triton", compile=False)
    compiled.ops_backend = "torch"
    compiled.compile = True
    compiled.backbone = engine.CompiledBackbone(model, backend="aot_eager")
    want = list(eager.write_many(docs, slots=2, stats=True))
    got = list(compiled.write_many(docs, slots=2, stats=True))
    assert compiled.backbone.compiles >= 1
    shapes = compiled.backbone.compiles
    again = list(compiled.write_many(docs, slots=2, stats=True))
    assert compiled.backbone.compiles == shapes  # the second stream reuses every compiled bucket
    for i in range(len(docs)):
        assert got[i].steps == want[i].steps == again[i].steps
        assert_close(got[i].memory, want[i].memory, torch.float32, name=f"memory {i}")


# ---------------------------------------------------------------------------------------------------------
# The slot loop replayed as CUDA graphs (cramming.GraphedSlots)


def _graphed_writer(model, config, counter):
    from gradmem_fast import cramming

    writer = MemoryWriter(model, config, backend="triton", compile=False)
    writer.ops_backend = "torch"
    writer._padded = lambda: True  # bucket-padded batches, as with cuda_graphs
    slots = cramming.GraphedSlots(capture=eager_capture(counter, lambda out: out.tensors()))
    writer._slot_graphs = lambda: slots
    return writer


def test_graphed_slot_loop_equals_the_eager_one(monkeypatch):
    """The slot loop through GraphedSlots (captured once per shape, later batches copied into the static
    buffers, continuing batches fed the previous replay's outputs) = the eager slot loop: steps, memories,
    scores and the per-step record; every replay runs the captured call's ops (``helpers.eager_capture``). The
    stand-in capture runs on the CPU; the CUDA capture is tested in the GPU suite
    (test_graphed_slot_loop_on_cuda_graph)."""
    packed_attention_without_host_reads(monkeypatch)  # for the eager run too: the same attention math
    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE)
    config = cram_config(steps=30)
    docs = documents((3, 1, 5, 2, 6, 4))
    eager = MemoryWriter(model, config, backend="triton", compile=False)
    eager.ops_backend = "torch"
    eager._padded = lambda: True
    counter = {"captures": 0, "replays": 0}
    graphed = _graphed_writer(model, config, counter)
    want = list(eager.write_many(docs, slots=2, stats=True))
    got = list(graphed.write_many(docs, slots=2, stats=True))
    assert len({d.steps for d in want}) >= 3
    # Several batches share a shape: the reuse path (a new batch loaded into a captured graph) ran.
    assert 1 <= counter["captures"] < counter["replays"] and counter["replays"] >= len(docs)
    for i in range(len(docs)):
        assert (got[i].steps, got[i].stopped, got[i].exact, got[i].prefix) == (
            want[i].steps,
            want[i].stopped,
            want[i].exact,
            want[i].prefix,
        )
        assert_close(got[i].memory, want[i].memory, torch.float32, name=f"memory {i}")
        assert got[i].loss == pytest.approx(want[i].loss, rel=1e-6)
        assert got[i].initial_loss == pytest.approx(want[i].initial_loss, rel=1e-6)
    # writer.write: every document in flight, the per-step record (WriteResult.losses) through the graph.
    batch_want = eager.write(*padded(docs))
    batch_got = _graphed_writer(model, config, counter).write(*padded(docs))
    assert torch.equal(batch_got.stats.steps, batch_want.stats.steps)
    taken = ~batch_want.losses.isnan()  # NaN after a document stopped
    assert torch.equal(~batch_got.losses.isnan(), taken) and taken.any()
    assert_close(batch_got.losses[taken], batch_want.losses[taken], torch.float32, name="losses")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_slot_loop_on_cuda_graph_has_no_host_sync():
    """On CUDA with cuda_graphs=True: the same documents, steps and memories as the eager engine, and a
    replay (copies in, graph, outputs) runs with synchronisation forbidden."""
    from gradmem_fast import cramming

    model = tiny_model("llama", dtype=torch.float32, **LEARNABLE).cuda()
    config = cram_config(steps=20)
    docs = documents((3, 1, 5, 2))
    eager = MemoryWriter(model, config, backend="triton", compile=False)
    graphed = MemoryWriter(model, config, backend="triton", compile=False, cuda_graphs=True)
    assert graphed._slot_graphs() is not None
    eager._padded = lambda: True  # the same buckets as the graphed writer
    eager._pack = graphed._pack
    want = list(eager.write_many(docs, slots=2, stats=True))
    got = list(graphed.write_many(docs, slots=2, stats=True))  # captures every shape
    run = cramming.GraphedSlots.run

    def strict(self, *args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    cramming.GraphedSlots.run = strict
    try:
        again = list(graphed.write_many(docs, slots=2, stats=True))
    finally:
        cramming.GraphedSlots.run = run
    for i in range(len(docs)):
        assert got[i].steps == want[i].steps == again[i].steps
        assert_close(got[i].memory, want[i].memory, torch.float32, name=f"memory {i}")
        assert_close(again[i].memory, want[i].memory, torch.float32, name=f"memory {i} (replayed)")
