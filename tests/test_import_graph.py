"""The import graph of python/heron and python/heron_kernels, read from the source with ast: no import
cycle between modules (imports inside functions count: a lazy import only hides a cycle), no private
name (`_name`) imported from or read off another module, and the profiling presets (which build whole
models) imported only by the profiling and command-line layers."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "python" / "heron", ROOT / "python" / "heron_kernels")


@dataclass
class ImportGraph:
    """modules: dotted name -> file; edges: module -> the modules importing it runs; private: the
    (module, what it reaches for) pairs that cross into another module's private names."""

    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    private: list[tuple[str, str]] = field(default_factory=list)


def module_files(packages: tuple[Path, ...] = PACKAGES) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted(package.rglob("*.py")):
            parts = list(path.relative_to(package.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(importer, path).split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, target: str, modules: dict[str, Path]) -> set[str]:
    """The modules that importing `target` runs: target itself and each package above it, except
    the packages the importer sits in (those are already being imported)."""
    found = set()
    parts = target.split(".")
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        if name in modules and not (importer == name or importer.startswith(name + ".")):
            found.add(name)
    return found


def build_graph(packages: tuple[Path, ...] = PACKAGES) -> ImportGraph:
    graph = ImportGraph(module_files(packages))
    modules = graph.modules
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = graph.edges.setdefault(module, set())
        aliases: dict[str, str] = {}  # local name -> heron module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= _targets(module, alias.name, modules)
                    if alias.name in modules:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                            alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    if child in modules:
                        edges |= _targets(module, child, modules)
                        aliases[alias.asname or alias.name] = child
                    elif source in modules:
                        edges |= _targets(module, source, modules)
                        if _is_private(alias.name) and source != module:
                            graph.private.append((module, f"from {source} import {alias.name}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _is_private(node.attr) and aliases[node.value.id] != module
                    and f"{aliases[node.value.id]}.{node.attr}" not in modules):
                graph.private.append((module, f"{aliases[node.value.id]}.{node.attr}"))
        edges.discard(module)
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(build_graph().edges) == []


def test_no_private_names_cross_modules():
    assert build_graph().private == []


def test_profiling_presets_are_imported_by_profiling_and_the_cli_only():
    """heron.profiling.presets builds whole models (ResNet-18, GPT-2 Medium): the engine and the Flower
    app must not pull it in."""
    importers = {m for m, targets in build_graph().edges.items() if "heron.profiling.presets" in targets}
    assert all(m.startswith(("heron.profiling", "heron.cli")) for m in importers), importers


def test_the_checker_sees_cycles_lazy_imports_and_private_names(tmp_path):
    """The checks above on a made-up package: a cycle closed by an import inside a function, a private
    name imported from another module and one read off a module alias."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import helper\n\ndef f():\n    from pkg import c\n    return c._hidden\n")
    (package / "b.py").write_text("def helper():\n    from pkg.c import _hidden\n    return _hidden\n")
    (package / "c.py").write_text("import pkg.a\n_hidden = 1\n")
    graph = build_graph((package,))
    assert cycles(graph.edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert sorted(graph.private) == [("pkg.a", "pkg.c._hidden"), ("pkg.b", "from pkg.c import _hidden")]
