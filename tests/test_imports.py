"""Imports point one way and never in a circle, read from the source with ``ast`` (nothing is
imported). The direction is CONTRIBUTING.md's table, :data:`MAY_IMPORT` below.

Every import of a module of the repository counts: absolute (``server.…``, ``compressors.…``) and
relative ones, at module level, under ``if TYPE_CHECKING:`` and inside functions. A cycle that only
works because one side imports late (in a function, or for type checking only) is still a cycle: the
two modules cannot be understood, tested or split apart one without the other.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def repo_module(name: str) -> bool:
    """Is ``name`` a module or package of the repository?"""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_modules(package: str) -> dict[str, Path]:
    """The package's modules (subpackages included), by dotted name."""
    base = ROOT.joinpath(*package.split("."))
    return {module_name(path): path for path in sorted(base.rglob("*.py"))}


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` statement names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def type_checking_test(node: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(node, ast.Name) and node.id == "TYPE_CHECKING") or (
        isinstance(node, ast.Attribute) and node.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path) -> list[tuple[str, str]]:
    """(repository module, where) for every import in the file, wherever it stands; ``where`` is
    its line and, when it is not at module level, "in a function" or "TYPE_CHECKING"."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            where = f"line {node.lineno}" + (f", {context}" if context else "")
            if isinstance(node, ast.Import):
                found.extend((alias.name, where) for alias in node.names)
            else:
                source = resolve_from(module, is_package, node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    # `from pkg import mod` imports the submodule; `from pkg import name` the package itself
                    found.append((submodule if repo_module(submodule) else source, where))
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            context = "in a function"
        if isinstance(node, ast.If) and type_checking_test(node.test):
            for child in node.body:
                visit(child, context or "TYPE_CHECKING")
            for child in node.orelse:
                visit(child, context)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, context)

    visit(tree, "")
    return [(name, where) for name, where in found if name and repo_module(name)]


def import_graph(package: str) -> dict[str, dict[str, str]]:
    """For each module of the package, the modules of the same package it imports (and where)."""
    modules = package_modules(package)
    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for name, path in modules.items():
        for target, where in imports_of(name, path):
            if target in graph and target != name:
                graph[name].setdefault(target, where)
    return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan's algorithm, then a path
    search inside the component), each as ``[a, b, …, a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first from start back to start, inside the component: a shortest cycle through it
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for target in sorted(graph[node]):
                    if target not in members:
                        continue
                    if target == start:
                        found = node
                        break
                    if target not in previous:
                        previous[target] = node
                        following.append(target)
                if found is not None:
                    break
            frontier = following
        assert found is not None
        chain = [found]
        while chain[-1] != start:
            chain.append(previous[chain[-1]])
        cycles.append([start, *reversed(chain[:-1]), start])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = [f"{a} ({graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The walk finds relative, absolute, TYPE_CHECKING and function-level imports."""
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import scheduler\n"
        "from .types import GenerationRequest\n"
        "import server.engine.base\n"
        "if TYPE_CHECKING:\n"
        "    from server.engine.runner import ModelRunner\n"
        "def f():\n"
        "    from ..engine import sequence\n"
        "    from contract.protocol import CompressionInfo\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert sorted(imports_of("server.engine.probe", path)) == [
        ("contract.protocol", "line 10, in a function"),
        ("server.engine.base", "line 5"),
        ("server.engine.runner", "line 7, TYPE_CHECKING"),
        ("server.engine.scheduler", "line 3"),
        ("server.engine.sequence", "line 9, in a function"),
        ("server.engine.types", "line 4"),
    ]


def test_cycles_are_found_and_shown_as_a_chain() -> None:
    graph = {"a": {"b": "line 1"}, "b": {"c": "line 2"}, "c": {"a": "line 3", "d": "line 4"}, "d": {}}
    cycles = find_cycles(graph)
    assert cycles == [["a", "b", "c", "a"]]
    assert describe(cycles[0], graph) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert find_cycles({"a": {"b": "line 1"}, "b": {}}) == []


@pytest.mark.parametrize("package", ["server.engine", "compressors"])
def test_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 3, f"{package}: found only {sorted(graph)}"
    assert any(graph.values()), f"{package}: no imports between its modules were found"
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles in {package}:\n" + "\n".join(describe(c, graph) for c in cycles)


# ---- the direction (CONTRIBUTING.md, "Layout and the way imports point") --------------------
PACKAGES = ("contract", "compressors", "server", "clients", "evals", "bench", "cli", "scripts")
# top-level package -> the packages it may import. ``cli`` is the composition root: it may import
# every layer and nothing imports it. evals and bench run the engine in-process, so they sit
# above server; the SDK (clients) sees only the contract.
MAY_IMPORT: dict[str, set[str]] = {
    "contract": {"contract"},
    "compressors": {"compressors"},
    "server": {"server", "compressors", "contract"},
    "clients": {"clients", "contract"},
    "evals": {"evals", "contract", "compressors", "server"},
    "bench": {"bench", "evals", "clients", "server", "compressors", "contract"},
    "scripts": {"scripts", "evals", "clients", "server", "compressors", "contract"},
    "cli": set(PACKAGES) - {"scripts"},
}
# Inside server: the engine never imports the web layer.
WEB_LAYER = ("server.app", "server.routes", "server.openapi", "server.errors", "server.guards", "server.viewer")


def tree_imports() -> dict[str, dict[str, str]]:
    """Every module of the tree -> the repository modules it imports (and where)."""
    graph: dict[str, dict[str, str]] = {}
    for package in PACKAGES:
        for name, path in package_modules(package).items():
            graph[name] = {}
            for target, where in imports_of(name, path):
                if target != name:
                    graph[name].setdefault(target, where)
    return graph


def top(module: str) -> str:
    return module.split(".")[0]


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def wrong_arrows(graph: dict[str, dict[str, str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(graph.items()):
        for target, where in sorted(targets.items()):
            if top(target) not in MAY_IMPORT[top(source)]:
                wrong.append(
                    f"{source} ({where}) imports {target}: {top(source)} may import {sorted(MAY_IMPORT[top(source)])}"
                )
            elif within(source, ("server.engine",)) and within(target, WEB_LAYER):
                wrong.append(f"{source} ({where}) imports {target}: the engine never imports the web layer")
    return wrong


def test_the_direction_check_finds_an_upward_arrow() -> None:
    graph = {
        "clients.sdk": {"server.protocol": "line 3"},
        "server.engine.hf": {"server.routes.chat": "line 9, in a function"},
        "server.routes.chat": {"server.engine.hf": "line 2"},
        "cli.main": {"evals.runner": "line 1"},
    }
    assert wrong_arrows(graph) == [
        "clients.sdk (line 3) imports server.protocol: clients may import ['clients', 'contract']",
        "server.engine.hf (line 9, in a function) imports server.routes.chat: the engine never imports the web layer",
    ]


def test_imports_point_one_way() -> None:
    graph = tree_imports()
    assert {top(name) for name in graph} == set(PACKAGES)
    wrong = wrong_arrows(graph)
    assert not wrong, "imports against the documented direction:\n" + "\n".join(wrong)


def test_nothing_imports_the_composition_root() -> None:
    graph = tree_imports()
    importers = [
        f"{source} ({where})"
        for source, targets in graph.items()
        if top(source) != "cli"
        for target, where in targets.items()
        if top(target) == "cli"
    ]
    assert not importers, importers


def test_no_import_cycle_across_the_tree() -> None:
    graph = tree_imports()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)
