"""Every ```python block of README.md and docs/*.md runs (the documented examples cannot rot).

The blocks of one file run top to bottom in one namespace, as a reader copies them. Where a block loads a Hub
model or tokenizer by name (``AutoModelForCausalLM.from_pretrained("gpt2")``, ``AutoTokenizer.from_pretrained``),
the loaders are replaced by the tiny local Llama-style model and word-level tokenizer of ``tiny_local`` (random
weights, offline, seconds): the documented substitution (docs/contributing.md, "The docs"). A block that cannot
run on a CPU starts with ``# docs: needs a GPU (<why>)`` and is skipped; ``test_gpu_markers_are_rare`` keeps
that marker rare and explained.
"""

import re
from pathlib import Path

import pytest
import torch
import transformers

from tiny_local import save_tiny

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
GPU_MARKER = re.compile(r"^# docs: needs a GPU \((.+)\)$")
MAX_GPU_BLOCKS = 2


def python_blocks(path: Path) -> list:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def needs_gpu(block: str) -> bool:
    return block.lstrip().startswith("# docs: needs a GPU")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("docs_tiny")))


@pytest.fixture
def hub_stand_in(monkeypatch, tiny_dir):
    """Any name given to the Auto loaders loads the tiny local model / tokenizer instead (keyword arguments such
    as ``attn_implementation`` pass through)."""
    model_loader = transformers.AutoModelForCausalLM.from_pretrained
    tok_loader = transformers.AutoTokenizer.from_pretrained

    def model_from_pretrained(name, *args, **kwargs):
        return model_loader(tiny_dir, *args, **kwargs)

    def tok_from_pretrained(name, *args, **kwargs):
        tok = tok_loader(tiny_dir, *args, **kwargs)
        tok.model_input_names = ["input_ids", "attention_mask"]  # as GPT-2's: no token_type_ids
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from_pretrained)


def test_blocks_found():
    """The extraction sees the examples (a changed fence style would silently test nothing)."""
    counts = {p.relative_to(ROOT).as_posix(): len(python_blocks(p)) for p in FILES}
    assert counts["README.md"] >= 4, counts
    assert sum(counts.values()) >= 12, counts


def test_gpu_markers_are_rare():
    """Skipped blocks are few and each says why (the marker must carry a reason in parentheses)."""
    marked = []
    for path in FILES:
        for block in python_blocks(path):
            first = block.lstrip().splitlines()[0]
            if first.startswith("# docs:"):
                match = GPU_MARKER.match(first)
                assert match and len(match.group(1)) >= 10, f"{path.name}: marker without a reason: {first!r}"
                marked.append(path.name)
    assert len(marked) <= MAX_GPU_BLOCKS, f"too many blocks skipped on CPU: {marked}"


@pytest.mark.parametrize("path", [p for p in FILES if python_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path, hub_stand_in, capsys):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = {"__name__": "__docs__"}
    try:
        for i, block in enumerate(python_blocks(path)):
            if needs_gpu(block):
                continue
            code = compile(block, f"{path.name}[python block {i + 1}]", "exec")
            exec(code, namespace)  # noqa: S102 (the documentation's own examples)
    finally:
        torch.set_num_threads(threads)
