"""Progressive capacity search modes (gradmem_fast.capacity): linear or factor growth, bisect or linear
back-off, resume.

The search order is checked against a fake writer with known per-text capacities (a stage of target t is
exact iff t <= capacity; a failed stage decodes a known prefix) and an independent oracle: a plain sequential
loop per text, written from the module docstring, against the batched search that mixes texts in different
phases in one write. Hand-computed sequences pin the oracle itself. One real run per mode on the tiny fp64
model replays every stage by hand from the memory it must warm-start from.
"""

import json
import math
import random
import types

import pytest
import torch
from test_cli_write import _jsonl

from gradmem_fast import MemoryWriter, WriteConfig, capacity, cli
from gradmem_fast.capacity import Stage, next_target, progressive_capacity
from gradmem_fast.config import StopRule
from gradmem_fast.reader import teacher_forced
from helpers import assert_close
from tiny_local import save_tiny, sentence
from tiny_models import VOCAB, tiny_model


def failed_prefix(cap: int, t: int) -> int:
    """What a failed stage of target t decodes in the fake: at most the capacity, varying with t (sometimes
    above the last exact target, sometimes below)."""
    return max(0, cap - (t * 7) % 5)


class FakeWriter:
    """A writer whose texts have known capacities. Text i's tokens start with i (how a write row is told
    apart); its memory after a stage is [[i, target, serial]], so a later stage shows where it started."""

    def __init__(self, caps):
        self.caps = caps
        self.config = WriteConfig(num_memory_tokens=1, steps=7, stop=StopRule(exact=True))
        self.model = torch.nn.Module()
        self.model.get_input_embeddings = lambda: torch.nn.Embedding(1, 3)
        self.calls = []  # (text, target, tag of the starting memory or None)
        self.serial = 0

    _as_document = staticmethod(MemoryWriter._as_document)

    def write(self, ids, mask, memory=None):
        exact, prefix, steps, out = [], [], [], []
        for row in range(ids.shape[0]):
            text, t = int(ids[row, 0]), int(mask[row].sum())
            start = None if memory is None else tuple(int(v) for v in memory[row, 0])
            start = None if start == INIT else start  # the config's initial memory, in a mixed stage
            self.calls.append((text, t, start))
            ok = t <= self.caps[text]
            exact.append(ok)
            prefix.append(t if ok else failed_prefix(self.caps[text], t))
            steps.append(t)
            self.serial += 1
            out.append(torch.tensor([[text, t, self.serial]], dtype=torch.float64))
        stats = types.SimpleNamespace(exact=torch.tensor(exact), prefix=torch.tensor(prefix), steps=torch.tensor(steps))
        return types.SimpleNamespace(memory=torch.stack(out), stats=stats)


def oracle(n, cap, first, grow=1.5, growth="factor", step=1, backoff="none", lo=0):
    """The search of one text as a plain loop: [(kind, target)], its capacity, each probe's start (the
    target of the stage whose memory it starts from; None: the initial memory) and the stage whose memory
    decodes the capacity."""
    probes, starts = [], []
    start = None if lo == 0 else "resume"
    hi = None

    def grown(t):
        return t + step if growth == "linear" else max(t + 1, math.ceil(t * grow))

    def probe(kind, t):
        probes.append((kind, t))
        starts.append(start)
        return t <= cap

    t = min(first, n) if lo == 0 else min(grown(lo), n)
    if lo == n:
        return probes, lo, starts, start
    while True:  # the growth ramp
        if probe("grow", t):
            lo, start = t, t
            if t == n:
                return probes, lo, starts, start
            t = min(grown(t), n)
        else:
            hi = t
            if failed_prefix(cap, t) > lo:
                lo, start = failed_prefix(cap, t), t
            break
    if backoff == "bisect":
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe("bisect", mid):
                lo, start = mid, mid
            else:
                hi = mid
                if failed_prefix(cap, mid) > lo:
                    lo, start = failed_prefix(cap, mid), mid
    elif backoff == "linear":
        while lo + 1 < hi:
            if not probe("linear", lo + 1):
                break
            lo, start = lo + 1, lo + 1
    return probes, lo, starts, start


INIT = (-1, -1, -1)  # the fake's initial memory


def run_fake(monkeypatch, lengths, caps, **options):
    from gradmem_fast import inputs

    monkeypatch.setattr(capacity, "_verify", lambda writer, docs, cap, best: [0.0] * len(docs))
    monkeypatch.setattr(inputs, "initial_memory", lambda *a: torch.tensor([[INIT]], dtype=torch.float64))
    writer = FakeWriter(caps)
    docs = [torch.tensor([i] + [0] * (n - 1)) for i, n in enumerate(lengths)]
    return writer, progressive_capacity(writer, docs, **options)


@pytest.mark.parametrize(
    "options,expected,cap",
    [
        # cap 37 of 100 tokens; x2 growth from 4; failed prefix of 64 is 37 - 64*7 % 5 = 34 (lifts lo to 34)
        (dict(grow=2.0), [4, 8, 16, 32, 64], 34),
        (dict(grow=2.0, backoff="bisect"), [4, 8, 16, 32, 64, 49, 41, 38, 37], 37),
        (dict(grow=2.0, backoff="linear"), [4, 8, 16, 32, 64, 35, 36, 37, 38], 37),
        # +10 growth: 44 fails with prefix 37 - 308 % 5 = 34 (= lo); bisect (34, 44)
        (dict(growth="linear", step=10), [4, 14, 24, 34, 44], 34),
        (dict(growth="linear", step=10, backoff="bisect"), [4, 14, 24, 34, 44, 39, 36, 37, 38], 37),
    ],
)
def test_hand_computed_sequences(monkeypatch, options, expected, cap):
    """Target sequences worked out by hand (and the oracle agrees with them)."""
    writer, (r,) = run_fake(monkeypatch, [100], [37], first=4, **options)
    assert [s.target for s in r.stages] == expected and r.capacity == cap
    probes, lo, _, _ = oracle(100, 37, 4, **options)
    assert [t for _, t in probes] == expected and lo == cap
    assert [s.kind for s in r.stages] == [k for k, _ in probes]
    assert all(s.kind == "grow" for s in r.stages[:5]) and r.steps == sum(expected)


@pytest.mark.parametrize("seed", range(6))
def test_batched_search_equals_the_sequential_oracle(monkeypatch, seed):
    """Many texts searched together (in different phases in one write) follow the oracle's order exactly,
    each probe starting from the memory of the stage that proved its lower bound."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(9)]
    caps = [rng.randint(0, n + 3) for n in lengths]  # some texts fit whole
    options = dict(
        first=rng.randint(1, 9),
        grow=rng.choice([1.3, 1.5, 2.0, 3.0]),
        growth=rng.choice(["factor", "linear"]),
        step=rng.randint(1, 12),
        backoff=rng.choice(["none", "bisect", "linear"]),
    )
    writer, results = run_fake(monkeypatch, lengths, caps, **options)
    for i, (n, cap, r) in enumerate(zip(lengths, caps, results)):
        probes, lo, starts, proof = oracle(n, cap, **options)
        assert [(s.kind, s.target) for s in r.stages] == probes, (i, options)
        assert r.capacity == lo and r.complete == (lo == n)
        calls = [(t, start) for text, t, start in writer.calls if text == i]
        assert [t for t, _ in calls] == [t for _, t in probes]
        assert [None if s is None else s[1] for _, s in calls] == starts
        # the reported memory is the one of the stage that proved the capacity (a failed stage's prefix too)
        if proof is not None:
            assert int(r.memory[0, 1]) == proof


def test_resume_starts_after_the_given_prefix(monkeypatch):
    """``resume=(lo, memory)`` starts at the growth target after lo, warm from that memory; a text resumed
    at its end writes nothing."""
    mem = torch.tensor([[0.0, 16.0, 0.0]], dtype=torch.float64)
    writer, results = run_fake(
        monkeypatch, [100, 30], [37, 40], first=4, grow=2.0, backoff="bisect", resume=[(16, mem), (30, mem)]
    )
    assert [s.target for s in results[0].stages] == [32, 64, 49, 41, 38, 37]
    assert writer.calls[0] == (0, 32, (0, 16, 0))
    assert results[1].stages == [] and results[1].complete and results[1].capacity == 30
    probes, lo, _, _ = oracle(100, 37, 4, grow=2.0, backoff="bisect", lo=16)
    assert [t for _, t in probes] == [32, 64, 49, 41, 38, 37] and lo == results[0].capacity == 37


def test_search_options_are_checked(monkeypatch):
    for bad, needle in [
        (dict(growth="double"), "growth must be"),
        (dict(backoff="halve"), "backoff must be"),
        (dict(step=0), "step must be"),
        (dict(moments="forget"), "moments must be"),
        (dict(resume=[(200, torch.zeros(1, 3))]), "resume: document 0"),
        (dict(resume=[]), "one entry per document"),
    ]:
        with pytest.raises(ValueError, match=needle):
            run_fake(monkeypatch, [100], [37], **bad)


def test_linear_growth_target():
    assert [next_target(t, growth="linear", step=5) for t in (1, 7)] == [6, 12]
    assert next_target(16, 2.0) == 32 and next_target(16) == 24


# ---------------------------------------------------------------------------------------------------------
# Real writes: the tiny fp64 model of test_capacity, one text, every mode


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, initializer_range=0.3)


@pytest.mark.parametrize(
    "options",
    [
        dict(growth="linear", step=6),
        dict(grow=2.0, backoff="bisect"),
        dict(grow=2.0, backoff="linear"),
        dict(growth="linear", step=7, backoff="bisect"),
    ],
)
def test_real_search_replays_by_hand(model64, options):
    """Every stage equals a write by hand from the memory of the stage that proved the lower bound; the
    capacity decodes exactly and, with a back-off, the target one longer failed."""
    doc = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3))
    config = WriteConfig(
        num_memory_tokens=4, steps=100, lr=0.05, init_std=0.5, optimizer="adam", stop=StopRule(check_every=5)
    )
    w = MemoryWriter(model64, config, backend="torch")
    (r,) = progressive_capacity(w, [doc], first=4, **options)
    assert len(r.stages) >= 3 and not r.complete
    anchor, lo = None, 0
    for stage in r.stages:
        result = w.write(doc[None, : stage.target], memory=anchor)
        got = Stage(stage.target, int(result.stats.steps[0]), bool(result.stats.exact[0]), int(result.stats.prefix[0]))
        assert got == dataclasses_replace_kind(stage), options
        if got.exact or got.prefix > lo:
            anchor, lo = result.memory, got.target if got.exact else got.prefix
    assert r.capacity == lo
    _, correct = teacher_forced(model64, r.memory[None], [doc[: r.capacity]])
    assert int(correct[0]) == r.capacity
    torch.testing.assert_close(r.memory, anchor[0], rtol=0, atol=0)
    if options.get("backoff", "none") != "none":
        assert any(s.target == r.capacity + 1 and not s.exact for s in r.stages)
        assert {s.kind for s in r.stages} >= {"grow", options["backoff"]}


def dataclasses_replace_kind(stage):
    return Stage(stage.target, stage.steps, stage.exact, stage.prefix)


# ---------------------------------------------------------------------------------------------------------
# Command line: the modes, every stage in the report with its kind, resume from a dataset output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), initializer_range=0.3)


def _cli(model_dir, inp, *extra):
    base = ["capacity", "--model", model_dir, "--memory-tokens", "2", "--input", inp, "--quiet", "--device", "cpu"]
    return cli.main([*base, "--max-steps", "30", "--lr", "0.05", "--init-std", "0.5", "--first", "2", *extra])


def test_cli_backoff_and_resume(model_dir, tmp_path):
    inp = _jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": sentence(14)}, {"id": "b", "text": sentence(9, 2)}])
    first = str(tmp_path / "first")
    extra = ["--growth", "linear", "--step", "3", "--backoff", "bisect"]
    assert _cli(model_dir, inp, *extra, "--output", first, "--output-format", "dataset") == 0
    with open(tmp_path / "first" / "gradmem_fast.json") as fh:
        report = json.loads(json.load(fh)["report"])
    assert report["settings"]["backoff"] == "bisect" and report["settings"]["growth"] == "linear"
    for t in report["texts"]:
        kinds = [s["kind"] for s in t["stages"]]
        assert kinds[0] == "grow" and set(kinds) <= {"grow", "bisect"}
        grow = [s["target"] for s in t["stages"] if s["kind"] == "grow"]
        assert all(b - a == 3 for a, b in zip(grow, grow[1:-1]))  # +3 per stage (the last may be cut)
        if not t["complete"]:
            assert any(s["target"] == t["capacity"] + 1 and not s["exact"] for s in t["stages"])
    assert any(s["kind"] == "bisect" for t in report["texts"] for s in t["stages"])
    # Resume from stage 1: each text starts at the growth target after what its stage 0 or 1 proved.
    out = str(tmp_path / "second.json")
    assert _cli(model_dir, inp, *extra, "--resume-from", first, "--resume-stage", "1", "--output", out) == 0
    second = json.load(open(out))
    for old, new in zip(report["texts"], second["texts"]):
        proven = max((s["target"] if s["exact"] else s["prefix"]) for s in old["stages"][:2])
        if proven == old["tokens"]:
            assert new["stages"] == [] and new["complete"]
        else:
            assert new["stages"][0]["target"] == (min(proven + 3, new["tokens"]) if proven else 2)
        assert new["capacity"] >= proven


# ---------------------------------------------------------------------------------------------------------
# moments="keep": an eager fp64 loop with the Adam formulas written out, state carried across stages


def _eager_stage(model, doc, M, state, budget, lr, betas=(0.9, 0.999)):
    """One stage with an exact stop checked every step: (memory, state, steps, exact, prefix). Each step first
    checks the memory it starts from (greedy = argmax of the teacher-forced logits); an exact memory stops
    without an update; otherwise an Adam step continuing ``state`` = (m, v, t)."""
    m1, v1, t = state
    n = len(doc)
    emb = model.get_input_embeddings()
    for k in range(budget + 1):
        M = M.detach().requires_grad_(True)
        logits = model(inputs_embeds=torch.cat([M, emb(doc)])[None]).logits[0, M.shape[0] - 1 : M.shape[0] - 1 + n]
        hits = (logits.argmax(-1) == doc).long()
        prefix = int(hits.cumprod(0).sum())
        if prefix == n or k == budget:
            return M.detach(), (m1, v1, t), k, prefix == n, prefix
        loss = torch.nn.functional.cross_entropy(logits, doc)
        (g,) = torch.autograd.grad(loss, M)
        g = g.clamp(-10.0, 10.0)
        t += 1
        m1 = betas[0] * m1 + (1 - betas[0]) * g
        v1 = betas[1] * v1 + (1 - betas[1]) * g * g
        mh, vh = m1 / (1 - betas[0] ** t), (v1 / (1 - betas[1] ** t)).clamp(min=1e-8)
        M = M.detach() - lr * mh / (vh.sqrt() + 1e-8)


def _eager_search(model, doc, M0, first, budget, lr, keep):
    """x2 growth then linear back-off, each probe from the memory (and, with ``keep``, the Adam state) of the
    stage proving the longest prefix: [(target, steps, exact, prefix)], the capacity, its memory."""
    zero = (torch.zeros_like(M0), torch.zeros_like(M0), 0)
    anchor, lo, hi, t, phase, stages = (M0, zero), 0, None, first, "grow", []
    while True:
        M, state, steps, exact, prefix = _eager_stage(model, doc[:t], *anchor, budget, lr)
        stages.append((t, steps, exact, prefix))
        if not keep:
            state = zero
        if exact:
            lo, anchor = t, (M, state)
            if t == len(doc):
                return stages, lo, anchor[0]
            t = min(2 * t, len(doc)) if phase == "grow" else t + 1
            if phase == "linear" and t >= hi:
                return stages, lo, anchor[0]
            continue
        hi = t
        if prefix > lo:
            lo, anchor = prefix, (M, state)
        if phase == "linear" or hi - lo <= 1:
            return stages, lo, anchor[0]
        phase, t = "linear", lo + 1


def test_kept_moments_equal_the_eager_loop(model64):
    """moments="keep" equals the eager loop with Adam's moments and step count carried from the memory each
    stage starts from (back-off included); "reset" equals it with fresh moments, and the two differ."""
    from gradmem_fast.inputs import initial_memory

    doc = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3))
    config = WriteConfig(
        num_memory_tokens=4, steps=60, lr=0.05, init_std=0.5, optimizer="adam", stop=StopRule(check_every=1)
    )
    w = MemoryWriter(model64, config, backend="torch")
    M0 = initial_memory(None, 1, config, model64, "cpu")[0].clone()
    got = {}
    for policy in ("keep", "reset"):
        (r,) = progressive_capacity(w, [doc], first=4, grow=2.0, backoff="linear", moments=policy)
        stages, lo, memory = _eager_search(model64, doc, M0, 4, 60, 0.05, keep=policy == "keep")
        assert [(s.target, s.steps, s.exact, s.prefix) for s in r.stages] == stages, policy
        assert r.capacity == lo and len(stages) >= 4 and any(s.kind == "linear" for s in r.stages)
        if policy == "keep":
            assert_close(r.memory, memory, name="kept-moments memory")  # fp64 bound, over ~250 Adam steps
        # (reset: the stages above are exact; its memory after ~250 steps differs by ~3e-10, the fp64 rounding
        # of the two loops amplified by Adam's restarts; test_capacity replays it write by write exactly)
        got[policy] = [(s.target, s.steps) for s in r.stages]
    assert got["keep"] != got["reset"]


def test_kept_moments_refused_where_they_cannot_continue(model64):
    config = WriteConfig(num_memory_tokens=2, steps=3, lr=0.1, optimizer="sgd", stop=StopRule(check_every=1))
    with pytest.raises(ValueError, match="moments='keep'"):
        progressive_capacity(MemoryWriter(model64, config, backend="torch"), [torch.arange(5)], moments="keep")


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--moments", "keep", "--memory-rank", "2"], "--moments keep needs full-rank memories"),
        (["--step", "0"], "--step must be >= 1"),
        (["--resume-stage", "1"], "--resume-stage needs --resume-from"),
        (["--resume-from", "{dir}"], "is not a dataset folder"),
        (["--log-format", "jsonl"], "--log-format jsonl needs --logdir"),
    ],
)
def test_cli_refuses_bad_search_options(tmp_path, capsys, extra, needle):
    """Refused with the flag named, before any model loads (the model path does not exist)."""
    inp = _jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    extra = [e.replace("{dir}", str(tmp_path)) for e in extra]
    argv = ["capacity", "--model", str(tmp_path / "none"), "--memory-tokens", "2", "--input", inp, *extra]
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err
