"""Benchmarks (issue 9): the FLOP formula, the CPU-runnable benchmark paths, the dry run end to end.

Nothing here asserts a speed: pytest-benchmark times the torch/interpreter paths at tiny sizes so the
benchmark code is exercised in CI; the dry run writes the same files the GPU suite writes, and those
are checked for form.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import DEVICE, rel_error, tolerance
from tiny_models import FAMILIES, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import (  # noqa: E402
    common,  # noqa: E402
    report,
    run,
)
from benchmarks.bench_write import PlainLoop  # noqa: E402
from benchmarks.common import LEADING_COLUMNS  # noqa: E402
from gradmem_fast import WriteConfig, flops, reference  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny sizes gain nothing from threads; on a shared 2-core box they only spin against other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SECTIONS = ("peak", "attention", "cross_entropy", "update", "write", "second_order")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ FLOP formula


def _hand_count_gpt2(d, layers, heads, inner, vocab, m, lengths):
    """Every matrix product of a GPT-2 WRITE step, listed one by one (2 FLOPs per multiply-add)."""
    dh = d // heads
    total = 0
    for n in lengths:
        t = m + n
        pairs = t * (t + 1) // 2  # causal: query i sees keys 0..i
        per_layer_fwd = (
            2 * t * d * (3 * d)  # c_attn: x [t, d] @ [d, 3d]
            + heads * 2 * dh * pairs  # q k^T over visible pairs
            + heads * 2 * dh * pairs  # p v
            + 2 * t * d * d  # c_proj
            + 2 * t * d * inner  # mlp c_fc
            + 2 * t * inner * d  # mlp c_proj
        )
        per_layer_bwd = (
            2 * t * d * (3 * d)
            + 2 * t * d * d
            + 2 * t * d * inner
            + 2 * t * inner * d  # dX = dY W^T
            + 4 * heads * 2 * dh * pairs  # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
        )
        head = 2 * n * d * vocab  # logits of the n loss positions
        head_bwd = 2 * n * d * vocab  # d hidden = d logits @ W
        total += layers * (per_layer_fwd + per_layer_bwd) + head + head_bwd
    return total


def test_write_step_flops_hand_count_gpt2():
    model = tiny_model("gpt2", dtype=torch.float32)  # d=32, 2 layers, 4 heads, n_inner 4d, V=61
    lengths, m = [5, 1, 12], 3
    expected = _hand_count_gpt2(32, 2, 4, 128, 61, m, lengths)
    assert flops.write_step_flops(model, lengths, m) == expected
    assert flops.write_step_flops(model.config, torch.tensor(lengths), m) == expected
    assert flops.write_flops(model, lengths, m, steps=5) == 5 * expected


def test_write_step_flops_hand_count_llama_gqa():
    # d=32, 2 layers, 4 query heads and 2 kv heads of dim 8, gated MLP of 64, V=61; m=2, one document of 3.
    shape = flops.model_shape(tiny_model("llama", dtype=torch.float32))
    assert shape == flops.ModelShape(32, 2, 4, 2, 8, 64, 61, True)
    t, pairs, layers = 5, 15, 2
    linear = layers * (2 * t * 32 * 32 + 2 * t * 32 * (2 * 16) + 2 * t * 32 * 32 + 3 * 2 * t * 32 * 64)  # q, kv, o, mlp
    attention = layers * 4 * (2 * 2 * 8 * pairs)  # forward: 4 heads x (QK^T, PV) x 2 Dh per visible pair
    head = 2 * 3 * 32 * 61  # logits of 3 loss positions
    expected = 2 * linear + 3 * attention + 2 * head  # input backward: linears 1x, attention 2x, head 1x
    assert flops.write_step_flops(shape, [3], 2) == expected
    parts = flops.write_step_breakdown(shape, [3], 2)
    assert parts["total"] == parts["linear"] + parts["attention"] + parts["head"] == expected


def test_model_shape_from_config_only():
    cfg = tiny_model("qwen2", dtype=torch.float32).config
    assert flops.model_shape(cfg).gated_mlp  # model_type qwen2
    assert not flops.model_shape(tiny_model("gpt_neox", dtype=torch.float32).config).gated_mlp
    with pytest.raises(ValueError):
        flops.write_step_flops(cfg, [-1], 2)
    with pytest.raises(ValueError):
        flops.write_step_breakdown(cfg, [3], 2, attention_pairs="half")


@pytest.mark.parametrize("family", FAMILIES)
def test_write_step_flops_matches_flop_counter(family):
    """The formula with full S x S pairs equals torch's FLOP counter on the eager reference step."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(family, dtype=torch.float32)
    m, batch, n = 3, 2, 6
    ids = torch.randint(0, 61, (batch, n))
    with FlopCounterMode(display=False) as counter:
        reference.write(model, ids, None, None, WriteConfig(num_memory_tokens=m, steps=1))
    counts = counter.get_flop_counts()
    # Rotary tables (inv_freq x positions, no gradient) are not model FLOPs.
    rotary = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith("rotary_emb"))
    measured = sum(counts["Global"].values()) - rotary
    assert measured == flops.write_step_flops(model, [n] * batch, m, attention_pairs="full")


# ------------------------------------------------------------------------------------------ pytest-benchmark


def _pedantic(benchmark, fn):
    return benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


def test_bench_reference_write(benchmark):
    model = tiny_model("gpt2", dtype=torch.float32).to(DEVICE)
    ids = torch.randint(0, 61, (4, 9), device=DEVICE)
    config = WriteConfig(num_memory_tokens=2, steps=2, clip_norm=1.0)
    result = _pedantic(benchmark, lambda: reference.write(model, ids, None, None, config))
    assert result.memory.shape == (4, 2, 32)


@pytest.mark.parametrize("family,attn", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "sdpa")])
def test_bench_plain_loop_matches_reference(benchmark, family, attn):
    """The plain-torch baseline of the WRITE benchmark writes the reference's memories (right padding, no
    mask). SDPA runs in fp32 (torch's CPU SDPA is not exact in fp64) against the fp64 reference."""
    model = tiny_model(family, dtype=torch.float64).to(DEVICE)  # the fp64 oracle (its own fp64 attention)
    model.requires_grad_(False)
    lengths = torch.tensor([7, 3, 5])
    ids = torch.randint(0, 61, (3, 7), device=DEVICE)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).to(DEVICE)
    M0 = (torch.randn(2, 32, dtype=torch.float64) * 0.02).to(DEVICE)
    config = WriteConfig(num_memory_tokens=2, steps=3, lr=1e-2, clip_norm=1.0)
    ref = reference.write(model, ids, mask, M0, config).memory
    dtype = torch.float64 if attn == "eager" else torch.float32
    # Same seed: the same initial weights (tiny_model initialises in fp32, then casts).
    fast = model if attn == "eager" else tiny_model(family, dtype=dtype, attn_implementation=attn).to(DEVICE)
    fast.requires_grad_(False)
    loop = PlainLoop(fast, ids, mask, steps=3, memory_tokens=2)
    out = _pedantic(benchmark, lambda: loop(M0.to(dtype)))
    assert rel_error(out, ref) <= tolerance(dtype), rel_error(out, ref)


def test_bench_linear_cross_entropy_torch_path(benchmark):
    from benchmarks.bench_kernels import _torch_ce, gradmem_op
    from benchmarks.common import Skip

    try:
        lce = gradmem_op("linear_cross_entropy")
    except Skip as exc:
        pytest.skip(str(exc))
    h = torch.randn(40, 16, device=DEVICE, dtype=torch.float64)
    w = torch.randn(61, 16, device=DEVICE, dtype=torch.float64)
    t = torch.randint(0, 61, (40,), device=DEVICE)
    loss = _pedantic(benchmark, lambda: lce(h, w, t, backend="torch"))
    assert rel_error(loss, _torch_ce(h, w, t)) <= 1e-10


def test_bench_memory_update_torch_path(benchmark):
    from benchmarks.bench_kernels import gradmem_op
    from benchmarks.common import Skip

    try:
        update = gradmem_op("memory_update")
    except Skip as exc:
        pytest.skip(str(exc))
    m = torch.randn(8, 4, 16, device=DEVICE)
    g = torch.randn_like(m)
    out = _pedantic(benchmark, lambda: update(m, g, lr=0.1, clip_norm=1.0, backend="torch"))
    assert out.memory.shape == m.shape


def test_bench_attention_reference_path(benchmark):
    from benchmarks.bench_kernels import _eager_attention, gradmem_op
    from benchmarks.common import Skip

    try:
        attn = gradmem_op("prefix_attention")
    except Skip as exc:
        pytest.skip(str(exc))
    q, k, v = (torch.randn(2, 11, 2, 8, device=DEVICE, dtype=torch.float64) for _ in range(3))
    out = _pedantic(benchmark, lambda: attn(q, k, v, causal=True, backend="torch"))
    keep = torch.ones(11, 11, dtype=torch.bool, device=DEVICE).tril()
    eager = _eager_attention(*(x.transpose(1, 2) for x in (q, k, v)), keep).transpose(1, 2)
    assert rel_error(out, eager) <= 1e-10


# ------------------------------------------------------------------------------------------ dry run end to end


# The fixture's dry run keeps every section and runs every implementation of each section at least once (and
# the reference and SDPA loops on every WRITE model, which the tests compare), but not every implementation on
# every shape: in the Triton interpreter our kernels cost seconds per case even at these sizes. Left out here
# (they ran in 28 of the full dry run's 50 s of cases): the attention double backward and fwd+bwd on the varlen
# layout (the padded S=16 case runs all four modes), the engine on llama_1b (tiny_kv runs the same Llama family),
# the eager-step engine and the compiled SDPA loop on tiny_kv and llama_1b (on a CPU the eager-step engine is
# the default engine's computation: compile="auto" is eager off CUDA), and the GPT-2 second-order case (tiny_kv
# runs the same three implementations). GRADMEM_TEST_FULL_DRY_RUN=1 runs the whole dry run instead.
DRY_RUN_SELECT = (
    "attention:case=S=16",
    "attention:case=varlen;mode=fwd|bwd",
    "write:impl=reference|torch_sdpa|gradmem_ops",
    "write:case=tiny_kv;impl=gradmem_fast",
    "write:case=gpt2_124m;impl=gradmem_fast_eager|gradmem_fast_graphs|torch_sdpa_compiled",
    "second_order:case=tiny_kv",
)


@pytest.fixture(scope="module")
def dry_run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-dry-run")
    select = [] if os.environ.get("GRADMEM_TEST_FULL_DRY_RUN") == "1" else DRY_RUN_SELECT
    argv = ["--dry-run", "--device", DEVICE, "--out", str(out), "--quiet"]
    assert run.main(argv + [a for clause in select for a in ("--select", clause)]) == 0
    return out


def test_dry_run_writes_well_formed_json(dry_run_dir):
    with open(dry_run_dir / "results.json") as f:
        doc = json.load(f)
    meta = doc["meta"]
    for key in ("commit", "gpu", "torch", "triton", "transformers", "date", "timestamp"):
        assert meta.get(key), key
    assert meta["dry_run"] is True
    assert set(doc["sections"]) == set(SECTIONS)
    assert all(info["status"] == "done" for info in doc["sections"].values()), doc["sections"]
    records = doc["records"]
    for section in SECTIONS:
        assert any(r["section"] == section and r["status"] == "ok" for r in records), section
    for r in records:
        assert r["status"] in ("ok", "skipped"), r  # nothing errors in the rehearsal, ours or a baseline
        if r["status"] != "ok":
            assert r.get("reason"), r
    assert common.own_failures(records, doc["sections"]) == []
    for section in ("attention", "cross_entropy", "update", "write"):  # our own implementations ran
        assert any(r["section"] == section and r["impl"] == "gradmem_fast" and r["status"] == "ok" for r in records), (
            section
        )
    # Every implementation of each section still runs (DRY_RUN_SELECT drops shapes, never an implementation or
    # an attention mode).
    from benchmarks import bench_kernels, bench_second_order, bench_write

    ran = {s: {r["impl"] for r in records if r["section"] == s} for s in SECTIONS}
    assert ran["write"] == set(bench_write.IMPLS) and ran["second_order"] == set(bench_second_order.IMPLS)
    assert ran["attention"] == set(bench_kernels.attention_impls(DEVICE)), ran["attention"]
    ours = {r["mode"] for r in records if r["section"] == "attention" and r["impl"] == "gradmem_fast"}
    assert ours == set(bench_kernels.ATTENTION_MODES)
    write = {(r["case"], r["impl"]): r for r in records if r["section"] == "write"}
    for model in ("tiny_kv", "gpt2_124m", "llama_1b"):
        assert write[(model, "reference")]["status"] == "ok"
        sdpa = write[(model, "torch_sdpa")]
        assert sdpa["status"] == "ok" and sdpa["rel_err"] < 1e-5  # fp32: the baseline writes the same memories
        assert sdpa["tokens_per_s"] > 0 and sdpa["flops"] > 0 and sdpa["mfu"] is not None


def test_dry_run_lists_peers_with_reason_and_versions(dry_run_dir):
    """Every peer (Liger, CCE, flash-attn, jvp-flash-attention) has records in its section, skipped with the
    reason on a CPU; results.json's meta records each peer distribution's version or "not installed"."""
    from benchmarks import peers

    doc = json.loads((dry_run_dir / "results.json").read_text())
    assert doc["meta"]["peers"] == {d: peers.version(d) for d in peers.DISTRIBUTIONS}
    for name, (section, dists, _) in peers.PEERS.items():
        rows = [r for r in doc["records"] if r["impl"] == name]
        assert rows and {r["section"] for r in rows} == {section}, name
        assert all(r["backend"] == "peer" for r in rows), name
        if DEVICE == "cpu":
            for r in rows:
                assert r["status"] == "skipped" and r["reason"].startswith(f"peer {name} runs on CUDA only ("), r
                assert any(d in r["reason"] for d in dists), r
    text = report.render(str(dry_run_dir))
    assert "Peers: " in text and "| liger | cce |" in text and "jvp_flash_attention" in text


def test_peer_versions_recorded_from_metadata(monkeypatch):
    """The version comes from the distribution's metadata (nothing imported); a missing one says so."""
    from benchmarks import peers

    assert peers.version("no-such-distribution-gradmem") == peers.NOT_INSTALLED
    monkeypatch.setattr(peers, "version", lambda d: "9.9.1" if d == "liger-kernel" else peers.NOT_INSTALLED)
    meta = common.run_metadata("cpu", dry_run=True)
    assert meta["peers"]["liger-kernel"] == "9.9.1" and meta["peers"]["cut-cross-entropy"] == "not installed"
    with pytest.raises(common.Skip, match=r"peer liger runs on CUDA only \(liger-kernel 9\.9\.1\)"):
        peers.require("liger", "cpu")
    with pytest.raises(common.Skip, match="flash_attn_3 / flash-attn / flash-attn-4 not installed"):
        peers.require("flash_attn", "cpu")


class _OpaqueBackward(torch.autograd.Function):
    """q * k + v whose backward runs outside autograd, as a Triton backward does (jvp-flash-attention's)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k)
        return q * k + v

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        with torch.no_grad():
            return grad * k, grad * q, grad.clone()


def test_attention_double_backward_case_needs_a_gradient_graph():
    """The dbwd case checks the first-order gradient's graph before timing: an op whose backward is opaque is
    skipped as unsupported (not timed, not an error); a differentiable one runs."""
    from benchmarks import bench_kernels

    def inputs():
        return [torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3)]

    with pytest.raises(common.Skip, match="unsupported here: no reverse-mode double backward"):
        bench_kernels.attention_run(_OpaqueBackward.apply, inputs(), "dbwd")
    q, k, v = inputs()
    run = bench_kernels.attention_run(lambda a, b, c: a * b * c, [q, k, v], "dbwd")
    run()  # the gradients of <dout, q k v> (dout k v, ...) have a graph: the double backward exists
    with pytest.raises(ValueError, match="mode"):
        bench_kernels.attention_run(lambda a, b, c: a, inputs(), "dbwd2")


def test_kernel_microbenchmarks_stay_out_of_make_test():
    """pytest's configured test path is tests/ alone (make test never collects benchmarks/test_*.py)."""
    import configparser

    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    assert ini["pytest"]["testpaths"].split() == ["tests"]
    assert os.path.isfile(os.path.join(ROOT, "benchmarks", "test_kernel_bench.py"))


@pytest.mark.parametrize("failing", ["gradmem_fast", "sdpa_flash"])
def test_run_exit_code_follows_our_implementations(tmp_path, monkeypatch, capsys, failing):
    """An error of one of our implementations fails the run (exit 1, named on stderr); a baseline's error
    or skip is recorded and the run still succeeds."""

    def sections(args, rec, device, *rest):
        def broken():
            raise RuntimeError("planted failure")

        def unavailable():
            raise common.Skip("baseline not installed here")

        with rec.section("peak", 60):
            rec.case("matmul", failing, broken, device=device, mode="planted")
            rec.case("matmul", "torch_compiled", unavailable, device=device, mode="planted")
            rec.case("matmul", "gradmem_ops", lambda: {"ms": 1.0}, device=device, mode="planted")

    monkeypatch.setattr(run, "_run_sections", sections)
    rc = run.main(
        ["--dry-run", "--device", DEVICE, "--out", str(tmp_path), "--sections", "peak", "--no-plots", "--quiet"]
    )
    err = capsys.readouterr().err
    if failing.startswith("gradmem"):
        assert rc == 1 and "peak matmul planted gradmem_fast: error: RuntimeError: planted failure" in err
    else:
        assert rc == 0 and "failure" not in err


def test_dry_run_writes_csv_and_plots(dry_run_dir):
    with open(dry_run_dir / "results.json") as f:
        n_records = len(json.load(f)["records"])
    with open(dry_run_dir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert tuple(reader.fieldnames[: len(LEADING_COLUMNS)]) == LEADING_COLUMNS
    assert len(rows) == n_records
    import matplotlib.image

    for section in SECTIONS:
        path = dry_run_dir / f"{section}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, section
        assert matplotlib.image.imread(str(path)).shape[0] > 100


def test_dry_run_report_and_merge(dry_run_dir):
    text = report.render(str(dry_run_dir))
    assert "### Benchmarks:" in text and "DRY RUN" in text
    for title in (
        "End-to-end WRITE",
        "Attention fwd+bwd",
        "Linear cross-entropy",
        "Memory update",
        "Second-order meta step",
    ):
        assert f"#### {title}" in text
    # A later call with one section keeps the other sections' records.
    before = json.loads((dry_run_dir / "results.json").read_text())["records"]
    assert (
        run.main(
            ["--dry-run", "--device", DEVICE, "--out", str(dry_run_dir), "--sections", "peak", "--no-plots", "--quiet"]
        )
        == 0
    )
    after = json.loads((dry_run_dir / "results.json").read_text())["records"]
    assert len([r for r in after if r["section"] != "peak"]) == len([r for r in before if r["section"] != "peak"])
    assert len([r for r in after if r["section"] == "peak"]) == len([r for r in before if r["section"] == "peak"])


# ------------------------------------------------------------------------------------------ report and suite


def _fake_results(tmp_path, name, timestamp, dry_run=False):
    folder = tmp_path / name
    folder.mkdir()
    records = [
        dict(section="peak", bench="matmul", impl="torch.mm", mode="bf16", status="ok", tflops=700.0, ms=1.0),
        dict(
            section="write",
            bench="write",
            impl="reference",
            case="gpt2_124m",
            status="ok",
            ms=100.0,
            docs_per_s=640.0,
            tokens_per_s=1.8e5,
            mfu=0.05,
        ),
        dict(section="write", bench="write", impl="torch_sdpa", case="gpt2_124m", status="ok", ms=50.0),
        dict(section="write", bench="write", impl="torch_sdpa_compiled", case="gpt2_124m", status="ok", ms=40.0),
        dict(
            section="write",
            bench="write",
            impl="gradmem_fast",
            case="gpt2_124m",
            status="ok",
            ms=10.0,
            mfu=0.5,
            peak_mem_mb=2048.0,
        ),
        dict(
            section="write",
            bench="write",
            impl="gradmem_ops",
            case="gpt2_124m",
            status="skipped",
            reason="not available yet",
        ),
    ]
    meta = dict(gpu="NVIDIA H100 80GB HBM3", date="2030-01-01", timestamp=timestamp, commit="abc", dry_run=dry_run)
    (folder / "results.json").write_text(json.dumps({"meta": meta, "records": records}))
    return folder


def test_report_ratios_and_latest_folder(tmp_path):
    old = _fake_results(tmp_path, "2030-01-01-h100", "2030-01-01T00:00:00+00:00")
    new = _fake_results(tmp_path, "2030-01-02-h100", "2030-01-02T00:00:00+00:00")
    _fake_results(tmp_path, "2030-01-03-cpu-dryrun", "2030-01-03T00:00:00+00:00", dry_run=True)
    assert report.latest_results_dir(str(tmp_path)) == str(new) != str(old)
    text = report.render(str(new))
    row = next(line for line in text.splitlines() if "| gradmem_fast |" in line)
    assert "10.00×" in row and "4.00×" in row and "50.0%" in row and "2.00 GiB" in row  # vs reference / best torch
    assert "NVIDIA H100 80GB HBM3, 2030-01-01" in text
    assert "| gradmem_ops | skipped |" in text
    assert "write / gradmem_ops: skipped: not available yet" in text
    (new / "pytest.txt").write_text("....\n===== 120 passed, 3 skipped in 200.00s =====\n")
    (new / "sanitizer-memcheck.txt").write_text(
        "CASE attention_padded: OK [1.0 s]\nCASE write_engine: SKIP (x) [0.1 s]\n========= ERROR SUMMARY: 0 errors\n"
    )
    validation = report.render(str(new)).split("#### Validation")[1]
    assert "tests on CUDA: 120 passed, 3 skipped in 200.00s" in validation
    assert "memcheck: ERROR SUMMARY: 0 errors; cases 1 OK, 1 SKIP" in validation


def test_sanitizer_cases_run_here():
    from benchmarks import sanitizer_cases

    results = sanitizer_cases.run_cases(["memory_update", "linear_cross_entropy"], torch.device(DEVICE))
    assert [r["status"] for r in results] in (["OK", "OK"], ["OK", "SKIP"], ["SKIP", "OK"], ["SKIP", "SKIP"])
    assert set(sanitizer_cases.CASES) >= {
        "attention_padded",
        "attention_varlen",
        "linear_cross_entropy",
        "memory_update",
        "write_engine",
    }


def _suite(args, env_extra, timeout=900):
    script = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _plan(call):
    """(limit, {stage: seconds}) from the suite's printed budget plan of one call."""
    import re

    done = _suite([call], {"GRADMEM_SUITE_PLAN_ONLY": "1"}, timeout=60)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("== budget plan: call " + call))
    limit = int(re.search(r"limit (\d+) s", line).group(1))
    stages = dict((name, int(sec)) for name, sec in re.findall(r"(\w+) (\d+)(?= \+| =)", line.split(":", 2)[2]))
    total = int(re.search(r"= (\d+) s, margin", line).group(1))
    assert total == sum(stages.values()) <= limit, line
    return limit, stages


def test_gpu_suite_budget_plans():
    """A lent GPU gives 15 minutes: the first call fits 9 minutes, the second 5; each bench stage holds its
    plan's section budgets plus start-up; the first call carries the CUDA tests and the census hook."""
    script = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    first_limit, first = _plan("first")
    second_limit, second = _plan("second")
    assert first_limit <= 9 * 60 and second_limit <= 5 * 60
    assert list(first) == ["env", "tests", "bench", "census", "report"]
    assert list(second) == ["env", "sanitizer", "bench", "kernels", "report"]
    for call, stages in (("first", first), ("second", second)):
        assert stages["bench"] >= sum(run.PLANS[call]["budgets"].values()) + run.PLAN_STARTUP_S, call
    # a shorter deadline shrinks the stages to fit it
    done = _suite(["first"], {"GRADMEM_SUITE_PLAN_ONLY": "1", "GRADMEM_SUITE_SECONDS": "300"}, timeout=60)
    assert "scaled down" in done.stdout and "margin -" not in done.stdout


def test_plan_selections_name_real_cases():
    """Every case, mode, implementation and head dim a plan selects exists at full size, and every clause
    selects something (a renamed case would silently drop out of the GPU call)."""
    from benchmarks import bench_kernels, bench_write

    shapes = bench_kernels.attention_shapes(False)
    known = {
        "attention": dict(
            case={s[0] for s in shapes},
            head_dim={str(s[5]) for s in shapes},
            mode=set(bench_kernels.ATTENTION_MODES),
            impl=set(bench_kernels.attention_impls("cpu")) | {"sdpa_cudnn"},
        ),
        "cross_entropy": dict(
            case={s[0] for s in bench_kernels.ce_shapes(False)},
            mode=set(bench_kernels.CE_MODES),
            impl=set(bench_kernels.ce_impls("cpu", False)),
        ),
        "write": dict(case={s.name for s in bench_write.write_specs(False)}, impl=set(bench_write.IMPLS)),
    }
    for name, plan in run.PLANS.items():
        assert set(plan["budgets"]) <= set(run.SECTIONS), name
        for section, clauses in run.plan_selection(plan, dry_run=False).items():
            assert section in plan["budgets"], (name, section)
            for clause in clauses:
                for key, values in clause.items():
                    assert values <= known[section][key], (name, section, key, values - known[section][key])
                if section == "attention" and "head_dim" in clause:
                    assert any(s[0] in clause["case"] and str(s[5]) in clause["head_dim"] for s in shapes), clause


def test_recorder_selection_and_merge_by_case(tmp_path):
    """A selection runs only matching cases; a later call that selects other cases of a section keeps the
    earlier call's records of that section (the two GPU calls end in one results.json)."""
    first = common.Recorder(
        str(tmp_path),
        {},
        sections_now=["write"],
        verbose=False,
        select={"write": [{"case": {"gpt2_124m"}, "impl": {"reference", "torch_sdpa"}}]},
    )
    with first.section("write", 60):
        assert first.wants(case="gpt2_124m") and not first.wants(case="llama_1b")
        for impl in ("reference", "torch_sdpa", "torch_sdpa_compiled"):
            first.case("write", impl, lambda: {"ms": 1.0}, case="gpt2_124m")
    assert [r["impl"] for r in first.records] == ["reference", "torch_sdpa"]
    second = common.Recorder(
        str(tmp_path),
        {},
        sections_now=["write"],
        verbose=False,
        select={"write": [{"case": {"gpt2_124m"}, "impl": {"reference", "torch_sdpa_compiled"}}]},
    )
    with second.section("write", 60):
        second.case("write", "torch_sdpa_compiled", lambda: {"ms": 2.0}, case="gpt2_124m")
        second.case("write", "reference", lambda: {"ms": 3.0}, case="gpt2_124m")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["impl"], r["ms"]) for r in doc["records"]) == [
        ("reference", 3.0),
        ("torch_sdpa", 1.0),
        ("torch_sdpa_compiled", 2.0),
    ]
    assert not (tmp_path / "results.csv").exists() or (tmp_path / "results.csv").read_text().count("\n") == 4
    common.Recorder(str(tmp_path), {}, sections_now=["write"], verbose=False)  # no selection: the section restarts
    assert json.loads((tmp_path / "results.json").read_text())["records"] == []


def test_gpu_suite_calls_rehearsed_dry(tmp_path):
    """Both calls run through the suite script in its dry run: the plan, env, the first call's CUDA test
    selection (collected as on a GPU: it must still name tests) and the report."""
    env = {"GRADMEM_SUITE_DRY_RUN": "1", "GRADMEM_T_ENV": "45"}  # a busy CI box imports torch slowly
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    done = _suite(["first", "env", "tests", "report"], dict(env, GRADMEM_RESULTS_DIR=str(first_dir)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== budget plan: call first, limit 540 s (9.0 min)" in done.stdout
    lines = (first_dir / "suite_status.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["env", "tests", "report"]
    assert all(line.split("\t")[1] == "0" for line in lines)
    assert "torch" in (first_dir / "env.txt").read_text()
    collected = (first_dir / "pytest.txt").read_text()
    for needle in ("bfloat16", "test_cuda_graph_replay_matches_eager_engine", "host_sync", "test_half_precision"):
        assert needle in collected, needle
    done = _suite(["second", "env", "kernels", "report"], dict(env, GRADMEM_RESULTS_DIR=str(second_dir)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== budget plan: call second, limit 300 s (5.0 min)" in done.stdout
    # the kernels stage collects the pytest-benchmark microbenchmarks, peers included (timed only on a GPU)
    for test_id in ("test_attention[dbwd-jvp_flash_attention]", "test_linear_cross_entropy[liger]", "adam-torch"):
        assert test_id in done.stdout, test_id
    assert "peer jvp-flash-attention" in (second_dir / "env.txt").read_text()
    assert len(list(first_dir.iterdir())) <= 8 and len(list(second_dir.iterdir())) <= 8


def test_census_compare_of_a_gpu_run_takes_stored_projections(tmp_path):
    """The first GPU call's census stage (~30 s) compares a CUDA results.json, whose engine rows map to the
    compiled engine: counting that compiles the model on the CPU (160-630 s in the stored censuses). The newest
    stored census of the same shape answers; a compiled count none has is not started under --seconds."""
    from benchmarks import census

    spec = census.specs(False, ("tiny_kv",))[0]
    shape = dict(
        case="tiny_kv",
        dtype="float32",
        batch=spec.batch,
        min_len=spec.min_len,
        max_len=spec.max_len,
        memory_tokens=spec.memory_tokens,
        steps=spec.steps,
    )

    def stored(name, stamp, records, dry_run=False):
        folder = tmp_path / "results" / name
        folder.mkdir(parents=True)
        doc = {"meta": {"dry_run": dry_run, "timestamp": stamp}, "records": records}
        (folder / "census.json").write_text(json.dumps(doc))

    def rec(impl, step_ms, **extra):
        p = {"H100 SXM": {"step_ms": 2 * step_ms, "bound": "memory"}, "H200": {"step_ms": step_ms, "bound": "compute"}}
        return dict(shape, impl=impl, status="ok", launches=7, projection=p, **extra)

    stored("old-census", "2026-01-01T00:00:00", [rec("engine_compiled", 99.0), rec("reference", 8.0)])
    stored("new-census", "2026-02-01T00:00:00", [rec("engine_compiled", 3.0)])
    stored("other-shape", "2026-03-01T00:00:00", [dict(rec("engine_compiled", 50.0), batch=spec.batch + 1)])
    stored("dry", "2026-04-01T00:00:00", [rec("engine_compiled", 60.0)], dry_run=True)
    results = tmp_path / "results.json"
    write = [("reference", 40.0), ("gradmem_fast", 12.0), ("gradmem_fast_graphs", 10.0)]
    doc = {
        "meta": {"dry_run": False, "gpu": "NVIDIA H200", "device": "cuda"},
        "records": [dict(bench="write", status="ok", impl=i, case="tiny_kv", ms=ms) for i, ms in write],
    }
    results.write_text(json.dumps(doc))
    calls = []
    rows = census.compare(str(results), seconds=5.0, on_rows=calls.append, stored_root=str(tmp_path / "results"))
    assert [r["impl"] for r in rows] == ["reference", "gradmem_fast", "gradmem_fast_graphs"] and calls
    ref, engine, graphs = rows
    assert ref["projected_write_ms"] == 8.0 * spec.steps and "old-census" in ref["projection_source"]
    assert engine["projected_step_ms"] == 3.0 and engine["projection_gpu"] == "H200"  # newest of the same shape
    assert engine["measured_over_projected"] == 12.0 / (3.0 * spec.steps)
    assert graphs["projection_error"].startswith("not counted: a compiled implementation")  # no graph projection
    # The command line writes its file (under --seconds 0 nothing is counted; stored censuses of the tree answer).
    out = tmp_path / "out"
    assert census.main(["--compare", str(results), "--out", str(out), "--seconds", "0"]) == 0
    assert len(json.loads((out / "census_vs_measured.json").read_text())) == 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_second_order_reference_equals_model_class(family):
    """The second_order section's reference (the published path: padded batch, eager attention, full logits)
    computes the same meta loss and gradients as GradMemModel on its torch backend (fp64, ragged contexts),
    so the benchmark compares two implementations of one computation."""
    from benchmarks import bench_second_order as so
    from benchmarks.bench_write import build_model

    config = (
        dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=23)
        if family == "gpt2"
        else so._llama(16, 2, 2, 23)
    )
    spec = so.SecondOrderSpec("t", family, config, torch.float64, 3, 9, 5, 3, 2, inner_lr=0.3)
    gm = so.gradmem_model(build_model(family, config, torch.float64, "cpu"), spec, "torch")
    ids, mask, query, labels = so.make_inputs(spec, 23, "cpu")
    assert mask.sum(1).min() < mask.shape[1]  # ragged
    params = [p for p in gm.parameters() if p.requires_grad]
    out = []
    for fn in (
        lambda: so.eager_meta_loss(gm, ids, mask, query, labels),
        lambda: gm(context_input_ids=ids, context_attention_mask=mask, query_input_ids=query, labels=labels).loss,
    ):
        loss = fn()
        out.append((loss.detach(), torch.autograd.grad(loss, params)))
    (ref_loss, ref_grads), (loss, grads) = out
    assert rel_error(loss, ref_loss) < 1e-10
    for p, g, r in zip(params, grads, ref_grads):
        assert rel_error(g, r) < 1e-10, [n for n, q in gm.named_parameters() if q is p]
