"""FAISS on one machine: choose an index type from the collection size and a memory budget the
way autofaiss does, build it, tune its search breadth to a recall target, search with paging.

Vectors are unit length and the metric is the inner product, so scores are cosine similarities.
"""

from __future__ import annotations

import math
import numbers
import os
import re

import numpy as np

from cliplab.errors import ConfigError, DataError, InputError

EXACT_BELOW = 100_000          # exact search is fast enough (and perfect) below this many vectors
TUNE_QUERIES = 200
TUNE_K = 10                    # search breadth is tuned for recall@10
NAMED_TYPES = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - the serve extra declares it
        raise ConfigError("the FAISS backend needs faiss-cpu: pip install 'cliplab[serve]'") from None
    return faiss


def default_memory_budget() -> int:
    """Half the machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest sqrt(n) (1M -> 1024)."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def pq_bytes(dim: int) -> int:
    """Bytes per PQ code: dim/8 sub-quantizers (64 for 512-d), a divisor of ``dim``."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def choose_index_type(n: int, dim: int, index_type: str = "auto",
                      memory_budget: int | None = None) -> str:
    """A FAISS factory string. ``auto``: exact (``Flat``) below 100k vectors; above,
    ``IVF<nlist>,Flat`` when the raw vectors fit the memory budget, else compressed
    ``IVF<nlist>,PQ<m>``. Named types (flat, hnsw, ivf-flat, ivf-pq) and raw factory strings
    (``IVF4096,PQ32``) are taken as given."""
    nlist = nlist_for(n)
    named = {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf-flat": f"IVF{nlist},Flat",
             "ivf-pq": f"IVF{nlist},PQ{pq_bytes(dim)}"}
    if index_type in named:
        return named[index_type]
    if index_type != "auto":
        return index_type
    if n < EXACT_BELOW:
        return "Flat"
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    return named["ivf-flat"] if n * dim * 4 * 1.1 <= budget else named["ivf-pq"]


def one_thread_per_search() -> None:
    """FAISS searches on one OpenMP thread each, for a server: its requests run concurrently,
    and OpenMP teams spinning on a busy machine cost more than they save on one small search.
    OpenMP's setting is the whole process's (torch's threads too)."""
    _faiss().omp_set_num_threads(1)


def empty_faiss(dim: int, factory: str):
    """An untrained FAISS index of ``factory``; ``ConfigError`` naming the type if FAISS cannot
    build it (so a bad ``index_type`` can be caught before any embedding)."""
    faiss = _faiss()
    # FAISS parses HNSW0 / HNSW1 (a graph of 0 or 1 links a node) but aborts or crashes
    # adding to it
    small = re.search(r"HNSW([01])(?!\d)", factory)
    if small:
        raise ConfigError(f"bad FAISS index type {factory!r}: HNSW{small.group(1)} links each "
                          "vector to fewer than 2 others, which FAISS cannot build; use HNSW32 "
                          "(hnsw), or 2 links at least")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).splitlines()[0].rsplit(": ", 1)[-1]  # FAISS prefixes its C++ location
        raise ConfigError(f"bad FAISS index type {factory!r}: {reason}; use one of "
                          f"{', '.join(NAMED_TYPES)} or a FAISS factory string") from None


def build_faiss(vectors: np.ndarray, factory: str, seed: int = 0, train_size: int | None = None):
    """A trained FAISS index holding ``vectors`` (float32 [N, D], unit rows) under ids 0..N-1."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = empty_faiss(dim, factory)
    if not index.is_trained:
        ivf = _ivf(index)
        need = 39 * (ivf.nlist if ivf is not None else 256)
        size = min(n, train_size or max(need, 10_000))
        if n < (ivf.nlist if ivf is not None else 1):
            raise ConfigError(f"index type {factory!r} needs at least {ivf.nlist} vectors, "
                              f"the collection has {n}; use flat or hnsw")
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, size, replace=False))] if size < n else vectors
        try:
            index.train(sample)
        except RuntimeError as err:  # e.g. PQ codebooks need more points than the collection has
            reason = str(err).splitlines()[0].rsplit(": ", 1)[-1]  # FAISS prefixes its location
            raise ConfigError(f"index type {factory!r} cannot be trained on {n} vectors "
                              f"({reason}); use flat or hnsw") from None
    add_vectors(index, vectors)
    return index


def needs_training(dim: int, factory: str) -> bool:
    """Whether an index of ``factory`` is trained on the data before it holds any (IVF, PQ):
    its quantizer can then take more vectors without training again."""
    return not empty_faiss(dim, factory).is_trained


def add_vectors(index, vectors: np.ndarray) -> None:
    """Add ``vectors`` (float32 [M, D], unit rows; a memory map is read a block at a time) to
    the trained ``index`` under ids ``index.ntotal .. index.ntotal + M - 1``."""
    for start in range(0, len(vectors), 65536):
        index.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))


def _ivf(index):
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def search_parameter(index) -> str | None:
    """The knob that trades speed for recall: ``nprobe`` (IVF), ``efSearch`` (HNSW), or None."""
    if _ivf(index) is not None:
        return "nprobe"
    faiss = _faiss()
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def set_search_parameter(index, value: int | None) -> None:
    name = search_parameter(index)
    if name is not None and value is not None:
        _faiss().ParameterSpace().set_index_parameter(index, name, int(value))


def held_out_queries(vectors: np.ndarray, count: int = TUNE_QUERIES, noise: float = 0.1,
                     seed: int = 0) -> np.ndarray:
    """Queries near the data but not in it: random collection vectors plus Gaussian noise of
    norm ~``noise``, renormalised."""
    rng = np.random.default_rng(seed + 1)
    base = vectors[rng.choice(len(vectors), min(count, len(vectors)), replace=False)]
    q = base + rng.normal(0, noise / math.sqrt(vectors.shape[1]), base.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-``k`` by inner product (no copy of ``vectors``)."""
    faiss = _faiss()
    _, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                       np.ascontiguousarray(vectors, dtype=np.float32), k,
                       metric=faiss.METRIC_INNER_PRODUCT)
    return ids


# cosine similarities this close count as tied (one image embedded in two batches can differ in
# its last bits); far below the gaps between distinct neighbours
TIE_TOLERANCE = 1e-6


def recall_at_k(found: np.ndarray, truth: np.ndarray, queries: np.ndarray | None = None,
                vectors: np.ndarray | None = None, tolerance: float = TIE_TOLERANCE) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k. A collection of
    fewer than k vectors pads both with -1, which is no neighbour: 7 vectors all found are a
    recall of 1, not 0.8.

    Given the ``queries`` and the indexed ``vectors``, ties count: a found vector as similar
    to the query as the exact k-th (within ``tolerance``) fills the k-th's place, as many
    places as the exact top-k gives the tie. IVF lists return tied vectors (an image indexed
    twice) in another order than exact search, so recall on ids alone may never reach a
    target however broad the search."""
    k = truth.shape[1]
    scores = []
    for row, (f, t) in enumerate(zip(found[:, :k], truth)):
        wanted = set(t[t >= 0].tolist())
        if not wanted:
            scores.append(1.0)
            continue
        got = set(f[f >= 0].tolist())
        hits = len(got & wanted)
        if queries is not None and vectors is not None and hits < len(wanted):
            hits = _hits_with_ties(queries[row], vectors, wanted, got, tolerance)
        scores.append(hits / len(wanted))
    return float(np.mean(scores))


def _hits_with_ties(query: np.ndarray, vectors: np.ndarray, wanted: set[int], got: set[int],
                    tolerance: float) -> int:
    """The exact neighbours ``wanted`` above the k-th's similarity that ``got`` holds, plus
    its vectors tied with the k-th, up to the places the tie has among ``wanted``."""
    ids = sorted(wanted)
    similar = _similarities(query, vectors, ids)
    kth = similar.min()
    above = {i for i, s in zip(ids, similar) if s > kth + tolerance}
    rest = sorted(got - above)
    tied = int((_similarities(query, vectors, rest) >= kth - tolerance).sum()) if rest else 0
    return len(got & above) + min(tied, len(wanted) - len(above))


def _similarities(query: np.ndarray, vectors: np.ndarray, ids: list[int]) -> np.ndarray:
    """Inner products of ``query`` with rows ``ids`` of ``vectors``, in float64: identical
    vectors score alike (float32 BLAS rounds a row by its place in the batch)."""
    rows = np.asarray(vectors[np.asarray(ids)], dtype=np.float64)
    return rows @ np.asarray(query, dtype=np.float64)


def tune_search(index, vectors: np.ndarray, recall_target: float = 0.95, k: int = TUNE_K,
                queries: np.ndarray | dict[str, np.ndarray] | None = None,
                start: int | None = None) -> dict:
    """The smallest nprobe / efSearch (powers of two) whose recall@k (tie-aware: see
    `recall_at_k`) reaches ``recall_target`` on every set of held-out ``queries`` (one array,
    or named sets such as image and text queries; default: indexed vectors plus noise), the
    largest tried if none does. From ``start`` (a breadth tuned before, checked first and kept
    if it still reaches the target), else from the narrowest.
    ``{parameter, value, recall}``: ``recall`` is the lowest set's; named sets add
    ``recalls``, each set's recall at that value."""
    name = search_parameter(index)
    if name is None:
        return {"parameter": None, "value": None, "recall": 1.0}
    named = isinstance(queries, dict)
    sets = queries if named else {"queries": held_out_queries(vectors) if queries is None
                                  else queries}
    sets = {key: np.ascontiguousarray(q, dtype=np.float32) for key, q in sets.items()}
    truths = {key: exact_neighbours(q, vectors, k) for key, q in sets.items()}
    limit = _ivf(index).nlist if name == "nprobe" else 2048
    value = int(start) if start is not None else 1 if name == "nprobe" else 16
    while True:
        set_search_parameter(index, value)
        recalls = {key: recall_at_k(index.search(q, k)[1], truths[key], q, vectors)
                   for key, q in sets.items()}
        lowest = min(recalls.values())
        if lowest >= recall_target or value >= limit:
            best = {"parameter": name, "value": value, "recall": round(lowest, 4)}
            if named:
                best["recalls"] = {key: round(r, 4) for key, r in recalls.items()}
            return best
        value *= 2


def search(index, queries: np.ndarray, k: int, offset: int = 0,
           vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids ``[Q, k]`` of results ``offset .. offset+k`` (ids -1 past the end).

    An approximate index (IVF, HNSW) is searched broader than its tuned breadth when the page
    lies deeper than that breadth reaches, so a page is full while the collection has more;
    a query still short of ``offset + k`` hits is searched exactly over ``vectors`` (the
    stored ``[N, D]`` embeddings), if given. One vector ``[D]`` is one query."""
    queries = search_queries(queries, k, offset, index.d, "the FAISS index")
    k, offset = int(k), int(offset)  # a NumPy integer is no idx_t to FAISS's bindings
    depth = offset + k
    fetch, most = depth, depth + max(depth, TIE_REACH)
    while True:  # one more than the page's end: a tie across the cut is seen, and taken whole
        wanted = min(fetch + 1, max(index.ntotal, depth), most)
        scores, ids = _deep_search(index, queries, wanted, breadth_for=depth)
        short = _short(ids, wanted, index.ntotal)
        if short.any() and vectors is not None:
            scores[short], ids[short] = _exact_search(queries[short], vectors, wanted)
        if wanted <= depth or wanted >= min(index.ntotal, most) or \
                not tie_past_the_end(scores, ids, depth):
            break
        fetch *= 2
    scores, ids = order_page(scores, ids)
    return scores[:, offset:depth], ids[:, offset:depth]


def order_page(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row best first, equal scores (an image indexed twice) in id order, no hit (-1)
    last: FAISS returns ties in an order that depends on the depth asked, so pages cut from
    two searches repeated one and lost the other."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


# how far past a page's end a tie is followed (thousands of identical embeddings, such as blank
# images, would cost a search each doubling; a page inside a larger tie may repeat an item)
TIE_REACH = 1024


def tie_past_the_end(scores: np.ndarray, ids: np.ndarray, depth: int) -> bool:
    """Whether some row's score at the page's end (rank ``depth``; rows come best first) is
    also its last fetched one: the tie may go on past what was fetched."""
    return bool(((ids[:, -1] >= 0) & (scores[:, -1] == scores[:, depth - 1])).any())


def search_queries(queries, k: int, offset: int = 0, dim: int | None = None,
                   where: str = "the index") -> np.ndarray:
    """``queries`` (NumPy, torch or lists) as contiguous float32 ``[Q, dim]``, one vector
    ``[dim]`` as one query; ``k >= 1`` and ``offset >= 0``, as the HTTP API takes them. Anything
    else is one `InputError` saying what was given and what ``where`` expects."""
    for name, value, least in (("k", k, 1), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InputError(f"search: {name}={value!r}; {name} must be an integer >= {least}")
    if hasattr(queries, "detach"):  # a torch tensor (torch is not imported here)
        queries = queries.detach().cpu().numpy()
    try:
        array = np.asarray(queries, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"search: queries must be embeddings (a float array [Q, D] or one "
                         f"vector [D]), not {type(queries).__name__}") from None
    array = array.reshape(1, -1) if array.ndim == 1 else array
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        held = f"{where} holds vectors of {dim} dimensions: " if dim is not None else ""
        raise InputError(f"search: queries of shape {list(np.shape(queries))}; {held}give one "
                         f"vector [{dim or 'D'}] or a batch [Q, {dim or 'D'}] embedded with "
                         "the index's model")
    if not np.isfinite(array).all():  # FAISS answers a NaN query as if the index were empty
        raise InputError("search: queries hold NaN or infinite values; embed them again")
    return np.ascontiguousarray(array)


def _short(ids: np.ndarray, depth: int, total: int) -> np.ndarray:
    """Which rows of ``ids`` hold fewer than ``min(depth, total)`` hits."""
    return (ids[:, :min(depth, total)] < 0).any(axis=1)


def _deep_search(index, queries: np.ndarray, depth: int,
                 breadth_for: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top ``depth`` of an index at a breadth made for ``breadth_for`` (default
    ``depth``; the page's end, so pages of one power of two are searched alike), set per call,
    not on the shared index, and doubled while some query gets fewer than ``depth`` hits, up to
    a limit."""
    name = search_parameter(index)
    if name is None:
        return index.search(queries, depth)
    value, limit = _breadth(index, name, breadth_for or depth)
    while True:
        scores, ids = _search_with(index, queries, depth, name, value)
        if value >= limit or not _short(ids, depth, index.ntotal).any():
            return scores, ids
        value = min(limit, 2 * value)


def _breadth(index, name: str, depth: int) -> tuple[int, int]:
    """``(start, limit)`` of ``nprobe`` / ``efSearch`` for the top ``depth``: the tuned value
    (tuned for the top ``TUNE_K``) times the power of two ``m`` with ``TUNE_K * m >= depth``,
    so deeper pages keep about the recall of the first (HNSW: at most 4x the depth, where
    recall is high anyway). Pages of one power of two are searched alike and continue each
    other without duplicates."""
    scale = 1 << max(0, math.ceil(math.log2(depth / TUNE_K)))
    if name == "nprobe":
        ivf = _ivf(index)
        return min(ivf.nlist, ivf.nprobe * scale), ivf.nlist
    bucket, tuned = TUNE_K * scale, _faiss().downcast_index(index).hnsw.efSearch
    ef = max(bucket, tuned, min(tuned * scale, 4 * bucket))
    return ef, 4 * ef


def _search_with(index, queries: np.ndarray, depth: int, name: str, value: int):
    """``index.search`` with ``nprobe`` / ``efSearch`` = ``value`` for this call only (safe
    while other threads search the same index)."""
    faiss = _faiss()
    inner = (faiss.SearchParametersIVF(nprobe=int(value)) if name == "nprobe"
             else faiss.SearchParametersHNSW(efSearch=int(value)))
    params = inner
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):  # e.g. OPQ16,IVF..
        params = faiss.SearchParametersPreTransform(index_params=inner)
    return index.search(queries, depth, params=params)


def _exact_search(queries: np.ndarray, vectors: np.ndarray, depth: int):
    """Exact top ``depth`` scores and ids over ``vectors`` (-1 past the end)."""
    scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), depth), -1, dtype=np.int64)
    found = min(depth, len(vectors))
    scores[:, :found], ids[:, :found] = _faiss().knn(
        queries, np.ascontiguousarray(vectors, dtype=np.float32), found,
        metric=_faiss().METRIC_INNER_PRODUCT)
    return scores, ids


def _utf8(path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_faiss(index, path) -> None:
    """Write ``index`` to ``path``; through Python's file when FAISS cannot take the path
    (a name that is not UTF-8: SWIG passes a path to C++ as UTF-8 text)."""
    if _utf8(path):
        _faiss().write_index(index, str(path))
        return
    with open(path, "wb") as file:
        _faiss().write_index(index, _faiss().PyCallbackIOWriter(file.write))


def read_faiss(path):
    """The FAISS index in ``path``; a ``DataError`` naming the file if FAISS cannot read it."""
    try:
        if _utf8(path):
            return _faiss().read_index(str(path))
        with open(path, "rb") as file:  # as write_faiss
            return _faiss().read_index(_faiss().PyCallbackIOReader(file.read))
    except RuntimeError as err:
        reason = str(err).splitlines()[0].rsplit(": ", 1)[-1]  # FAISS prefixes its C++ location
        raise DataError(f"{path}: not a FAISS index FAISS can read ({reason}); the index is "
                        "damaged, rebuild it with `cliplab index`") from None
