"""benchmarks/bench_meta_peer.py: its equality check on a tiny configuration (needs the published code's clone,
made by benchmarks/peers/setup_gradmem.sh; skipped when it is absent), and that the check catches a difference."""

import dataclasses

import pytest
import torch

from benchmarks import bench_meta_peer as bench

PEER = bench.import_peer()
pytestmark = pytest.mark.skipif(PEER is None, reason="no clone of the published GradMem code (setup_gradmem.sh)")


def _tiny(grad_mode: str, **over) -> bench.Case:
    backbone = bench.llama_backbone(vocab=23, hidden=32, layers=2, heads=2)
    return bench.Case(f"tiny_{grad_mode}", backbone=backbone, batch=3, length=9, query=4, grad_mode=grad_mode, **over)


@pytest.mark.parametrize("grad_mode", ["second", "first", "none"])
def test_equality_check_passes_on_identical_weights(grad_mode):
    """The published GradMemGPT and GradMemModel.from_pretrained of its checkpoint agree (fp64 and fp32) on the
    KV recipe's options, every grad_mode; the timing and memory records have both sides."""
    torch.manual_seed(0)
    rec = bench.run_case(_tiny(grad_mode), PEER, "cpu", rounds=1)
    assert rec["equality"]["fp64"]["grads"] <= 1e-6 and rec["time"]["ours"]["runs"] == 1
    assert rec["memory"]["peer"]["saved_mb"] > 0 and rec["memory"]["ours"]["saved_mb"] > 0


def test_equality_check_passes_gpt2_proj_recipe():
    """The GPT-2 recipe's options (write head, mem_proj "proj", no inner loss) on a tiny GPT-2."""
    case = dataclasses.replace(
        _tiny("second", mem_proj_mode="proj", inner_loss_weight=None),
        backbone=bench.gpt2_backbone(layers=2, hidden=32, heads=2, vocab=29),
    )
    peer, ours = bench.build_pair(case, PEER)
    bench.check_equal(peer, ours, bench.make_batch(case, 29))


@pytest.mark.parametrize("field, factor", [("lr", 1 + 1e-6), ("inner_loss_weight", 1 + 1e-6)])
def test_equality_check_catches_a_difference(field, factor):
    """A one-in-a-million change of our inner lr or inner-loss weight fails the float64 check."""
    case = _tiny("first")
    peer, ours = bench.build_pair(case, PEER)
    setattr(ours.config, field, getattr(ours.config, field) * factor)
    with pytest.raises(AssertionError, match="float64"):
        bench.check_equal(peer, ours, bench.make_batch(case, 23))
