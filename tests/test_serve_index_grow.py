"""`cliplab index --add` to a trained (IVF) FAISS index adds only the new vectors: an --add of
1,000 items to a 100k index copied every vector twice (into a chunk, then into vectors.npy),
trained the quantizer again and added all 101k vectors again, the cost of a whole build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplab.serve import build as build_module
from cliplab.serve import faiss_build, faiss_index
from cliplab.serve.index import SearchIndex
from tests.serve_helpers import SHAPES, build, save_tiny_model
from tests.test_serve_index import Killed, _clustered, _files

BASE = {**SHAPES, "n": 200}
MORE = {**SHAPES, "n": 60, "seed": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _no_training(monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise AssertionError("build_faiss called: the FAISS index was trained again")

    monkeypatch.setattr(faiss_index, "build_faiss", refused)


def _record(folder) -> dict:
    return json.loads((folder / "index.json").read_text(encoding="utf-8"))


def test_an_add_to_an_ivf_index_adds_only_its_new_vectors(model_dir, tmp_path, monkeypatch,
                                                          capsys):
    """No training; the grown index searches as the old trained index filled with every vector
    anew; each added item is found by its own vector, under its own row."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out, index_type="IVF8,Flat")
    old = _record(out)["faiss"]
    _no_training(monkeypatch)
    record = build_module.build_index(
        {"model": str(model_dir), "data": MORE, "out": str(out), "add": True}, progress=True)
    assert "adding 60 vectors to the trained FAISS IVF8,Flat index of 200 (trained on 200)" \
        in capsys.readouterr().err
    assert record["count"] == 260 and record["faiss"]["type"] == "IVF8,Flat"
    assert record["faiss"]["trained_on"] == old["trained_on"] == 200
    assert record["faiss"]["value"] >= old["value"]
    monkeypatch.undo()

    index = SearchIndex(out)
    vectors = np.asarray(index.vectors)
    fresh = faiss_index.read_faiss(out / "faiss.index")
    fresh.reset()  # the same trained quantizer, emptied, then given every vector at once
    faiss_index.add_vectors(fresh, vectors)
    faiss_index.set_search_parameter(fresh, record["faiss"]["value"])
    queries = faiss_index.held_out_queries(vectors, count=50)
    for k in (1, 10, 40):
        grown, anew = index.search(queries, k), faiss_index.search(fresh, queries, k, 0, vectors)
        assert np.array_equal(grown[1], anew[1]) and np.allclose(grown[0], anew[0])
    added = range(200, 260)
    rows = index.items(added)
    keys = [rows[i]["key"] for i in added]
    assert all(key.endswith(f"shapes#{n}") for n, key in enumerate(keys))
    scores, ids = index.search(vectors[200:], 1)
    for i, (score, found) in zip(added, zip(scores[:, 0], ids[:, 0])):
        # rank 1 is the item itself (or an item of the very same vector, listed first)
        assert score == pytest.approx(1.0, abs=1e-5) and found <= i
        assert found == i or np.array_equal(vectors[found], vectors[i])
    assert sum(ids[:, 0] == np.arange(200, 260)) >= 55
    index.close()


def test_a_killed_add_leaves_the_old_index_serving_and_resumes(model_dir, tmp_path,
                                                               monkeypatch):
    """The old vectors reach the work folder as a hard link (no copy), and neither that nor
    the grown FAISS index changes a file of the old folder a server holds open."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out, index_type="IVF8,Flat")
    before = _files(out)
    serving = SearchIndex(out)
    query = np.asarray(serving.vectors[:5])
    answer = serving.search(query, 10)

    def die(*args, **kw):
        raise Killed

    monkeypatch.setattr(faiss_index, "write_faiss", die)  # after the vectors were added
    with pytest.raises(Killed):
        build(model_dir, MORE, out, add=True)
    monkeypatch.undo()
    chunk = out.with_name("idx.partial") / "chunks" / "000000.npy"
    assert chunk.stat().st_ino == (out / "vectors.npy").stat().st_ino
    assert _files(out) == before
    assert all(np.array_equal(a, b) for a, b in zip(serving.search(query, 10), answer))
    assert SearchIndex(out).count == 200

    _no_training(monkeypatch)
    assert build(model_dir, MORE, out, add=True)["count"] == 260  # resumed
    assert not out.with_name("idx.partial").exists() and SearchIndex(out).count == 260
    assert all(np.array_equal(a, b) for a, b in zip(serving.search(query, 10), answer))
    serving.close()


def test_an_index_is_trained_again_once_its_type_changes_or_it_doubles(model_dir, tmp_path,
                                                                      monkeypatch):
    """An IVF's list count follows the collection's size: a grown collection given another
    factory is built anew, as is one grown past twice what it was trained on."""
    out, built = tmp_path / "idx", []
    real = faiss_index.build_faiss
    monkeypatch.setattr(faiss_index, "build_faiss",
                        lambda vectors, factory: built.append(len(vectors)) or real(
                            vectors, factory))
    build(model_dir, BASE, out, index_type="IVF8,Flat")
    assert build(model_dir, {**MORE, "n": 200}, out, add=True)["faiss"]["trained_on"] == 200
    assert built == [200]  # 400 vectors: twice what it was trained on, no more
    assert build(model_dir, {**MORE, "n": 10, "seed": 5}, out,
                 add=True)["faiss"]["trained_on"] == 410
    assert built == [200, 410]
    # a named type whose list count grows with the collection: 16 lists up to 512 vectors
    build(model_dir, BASE, tmp_path / "named", index_type="ivf-flat")
    record = build(model_dir, {**MORE, "n": 400}, tmp_path / "named", add=True)
    assert record["faiss"]["type"] == "IVF32,Flat" and record["faiss"]["trained_on"] == 600
    assert built == [200, 410, 200, 600]


def test_an_add_to_a_flat_index_builds_it_anew_and_records_no_training(model_dir, tmp_path,
                                                                       monkeypatch):
    out, built = tmp_path / "idx", []
    real = faiss_index.build_faiss
    monkeypatch.setattr(faiss_index, "build_faiss",
                        lambda vectors, factory: built.append(factory) or real(vectors, factory))
    build(model_dir, BASE, out)
    record = build(model_dir, MORE, out, add=True)
    assert built == ["Flat", "Flat"] and "trained_on" not in record["faiss"]


def _old_ivf(count: int, value: int, target: float = 0.95) -> dict:
    """An --add's old index record of ``count`` vectors: IVF64, tuned breadth ``value``."""
    return {"backend": "faiss", "count": count,
            "faiss": {"type": "IVF64,Flat", "recall_target": target, "parameter": "nprobe",
                      "value": value, "trained_on": count}}


def test_a_breadth_the_grown_index_misses_the_target_at_is_widened(tmp_path, monkeypatch):
    vectors, old_file = _clustered(12_000, 16, 40), tmp_path / "faiss.index"
    faiss_index.write_faiss(faiss_index.build_faiss(vectors[:10_000], "IVF64,Flat"), old_file)
    _no_training(monkeypatch)
    said = []

    def grown(existing: dict) -> dict:
        return faiss_build.finished_faiss(vectors, "IVF64,Flat", 0.95, existing, old_file,
                                          lambda: None, said.append)[1]

    record = grown(_old_ivf(10_000, value=1))  # too narrow, as if far off the target now
    assert said == ["adding 2000 vectors to the trained FAISS IVF64,Flat index of 10000 "
                    "(trained on 10000)",
                    "checking its search breadth nprobe=1 at recall 0.95 (widened if short)"]
    assert record["value"] > 1 and record["recall"] >= 0.95 and record["trained_on"] == 10_000
    # one that reaches the target still is kept
    assert grown(_old_ivf(10_000, value=record["value"] * 2))["value"] == record["value"] * 2
    # another recall target: tuned from the narrowest
    assert grown(_old_ivf(10_000, value=64, target=0.5))["value"] == record["value"]
    assert said[-1] == "tuning its search breadth to recall 0.95"



def test_an_add_keeps_the_recall_target_the_index_was_tuned_to(model_dir, tmp_path,
                                                               monkeypatch):
    """An index tuned to recall 0.99 was tuned to 0.95 by an --add that did not repeat
    ``recall=`` (so the kept-breadth path was skipped), and an --add finding nothing new
    rebuilt it, as "another recall target" asked."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out, index_type="IVF8,Flat", recall=0.99)
    _no_training(monkeypatch)
    record = build(model_dir, MORE, out, add=True)
    assert record["faiss"]["recall_target"] == 0.99 and record["count"] == 260
    before = (out / "index.json").read_bytes()
    assert build(model_dir, MORE, out, add=True)["count"] == 260  # nothing new: left as it is
    assert (out / "index.json").read_bytes() == before
    monkeypatch.undo()
    assert build(model_dir, MORE, out, add=True, recall=0.9)["faiss"]["recall_target"] == 0.9


def test_a_kill_between_completing_and_cleaning_up_leaves_no_chunks_in_the_index(
        model_dir, tmp_path, monkeypatch):
    """Killed after progress.json went (the folder complete) but before chunks/ did, the next
    run put the folder in place with chunks/ in it: a second copy of the vectors, kept."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out)
    real = build_module.shutil.rmtree

    def die_on_chunks(path, *args, **kwargs):
        if str(path).endswith("chunks"):
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(build_module.shutil, "rmtree", die_on_chunks)
    with pytest.raises(Killed):
        build(model_dir, MORE, out, add=True)
    monkeypatch.undo()
    assert (out.with_name("idx.partial") / "chunks").is_dir()
    assert build(model_dir, MORE, out, add=True)["count"] == 260
    assert not (out / "chunks").exists() and SearchIndex(out).count == 260


def test_an_add_keeps_the_memory_budget_the_index_was_built_with(model_dir, tmp_path,
                                                                 monkeypatch):
    """``max_memory_gb`` was not recorded, so an --add (which chooses the type again for the
    grown count) chose it for half the RAM: an IVF-PQ index of a budget became an IVF-Flat
    over it. The type is chosen with the recorded budget now."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out, max_memory_gb=0.25)
    assert _record(out)["faiss"]["max_memory_gb"] == 0.25
    budgets = []
    real = faiss_index.choose_index_type

    def spy(count, dim, kind, budget=None):
        budgets.append(budget)
        return real(count, dim, kind, budget)

    monkeypatch.setattr(faiss_index, "choose_index_type", spy)
    assert build(model_dir, MORE, out, add=True)["faiss"]["max_memory_gb"] == 0.25
    assert budgets[-1] == int(0.25 * (1 << 30))  # (the first: the type checked up front)


def test_an_add_that_cannot_grow_a_damaged_faiss_file_says_why_it_trains_again(
        model_dir, tmp_path, recwarn):
    """A damaged old faiss.index was built anew without a word, so an --add expected to take
    seconds trained the whole index again unexplained."""
    out = tmp_path / "idx"
    build(model_dir, BASE, out, index_type="IVF8,Flat")
    (out / "faiss.index").write_bytes(b"not a faiss index")
    record = build(model_dir, MORE, out, add=True)
    assert record["count"] == 260 and record["faiss"]["trained_on"] == 260
    said = [str(w.message) for w in recwarn]
    assert any(m.startswith(f"index: {out / 'faiss.index'} cannot be grown (") and
               m.endswith("); training the index anew") for m in said), said
