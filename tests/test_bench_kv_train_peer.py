"""benchmarks/bench_kv_train_peer.py on a tiny configuration: the published GradMemGPT and GradMemModel start the
KV example's training from identical weights (equal first outer loss), and a side's run writes its curve.
Needs the published code's clone (benchmarks/peers/setup_gradmem.sh); skipped when it is absent."""

import json

import pytest
import torch

from benchmarks import bench_kv_train_peer as bench
from benchmarks.bench_meta_peer import import_peer

pytestmark = pytest.mark.skipif(import_peer() is None, reason="no clone of the published GradMem code")

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--memory", "2", "--batch", "3", "--eval-size", "8"]


def test_first_outer_loss_equal_on_identical_weights():
    """Same seed, same first batch: the two sides' outer loss agrees to float32 rounding (a wrong inner lr, a
    missing inner-loss term or a different batch would move it far more)."""
    torch.set_num_threads(1)
    first = bench.first_losses(bench.parse_args(TINY))
    assert first["peer"] == pytest.approx(first["ours"], rel=1e-5, abs=1e-6)
    other = bench.first_losses(bench.parse_args([*TINY, "--inner-lr", "0.5"]))
    assert abs(other["ours"] - first["ours"]) > 1e-4  # the loss depends on the recipe: the check has teeth


@pytest.mark.parametrize("side", bench.SIDES)
def test_side_run_writes_its_curve(side, tmp_path):
    """Two outer steps of one side: the JSON has the evaluation at steps 0, 1, 2 and positive CPU time."""
    args = bench.parse_args([*TINY, "--steps", "2", "--eval-every", "1", "--side", side, "--out", str(tmp_path)])
    bench.train_side(side, args, tmp_path / f"{side}.json")
    doc = json.loads((tmp_path / f"{side}.json").read_text())
    assert [r[0] for r in doc["curve"]] == [0, 1, 2] and doc["train_cpu_s"] > 0 and len(doc["losses"]) == 2
    assert all(0.0 <= r[1] <= 1.0 for r in doc["curve"])


def test_both_sides_follow_the_same_losses(tmp_path):
    """Identical weights and batches: the two sides' first two outer losses agree (the runs start equal)."""
    docs = {}
    for side in bench.SIDES:
        args = bench.parse_args([*TINY, "--steps", "2", "--eval-every", "2", "--side", side, "--out", str(tmp_path)])
        docs[side] = bench.train_side(side, args, tmp_path / f"{side}.json")
    assert docs["peer"]["losses"] == pytest.approx(docs["ours"]["losses"], rel=1e-4)
