"""No import cycles in src/: a cycle marks a seam in the wrong place (issue 24).

The graph is built from the code with `ast`, not by importing it, so every import counts:
at module level, inside functions, and under `TYPE_CHECKING` (a type-only import is still a
dependency that a seam should have cut). Its nodes are the modules of src/, a package being
its `__init__`; an edge A -> B means that running A runs (or needs) B:

- `import a.b.c` and `from a.b.c import x` depend on `a.b.c`; `from a.b import c` depends on
  the submodule `a.b.c` when there is one, else on `a.b` itself (a name of its `__init__`).
- Importing `a.b.c` also runs the `__init__` of `a` and `a.b`, unless the importer is inside
  that package: Python runs a package's `__init__` before any of its submodules, so from
  inside it is already running (importing a sibling runs nothing more), while from outside
  it runs now, with all that it imports.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BRIDGE = ROOT / "clients" / "python" / "src"  # listeners-bridge, which the service imports

Graph = dict[str, dict[str, str]]  # module -> {module it imports: where, "file:line"}


def modules(root: Path) -> dict[str, Path]:
    """Every module under `root` by dotted name; a package by its `__init__.py`."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(part.isidentifier() for part in parts):
            found[".".join(parts)] = path
    return found


def import_graph(*roots: Path) -> Graph:
    known = {name: path for root in roots for name, path in modules(root).items()}
    graph: Graph = {}
    for name, path in known.items():
        root = next(r for r in roots if path.is_relative_to(r))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for target, line in imported(path, package, known):
            where = f"{path.relative_to(root)}:{line}"
            for dependency in runs(name, target, known):
                edges.setdefault(dependency, where)
    return graph


def imported(path: Path, package: str, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The modules of `known` that the file's import statements name, with their lines."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                yield (submodule if submodule in known else module), node.lineno


def runs(importer: str, target: str, known: dict[str, Path]) -> list[str]:
    """What importing `target` from `importer` runs or needs, among the modules of src/."""
    parts = target.split(".")
    while parts and ".".join(parts) not in known:  # `a.b.name`: a name of `a.b`, or not ours
        parts.pop()
    if not parts:
        return []  # outside src/ (the standard library, a dependency)
    target = ".".join(parts)
    own_packages = {importer, *(importer.rsplit(".", n)[0] for n in range(1, importer.count(".") + 1))}
    ancestors = [".".join(parts[:n]) for n in range(1, len(parts))]
    ran = [a for a in ancestors if a in known and a not in own_packages]
    return [*ran, target] if target != importer else ran


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan),
    as the modules in import order, the first repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth: the longest import chain, a few dozen
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (by name), by breadth-first search."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt in component and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def describe(graph: Graph, cycle: list[str]) -> str:
    steps = [f"  {a} -> {b}  ({graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return "\n".join([" -> ".join(cycle), *steps])


def test_src_has_no_import_cycles() -> None:
    graph = import_graph(SRC, BRIDGE)
    assert "listeners.source.listen.stream" in graph and "listeners_testkit" in graph  # it read src/
    assert "listeners_bridge.consumer" in graph
    found = cycles(graph)
    assert not found, "import cycles in src/:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_bridge_imports_nothing_of_the_service() -> None:
    """listeners-bridge installs alone (issue 29): the service imports it, never the reverse."""
    graph = import_graph(SRC, BRIDGE)
    reaching = {
        f"{module} -> {target} ({where})"
        for module, edges in graph.items()
        if module.startswith("listeners_bridge")
        for target, where in edges.items()
        if not target.startswith("listeners_bridge")
    }
    assert not reaching, reaching


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_checker_finds_two_modules_that_import_each_other(tmp_path: Path) -> None:
    """Each way of importing counts: relative, inside a function, under TYPE_CHECKING."""
    write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "def f():\n    from pkg.a import x\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
            "pkg/d.py": "from pkg import c\n",
            "pkg/e.py": "import pkg.a, json\n",  # into a cycle, not in one
        },
    )
    graph = import_graph(tmp_path)
    found = sorted(cycles(graph))
    assert found == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]]
    assert "pkg/b.py:2" in describe(graph, found[0])  # where each step of the cycle is


def test_the_checker_finds_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    """`lib.tool` imports `app.util`, a module that imports nothing, but importing it from
    outside `app` runs `app/__init__`, which imports `app.core`, which imports `lib.tool`."""
    write(
        tmp_path,
        {
            "app/__init__.py": "from app.core import Core\n",
            "app/core.py": "from lib.tool import tool\nfrom app import util\nclass Core: ...\n",
            "app/util.py": "",
            "lib/__init__.py": "",
            "lib/tool.py": "from app.util import helper\n",
        },
    )
    assert cycles(import_graph(tmp_path)) == [["app", "app.core", "lib.tool", "app"]]


def test_the_checker_lets_a_package_init_re_export_its_modules(tmp_path: Path) -> None:
    """The usual layout is no cycle: an `__init__` re-exports its submodules, which import
    each other (running nothing more: their package is already running)."""
    write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.top import Top\nfrom pkg import low\n",
            "pkg/top.py": "from pkg.low import Low\nfrom pkg import low\n",
            "pkg/low.py": "import os\n",
            "user.py": "from pkg import Top\nfrom pkg.low import Low\n",
        },
    )
    graph = import_graph(tmp_path)
    assert cycles(graph) == []
    assert set(graph["user"]) == {"pkg", "pkg.low"}
    assert set(graph["pkg.top"]) == {"pkg.low"}
