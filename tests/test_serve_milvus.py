"""The Milvus backend: a small collection indexed into Milvus Lite gives the same top-k as the
exact FAISS index, through the index and through the API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.errors import ConfigError  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
from cliplab.serve import build as build_module  # noqa: E402
from cliplab.serve.app import create_app  # noqa: E402
from cliplab.serve.index import SearchIndex  # noqa: E402
from tests.serve_helpers import SHAPES, build, save_tiny_model  # noqa: E402


def test_milvus_lite_gives_the_exact_faiss_top_k(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "exact", index_type="flat")
    record = build(model_dir, SHAPES, tmp_path / "milvus", backend="milvus",
                   uri=str(tmp_path / "search.db"), collection="shapes_test")
    assert record["milvus"] == {"uri": str(tmp_path / "search.db"), "collection": "shapes_test"}
    exact, milvus = SearchIndex(tmp_path / "exact"), SearchIndex(tmp_path / "milvus")
    queries = np.asarray(exact.vectors)[[0, 7, 21]] + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for offset in (0, 3):
        f_scores, f_ids = exact.search(queries, 8, offset)
        m_scores, m_ids = milvus.search(queries, 8, offset)
        assert np.array_equal(f_ids, m_ids)
        assert np.allclose(f_scores, m_scores, atol=1e-6)
    model = DualEncoder.load(model_dir)
    milvus.close()
    milvus = SearchIndex(tmp_path / "milvus")
    via_api = TestClient(create_app(milvus, model)).get(
        "/api/search", params={"q": "a blue square", "k": 6}).json()
    direct = TestClient(create_app(exact, model)).get(
        "/api/search", params={"q": "a blue square", "k": 6}).json()
    assert [r["id"] for r in via_api["results"]] == [r["id"] for r in direct["results"]]
    assert [r["caption"] for r in via_api["results"]] == [r["caption"] for r in direct["results"]]
    assert via_api["total"] == 40
    health = TestClient(create_app(milvus, model)).get("/api/health").json()
    assert (health["backend"], health["index"]) == ("milvus", record["milvus"])
    milvus.close()


def test_a_milvus_collection_that_lost_a_vector_is_refused_at_open(tmp_path):
    from pymilvus import MilvusClient

    from cliplab.errors import DataError

    record = build(save_tiny_model(tmp_path / "model"), SHAPES, tmp_path / "idx",
                   backend="milvus", uri=str(tmp_path / "search.db"), collection="shapes_test")
    client = MilvusClient(record["milvus"]["uri"])
    client.delete(collection_name="shapes_test", ids=[7])
    client.close()
    with pytest.raises(DataError, match="^Milvus collection shapes_test at .* holds 39 vectors, "
                       "the index .* 40; rebuild the index"):
        SearchIndex(tmp_path / "idx")


def test_milvus_needs_a_uri(tmp_path):
    with pytest.raises(ConfigError, match="needs --uri"):
        build(save_tiny_model(tmp_path / "m"), SHAPES, tmp_path / "idx", backend="milvus")
    with pytest.raises(ConfigError, match="must end in .db"):
        build(save_tiny_model(tmp_path / "m2"), SHAPES, tmp_path / "idx2", backend="milvus",
              uri=str(tmp_path / "x.txt"))



def test_a_milvus_index_built_by_another_process_is_loaded_for_search(tmp_path):
    """Milvus keeps a collection released on disk until a client loads it: opening an index
    that `cliplab index` built in another process (as `cliplab serve` does) must load it."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = {"source": "shapes", "n": 40, "image_size": 32}
    build(model_dir, data, tmp_path / "exact", index_type="flat")
    done = subprocess.run(
        [sys.executable, "-m", "cliplab", "index", "--model", str(model_dir), "--data", "shapes",
         "--out", str(tmp_path / "milvus"), "--backend", "milvus", "--uri",
         str(tmp_path / "search.db"), "--no-progress", "data.n=40", "data.image_size=32",
         "collection=reopened"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    exact, milvus = SearchIndex(tmp_path / "exact"), SearchIndex(tmp_path / "milvus")
    queries = np.asarray(exact.vectors)[[3, 30]] + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert np.array_equal(milvus.search(queries, 8, 2)[1], exact.search(queries, 8, 2)[1])
    milvus.close()


def _serves_its_own_vectors(folder) -> bool:
    """Each of some items' own vectors finds that item first, at cosine ~1."""
    index = SearchIndex(folder)
    try:
        ids = [0, 5, 17, 39]
        scores, found = index.search(np.stack([index.vector(i) for i in ids]), 3)
        return found[:, 0].tolist() == ids and np.allclose(scores[:, 0], 1, atol=1e-4)
    finally:
        index.close()


def test_two_indexes_in_one_milvus_file_keep_their_own_collections(tmp_path, monkeypatch):
    """Left out, the collection is a fresh name per index (kept in progress.json from the
    start), so a second index in the same ./search.db does not replace the first's vectors;
    a named collection that exists already is refused before any embedding."""
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    real_finish, seen = build_module._finish, []

    def finish(cfg, work, store, state, *args):
        seen.append(json.loads((work / "progress.json").read_text()).get("collection"))
        return real_finish(cfg, work, store, state, *args)

    monkeypatch.setattr(build_module, "_finish", finish)
    a = build(model_dir, SHAPES, tmp_path / "a", backend="milvus", uri="./search.db")
    b = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "b", backend="milvus",
              uri="./search.db")
    assert _serves_its_own_vectors(tmp_path / "a") and _serves_its_own_vectors(tmp_path / "b")
    names = [a["milvus"]["collection"], b["milvus"]["collection"]]
    assert seen == names and names[0] != names[1]
    assert all(re.fullmatch(r"cliplab_[0-9a-f]{12}", name) for name in names)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the collection")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    uri = str(tmp_path / "search.db")
    with pytest.raises(ConfigError, match=rf"^collection={names[0]} already exists at "
                                          rf"{re.escape(uri)} ") as caught:
        build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "c", backend="milvus", uri=uri,
              collection=names[0])
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "c.partial").exists()  # refused before its work folder was made
    assert _serves_its_own_vectors(tmp_path / "a")


class Killed(BaseException):
    """Stands for SIGKILL."""


def _killed_while_inserting(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A Milvus index build into tmp_path/idx killed as it inserts its first vectors (its
    collection made); the model folder and Milvus Lite file it used."""
    from cliplab.serve.milvus_index import MilvusVectors

    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")

    def die(self, *args):
        raise Killed

    monkeypatch.setattr(MilvusVectors, "insert", die)
    with pytest.raises(Killed):
        build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)
    monkeypatch.undo()
    return model_dir, uri


def test_a_run_killed_while_inserting_reuses_its_collection(tmp_path, monkeypatch):
    """The collection named in progress.json before it was created is this run's own: the
    resumed run fills it (no refusal, no second collection left behind)."""
    from pymilvus import MilvusClient

    model_dir, uri = _killed_while_inserting(tmp_path, monkeypatch)
    name = json.loads((tmp_path / "idx.partial" / "progress.json").read_text()).get("collection")
    record = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)
    assert record["milvus"]["collection"] == name
    assert _serves_its_own_vectors(tmp_path / "idx")
    client = MilvusClient(uri)
    try:
        assert client.list_collections() == [name]
    finally:
        client.close()


def _collections(uri: str) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    try:
        return sorted(client.list_collections())
    finally:
        client.close()


def test_add_keeps_a_milvus_index_in_milvus_in_a_new_collection(tmp_path):
    """--add without --backend keeps a Milvus index in Milvus at its URI; the grown index goes
    to a new collection (named, or a fresh name) and the old one is dropped once it is
    complete; another backend or URI, or naming the collection it serves now, is refused."""
    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")
    first = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)
    record = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    assert record["backend"] == "milvus" and record["count"] == 80
    assert record["milvus"]["uri"] == uri
    assert record["milvus"]["collection"] != first["milvus"]["collection"]
    assert record["milvus"]["collection"].startswith("cliplab_")
    assert _collections(uri) == [record["milvus"]["collection"]]  # the old one dropped
    assert _serves_its_own_vectors(tmp_path / "idx")
    for wrong, words in (({"backend": "faiss"}, "is a milvus index; --backend faiss"),
                         ({"uri": str(tmp_path / "other.db")}, "keeps its vectors in Milvus at"),
                         ({"index_type": "hnsw"}, "--index-type hnsw is for the FAISS backend"),
                         ({"collection": record["milvus"]["collection"]},
                          "is the one .* serves now")):
        with pytest.raises(ConfigError, match=words):
            build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", add=True, **wrong)
    record = build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", add=True,
                   collection="moved")
    assert record["milvus"] == {"uri": uri, "collection": "moved"} and record["count"] == 120
    assert _serves_its_own_vectors(tmp_path / "idx")
    assert _collections(uri) == ["moved"]


def test_overwrite_drops_the_replaced_indexs_milvus_collection(tmp_path):
    """`index --overwrite` of a Milvus index builds into a collection of its own and drops the
    old index's once the new one is complete, as --add does (else it stayed in Milvus, no
    folder pointing at it)."""
    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")
    first = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)
    record = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", backend="milvus",
                   uri=uri, overwrite=True)
    assert record["milvus"]["collection"] != first["milvus"]["collection"]
    assert _collections(uri) == [record["milvus"]["collection"]]
    assert _serves_its_own_vectors(tmp_path / "idx")


def test_overwrite_over_a_stopped_run_of_another_command_drops_its_collection(tmp_path,
                                                                              monkeypatch):
    """`index --overwrite` starting over from a stopped Milvus run of another request deleted
    its work folder but left the collection it had created in Milvus, no folder naming it."""
    model_dir, uri = _killed_while_inserting(tmp_path, monkeypatch)
    assert len(_collections(uri)) == 1  # created before the kill
    record = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", backend="milvus",
                   uri=uri, overwrite=True)
    assert _collections(uri) == [record["milvus"]["collection"]]
    assert _serves_its_own_vectors(tmp_path / "idx")


def test_an_add_that_finds_nothing_new_keeps_the_milvus_collection(tmp_path):
    """An --add of items the index holds all copied every vector into a new collection and
    dropped the old one (a server on it then answered 503 until restarted): it leaves the
    index folder and its collection as they were now."""
    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")
    first = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)
    files = {path.name: (path.stat().st_mtime_ns, path.read_bytes())
             for path in (tmp_path / "idx").iterdir() if path.is_file()}
    record = build(model_dir, {**SHAPES, "n": 20}, tmp_path / "idx", add=True)
    assert record["milvus"] == first["milvus"] and record["count"] == 40
    assert _collections(uri) == [first["milvus"]["collection"]]
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes())
            for path in (tmp_path / "idx").iterdir() if path.is_file()} == files
    assert _serves_its_own_vectors(tmp_path / "idx")


def test_a_killed_add_leaves_the_milvus_index_it_grows_whole(tmp_path, monkeypatch):
    """--add killed while it fills Milvus: the index keeps serving its own vectors from its own
    collection (it was rebuilt in place, dropped first); the same command then finishes."""
    from cliplab.serve.milvus_index import MilvusVectors

    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")
    first = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=uri)

    def die(self, *args):
        raise Killed

    monkeypatch.setattr(MilvusVectors, "insert", die)
    with pytest.raises(Killed):
        build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    monkeypatch.undo()
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["milvus"] == first["milvus"]
    assert _serves_its_own_vectors(tmp_path / "idx")
    record = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    assert record["count"] == 80 and _serves_its_own_vectors(tmp_path / "idx")
    assert _collections(uri) == [record["milvus"]["collection"]]


def _copies_folder(folder, copies: int = 30):
    """``copies`` byte-identical images and 10 others (an image collection with duplicates)."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(folder / "same_00.png")
    for i in range(1, copies):
        (folder / f"same_{i:02d}.png").write_bytes((folder / "same_00.png").read_bytes())
    for i in range(10):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"other_{i}.png")
    return folder


def test_milvus_pages_neither_repeat_nor_skip_among_equal_scores(tmp_path):
    """Pages asked of Milvus with its own offset repeated some copies of an image and never
    showed others (paging 47 items one at a time showed 26); cut as FAISS's are, a page of one
    at every offset is FAISS's whole order, copies in id order, scores equal to FAISS's."""
    model_dir = save_tiny_model(tmp_path / "model")
    folder = _copies_folder(tmp_path / "photos")
    build(model_dir, str(folder), tmp_path / "exact", index_type="flat")
    build(model_dir, str(folder), tmp_path / "milvus", backend="milvus",
          uri=str(tmp_path / "search.db"))
    exact, milvus = SearchIndex(tmp_path / "exact"), SearchIndex(tmp_path / "milvus")
    try:
        copy = next(i for i, row in exact.items(range(40)).items() if "same_" in row["key"])
        query = exact.vector(copy)
        f_scores, f_ids = exact.search(query, 40)
        pages = [milvus.search(query, 1, offset) for offset in range(40)]
        assert [int(ids[0, 0]) for _, ids in pages] == f_ids[0].tolist()
        assert np.allclose([s[0, 0] for s, _ in pages], f_scores[0], atol=1e-6)
        for k in (7, 13):
            paged = np.concatenate([milvus.search(query, k, o)[1][0] for o in range(0, 40, k)])
            assert paged[paged >= 0].tolist() == f_ids[0].tolist(), k
    finally:
        exact.close()
        milvus.close()


def test_milvus_holds_only_ids_and_vectors(tmp_path):
    """Keys, captions and metadata stay in the folder's SQLite (all that reads them): Milvus
    Lite's port on 127.0.0.1 is open to every local user, and a server counts a caption's
    length in bytes (a long CJK caption failed the insert)."""
    from pymilvus import MilvusClient

    model_dir = save_tiny_model(tmp_path / "model")
    record = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus",
                   uri=str(tmp_path / "search.db"))
    client = MilvusClient(str(tmp_path / "search.db"))
    try:
        fields = client.describe_collection(record["milvus"]["collection"])["fields"]
        assert [field["name"] for field in fields] == ["id", "vector"]
    finally:
        client.close()


def test_a_collection_dropped_under_the_server_is_a_503_saying_what_follows(tmp_path, capfd):
    """An --add (of this index, or of a copy of its folder) drops the collection a running
    server searches: each search was a 500 "internal error". A 503 the schema declares, and
    no pymilvus traceback in the server's log per search."""
    model_dir = save_tiny_model(tmp_path / "model")
    record = build(model_dir, SHAPES, tmp_path / "idx", backend="milvus",
                   uri=str(tmp_path / "search.db"))
    index = SearchIndex(tmp_path / "idx")
    client = TestClient(create_app(index, DualEncoder.load(model_dir)))
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
    index._milvus.drop()
    document = client.get("/openapi.json").json()
    capfd.readouterr()
    try:
        for path, params in (("/api/search", {"q": "a red circle"}),
                             ("/api/search/similar", {"id": 3})):
            answer = client.get(path, params=params)
            assert answer.status_code == 503, answer.text
            assert "503" in document["paths"][path]["get"]["responses"]
            assert answer.json()["error"] == (
                f"Milvus collection {record['milvus']['collection']} at {tmp_path / 'search.db'} "
                "is gone (an `index --add` of this index, or of a copy of its folder, replaced "
                "it): the server serves the index folder's new collection once it has loaded it "
                "(a copy's --add leaves none: rebuild the index)")
        assert "Traceback" not in capfd.readouterr().err
        health = client.get("/api/health")  # it said "ok" of an index that cannot search
        assert health.status_code == 503 and "is gone" in health.json()["error"]
        assert "503" in document["paths"]["/api/health"]["get"]["responses"]
    finally:
        index.close()


def test_a_missing_milvus_lite_file_is_named_and_not_created(tmp_path):
    from cliplab.errors import DataError

    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "idx", backend="milvus", uri=str(tmp_path / "search.db"))
    (tmp_path / "search.db").rename(tmp_path / "moved.db")
    gone = (rf"^the Milvus Lite database {re.escape(str(tmp_path / 'search.db'))} holding "
            r"collection cliplab_\w+ does not exist \(moved or deleted\?\); put it back at "
            r"that path$")
    with pytest.raises(DataError, match=gone):
        SearchIndex(tmp_path / "idx")
    assert not (tmp_path / "search.db").exists()
    # an --add too, before its embedding (it made a new empty file there and added into it)
    with pytest.raises(DataError, match=gone):
        build(model_dir, {**SHAPES, "seed": 9}, tmp_path / "idx", add=True)
    assert not (tmp_path / "search.db").exists()


CREDENTIALS = "--uri: give Milvus's credentials in $CLIPLAB_MILVUS_TOKEN"


@pytest.mark.parametrize("uri, words", [
    ("http://root:s3cret@127.0.0.1:19530", CREDENTIALS),
    ("https://db_admin_9f8e7d6c@in01.example.com:443", CREDENTIALS),  # a token alone
    ("http://root%3AMilvus@127.0.0.1:19530", CREDENTIALS),
    ("grpc://127.0.0.1:19530", "--uri grpc://127.0.0.1:19530: Milvus takes http, https, tcp, "
                               "unix URIs"),
])
def test_a_milvus_uri_pymilvus_refuses_or_that_would_record_credentials_is_refused(
        uri, words, tmp_path):
    """Typed: refused before anything (the index records and shows its URI). Recorded by an
    older index (credentials in the URI were the only way then): still opened as it was."""
    from cliplab.serve.milvus_index import normalise_uri

    with pytest.raises(ConfigError, match=re.escape(words)):
        build(save_tiny_model(tmp_path / "model"), SHAPES, tmp_path / "idx", backend="milvus",
              uri=uri)
    assert not (tmp_path / "idx.partial").exists()
    if words == CREDENTIALS:
        assert normalise_uri(uri) == uri
    assert normalise_uri("unix:///run/milvus.sock") == "unix:///run/milvus.sock"
    assert normalise_uri("HTTP://127.0.0.1:19530") == "HTTP://127.0.0.1:19530"


def test_a_milvus_lite_file_another_process_holds_is_refused_before_the_embedding(
        tmp_path, monkeypatch, capfd):
    """Milvus Lite lets one process use a file (a running `cliplab serve` holds it): said in
    one line before the embedding, not after it with milvus-lite's traceback."""
    from cliplab.errors import DataError

    model_dir = save_tiny_model(tmp_path / "model")
    db = tmp_path / "search.db"  # held as Milvus Lite holds it (this process would keep its own)
    db.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"lock = open({str(db / 'LOCK')!r}, 'wb')\n"
        "fcntl.flock(lock, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def no_embedding(*args, **kwargs):
            raise AssertionError("embedded before connecting")

        monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
        with pytest.raises(DataError, match=rf"^the Milvus Lite database {re.escape(str(db))} is "
                                            r"open in another process \(a running `cliplab "
                                            r"serve` or `cliplab index`\?\)"):
            build(model_dir, SHAPES, tmp_path / "second", backend="milvus", uri=str(db))
        assert not (tmp_path / "second.partial").exists()
        assert "Traceback" not in capfd.readouterr().err  # milvus-lite's own, hidden
    finally:
        holder.kill()
        holder.wait()


def test_a_milvus_lite_file_among_the_images_is_refused(tmp_path, monkeypatch, capsys):
    """As an --out there is: its own files were listed as skipped images by each --add."""
    from cliplab.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    folder = _copies_folder(tmp_path / "photos", copies=2)
    monkeypatch.chdir(tmp_path)
    assert main(["index", "--model", str(model_dir), "--data", "photos", "--out", "idx",
                 "--backend", "milvus", "--uri", "photos/search.db", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("cliplab: error: --uri photos/search.db lies inside the "
                                       "input photos; choose another folder\n")
    assert not (folder / "search.db").exists() and not (tmp_path / "idx.partial").exists()


def test_milvus_searches_as_faiss_at_the_edges(tmp_path):
    """An empty batch of queries is an empty answer (it was pymilvus's IndexError), a window
    past Milvus's cap an InputError, and a missing hit scores as FAISS fills it."""
    from cliplab.errors import InputError

    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, {**SHAPES, "n": 5}, tmp_path / "exact", index_type="flat")
    build(model_dir, {**SHAPES, "n": 5}, tmp_path / "milvus", backend="milvus",
          uri=str(tmp_path / "search.db"))
    exact, milvus = SearchIndex(tmp_path / "exact"), SearchIndex(tmp_path / "milvus")
    try:
        empty = np.zeros((0, exact.vectors.shape[1]), np.float32)
        for index in (exact, milvus):
            scores, ids = index.search(empty, 3)
            assert scores.shape == ids.shape == (0, 3)
        f_scores, f_ids = exact.search(exact.vector(0), 8)
        m_scores, m_ids = milvus.search(exact.vector(0), 8)
        assert np.array_equal(f_ids, m_ids) and f_ids[0, -1] == -1
        assert np.array_equal(f_scores[:, 5:], m_scores[:, 5:])
        with pytest.raises(InputError, match=r"^search: offset \+ k = 20000 is past Milvus's "):
            milvus.search(exact.vector(0), 20000)
    finally:
        exact.close()
        milvus.close()


def test_without_pymilvus_the_milvus_backend_is_refused_before_the_embedding(tmp_path,
                                                                           monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before finding pymilvus")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    with pytest.raises(ConfigError, match=r"^the Milvus backend needs pymilvus .*: pip install "
                                          r"'cliplab\[milvus\]'$"):
        build(model_dir, SHAPES, tmp_path / "idx", backend="milvus",
              uri=str(tmp_path / "search.db"))
    assert not (tmp_path / "idx.partial").exists()


def test_milvus_pages_copies_in_id_order_at_real_embedding_sizes(tmp_path):
    """A matrix product scored copies of one 512-d vector ~1 ulp apart by where they sat in
    the candidates (the 16-d test model hid it): pages of one showed 32 of 40 items."""
    from cliplab.serve.milvus_index import MilvusVectors

    rng = np.random.default_rng(0)
    copy = rng.normal(size=512).astype(np.float32)
    vectors = np.concatenate([rng.normal(size=(5, 512)), np.repeat(copy[None], 30, 0),
                              rng.normal(size=(5, 512))]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    milvus = MilvusVectors(str(tmp_path / "search.db"), "copies")
    try:
        milvus.create(512)
        milvus.insert(np.arange(40), vectors)
        milvus.load()
        query = vectors[5] + 0.3 * vectors[0]  # near the copies, none of them
        query /= np.linalg.norm(query)
        _, whole = milvus.search(query, 40, 0, vectors)
        assert whole[0, :30].tolist() == list(range(5, 35))  # the copies first, in id order
        pages = [int(milvus.search(query, 1, offset, vectors)[1][0, 0]) for offset in range(40)]
        assert pages == whole[0].tolist()
    finally:
        milvus.close()


def test_a_resumed_run_whose_named_collection_was_taken_meanwhile_is_refused_at_once(
        tmp_path, monkeypatch):
    """A run stopped before embedding, another index taking its collection=NAME, the first
    command run again: refused before the embedding, not after it."""
    model_dir = save_tiny_model(tmp_path / "model")
    uri = str(tmp_path / "search.db")

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(build_module, "_embed_collection", killed)
    with pytest.raises(Killed):
        build(model_dir, SHAPES, tmp_path / "first", backend="milvus", uri=uri,
              collection="shared")
    assert (tmp_path / "first.partial" / "progress.json").is_file()
    monkeypatch.undo()
    build(model_dir, SHAPES, tmp_path / "second", backend="milvus", uri=uri, collection="shared")

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the collection")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    with pytest.raises(ConfigError, match=r"^collection=shared already exists at "):
        build(model_dir, SHAPES, tmp_path / "first", backend="milvus", uri=uri,
              collection="shared")


def test_a_quieted_milvus_logger_is_quiet_in_that_thread_only(caplog):
    """A server searches from many threads: a level set and put back by each raced, and could
    leave pymilvus silenced for good; records of other threads, and later ones, are kept."""
    import logging
    import threading

    from cliplab.serve.milvus_index import _quiet

    logger = logging.getLogger("pymilvus.decorators")
    inside, done = threading.Event(), threading.Event()

    def quiet_search():
        with _quiet("pymilvus.decorators"):
            logger.error("hidden")
            inside.set()
            done.wait(10)

    worker = threading.Thread(target=quiet_search)
    with caplog.at_level(logging.ERROR, logger="pymilvus.decorators"):
        worker.start()
        assert inside.wait(10)
        logger.error("another thread's")
        done.set()
        worker.join()
        logger.error("later")
    assert [r.getMessage() for r in caplog.records] == ["another thread's", "later"]
