"""Command line entry points and the demo (reduced form: a tiny local model and a few steps)."""

import os
import subprocess
import sys

import pytest

from gradmem_fast import cli
from tiny_local import save_tiny, sentence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model and tokenizer saved once for this module."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _recount_correct_tokens(model_dir, texts, steps, lr, memory_tokens, stop=None):
    """Tokens of each text decoded at the right position, counted here: the demo's write redone (Adam,
    deterministic on CPU), each next token taken greedily from full READ logits (no KV cache)."""
    import torch

    from gradmem_fast import MemoryWriter, WriteConfig
    from gradmem_fast.models import load_model

    net, tok = load_model(model_dir, "float32", torch.device("cpu"))
    docs = [tok(t, add_special_tokens=False).input_ids for t in texts]
    ids = torch.zeros(len(docs), max(map(len, docs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, d in enumerate(docs):
        ids[b, : len(d)], mask[b, : len(d)] = torch.tensor(d), 1
    cfg = WriteConfig(num_memory_tokens=memory_tokens, steps=steps, lr=lr, optimizer="adam", stop=stop)
    memory = MemoryWriter(net, cfg, backend="torch").write(ids, mask).memory
    counts = []
    with torch.no_grad():
        for b, d in enumerate(docs):
            generated = []
            for _ in d:  # the last position of [memory ; tokens so far] predicts the next token
                x = torch.cat([memory[b], net.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))])
                generated.append(int(net(inputs_embeds=x[None]).logits[0, -1].argmax()))
            counts.append(sum(int(a == g) for a, g in zip(d, generated)))
    return counts


def test_demo_reduced_form_runs_and_reports(model_dir, capsys):
    """The demo's whole path (load, write, decode from memory alone, report) on a tiny local model."""
    from gradmem_fast import demo
    from gradmem_fast.config import StopRule

    texts = [sentence(6, 0), sentence(4, 3)]
    result = demo.run(model=model_dir, texts=texts, steps=4, lr=0.05, memory_tokens=2, device="cpu")
    out = capsys.readouterr().out
    assert result.losses.shape == (4, 2)
    assert (result.losses[-1] < result.losses[0]).all()
    assert [d.tokens for d in result.documents] == [6, 4]
    assert [d.steps for d in result.documents] == [4, 4]  # not learned in 4 steps: all steps taken
    assert "steps per paragraph: [4, 4]" in out and "0% saved" in out
    rule = StopRule(exact=True, check_every=1)  # the demo checks every step on a CPU
    correct = _recount_correct_tokens(model_dir, texts, steps=4, lr=0.05, memory_tokens=2, stop=rule)
    assert [d.correct for d in result.documents] == correct
    assert result.token_accuracy == sum(correct) / 10
    assert [d.exact for d in result.documents] == [c == n for c, n in zip(correct, [6, 4])]
    for needle in ("memory vectors", "token accuracy", "exact match", "decoded :", texts[0]):
        assert needle in out


def test_demo_command_with_model_dir(model_dir, capsys):
    """`gradmem-fast demo --model DIR` with a custom paragraph."""
    assert (
        cli.main(
            [
                "demo",
                "--model",
                model_dir,
                "--steps",
                "2",
                "--memory-tokens",
                "2",
                "--text",
                sentence(3),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "total: token accuracy" in capsys.readouterr().out


@pytest.mark.skipif(
    os.environ.get("GRADMEM_TEST_REAL_DEMO") != "1",
    reason="loads the embedded 135M model (about 30-60 s); set GRADMEM_TEST_REAL_DEMO=1",
)
def test_demo_with_the_embedded_model_reduced(capsys):
    """Opt-in: the embedded SmolLM2 model, two steps."""
    from gradmem_fast import demo

    result = demo.run(steps=2, texts=["The cat sat on the mat."], device="cpu")
    assert len(result.documents) == 1 and "SmolLM2" in capsys.readouterr().out


def test_unknown_command_fails_cleanly(capsys):
    """An unknown command exits 2 with a message."""
    assert cli.main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_help_and_no_command(capsys):
    """--help exits 0; no command is a usage error."""
    assert cli.main(["--help"]) == 0
    assert "write" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_python_dash_m_entry_point():
    """`python -m gradmem_fast` reports a bad option without a traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "gradmem_fast", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "--steps" in out.stderr and "Traceback" not in out.stderr
