"""An approximate index's search breadth is tuned on image and text queries: text embeddings lie
apart from image ones, and a breadth tuned on image queries alone left text queries short (on
Fashion-MNIST, IVF256: recall@10 0.77 for captions at the nprobe that gave images 0.99)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from PIL import Image

from cliplab.cli import main
from cliplab.data.shapes import load_shapes
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.embed import embed_texts
from cliplab.serve import faiss_index
from cliplab.serve.index import describe
from cliplab.serve.store import MetadataStore
from cliplab.serve.tuning_queries import EVERYDAY_OBJECTS, sample_captions
from tests.serve_helpers import SHAPES, build, save_tiny_model
from tests.test_serve_index import _clustered

model_dir = pytest.fixture(scope="module")(
    lambda tmp_path_factory: save_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


def _recall(index, queries, vectors, value, ties: bool = True) -> float:
    """Recall@10 at breadth ``value`` as tuning measures it (tie-aware), or on ids alone."""
    faiss_index.set_search_parameter(index, value)
    truth = faiss_index.exact_neighbours(queries, vectors, 10)
    found = index.search(queries, 10)[1]
    if not ties:
        return faiss_index.recall_at_k(found, truth)
    return faiss_index.recall_at_k(found, truth, queries, vectors)


def test_breadth_reaches_the_target_on_every_query_set():
    """Queries far from the data (random directions, as text queries are from images) need
    more lists than queries near it: the breadth is the smallest that serves both, and each
    set's recall is recorded as measured."""
    vectors = _clustered(20_000, 32, 50)
    index = faiss_index.build_faiss(vectors, "IVF128,Flat")
    near = faiss_index.held_out_queries(vectors)
    far = np.random.default_rng(5).standard_normal((200, 32)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    alone = faiss_index.tune_search(index, vectors, 0.95, queries=near)
    both = faiss_index.tune_search(index, vectors, 0.95, queries={"images": near, "text": far})
    assert alone["value"] < both["value"]  # near queries alone ask for too narrow a search
    assert _recall(index, far, vectors, alone["value"]) < 0.95
    assert set(both["recalls"]) == {"images", "text"}
    for name, queries in (("images", near), ("text", far)):
        assert both["recalls"][name] == pytest.approx(
            _recall(index, queries, vectors, both["value"]), abs=1e-4)
        assert both["recalls"][name] >= 0.95
    assert both["recall"] == min(both["recalls"].values())
    half = both["value"] // 2  # the next narrower search misses on some set
    assert min(_recall(index, q, vectors, half) for q in (near, far)) < 0.95
    assert "recalls" not in alone  # one unnamed set: the record is as before


def test_sample_captions_are_distinct_non_empty_and_seeded(tmp_path):
    store = MetadataStore(tmp_path / "meta.sqlite")
    captions = ["a cat", "", "a dog", "a cat", "  ", "a bird", "a dog"] * 30
    store.add([{"id": i, "key": f"k{i}", "caption": c, "location": {}, "meta": {}}
               for i, c in enumerate(captions)])
    store.add([{"id": len(captions) + i, "key": f"{i // 3}/{key}", "caption": caption,
                "location": {}, "meta": {}} for i, (key, caption) in enumerate(
        [("IMG_0001.jpg", "IMG 0001"), ("trip/beach_day.png", "beach day"),
         ("/photos|trip/IMG_0002.jpg", "IMG 0002")] * 20)])  # file names: no text queries
    count = len(captions) + 60
    got = sample_captions(store, count, n=200, seed=1)
    assert sorted(got) == ["a bird", "a cat", "a dog"]
    two = sample_captions(store, count, n=2, seed=1)
    assert len(two) == 2 and set(two) < set(got)
    assert sample_captions(store, count, seed=1) == got  # seeded
    store.close()


def _built_index(path):
    record = json.loads((path / "index.json").read_text())
    vectors = np.load(path / "vectors.npy")
    return record["faiss"], faiss.read_index(str(path / "faiss.index")), vectors


def test_an_ivf_index_is_tuned_on_its_captions_as_text_queries(model_dir, tmp_path, capsys):
    """shapes has captions: they are the text queries; the recorded recalls are what the
    recorded breadth gives the image queries and the collection's captions, embedded as the
    server embeds a query's text."""
    spec = {**SHAPES, "n": 400}
    assert main(["index", "--model", str(model_dir), "--data", "shapes", "data.n=400",
                 "data.seed=3", "data.kinds=[single]", "data.image_size=32",
                 "--index-type", "IVF16,Flat", "--out", str(tmp_path / "idx"),
                 "--no-progress"]) == 0
    tuned, index, vectors = _built_index(tmp_path / "idx")
    assert set(tuned["recalls"]) == {"images", "captions"}
    store = MetadataStore(tmp_path / "idx" / "meta.sqlite", readonly=True)
    captions = sample_captions(store, len(vectors))
    store.close()
    assert 1 < len(captions) <= 200
    queries = embed_texts(DualEncoder.load(model_dir), captions)
    assert tuned["recalls"]["captions"] == pytest.approx(
        _recall(index, queries, vectors, tuned["value"]), abs=1e-4)
    assert tuned["recall"] == min(tuned["recalls"].values())
    out = capsys.readouterr().out
    assert (f"nprobe={tuned['value']} (recall@10 {tuned['recalls']['images']:.3f} on held-out "
            f"image queries, {tuned['recalls']['captions']:.3f} on caption queries)") in out
    assert spec["n"] == len(vectors)


def test_a_collection_without_captions_is_tuned_on_object_names(model_dir, tmp_path):
    """A flat folder of photos has no captions: "a photo of a {object}" for COCO's objects
    stand in. (A class folder's rows are captioned by their class.)"""
    (tmp_path / "photos").mkdir()
    for i, image in enumerate(load_shapes(n=6, seed=1, kinds=["single"], image_size=32).images):
        Image.fromarray(image.numpy()).save(tmp_path / "photos" / f"img_{i}.png")
    build(model_dir, str(tmp_path / "photos"), tmp_path / "idx", index_type="hnsw")
    tuned, index, vectors = _built_index(tmp_path / "idx")
    assert set(tuned["recalls"]) == {"images", "objects"}
    queries = embed_texts(DualEncoder.load(model_dir),
                          [f"a photo of a {name}" for name in EVERYDAY_OBJECTS])
    assert tuned["parameter"] == "efSearch"
    assert tuned["recalls"]["objects"] == pytest.approx(
        _recall(index, queries, vectors, tuned["value"]), abs=1e-4)


def test_exact_indexes_are_not_tuned(model_dir, tmp_path):
    record = build(model_dir, SHAPES, tmp_path / "idx")
    assert record["faiss"] == {"type": "Flat", "recall_target": 0.95, "parameter": None,
                               "value": None, "recall": 1.0}


def test_describe_names_the_query_sets_and_reads_older_indexes():
    record = {"count": 9, "skipped": 0, "model": {"name": "m"}, "backend": "faiss",
              "faiss": {"type": "IVF16,Flat", "parameter": "nprobe", "value": 4, "recall": 0.97,
                        "recalls": {"images": 1.0, "objects": 0.97}}}
    assert describe(record).endswith("FAISS IVF16,Flat, nprobe=4 (recall@10 1.000 on held-out "
                                     "image queries, 0.970 on object-name queries)")
    del record["faiss"]["recalls"]  # built before text queries were tuned on
    assert describe(record).endswith("nprobe=4 (recall@10 0.970 on held-out queries)")


def test_recall_at_k_reads_only_the_first_k_found():
    """Guards the recall being of the returned top-k: ids found past the k-th position (a
    deeper search) neither count as found nor dilute the fraction. Query 0 finds 1 of its
    true 2 in its first two, query 1 both: (1/2 + 2/2) / 2 = 0.75."""
    found = np.array([[5, 9, 7, 8], [2, 1, 9, 9]])
    truth = np.array([[5, 7], [1, 2]])
    assert faiss_index.recall_at_k(found, truth) == 0.75
    assert faiss_index.recall_at_k(found[:, :2], truth) == 0.75


def test_recall_counts_no_padding_on_a_collection_smaller_than_k():
    """faiss pads the top-10 of 7 vectors with -1 (as does the exact search): the shared -1
    was counted as a neighbour and the 10 as the number wanted, so an HNSW index finding every
    vector had recall 0.8 and was "tuned" to efSearch 2048 with a warning that it loses
    neighbours."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = faiss_index.exact_neighbours(vectors, vectors, 10)
    assert (truth[:, 7:] == -1).all()
    assert faiss_index.recall_at_k(truth, truth) == 1.0
    half = truth.copy()
    half[:, :3] = -1  # 3 of the 7 real neighbours lost
    assert faiss_index.recall_at_k(half, truth) == pytest.approx(4 / 7)
    index = faiss_index.build_faiss(vectors, "HNSW32,Flat")
    assert faiss_index.tune_search(index, vectors)["value"] == 16


def test_recall_counts_a_tied_vector_in_place_of_the_one_exact_search_listed():
    """Vectors 0 and 1 are one image indexed twice, as are 2 and 3. Query +x: similarities
    1, 1, 0.6, 0.6, 0; the exact top-3 is 0, 1, 2, its third place tied between 2 and 3.
    Finding 3 for 2 is a hit; finding 3 and 4 for 1 and 2 is one hit of two. Query +y, top-2
    4 then 2 (tied with 3): both tied vectors are one place, and do not stand in for 4."""
    vectors = np.array([[1, 0], [1, 0], [0.6, 0.8], [0.6, 0.8], [0, 1]], dtype=np.float32)
    x, y = np.array([[1, 0]], dtype=np.float32), np.array([[0, 1]], dtype=np.float32)
    truth = np.array([[0, 1, 2]])
    cases = [([[0, 1, 3]], 1.0, 2 / 3), ([[0, 3, 4]], 2 / 3, 1 / 3), ([[2, 3, 4]], 1 / 3, 1 / 3),
             ([[3, -1, -1]], 1 / 3, 0.0)]
    for found, with_ties, ids_only in cases:
        found = np.array(found)
        assert faiss_index.recall_at_k(found, truth, x, vectors) == pytest.approx(with_ties)
        assert faiss_index.recall_at_k(found, truth) == pytest.approx(ids_only)
    truth = np.array([[4, 2]])
    for found, with_ties in (([[4, 3]], 1.0), ([[3, 2]], 0.5), ([[2, 4]], 1.0)):
        assert faiss_index.recall_at_k(np.array(found), truth, y, vectors) == \
            pytest.approx(with_ties)
    # two rows at once, each scored by its own query: +x 1, +y 2/3 (0 is far from +y)
    both, truth = np.array([[1, 0, 3], [4, 3, 0]]), np.array([[0, 1, 2], [4, 2, 3]])
    assert faiss_index.recall_at_k(both, truth, np.concatenate([x, y]), vectors) == \
        pytest.approx(5 / 6)


def test_duplicate_images_tune_to_a_narrow_search():
    """100 images each indexed 300 times (a web-scraped set's repeats): identical vectors can
    land in two IVF lists with near-identical centroids, and the lists return tied copies in
    another order than exact search. Recall on ids stopped near 0.96 from nprobe 4 up, so
    tuning climbed to a full scan (nprobe = nlist, as slow as Flat); tie-aware, nprobe 4
    finds them all."""
    vectors = np.tile(_clustered(100, 128, 20), (300, 1))
    index = faiss_index.build_faiss(vectors, "IVF256,Flat")
    tuned = faiss_index.tune_search(index, vectors, recall_target=0.99)
    assert tuned["value"] <= 8 and tuned["recall"] >= 0.99


def test_a_collection_without_duplicates_tunes_as_on_ids_alone():
    """Without ties the tie-aware recall is the recall on ids: each breadth and recall tuned
    (IVF and HNSW, one query set and named sets) is what tuning on ids alone gives."""
    vectors = _clustered(20_000, 32, 50)
    far = np.random.default_rng(5).standard_normal((200, 32)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    near = faiss_index.held_out_queries(vectors)
    for factory, start, limit in (("IVF128,Flat", 1, 128), ("HNSW32,Flat", 16, 2048)):
        index = faiss_index.build_faiss(vectors, factory)
        for target, sets in ((0.99, {"queries": near}), (0.95, {"images": near, "text": far})):
            value = start
            while True:  # the tuning on ids alone, as before ties counted
                recalls = {key: _recall(index, q, vectors, value, ties=False)
                           for key, q in sets.items()}
                if min(recalls.values()) >= target or value >= limit:
                    break
                value *= 2
            tuned = faiss_index.tune_search(index, vectors, target,
                                            queries=sets if len(sets) > 1 else near)
            assert (tuned["value"], tuned["recall"]) == (value, round(min(recalls.values()), 4))
            if len(sets) > 1:
                assert tuned["recalls"] == {key: round(r, 4) for key, r in recalls.items()}


def test_tuning_from_a_start_keeps_it_when_it_reaches_the_target():
    """An --add checks the breadth tuned before on the grown index: kept if it reaches the
    target, else widened from there."""
    vectors = _clustered(20_000, 32, 50)
    index = faiss_index.build_faiss(vectors, "IVF128,Flat")
    best = faiss_index.tune_search(index, vectors, 0.95)["value"]
    assert faiss_index.tune_search(index, vectors, 0.95, start=4 * best)["value"] == 4 * best
    assert faiss_index.tune_search(index, vectors, 0.95, start=max(1, best // 4))["value"] == \
        best
