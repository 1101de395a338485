"""Milvus beyond one machine: vectors and metadata in a Milvus collection through `pymilvus`.

A URI that is a local file path (``./search.db``) runs Milvus Lite in-process; an
``http(s)://`` URI reaches a Milvus server or cluster. Scores are inner products of unit
vectors (cosine), as in the FAISS backend.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from cliplab.errors import ConfigError, DataError
from cliplab.serve.faiss_index import search_queries

MAX_WINDOW = 16384  # Milvus caps offset + limit
BATCH = 1000


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def normalise_uri(uri: str) -> str:
    """Remote URIs as given; a Milvus Lite file as an absolute path ending in ``.db``."""
    if is_remote(uri):
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise ConfigError(f"--uri {uri}: a Milvus Lite file must end in .db (e.g. ./search.db), "
                          "or give a server as http://HOST:19530")
    return str(path)


def new_collection_name() -> str:
    """A fresh collection name for one index: ``cliplab_`` and 12 random hex digits."""
    return f"cliplab_{uuid.uuid4().hex[:12]}"


class MilvusVectors:
    """One Milvus collection: ``id`` (primary), ``vector``, ``key``, ``caption``, ``meta``."""

    def __init__(self, uri: str, collection: str, token: str | None = None):
        try:
            from pymilvus import MilvusClient
        except ImportError:  # pragma: no cover - the milvus extra declares it
            raise ConfigError("the Milvus backend needs pymilvus (and milvus-lite for a local "
                              "file): pip install 'cliplab[milvus]'") from None
        self.uri, self.collection = normalise_uri(uri), collection
        try:
            self.client = MilvusClient(self.uri, token=token or "")
        except Exception as err:  # pymilvus raises its own MilvusException family
            raise DataError(f"cannot reach Milvus at {self.uri}: {str(err).splitlines()[0]}") from None

    def exists(self) -> bool:
        return self.client.has_collection(self.collection)

    def drop(self) -> None:
        """Drop the collection, if there is one."""
        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)

    def create(self, dim: int, index_type: str | None = None) -> None:
        """A fresh collection (an old one of the same name is dropped: callers check first
        that it is theirs)."""
        from pymilvus import DataType

        client = self.client
        self.drop()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("key", DataType.VARCHAR, max_length=4096)
        schema.add_field("caption", DataType.VARCHAR, max_length=8192)
        schema.add_field("meta", DataType.VARCHAR, max_length=65535)
        params = client.prepare_index_params()
        kind = index_type or ("AUTOINDEX" if is_remote(self.uri) else "FLAT")
        params.add_index(field_name="vector", index_type=kind, metric_type="IP")
        client.create_collection(self.collection, schema=schema, index_params=params)

    def insert(self, ids: np.ndarray, vectors: np.ndarray, rows: list[dict]) -> None:
        """Rows ``{key, caption, meta (JSON text)}`` with their ids and vectors, in batches."""
        for start in range(0, len(ids), BATCH):
            self.client.insert(self.collection, [
                {"id": int(i), "vector": v.tolist(), "key": r["key"][:4096],
                 "caption": r["caption"][:8192], "meta": r["meta"][:65535]}
                for i, v, r in zip(ids[start:start + BATCH], vectors[start:start + BATCH],
                                   rows[start:start + BATCH])])
        if hasattr(self.client, "flush"):
            self.client.flush(self.collection)

    def load(self) -> None:
        """Load the collection for search: Milvus keeps an existing collection released (on
        disk only) until a client loads it, and refuses to search it until then."""
        if self.client.has_collection(self.collection):
            self.client.load_collection(self.collection)

    def count(self) -> int:
        if not self.client.has_collection(self.collection):
            return 0
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search(self, queries: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``[Q, k]`` of results ``offset .. offset+k`` (ids -1 past the end);
        one vector ``[D]`` is one query."""
        queries = search_queries(queries, k, offset)
        k, offset = int(k), int(offset)  # NumPy integers as the client's JSON takes them
        if offset + k > MAX_WINDOW:
            raise DataError(f"offset + k = {offset + k} is past Milvus's window of {MAX_WINDOW}")
        hits = self.client.search(self.collection, data=[q.tolist() for q in queries], limit=k,
                                  offset=offset, search_params={"metric_type": "IP"},
                                  output_fields=[])
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, found in enumerate(hits):
            for col, hit in enumerate(list(found)[:k]):
                ids[row, col], scores[row, col] = int(hit["id"]), float(hit["distance"])
        return scores, ids

    def close(self) -> None:
        self.client.close()
