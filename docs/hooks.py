"""MkDocs hooks: the generated parts of the documentation site (mkdocs.yml lists this file under ``hooks``).

A page asks for generated text with an HTML comment on a line of its own; the comment is replaced at build time:

* ``<!-- gen:cli -->``: the command-line reference, each ``gradmem-fast`` subcommand's ``format_help()`` from the
  argparse parser itself (found through the ``gradmem-fast`` console-script entry point), so it cannot drift;
* ``<!-- gen:help PATH -->``: the ``--help`` text of a script of the repository (``parse_args(["--help"])`` or
  ``main(["--help"])``), e.g. ``examples/train_kv_retrieval.py``;
* ``<!-- gen:kernel NAME -->``: the module docstring (the formulas) of kernel module ``NAME`` of the installed
  ``gradmem_fast.kernels`` package, read from its source without importing Triton;
* ``<!-- gen:include PATH -->``: a repository file (e.g. ``FAMILIES.md``), headings demoted one level, its
  relative links rewritten to the copies of repository images this hook publishes or, for other files, turned
  into code spans (the site holds only ``docs/`` and those images).

An unknown marker, a missing file or a parser that cannot be found fails the build (``mkdocs build --strict``
turns the hook's errors into a failed build too).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import posixpath
import re
import sys
import textwrap

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET_DIRS = ("benchmarks/results", "examples/results")  # repository images published under repo/
ASSET_PREFIX = "repo"
MARKER = re.compile(r"^<!-- gen:(\w+)(?: (\S+))? -->$", re.MULTILINE)
HELP_WIDTH = "100"


def on_config(config):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps help at $COLUMNS: a fixed width, the same page everywhere
    return config


def on_files(files, config):
    """Publish the repository's result images under ``repo/<path>`` so pages can show them."""
    for folder in ASSET_DIRS:
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(names):
                if name.endswith(".png"):
                    path = os.path.join(dirpath, name)
                    uri = posixpath.join(ASSET_PREFIX, os.path.relpath(path, ROOT).replace(os.sep, "/"))
                    files.append(File.generated(config, uri, abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")

    def replace(match):
        kind, arg = match.group(1), match.group(2)
        if kind == "cli":
            return cli_reference()
        if kind == "help":
            return fenced(script_help(arg))
        if kind == "kernel":
            return kernel_docstring(arg)
        if kind == "include":
            return include(arg, depth)
        raise ValueError(f"{page.file.src_uri}: unknown generator marker gen:{kind}")

    return MARKER.sub(replace, markdown)


def fenced(text: str, lang: str = "text") -> str:
    return f"```{lang}\n{text.rstrip()}\n```\n"


# --- the command line -----------------------------------------------------------------------------------------


def _cli_module():
    """The module of the ``gradmem-fast`` console script (setup.py's entry point), which builds the parser."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="console_scripts") if ep.name == "gradmem-fast"]
    target = found[0].value.split(":")[0] if found else "gradmem_fast.cli"
    module = importlib.import_module(target)
    if not hasattr(module, "build_parser"):
        raise RuntimeError(f"docs/hooks.py: {target} (the gradmem-fast entry point) has no build_parser()")
    return module


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:  # argparse keeps subparsers as one action; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    parser = _cli_module().build_parser()
    subs = _subcommands(parser)
    if not subs:
        raise RuntimeError("docs/hooks.py: the gradmem-fast parser has no subcommands")
    out = ["### `gradmem-fast`\n", fenced(parser.format_help())]
    for name, sub in subs.items():
        out += [f"### `gradmem-fast {name}`\n", fenced(sub.format_help())]
    return "\n".join(out)


def script_help(path: str) -> str:
    """The ``--help`` output of a repository script that has ``parse_args(argv)`` or ``main(argv)``."""
    full = os.path.join(ROOT, path)
    spec = importlib.util.spec_from_file_location("_docs_" + re.sub(r"\W", "_", path), full)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"docs/hooks.py: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "parse_args", None) or module.main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        entry(["--help"])
    text = buf.getvalue()
    if "usage:" not in text:
        raise RuntimeError(f"docs/hooks.py: {path} --help printed no usage")
    return text


# --- kernels --------------------------------------------------------------------------------------------------


def _kernels_dir() -> str:
    spec = importlib.util.find_spec("gradmem_fast.kernels")  # imports gradmem_fast (cheap), not Triton
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("docs/hooks.py: gradmem_fast.kernels not found")
    return list(spec.submodule_search_locations)[0]


def kernel_docstring(name: str) -> str:
    path = os.path.join(_kernels_dir(), f"{name}.py")
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    if not doc:
        raise RuntimeError(f"docs/hooks.py: kernel module {name} has no docstring")
    return rst_to_markdown(doc)


def rst_to_markdown(doc: str) -> str:
    """The little reStructuredText our docstrings use: ````code```` spans and ``::`` literal blocks."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            if head:
                out.append(_spans(head) + ":")
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", fenced(textwrap.dedent("\n".join(block)).strip("\n")).rstrip("\n"), ""]
            continue
        if line.rstrip().endswith(":") and i + 1 < len(lines) and lines[i + 1].startswith("  "):
            # a heading line followed directly by an indented table ("Kernels:\n  name  what"): keep its layout
            out.append(_spans(line))
            block = []
            i += 1
            while i < len(lines) and lines[i].startswith("  "):
                block.append(lines[i].replace("``", ""))
                i += 1
            out += ["", fenced(textwrap.dedent("\n".join(block))).rstrip("\n"), ""]
            continue
        if line.startswith("    ") and out and not out[-1].strip():  # an indented formula block after ':'
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += [fenced(textwrap.dedent("\n".join(block))).rstrip("\n"), ""]
            continue
        out.append(_spans(line))
        i += 1
    return "\n".join(out) + "\n"


def _spans(text: str) -> str:
    return re.sub(r"``(.+?)``", r"`\1`", text)


# --- repository files -----------------------------------------------------------------------------------------

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def include(path: str, depth: int) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    base = posixpath.dirname(path)
    up = "../" * depth

    def relink(match):
        bang, label, target = match.groups()
        if re.match(r"^[a-z]+:|^#", target):
            return match.group(0)
        repo_path = posixpath.normpath(posixpath.join(base, target))
        if repo_path.endswith(".png") and repo_path.startswith(ASSET_DIRS):
            return f"{bang}[{label}]({up}{ASSET_PREFIX}/{repo_path})"
        return f"{label} (`{repo_path}`)" if label else f"`{repo_path}`"

    out, in_fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            if line.startswith("#"):
                line = "#" + line
            line = LINK.sub(relink, line)
        out.append(line)
    return "\n".join(out) + "\n"
