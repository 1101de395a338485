"""A running server switches to its index folder's next generation by itself: an `index --add`
that completed, a rebuild in place (`--overwrite`); a damaged one, or one of other weights, is
warned of once and the generation served before goes on answering."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
import weakref

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.errors import DataError, ModelError  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
from cliplab.output_folder import swap_in  # noqa: E402
from cliplab.serve import build as build_module, faiss_index, index_generation  # noqa: E402
from cliplab.serve.app import create_app  # noqa: E402
from cliplab.serve.index import SearchIndex  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.serve_helpers import (SHAPES, build, save_tiny_model, start_server,  # noqa: E402
                                 wait_until_up)


@pytest.fixture(autouse=True)
def _look_often(monkeypatch):
    """A look at index.json on every request 50 ms apart (the server: once a second)."""
    monkeypatch.setattr(index_generation, "CHECK_EVERY_S", 0.05)


def _served(client: TestClient, seconds: float = 60, **expected) -> dict:
    """/api/health once it reports ``expected`` (e.g. count=80), asking every 50 ms; an
    AssertionError with the last answer after ``seconds``."""
    end = time.monotonic() + seconds
    while True:
        health = client.get("/api/health").json()
        if all(health.get(key) == value for key, value in expected.items()):
            return health
        if time.monotonic() > end:
            raise AssertionError(f"still serving {health} after {seconds} s, not {expected}")
        time.sleep(0.05)


def _server(tmp_path, **kw) -> tuple[TestClient, SearchIndex]:
    """A client of an app opened on a `SHAPES` index under ``tmp_path`` (40 items), and
    that index."""
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "idx", **kw)
    index = SearchIndex(tmp_path / "idx")
    return TestClient(create_app(index, DualEncoder.load(model_dir))), index


def test_an_add_is_served_without_a_restart(tmp_path, monkeypatch):
    """The server kept the 40 items it opened after an --add grew the index to 80: the new
    ones were never found until it was restarted. A killed --add (its work half-built in
    idx.partial) is neither loaded nor warned of."""
    client, _ = _server(tmp_path)
    first = _served(client, count=40)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    monkeypatch.undo()
    monkeypatch.setattr(index_generation, "CHECK_EVERY_S", 0.05)
    assert (tmp_path / "idx.partial").is_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            assert _served(client, seconds=0) == first
            time.sleep(0.06)
    assert not caught
    build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)  # resumed
    grown = _served(client, count=80)
    assert grown["build"] == first["build"] is not None  # an --add keeps the build id
    page = client.get("/api/search/similar", params={"id": 63, "k": 3}).json()
    assert page["total"] == 80 and page["results"][0]["id"] == 63
    assert client.get("/api/search", params={"q": "a red circle"}).json()["total"] == 80
    assert client.get("/images/63/thumbnail").status_code == 200


def test_a_request_in_flight_ends_on_the_generation_it_started_on(tmp_path):
    """A page asked before an --add and answered after the switch is the old generation's
    whole (its total, its rows); that generation is closed once the page is sent."""
    client, first = _server(tmp_path)
    inside, go_on = threading.Event(), threading.Event()
    items = first.items

    def slow_items(ids):
        inside.set()
        assert go_on.wait(120)
        return items(ids)

    first.items = slow_items
    answers = []
    asking = threading.Thread(target=lambda: answers.append(client.get(
        "/api/search/similar", params={"id": 3, "k": 40})))
    asking.start()
    try:
        assert inside.wait(60)
        build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
        _served(client, count=80)
        assert first.vectors is not None  # still in use
    finally:
        go_on.set()
        asking.join(60)
    page = answers[0].json()
    assert page["total"] == 40 and len(page["results"]) == 40
    assert {row["id"] for row in page["results"]} == set(range(40))
    assert first.vectors is None


def test_a_rebuild_in_place_is_served_with_its_own_images(tmp_path):
    """After `index --overwrite` of other images, the server answered 503 for the stored
    images until restarted; it serves the new index now, and an id's thumbnail is the new
    index's image (none cached from the old one)."""
    client, _ = _server(tmp_path)
    before = _served(client, count=40)
    old = client.get("/images/5/thumbnail").content
    build(tmp_path / "model", {**SHAPES, "seed": 9, "n": 30}, tmp_path / "idx", overwrite=True)
    after = _served(client, count=30)
    assert after["build"] != before["build"]
    fresh = TestClient(create_app(SearchIndex(tmp_path / "idx"),
                                  DualEncoder.load(tmp_path / "model")))
    new = fresh.get("/images/5/thumbnail").content
    assert new != old
    assert client.get("/images/5/thumbnail").content == new
    assert client.get("/images/5").content == fresh.get("/images/5").content


def test_a_replaced_generation_is_let_go(tmp_path):
    """Every later generation's text and label caches were bound methods of the first
    service: it stayed alive for the server's life, with its thumbnail cache (64 MB) and its
    closed index."""
    client, _ = _server(tmp_path)
    assert client.get("/images/3/thumbnail").status_code == 200
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
    first = weakref.ref(client.app.state.generations.service)
    build(tmp_path / "model", {**SHAPES, "seed": 9, "n": 30}, tmp_path / "idx", overwrite=True)
    _served(client, count=30)
    assert client.get("/api/search", params={"q": "a red circle"}).json()["total"] == 30
    gc.collect()
    assert first() is None


def _damaged_vectors(tmp_path) -> None:
    """A complete generation put in place as `cliplab index` does, its vectors cut short."""
    shutil.copytree(tmp_path / "idx", tmp_path / "next")
    vectors = tmp_path / "next" / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:200])
    swap_in(tmp_path / "next", tmp_path / "idx")


def _other_weights(tmp_path) -> None:
    """The index rebuilt in place with a model of other weights (30 items)."""
    build(save_tiny_model(tmp_path / "other", seed=5), {**SHAPES, "n": 30}, tmp_path / "idx",
          overwrite=True)


@pytest.mark.parametrize("next_generation, words", [
    (_damaged_vectors, "vectors.npy: not a readable NumPy array"),
    (_other_weights, "the model this server loaded has other weights")])
def test_a_bad_generation_is_warned_of_once_and_the_old_one_served(tmp_path, next_generation,
                                                                  words):
    client, _ = _server(tmp_path)
    before = _served(client, count=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next_generation(tmp_path)
        end = time.monotonic() + 60
        while not caught and time.monotonic() < end:
            assert client.get("/api/search", params={"q": "a red circle"}).json()["total"] == 40
            time.sleep(0.05)
        for _ in range(10):  # looked at again and again: not loaded nor warned of again
            assert client.get("/api/search/similar", params={"id": 7}).status_code == 200
            time.sleep(0.06)
    said = [str(w.message) for w in caught]
    assert len(said) == 1, said
    assert said[0].startswith(f"serve: {(tmp_path / 'idx').resolve()} holds another generation "
                              "of the index, which this server cannot serve (") and words in said[0]
    assert said[0].endswith("; still serving the one loaded before (40 items)")
    refused = said[0][len("serve: "):-len("; still serving the one loaded before (40 items)")]
    assert _served(client, seconds=0) == {**before, "next_refused": refused}


def test_a_bad_generation_beside_one_that_cannot_search_does_not_claim_it_is_served(
        tmp_path, monkeypatch):
    """The warning said "still serving the one loaded before" also when that one could no
    longer search (a Milvus generation whose collection an --add of a copy dropped): it
    says what keeps it from searching."""
    client, index = _server(tmp_path)
    _served(client, count=40)
    monkeypatch.setattr(index, "backend_problem", lambda: "Milvus collection c at u is gone")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _damaged_vectors(tmp_path)
        end = time.monotonic() + 60
        while not caught and time.monotonic() < end:
            client.get("/api/health")
            time.sleep(0.05)
    said = [str(w.message) for w in caught]
    assert len(said) == 1, said
    assert "vectors.npy: not a readable NumPy array" in said[0]
    assert said[0].endswith("; the one loaded before cannot search either (Milvus collection "
                            "c at u is gone)")
    assert "still serving" not in said[0]


def test_a_refused_generation_is_said_to_need_a_restart(tmp_path):
    """After a rebuild with a model of other weights, the old generation's stored images
    answered 503 "the server serves that one once it has loaded it", which it never will;
    the warning gave the library's "search it with the same model". Both, and /api/health,
    say this server cannot serve it and that a restart (its own model) does."""
    client, _ = _server(tmp_path)
    assert _served(client, count=40)["next_refused"] is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _other_weights(tmp_path)
        end = time.monotonic() + 60
        while (health := _served(client, seconds=0, count=40))["next_refused"] is None:
            assert time.monotonic() < end, "never refused"
            time.sleep(0.05)
    where = (tmp_path / "idx").resolve()
    why = health["next_refused"]
    assert why.startswith(f"{where} holds another generation of the index, which this server "
                          "cannot serve (it was built with model ")
    assert "the model this server loaded has other weights" in why
    assert why.endswith("; restart `cliplab serve` to serve it (with the model it was built "
                        "with)")
    assert [str(w.message) for w in caught] == [
        f"serve: {why}; still serving the one loaded before (40 items)"]
    answer = client.get("/images/5")
    assert answer.status_code == 503
    assert answer.json()["error"] == (f"the index {where} was rebuilt since this server opened "
                                      f"it, and its stored images are the new index's: {why}")
    assert "once it has loaded it" not in answer.text and "same model" not in answer.text


def test_a_refusal_is_not_said_of_the_generation_after_it(tmp_path, monkeypatch):
    """/api/health (and the stored images' 503) kept the refusal of a generation of other
    weights after the folder held a newer one, which had not loaded yet (here: for a passing
    reason, tried again later)."""
    monkeypatch.setattr(index_generation, "RETRY_AFTER_S", 60)
    client, _ = _server(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _other_weights(tmp_path)
        assert _served(client, count=40, seconds=0)["next_refused"] is None
        end = time.monotonic() + 60
        while _served(client, seconds=0)["next_refused"] is None:
            assert time.monotonic() < end, "never refused"
            time.sleep(0.05)

        def busy(path):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(index_generation, "SearchIndex", busy)
        build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", overwrite=True)
        while len(caught) < 2:
            assert time.monotonic() < end, "the newer generation was never tried"
            client.get("/api/health")
            time.sleep(0.05)
    health = _served(client, seconds=0, count=40)
    assert health["next_refused"] is None
    assert "Too many open files" in str(caught[1].message)


def test_a_load_that_fails_for_a_passing_reason_is_tried_again(tmp_path, monkeypatch):
    """Any failure to load the next generation (here too many open files) refused it for the
    server's life; one that is not the index's fault is warned of once and tried again."""
    monkeypatch.setattr(index_generation, "RETRY_AFTER_S", 0.5)
    client, _ = _server(tmp_path)
    real, calls = index_generation.SearchIndex, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return real(path)

    monkeypatch.setattr(index_generation, "SearchIndex", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
        grown = _served(client, count=80)
    assert len(calls) == 2 and grown["next_refused"] is None
    assert [str(w.message) for w in caught] == [
        f"serve: {(tmp_path / 'idx').resolve()} holds another generation of the index, which "
        "did not load (OSError: [Errno 24] Too many open files); still serving the one loaded "
        "before (40 items); trying it again every 0.5 s"]


def test_a_milvus_add_is_served_from_its_new_collection(tmp_path):
    """An --add of a Milvus index fills a new collection and drops the one the server
    searched: it answered 503 until restarted. Milvus Lite lets one process use a file, so
    the --add runs in the server's process here (a Milvus server takes one from anywhere)."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    client, _ = _server(tmp_path, backend="milvus", uri=str(tmp_path / "search.db"))
    try:
        first = _served(client, count=40)
        build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
        grown = _served(client, count=80)
        assert grown["index"]["collection"] != first["index"]["collection"]
        page = client.get("/api/search/similar", params={"id": 63, "k": 3})
        assert page.status_code == 200 and page.json()["results"][0]["id"] == 63
    finally:  # the old generation was closed on the switch; Milvus Lite's client of the new
        client.app.state.generations.service.index.close()


def test_a_switched_to_generation_is_set_up_as_one_opened_at_start(tmp_path, monkeypatch):
    """A Milvus index rebuilt in place as FAISS was searched with OpenMP teams, the setting a
    server started on it turns off; an index whose model's preprocessing cannot be checked
    was served without the warning a start gives."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    settings = []
    monkeypatch.setattr(faiss_index, "one_thread_per_search", lambda: settings.append(1))
    client, _ = _server(tmp_path, backend="milvus", uri=str(tmp_path / "search.db"))
    try:
        _served(client, count=40)
        assert settings == []
        build(tmp_path / "model", {**SHAPES, "n": 30}, tmp_path / "idx", overwrite=True,
              backend="faiss")
        _served(client, count=30, backend="faiss")
        assert settings == [1]
        shutil.copytree(tmp_path / "idx", tmp_path / "next")  # as an older cliplab wrote it
        record = json.loads((tmp_path / "next" / "index.json").read_text(encoding="utf-8"))
        del record["embedding_identity"]
        (tmp_path / "next" / "index.json").write_text(json.dumps(record), encoding="utf-8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            swap_in(tmp_path / "next", tmp_path / "idx")
            end = time.monotonic() + 60
            while len(settings) < 2 and time.monotonic() < end:
                _served(client, seconds=0, count=30)
                time.sleep(0.05)
        assert settings == [1, 1]
        assert [str(w.message) for w in caught] == [
            f"serve: {(tmp_path / 'idx').resolve()} keeps no record of its model's "
            "preprocessing and tokenizer (an older index): only the weights were checked, and "
            "image searches may differ from what this cliplab would embed; rebuild it to have "
            "them checked"]
    finally:
        client.app.state.generations.service.index.close()


def test_a_milvus_add_refused_is_tried_again_while_the_old_collection_is_gone(tmp_path,
                                                                             monkeypatch):
    """The --add drops the collection the server searches: a generation refused then (here a
    damaged-file error once) left the server answering 503 until restarted."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    monkeypatch.setattr(index_generation, "RETRY_AFTER_S", 0.5)
    client, _ = _server(tmp_path, backend="milvus", uri=str(tmp_path / "search.db"))
    real, calls = index_generation.SearchIndex, []

    def damaged_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise DataError(f"{path}: damaged (for a moment)")
        return real(path)

    monkeypatch.setattr(index_generation, "SearchIndex", damaged_once)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
            _served(client, count=80)
        assert len(calls) == 2 and len(caught) == 1 and "damaged (for a moment)" in str(
            caught[0].message)
        page = client.get("/api/search/similar", params={"id": 63, "k": 3})
        assert page.status_code == 200 and page.json()["results"][0]["id"] == 63
    finally:
        client.app.state.generations.service.index.close()


def test_a_milvus_add_of_other_weights_says_why_its_503s_last(tmp_path, monkeypatch):
    """A Milvus --add refused (here: the server's model has other weights) while the old
    collection is gone: the 503s said the server serves the new collection "once it has
    loaded it"; they say why it cannot, and the load is tried again meanwhile."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    monkeypatch.setattr(index_generation, "RETRY_AFTER_S", 0.2)
    client, first = _server(tmp_path, backend="milvus", uri=str(tmp_path / "search.db"))
    calls = []

    def other_weights(index):
        calls.append(index)
        raise ModelError("it was built with model M; the model this server loaded has other "
                         "weights")

    monkeypatch.setattr(client.app.state.generations.service, "with_index", other_weights)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(tmp_path / "model", {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
            end = time.monotonic() + 60
            while len(calls) < 3:  # tried again while the collection served is gone
                assert time.monotonic() < end, f"loaded {len(calls)} times"
                client.get("/api/health")
                time.sleep(0.05)
        assert len(caught) == 1, [str(w.message) for w in caught]
        for answer in (client.get("/api/health"), client.get("/api/search/similar",
                                                              params={"id": 3})):
            assert answer.status_code == 503
            assert answer.json()["error"].endswith(
                f"; but {(tmp_path / 'idx').resolve()} holds another generation of the index, "
                "which this server cannot serve (it was built with model M; the model this "
                "server loaded has other weights); restart `cliplab serve` to serve it (with "
                "the model it was built with)")
    finally:
        first.close()


def test_a_cliplab_serve_process_serves_what_a_cliplab_index_process_added(tmp_path):
    """The commands as a user runs them, each in its own process: `cliplab serve` (its own
    look once a second) goes on to the items `cliplab index --add` indexed, and says so."""
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "idx")
    port = free_port()
    server = start_server(tmp_path / "idx", port)
    health = f"http://127.0.0.1:{port}/api/health"
    try:
        wait_until_up(health, server)
        added = subprocess.run(
            [sys.executable, "-m", "cliplab", "index", "--model", str(model_dir), "--data",
             "shapes", "--out", str(tmp_path / "idx"), "--add", "--no-progress", "data.n=40",
             "data.seed=4", "data.kinds=[single]", "data.image_size=32"],
            capture_output=True, text=True, timeout=600)
        assert added.returncode == 0, added.stderr[-2000:]
        end = time.monotonic() + 120
        while True:
            with urllib.request.urlopen(health, timeout=10) as answer:
                count = json.load(answer)["count"]
            if count == 80 or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert count == 80
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert f"cliplab serve: now serving {(tmp_path / 'idx').resolve()}: 80 items" in err
