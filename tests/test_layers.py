"""The three floors of DESIGN.md, checked by reading every module's imports (ast, nothing is imported).

- ``kernels/`` is pure Triton: it imports nothing from ``gradmem_fast`` (it is installed *as*
  ``gradmem_fast.kernels``, so relative imports inside it are fine).
- ``gradmem_fast/ops/`` knows nothing of the engine, the writer, the reader, the command line or Hugging Face.
- No import cycles between the package's modules (function-local imports count: a cycle that only works
  because one side imports late is still a cycle a reader has to untangle).

A failure names the file, the line and the offending import.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "gradmem_fast"
OPS_FORBIDDEN = ("engine", "writer", "reader", "cli", "demo", "hf", "models", "fileio", "distributed")


def _module_name(path: pathlib.Path) -> str:
    """Dotted module name of a source file as installed (kernels/ becomes gradmem_fast.kernels)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = [PACKAGE] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_files():
    files = sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def imports_of(path: pathlib.Path):
    """(line, absolute dotted name) of every import in ``path``, relative imports resolved."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` / `from pkg import mod` may name submodules: record both spellings.
            found.append((node.lineno, target))
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


def _internal_graph():
    """module -> {imported package module: first line}, restricted to modules that exist in the tree."""
    files = {_module_name(f): f for f in _source_files()}
    graph = {}
    for name, path in files.items():
        edges = {}
        for line, target in imports_of(path):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE) and target != PACKAGE:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph, files


def test_import_reader_resolves_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a relative import two levels up resolves to the right absolute module."""
    assert _module_name(ROOT / "kernels" / "attention.py") == "gradmem_fast.kernels.attention"
    assert _module_name(ROOT / PACKAGE / "ops" / "__init__.py") == "gradmem_fast.ops"
    fake = ROOT / PACKAGE / "ops" / "probe_for_layer_test.py"
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self: "from ..engine import x\nfrom . import y\n")
    names = [t for _, t in imports_of(fake)]
    assert "gradmem_fast.engine" in names and "gradmem_fast.ops.y" in names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_from_the_package(path):
    bad = [
        (line, name)
        for line, name in imports_of(path)
        if name == PACKAGE or (name.startswith(PACKAGE + ".") and not name.startswith(PACKAGE + ".kernels"))
    ]
    assert not bad, "\n".join(f"{path.relative_to(ROOT)}:{line}: imports {name}" for line, name in bad)


@pytest.mark.parametrize("path", sorted((ROOT / PACKAGE / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_do_not_import_upper_floors(path):
    forbidden = tuple(f"{PACKAGE}.{name}" for name in OPS_FORBIDDEN) + ("transformers",)
    bad = [
        (line, name) for line, name in imports_of(path) if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, "\n".join(f"{path.relative_to(ROOT)}:{line}: imports {name}" for line, name in bad)


def _find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None. Iterative DFS, deterministic."""
    color = {}
    for start in sorted(graph):
        if color.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = 2
                stack.pop()
                path.pop()
                continue
            if color.get(child) == 1:
                return path[path.index(child) :] + [child]
            if not color.get(child):
                color[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"b": 1}}) is None


def test_no_import_cycles():
    graph, files = _internal_graph()
    # The package's __init__ only names its exports lazily (by string), so it has no edges; submodules
    # importing `from . import __version__` do not make a cycle through it.
    cycle = _find_cycle({name: {t: line for t, line in edges.items() if t != PACKAGE} for name, edges in graph.items()})
    if cycle:
        steps = [f"{files[a].relative_to(ROOT)}:{graph[a][b]}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n" + "\n".join(steps))
