"""Imports in src/cliplab go downward: no cycles through data/ or curate/, data/ below every
stage, and no stage below curation importing curate/."""

from tests.import_graph import cycles, import_graph

GRAPH = import_graph()


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_checker_finds_lazy_and_registry_cycles(tmp_path):
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


def test_no_import_cycle_through_data_or_curate():
    found = [c for c in cycles(GRAPH) if any(_in(m, "cliplab.data", "cliplab.curate") for m in c)]
    assert found == []


def test_data_imports_only_data_config_and_errors():
    wrong = {m: sorted(t for t in targets
                       if not _in(t, "cliplab.data", "cliplab.config", "cliplab.errors"))
             for m, targets in GRAPH.items() if _in(m, "cliplab.data")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_nothing_below_curation_imports_curate():
    below = ("cliplab.config", "cliplab.errors", "cliplab.models", "cliplab.data",
             "cliplab.evaluate", "cliplab.train")
    wrong = {m: sorted(t for t in targets if _in(t, "cliplab.curate"))
             for m, targets in GRAPH.items() if _in(m, *below)}
    assert {m: t for m, t in wrong.items() if t} == {}
