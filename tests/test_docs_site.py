"""The documentation site's contract, checked without building it (make test runs ``mkdocs build --strict``):

* the API reference covers every name of ``gradmem_fast.__all__`` and documents nothing by a module path (the
  modules will be regrouped; public names stay);
* every page is in the navigation, and every generator marker of docs/hooks.py resolves: the command-line
  reference holds each subcommand's own ``format_help()`` (generated, not copied), the kernel formulas are the
  kernel modules' docstrings.
"""

import importlib.util
import re
from pathlib import Path

import pytest

import gradmem_fast

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^::: (\S+)", re.MULTILINE)
PUBLIC_REF = re.compile(r"\bgradmem_fast\.([A-Za-z_][\w.]*)")


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.on_config(None)
    return module


def pages():
    return sorted(DOCS.glob("**/*.md"))


def test_reference_covers_all():
    """Each public name has its ``::: gradmem_fast.NAME`` block; no block names anything else."""
    documented = [m for p in pages() for m in DIRECTIVE.findall(p.read_text(encoding="utf-8"))]
    assert documented, "no mkdocstrings directive found"
    names = [d.removeprefix("gradmem_fast.") for d in documented]
    assert all(d.startswith("gradmem_fast.") for d in documented), documented
    missing = sorted(set(gradmem_fast.__all__) - set(names))
    assert not missing, f"public names missing from the API reference: {missing}"
    extra = sorted(set(names) - set(gradmem_fast.__all__))
    assert not extra, f"API reference blocks for non-public (module path) names: {extra}"
    assert len(names) == len(set(names)), "a name is documented twice"


def test_anchors_name_public_objects():
    """Links into the reference (``reference.md#gradmem_fast.X``) name public objects."""
    for page in pages():
        for name in re.findall(r"reference\.md#gradmem_fast\.([\w.]+)", page.read_text(encoding="utf-8")):
            assert name.split(".")[0] in gradmem_fast.__all__, f"{page.name}: link to non-public {name}"


def test_every_page_in_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in pages():
        rel = page.relative_to(DOCS).as_posix()
        assert f": {rel}" in nav, f"{rel} is not in mkdocs.yml's nav"


def test_markers_resolve(hooks):
    for page in pages():
        for kind, arg in hooks.MARKER.findall(page.read_text(encoding="utf-8")):
            assert kind in ("cli", "help", "kernel", "include"), f"{page.name}: unknown marker {kind}"
            if kind == "kernel":
                assert hooks.kernel_docstring(arg).strip()
            elif kind in ("help", "include"):
                assert (ROOT / arg).is_file(), f"{page.name}: {arg} does not exist"


def test_cli_reference_is_the_parsers_help(hooks):
    """The generated page holds every subcommand's own help text, so a new flag shows up without an edit."""
    module = hooks._cli_module()
    parser = module.build_parser()
    subs = hooks._subcommands(parser)
    assert {"write", "read", "capacity", "demo"} <= set(subs)
    page = hooks.cli_reference()
    for name, sub in subs.items():
        assert f"### `gradmem-fast {name}`" in page
        assert sub.format_help().strip() in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, f"{name} {flag} missing from the generated reference"


def test_kernel_formulas_come_from_docstrings(hooks):
    text = hooks.kernel_docstring("update")
    assert "SGD:  M_b = M_b - lr_b * g_b" in text
    assert not re.search(r"(?<!`)``(?!`)", text), "an RST ``code`` span was left unconverted"
    # a ``::`` literal block becomes a fenced block, its lines unchanged
    bwd = hooks.kernel_docstring("attention_bwd")
    assert "```text\ndelta_i = sum_d dO_id O_id" in bwd


def test_include_rewrites_links(hooks, tmp_path):
    """Repository images become published copies; other relative links become code spans (no broken links)."""
    out = hooks.include("examples/README.md", depth=0)
    assert "](repo/examples/results/kv_curves.png)" in out
    assert out.startswith("## ")  # headings demoted below the page's own title


def test_readme_links_exist():
    """README.md's relative links (to the docs pages, FAMILIES.md, result files) point at files of the tree."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:|^#", target):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
