"""No import circles in cliplab (imports anywhere in a file count, TYPE_CHECKING ones too:
a circle hidden behind TYPE_CHECKING is still two modules that need each other)."""

import ast
from pathlib import Path

import cliplab

SRC = Path(cliplab.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the cliplab modules it imports, for every module of ``package``."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        if not (name == package or name.startswith(package + ".")):
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("cliplab")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cliplab"):
                for alias in node.names:  # `from cliplab.train import fsdp` names a module
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = targets & set(modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules of ``graph`` (as a path), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_train_has_no_import_circles():
    graph = import_graph("cliplab.train")
    assert "cliplab.train.step_inputs" in graph and "cliplab.train.objectives" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_src_has_no_import_circles():
    graph = import_graph("cliplab")
    assert len(graph) > 50
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
