"""The Milvus backend: a small collection indexed into Milvus Lite gives the same top-k as the
exact FAISS index, through the index and through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.errors import ConfigError  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
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
        assert np.allclose(f_scores, m_scores, atol=1e-4)
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
    milvus.close()


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
