"""Every ```python block of README.md and docs/*.md runs (the documented examples cannot rot).

The blocks of one file run top to bottom in one namespace, as a reader copies them. Where a block loads a Hub
model or tokenizer by name (``AutoModelForCausalLM.from_pretrained("gpt2")``, ``AutoTokenizer.from_pretrained``),
the loaders are replaced by the tiny local Llama-style model and word-level tokenizer of ``tiny_local`` (random
weights, offline, seconds): the documented substitution (docs/contributing.md, "The docs"). A block that cannot
run on a CPU starts with ``# docs: needs a GPU (<why>)`` and is skipped; ``test_gpu_markers_are_rare`` keeps
that marker rare and explained.
"""

import os
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
    environ = dict(os.environ)  # a block may set torchrun's variables (the DDP example): not for later tests
    try:
        for i, block in enumerate(python_blocks(path)):
            if needs_gpu(block):
                continue
            code = compile(block, f"{path.name}[python block {i + 1}]", "exec")
            exec(code, namespace)  # noqa: S102 (the documentation's own examples)
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


# --- command lines -----------------------------------------------------------------------------------------------

SHELL_BLOCK = re.compile(r"^```(?:bash|sh|console)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
RUNNABLE = ("write", "read", "capacity")


def shell_commands(path: Path) -> list:
    """``gradmem-fast ...`` command lines of the file's shell blocks (continuations joined), each with the
    comment lines right below it (they list more of its flags)."""
    out = []
    for block in SHELL_BLOCK.findall(path.read_text(encoding="utf-8")):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            words = line.split()
            if "gradmem-fast" in words or "gradmem_fast" in words:
                at = words.index("gradmem-fast" if "gradmem-fast" in words else "gradmem_fast")
                comments = []
                for nxt in lines[i + 1 :]:
                    if not nxt.lstrip().startswith("#"):
                        break
                    comments.append(nxt)
                out.append((line.split("#")[0].split()[at + 1 :], line + "\n" + "\n".join(comments)))
    return out


def _cli():
    """The ``gradmem-fast`` console script's module (setup.py's entry point), as docs/hooks.py finds it."""
    import importlib

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks._cli_module(), hooks


def test_documented_flags_exist():
    """Every ``--flag`` a documented command line (or the comment lines under it) names is a flag of that
    subcommand's parser: a renamed or removed flag fails here, not in a reader's terminal."""
    cli, hooks = _cli()
    subs = hooks._subcommands(cli.build_parser())
    checked = 0
    for path in FILES:
        for argv, text in shell_commands(path):
            if not argv or argv[0] not in subs:
                continue
            known = {s for a in subs[argv[0]]._actions for s in a.option_strings}
            own = text.split(argv[0], 1)[1]  # flags after the subcommand (torchrun's come before it)
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", own):
                assert flag in known, f"{path.name}: `gradmem-fast {argv[0]}` has no flag {flag}: {text.strip()}"
                checked += 1
    assert checked >= 20


TEXTS = ["the cat sat on a mat", "a dog ran in the park", "the old boy saw a red bird"]


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if any(a and a[0] in RUNNABLE and "..." not in a for a, _ in shell_commands(p))],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_command_lines_run(path, tiny_dir, tmp_path, monkeypatch):
    """The file's complete ``gradmem-fast write/read/capacity`` lines run in order in one folder, on the tiny
    local model standing in for ``--model`` and small input files under the documented names."""
    import json

    cli, _ = _cli()
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"id": str(i), "text": t}) for i, t in enumerate(TEXTS)]
    for name in ("docs.jsonl", "texts.jsonl"):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    queries = [{"id": "0", "text": "the cat"}, {"id": "1", "text": ""}]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    torch.set_num_threads(1)
    ran = 0
    commands = [a for a, _ in shell_commands(path) if a and a[0] in RUNNABLE and "..." not in a]
    if commands[0][0] == "read":  # a page that reads without writing first reads the memories written here
        cli.main(
            ["write", "--model", tiny_dir, "--input", "docs.jsonl", "--output", "memories.safetensors"]
            + ["--steps", "5", "--quiet"]
        )
    for argv, _ in shell_commands(path):
        if not argv or argv[0] not in RUNNABLE or "..." in argv:
            continue
        argv = list(argv)
        argv[argv.index("--model") + 1] = tiny_dir
        if argv[0] == "capacity":
            argv += ["--max-steps", "20"]  # a random tiny model learns nothing: keep the failing stage short
        if argv[0] == "write":
            argv += ["--steps", "20"]
        assert cli.main(argv + ["--quiet"]) == 0, argv
        ran += 1
    assert ran
