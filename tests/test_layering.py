"""The package layout holds: imports go downward only and no module imports itself in a circle.

The graph (`tests/import_graph.py`) counts every import in ``src/cliplab``, also those inside
functions, under ``TYPE_CHECKING`` and registry strings: a lazy import hides a circle, it does
not remove it.
"""

from __future__ import annotations

from tests.import_graph import SRC, cycles, import_graph

# lower layers never import higher ones (models ← data ← evaluate/train ← stages ← cli)
LAYERS = {
    "errors": 0, "config": 0, "runs": 0, "output_folder": 0, "output_lock": 0, "file_modes": 0,
    "extras": 0, "provenance": 0,
    "report_text": 0,
    "models": 1, "export": 1,
    "data": 2,
    "evaluate": 3, "train": 3,
    "adapt": 4, "merge": 4, "curate": 4, "serve": 4,
    "quickstart": 5, "cli": 6, "__main__": 6,
}
GRAPH = import_graph()


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else max(LAYERS.values())


def test_every_top_level_package_has_a_layer():
    top = SRC / "cliplab"
    names = {p.name.removesuffix(".py") for p in top.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py")
             or (p.is_dir() and (p / "__init__.py").exists())}
    assert names <= set(LAYERS), f"give these a layer in LAYERS: {sorted(names - set(LAYERS))}"


def test_imports_go_downward_only():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if layer(b) > layer(a))
    assert upward == []


def test_no_import_circles():
    assert cycles(GRAPH) == []


def test_the_checker_finds_lazy_and_registry_circles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import A\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("REG = {'x': 'pkg.d:run'}\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.a"} and graph["pkg.c"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.c", "pkg.d"], ["pkg.sub.a", "pkg.sub.b"]]


def test_curate_never_imports_serve():
    """curate and serve are siblings: both read `data.collection`; neither reaches into the other."""
    def top(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    crossing = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                      if {top(a), top(b)} == {"curate", "serve"})
    assert crossing == []
