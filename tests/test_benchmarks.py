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

from benchmarks import report, run  # noqa: E402
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
            2 * t * d * (3 * d) + 2 * t * d * d + 2 * t * d * inner + 2 * t * inner * d  # dX = dY W^T
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

@pytest.fixture(scope="module")
def dry_run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-dry-run")
    assert run.main(["--dry-run", "--device", DEVICE, "--out", str(out), "--quiet"]) == 0
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
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] != "ok":
            assert r.get("reason"), r
        if not str(r["impl"]).startswith("gradmem"):  # baselines must run; our ops may still be landing
            assert r["status"] != "error", r
    write = {(r["case"], r["impl"]): r for r in records if r["section"] == "write"}
    for model in ("tiny_kv", "gpt2_124m", "llama_1b"):
        assert write[(model, "reference")]["status"] == "ok"
        sdpa = write[(model, "torch_sdpa")]
        assert sdpa["status"] == "ok" and sdpa["rel_err"] < 1e-5  # fp32: the baseline writes the same memories
        assert sdpa["tokens_per_s"] > 0 and sdpa["flops"] > 0 and sdpa["mfu"] is not None


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
    for title in ("End-to-end WRITE", "Attention fwd+bwd", "Linear cross-entropy", "Memory update",
                  "Second-order meta step"):
        assert f"#### {title}" in text
    # A later call with one section keeps the other sections' records.
    before = json.loads((dry_run_dir / "results.json").read_text())["records"]
    assert run.main(["--dry-run", "--device", DEVICE, "--out", str(dry_run_dir), "--sections", "peak",
                     "--no-plots", "--quiet"]) == 0
    after = json.loads((dry_run_dir / "results.json").read_text())["records"]
    assert len([r for r in after if r["section"] != "peak"]) == len([r for r in before if r["section"] != "peak"])
    assert len([r for r in after if r["section"] == "peak"]) == len([r for r in before if r["section"] == "peak"])


# ------------------------------------------------------------------------------------------ report and suite

def _fake_results(tmp_path, name, timestamp, dry_run=False):
    folder = tmp_path / name
    folder.mkdir()
    records = [
        dict(section="peak", bench="matmul", impl="torch.mm", mode="bf16", status="ok", tflops=700.0, ms=1.0),
        dict(section="write", bench="write", impl="reference", case="gpt2_124m", status="ok", ms=100.0,
             docs_per_s=640.0, tokens_per_s=1.8e5, mfu=0.05),
        dict(section="write", bench="write", impl="torch_sdpa", case="gpt2_124m", status="ok", ms=50.0),
        dict(section="write", bench="write", impl="torch_sdpa_compiled", case="gpt2_124m", status="ok", ms=40.0),
        dict(section="write", bench="write", impl="gradmem_fast", case="gpt2_124m", status="ok", ms=10.0,
             mfu=0.5, peak_mem_mb=2048.0),
        dict(section="write", bench="write", impl="gradmem_ops", case="gpt2_124m", status="skipped",
             reason="not available yet"),
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
        "CASE attention_padded: OK [1.0 s]\nCASE write_engine: SKIP (x) [0.1 s]\n========= ERROR SUMMARY: 0 errors\n")
    validation = report.render(str(new)).split("#### Validation")[1]
    assert "tests on CUDA: 120 passed, 3 skipped in 200.00s" in validation
    assert "memcheck: ERROR SUMMARY: 0 errors; cases 1 OK, 1 SKIP" in validation


def test_sanitizer_cases_run_here():
    from benchmarks import sanitizer_cases

    results = sanitizer_cases.run_cases(["memory_update", "linear_cross_entropy"], torch.device(DEVICE))
    assert [r["status"] for r in results] in (["OK", "OK"], ["OK", "SKIP"], ["SKIP", "OK"], ["SKIP", "SKIP"])
    assert set(sanitizer_cases.CASES) >= {"attention_padded", "attention_varlen", "linear_cross_entropy",
                                           "memory_update", "write_engine"}


def test_gpu_suite_script_dry_stages(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, GRADMEM_SUITE_DRY_RUN="1", GRADMEM_RESULTS_DIR=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", script, "env", "tests", "report"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "suite_status.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["env", "tests", "report"]
    assert all(line.split("\t")[1] == "0" for line in lines)
    assert "torch" in (tmp_path / "env.txt").read_text()
