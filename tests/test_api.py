"""The user API: config validation, bad input, backend selection."""

import os
import subprocess
import sys

import pytest
import torch

import gradmem_fast
from gradmem_fast import MemoryWriter, WriteConfig, resolve_backend
from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2")


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.0), TypeError, "steps"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(num_memory_tokens=0), ValueError, "num_memory_tokens"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(clip_value=-1.0), ValueError, "clip_value"),
        (dict(clip_norm=0.0), ValueError, "clip_norm"),
        (dict(grad_mode="third"), ValueError, "grad_mode"),
        (dict(grad_mode="first", last_k_second_order=1), ValueError, "last_k_second_order"),
        (dict(grad_mode="second", optimizer="adam"), ValueError, "adam"),
        (dict(adam_betas=(0.9, 1.0)), ValueError, "adam_betas"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        WriteConfig(**kwargs)


def test_config_second_order_steps():
    cfg = WriteConfig(steps=4, grad_mode="second", last_k_second_order=2)
    assert [cfg.second_order_step(k) for k in range(4)] == [False, False, True, True]
    assert all(WriteConfig(steps=3, grad_mode="second").second_order_step(k) for k in range(3))
    assert not WriteConfig(steps=3, grad_mode="first").second_order_step(2)
    assert WriteConfig(optimizer="adam").effective_clip_value == 10.0
    assert WriteConfig().effective_clip_value is None


def _write(model, *args, **kwargs):
    return MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="torch").write(*args, **kwargs)


def test_bad_inputs_name_the_argument(model):
    ids = torch.randint(0, VOCAB, (2, 4))
    d = model.config.hidden_size
    cases = [
        (lambda: _write(model, ids.float()), TypeError, "input_ids"),
        (lambda: _write(model, ids[0]), ValueError, "input_ids"),
        (lambda: _write(model, ids.tolist()), TypeError, "input_ids"),
        (lambda: _write(model, ids, torch.ones(2, 5)), ValueError, "attention_mask"),
        (lambda: _write(model, ids, torch.ones(2, 4)), TypeError, "attention_mask"),
        (lambda: _write(model, ids, torch.full((2, 4), 2)), ValueError, "attention_mask"),
        (lambda: _write(model, ids, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])), ValueError, "no real token"),
        (lambda: _write(model, ids + VOCAB), ValueError, "token ids"),
        (lambda: _write(model, ids, memory=torch.zeros(2, d + 1)), ValueError, "memory"),
        (lambda: _write(model, ids, memory=torch.zeros(3, 2, d)), ValueError, "memory"),
        (lambda: _write(model, ids, memory=torch.zeros(2, d, dtype=torch.long)), TypeError, "memory"),
        (lambda: _write(model, ids, memory=torch.zeros(1, 1, 2, d)), ValueError, "memory"),
    ]
    for fn, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            fn()


def test_bad_model_and_config_types(model):
    with pytest.raises(TypeError, match="model"):
        MemoryWriter("gpt2")
    with pytest.raises(ValueError, match="input embeddings"):
        MemoryWriter(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="config"):
        MemoryWriter(model, {"steps": 2})
    with pytest.raises(ValueError, match="backend"):
        MemoryWriter(model, backend="cuda")
    with pytest.raises(ValueError, match="write_head"):
        MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), write_head=torch.zeros(5, 3)).write(
            torch.randint(0, VOCAB, (1, 3))
        )


def test_mask_with_padding_ids_out_of_vocab_is_fine(model):
    ids = torch.tensor([[3, 4, 5, -100], [7, -100, -100, -100]])
    mask = (ids >= 0).long()
    result = _write(model, ids, mask)
    assert torch.isfinite(result.memory).all()


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("GRADMEM_FAST_BACKEND", raising=False)
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert resolve_backend("auto") == expected
    assert resolve_backend("torch") == "torch"
    monkeypatch.setenv("GRADMEM_FAST_BACKEND", "torch")
    assert resolve_backend("auto") == "torch"
    assert resolve_backend("triton") == "triton"  # an explicit argument wins over the environment
    monkeypatch.setenv("GRADMEM_FAST_BACKEND", "jax")
    with pytest.raises(ValueError, match="GRADMEM_FAST_BACKEND"):
        resolve_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast")


def test_triton_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET and with triton already imported, a CPU triton backend explains itself."""
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None); import triton, torch\n"
        "from gradmem_fast.backend import resolve_backend\n"
        "try:\n    resolve_backend('triton', 'cpu')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert "ERR" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stdout + out.stderr


def test_public_names_resolve():
    for name in ["WriteConfig", "WriteResult", "MemoryWriter", "resolve_backend"]:
        assert getattr(gradmem_fast, name) is not None
    with pytest.raises(AttributeError):
        _ = gradmem_fast.not_a_name


def test_use_backend_scopes_auto(monkeypatch):
    from gradmem_fast.backend import use_backend

    monkeypatch.setenv("GRADMEM_FAST_BACKEND", "torch")
    with use_backend("triton"):
        assert resolve_backend("auto") == "triton"
        assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("auto"):
            pass
