"""benchmarks/bench_cramming_peers.py: its own logic on a tiny local model (the peer parts run only where
benchmarks/peers/setup_progressive_cramming.sh installed the peer; otherwise they are skipped).

What each test catches:
* the batch-size prediction: a dropped last partial batch, or a batch costed by its mean (or sum) of steps
  instead of its slowest paragraph's;
* the shared exactness rule against an independent greedy decoding loop: an off-by-one in the logit
  position (m-1 predicts token 0), counting matches after the first mismatch, ``given`` tokens scored;
* the CPU-time measure: a child's CPU time not counted (or the parent's counted instead);
* end to end (data, our write and capacity, the report): token ids the peer would read differing from ours,
  a side's "exact" verdict disagreeing with the shared rule, ratios computed upside down.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_cramming_peers as bcp  # noqa: E402
from tiny_local import save_tiny  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def test_predicted_cost_is_the_slowest_paragraph_per_batch():
    steps = [10, 50, 20, 20, 30]
    assert bcp.predict_batch_cost(steps, 1.0, 1) == 130
    assert bcp.predict_batch_cost(steps, 1.5, 2) == (50 + 20 + 30) * 1.5  # last batch of one kept
    assert bcp.predict_batch_cost(steps, 2.0, 4) == (50 + 30) * 2.0
    assert bcp.predict_batch_cost(steps, 3.0, 8) == 50 * 3.0
    best, predicted = bcp.choose_best_batch(steps, {1: 1.0, 2: 1.5, 4: 2.0})
    assert best == 1 and predicted == {1: 130.0, 2: 150.0, 4: 160.0}
    best, _ = bcp.choose_best_batch(steps, {1: 1.0, 2: 0.6})
    assert best == 2  # 100 steps at 0.6 beat 130 at 1.0
    best, _ = bcp.choose_best_batch([5, 5], {1: 1.0, 2: 2.0})
    assert best == 1  # a tie goes to the smaller batch


def _greedy(model, memory, given, n_new):
    """Independent greedy decoding: one full forward per new token, no teacher forcing."""
    emb = model.get_input_embeddings()
    seq = list(given)
    with torch.no_grad():
        for _ in range(n_new):
            parts = [memory[None]]
            if seq:
                parts.append(emb(torch.tensor([seq])))
            logits = model(inputs_embeds=torch.cat(parts, dim=1)).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq


@pytest.mark.parametrize("m", [1, 3])
def test_exact_prefix_matches_greedy_decoding(m):
    model = tiny_model("llama", dtype=torch.float64)
    memory = torch.randn(m, model.config.hidden_size, dtype=torch.float64)
    ids = _greedy(model, memory, [], 7)
    assert bcp.exact_prefix(model, memory, ids) == 7
    for k in (0, 3, 6):
        broken = list(ids)
        broken[k] = (broken[k] + 1) % model.config.vocab_size
        assert bcp.exact_prefix(model, memory, broken) == k
    # given=1: token 0 is an input; greedy continues from it
    first = (ids[0] + 5) % model.config.vocab_size
    cont = _greedy(model, memory, [first], 5)
    assert bcp.exact_prefix(model, memory, cont, given=1) == 5
    broken = list(cont)
    broken[3] = (broken[3] + 1) % model.config.vocab_size
    assert bcp.exact_prefix(model, memory, broken, given=1) == 2


def test_timed_run_counts_the_child_cpu_time(tmp_path):
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    rec = bcp.timed_run([sys.executable, "-c", burn], str(tmp_path / "log.txt"), bcp.child_env())
    assert rec["rc"] == 0
    assert rec["cpu_seconds"] >= 0.3 and rec["wall_seconds"] >= 0.3
    rec = bcp.timed_run([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "log2.txt"), bcp.child_env())
    assert rec["rc"] == 3


def test_ratios_and_table():
    result = {
        "model": "tiny",
        "device": "cpu",
        "settings": {
            "cramming": {
                "paragraphs": ["a", "b"],
                "tokens": [3, 4],
                "memory_tokens": 2,
                "max_steps": 9,
                "ours_slots": 2,
            },  # fmt: skip
            "capacity": {"texts": ["c"], "tokens": [5], "max_steps_per_stage": 9},
        },
        "differences": ["x"],
        "cramming": {
            "cram-ours": {
                "cpu_seconds": 10.0,
                "wall_seconds": 20.0,
                "steps": [3, 5],
                "exact": [True, True],
                "agree": True,
            },  # fmt: skip
            "cram-peer-best": {
                "cpu_seconds": 30.0,
                "wall_seconds": 50.0,
                "steps": [4, 6],
                "batch": 2,
                "exact": [True, False],
                "agree": True,
            },  # fmt: skip
        },
        "capacity": {
            "cap-ours": {"cpu_seconds": 4.0, "wall_seconds": 8.0, "horizon": [3], "agree": True},
            "cap-peer": {"cpu_seconds": 10.0, "wall_seconds": 12.0, "horizon": [2], "agree": True},
        },
    }
    r = bcp.ratios(result)
    assert r["cram_vs_peer_best"]["cpu"] == 3.0 and r["cram_vs_peer_best"]["wall"] == 2.5
    # the peer's batch of 2 computes both paragraphs for 6 steps: 12 paragraph-steps against our 8
    assert r["cram_vs_peer_best"]["per_step_cpu"] == pytest.approx((30.0 / 12) / (10.0 / 8))
    assert r["capacity_vs_peer_linear"]["cpu"] == 2.5
    assert r["capacity_vs_peer_linear"]["mean_horizon_ours"] == 3
    result["ratios"] = r
    text = bcp.table(result)
    assert "**3.00x** CPU time" in text and "2/2" in text and "1/2" in text and "**2.50x**" in text


def _bench(tmp_path, peer_dir):
    model_dir = save_tiny(str(tmp_path / "model"))
    work = tmp_path / "work"
    argv = ["--work", str(work), "--model-dir", model_dir, "--count", "2", "--capacity-count", "1",
            "--max-steps", "3", "--capacity-max-steps", "2", "--slots", "2", "--memory-tokens", "2",
            "--peer-dir", str(peer_dir)]  # fmt: skip
    return work, argv


def test_end_to_end_ours_and_report(tmp_path):
    work, argv = _bench(tmp_path, tmp_path / "no-peer")
    assert bcp.main(argv + ["--phases", "data,cram-ours,cap-ours,cram-peer-1,report"]) == 0  # peer phase skipped
    data = work / "data"
    ours = [json.loads(x) for x in open(data / "cram.jsonl", encoding="utf-8")]
    peer = [json.loads(x) for x in open(data / "cram_peer" / "test.jsonl", encoding="utf-8")]
    assert [p["text"] for p in peer] == [o["text"] + "[EOS]" for o in ours]
    res = json.load(open(work / "results" / "results.json", encoding="utf-8"))
    side = res["cramming"]["cram-ours"]
    assert side["agree"] and len(side["exact"]) == 2 and all(1 <= s <= 3 for s in side["steps"])
    assert "cram-peer-1" not in res["cramming"]
    cap = res["capacity"]["cap-ours"]
    assert cap["agree"] and len(cap["horizon"]) == 1
    assert os.path.exists(work / "results" / "table.md")
    # a phase with a record is kept, not rerun
    before = os.path.getmtime(work / "runs" / "cram-ours" / "record.json")
    bcp.main(argv + ["--phases", "cram-ours"])
    assert os.path.getmtime(work / "runs" / "cram-ours" / "record.json") == before


@pytest.mark.skipif(not os.path.isdir(os.path.join(bcp.PEER_DIR, "src")), reason="the peer is not installed")
def test_end_to_end_with_the_peer(tmp_path):
    work, argv = _bench(tmp_path, bcp.PEER_DIR)
    assert bcp.main(argv + ["--phases", "data,cram-ours,cram-peer-1,report"]) == 0
    res = json.load(open(work / "results" / "results.json", encoding="utf-8"))
    peer = res["cramming"]["cram-peer-1"]
    assert peer["agree"] and peer["batch"] == 1 and len(peer["steps"]) == 2
    assert res["ratios"]["cram_vs_peer_default"]["cpu"] > 0
