"""The import graph of ``src/cliplab`` read from the source (AST), for tests of its direction.

Every ``import`` counts, also those inside functions or under ``TYPE_CHECKING``: a lazy import
still ties the two modules together; so does a registry string ``"cliplab.x.y:function"``. An edge goes to the most specific module that exists
(``from cliplab.data.shards import ShardLoader`` → ``cliplab.data.shards``; ``from cliplab.data
import shapes`` → ``cliplab.data.shapes``). A package's ``__init__`` is the package's module.

    python -m tests.import_graph            # prints every import cycle in src/cliplab
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
_REGISTRY_ENTRY = re.compile(r"^[A-Za-z_]\w*(\.\w+)+:\w+$")


def module_files(src: Path = SRC, package: str = "cliplab") -> dict[str, Path]:
    """Module name → file, for every ``.py`` file under ``src/package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC, package: str = "cliplab") -> dict[str, set[str]]:
    """Module → the package's modules it imports."""
    modules = module_files(src, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _REGISTRY_ENTRY.match(node.value):
                names = [node.value.partition(":")[0]]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in names:
                if target == package or target.startswith(package + "."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name:
                        targets.add(resolved)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each holds a cycle),
    sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


if __name__ == "__main__":
    found = cycles(import_graph())
    for component in found:
        print("cycle among:", ", ".join(component))
    print(f"{len(found)} import cycle(s) in {SRC / 'cliplab'}")
    sys.exit(1 if found else 0)
