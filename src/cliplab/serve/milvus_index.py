"""Milvus beyond one machine: an index's vectors in a Milvus collection through `pymilvus`.

A URI that is a local file path (``./search.db``) runs Milvus Lite in-process; an
``http(s)://``, ``tcp://`` or ``unix://`` URI reaches a Milvus server or cluster, with the
credentials (``user:password`` or a token) in ``$CLIPLAB_MILVUS_TOKEN``, never in the URI, which
is recorded. Scores are inner products of unit vectors (cosine), as in the FAISS backend, and
pages are cut as FAISS's are (`MilvusVectors.search`). The collection holds ids and vectors
only: keys, captions and metadata stay in the index folder's SQLite, which is all that reads
them (Milvus Lite's port on 127.0.0.1 is open to every local user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from cliplab.errors import ConfigError, DataError, InputError
from cliplab.serve.faiss_index import TIE_REACH, order_page, search_queries, tie_past_the_end

MAX_WINDOW = 16384  # Milvus caps offset + limit
BATCH = 1000
REMOTE_SCHEMES = ("http", "https", "tcp", "unix")  # pymilvus's; anything else is a Lite file
TOKEN_VARIABLE = "CLIPLAB_MILVUS_TOKEN"


class CollectionGone(DataError):
    """An index's Milvus collection was dropped after the index was opened."""


class MilvusUnavailable(DataError):
    """Milvus cannot be used now (unreachable, or a Milvus Lite file another process holds):
    a condition that may pass, not the index's fault."""


def gone_message(collection: str, uri: str) -> str:
    """What a server says of an index whose collection was dropped under it."""
    return (f"Milvus collection {collection} at {uri} is gone (an `index --add` of this index, "
            "or of a copy of its folder, replaced it): the server serves the index folder's new "
            "collection once it has loaded it (a copy's --add leaves none: rebuild the index)")


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in REMOTE_SCHEMES


def check_no_credentials(uri: str) -> None:
    """Refuse a ``--uri`` with credentials in it (``user:password@``, ``token@``): pymilvus
    would take them, and the index would record them in index.json and show them."""
    parts = urlsplit(uri)
    if parts.scheme.lower() in REMOTE_SCHEMES and "@" in parts.netloc:
        raise ConfigError(f"--uri: give Milvus's credentials in ${TOKEN_VARIABLE} "
                          "(user:password or a token), not in the URI, which the index "
                          "records in index.json and shows")


def normalise_uri(uri: str) -> str:
    """Remote URIs as given; a Milvus Lite file as an absolute path ending in ``.db``."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return uri
    if "://" in uri:
        raise ConfigError(f"--uri {uri}: Milvus takes {', '.join(REMOTE_SCHEMES)} URIs "
                          "(e.g. http://HOST:19530) or a Milvus Lite file ending in .db")
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise ConfigError(f"--uri {uri}: a Milvus Lite file must end in .db (e.g. ./search.db), "
                          "or give a server as http://HOST:19530")
    return str(path)


def new_collection_name() -> str:
    """A fresh collection name for one index: ``cliplab_`` and 12 random hex digits."""
    return f"cliplab_{uuid.uuid4().hex[:12]}"


def lite_file_in_use(path: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on the database ``path``."""
    import fcntl

    try:
        with open(path / "LOCK", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


class _QuietInThisThread(logging.Filter):
    """Drops the records of the threads inside `_quiet` (a server searches from many: a level
    set and put back by each would race, and could leave the logger silenced for good)."""

    def __init__(self):
        super().__init__()
        self.inside = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.inside, "on", False)


_QUIET_FILTERS: dict[str, _QuietInThisThread] = {}
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet(name: str):
    """The logger ``name`` silenced in this thread: Milvus Lite and pymilvus log a traceback
    of a failure they then raise, which cliplab says in one line (or as a 503)."""
    with _QUIET_LOCK:
        if name not in _QUIET_FILTERS:
            _QUIET_FILTERS[name] = _QuietInThisThread()
            logging.getLogger(name).addFilter(_QUIET_FILTERS[name])
    inside = _QUIET_FILTERS[name].inside
    inside.on = True
    try:
        yield
    finally:
        inside.on = False


class MilvusVectors:
    """One Milvus collection: ``id`` (primary) and ``vector``."""

    def __init__(self, uri: str, collection: str, *, must_exist: bool = False):
        """Connect to the Milvus at ``uri`` (credentials from ``$CLIPLAB_MILVUS_TOKEN``);
        ``must_exist``: a Milvus Lite file that is not there is refused, not created."""
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise ConfigError("the Milvus backend needs pymilvus (and milvus-lite for a local "
                              "file): pip install 'cliplab[milvus]'") from None
        self.uri, self.collection = normalise_uri(uri), collection
        local = None if is_remote(self.uri) else Path(self.uri)
        if local is not None and must_exist and not local.exists():
            holding = f" holding collection {collection}" if collection else ""
            raise DataError(f"the Milvus Lite database {local}{holding} does not exist (moved or "
                            "deleted?); put it back at that path")
        try:
            with _quiet("milvus_lite.server_manager"):
                self.client = MilvusClient(self.uri, token=os.environ.get(TOKEN_VARIABLE, ""))
        except Exception as err:  # pymilvus raises its own MilvusException family
            if local is not None and lite_file_in_use(local):
                raise MilvusUnavailable(
                    f"the Milvus Lite database {local} is open in another process (a running "
                    "`cliplab serve` or `cliplab index`?): Milvus Lite lets one process use a "
                    "file at a time; stop it, then run this again (or use a Milvus server)"
                ) from None
            raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: "
                                    f"{str(err).splitlines()[0]}") from None

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
        params = client.prepare_index_params()
        kind = index_type or ("AUTOINDEX" if is_remote(self.uri) else "FLAT")
        params.add_index(field_name="vector", index_type=kind, metric_type="IP")
        client.create_collection(self.collection, schema=schema, index_params=params)

    def insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Vectors with their ids, in batches."""
        for start in range(0, len(ids), BATCH):
            self.client.insert(self.collection, [
                {"id": int(i), "vector": v.tolist()}
                for i, v in zip(ids[start:start + BATCH], vectors[start:start + BATCH])])
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

    def search(self, queries: np.ndarray, k: int, offset: int = 0,
               vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``[Q, k]`` of results ``offset .. offset+k`` (ids -1 past the end);
        one vector ``[D]`` is one query. Cut as FAISS's pages are: the top ``offset + k`` (and
        one more, and on while a tie goes past the page) in (score, id) order, scored again
        over ``vectors`` (the stored ``[N, D]`` embeddings), if given — Milvus scores copies of
        one vector up to 1e-7 apart and orders ties otherwise for each limit and offset, so
        pages asked of it directly repeated some items and skipped others."""
        queries = search_queries(queries, k, offset)
        depth = int(offset) + int(k)
        if depth > MAX_WINDOW:
            raise InputError(f"search: offset + k = {depth} is past Milvus's window of "
                             f"{MAX_WINDOW} results")
        fetch, most = depth, min(depth + max(depth, TIE_REACH), MAX_WINDOW)
        while True:
            wanted = min(fetch + 1, most)
            scores, ids = self._top(queries, wanted)
            if vectors is not None:
                scores = _scored_again(queries, ids, vectors)
            if wanted <= depth or wanted >= most or not tie_past_the_end(scores, ids, depth):
                break
            fetch *= 2
        scores, ids = order_page(scores, ids)
        return scores[:, int(offset):depth], ids[:, int(offset):depth]

    def _top(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Milvus's own top ``limit`` of each query (ids -1, scores ``-FLT_MAX`` where none,
        as FAISS fills them)."""
        scores = np.full((len(queries), limit), np.finfo(np.float32).min, dtype=np.float32)
        ids = np.full((len(queries), limit), -1, dtype=np.int64)
        if not len(queries):
            return scores, ids
        try:
            with _quiet("pymilvus.decorators"):  # it logs a traceback of each failed call
                hits = self.client.search(self.collection, data=[q.tolist() for q in queries],
                                          limit=limit, search_params={"metric_type": "IP"},
                                          output_fields=[])
        except Exception:  # pymilvus raises its own MilvusException family
            if not self.client.has_collection(self.collection):
                raise CollectionGone(gone_message(self.collection, self.uri)) from None
            raise
        for row, found in enumerate(hits):
            for col, hit in enumerate(list(found)[:limit]):
                ids[row, col], scores[row, col] = int(hit["id"]), float(hit["distance"])
        return scores, ids

    def close(self) -> None:
        self.client.close()


def _scored_again(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The inner products of ``queries`` ``[Q, D]`` with the stored vectors of ``ids``
    ``[Q, n]`` (``-FLT_MAX`` where an id is -1)."""
    found = ids >= 0
    scores = np.full(ids.shape, np.finfo(np.float32).min, dtype=np.float32)
    for row in range(len(ids)):
        rows = np.asarray(vectors[ids[row, found[row]]], dtype=np.float32)
        # summed per row: a matrix product scores copies of one vector ~1 ulp apart by where
        # they sit in ``rows``, which reordered ties between pages (at 256+ dimensions)
        scores[row, found[row]] = (rows * queries[row]).sum(axis=1)
    return scores
