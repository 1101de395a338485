"""SemDeDup (Abbas et al., 2023) on a matrix of embeddings: k-means on the L2-normalised rows,
then within each cluster drop every item whose cosine similarity to a member visited before it
exceeds ``1 - eps``.

Which earlier members count (``compare``):

- ``"kept"`` (default): only those kept (greedy): a chain a~b~c with a, c apart keeps a and c,
  so nothing is dropped without a kept near duplicate standing for it.
- ``"earlier"``: every earlier member, kept or dropped, as SemDeDup's reference code does
  (``max(triu(S, 1), dim=0) > 1 - eps``): the chain keeps only a. It drops more at the same
  ``eps``, so the paper's ``eps`` gives the paper's rates with this rule only.

The members of a cluster are visited in a fixed order (``keep``):

- ``"first"`` (default): pool order. The first of a group of near duplicates is kept, as
  `exact_dedup` does, so the kept item does not depend on the clustering (a k-means seed only
  changes which pairs get compared), and a user who puts preferred items first keeps them.
- ``"farthest"``: farthest from the cluster centroid first (SemDeDup's "keep hard examples"),
  ties in pool order.

Near duplicates that k-means puts into different clusters are not compared: the price of
comparing within clusters only (more clusters: faster, fewer pairs found).

Fast at a million rows: k-means is trained on a subsample (``max_points_per_centroid`` rows per
centroid), assignment is one FAISS search over the centroids, and within-cluster similarities
are blocked matrix products (torch, all threads). In a large cluster, rows identical to an
earlier row are taken out before the products and answered from the row they copy: a
placeholder image repeated 40 000 times is one cluster k-means cannot split, and would cost
1.6e9 similarities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cliplab.errors import ConfigError, DataError

KeepRule = Literal["first", "farthest"]
CompareRule = Literal["kept", "earlier"]
BLOCK_ELEMENTS = 1 << 25  # similarities held at once per block (128 MB of float32)
# clusters this large are searched for rows identical to an earlier one first (below it a
# cluster of identical rows costs at most 4M similarities)
COLLAPSE_MIN_ROWS = 2048


@dataclass
class SemanticDuplicates:
    """The result, arrays aligned with the input rows.

    ``keep``: bool; ``duplicate_of``: for a dropped row the row of its cluster it was dropped
    as a near duplicate of (``compare: kept``: the kept row it is most similar to;
    ``earlier``: the most similar row visited before it, which may itself be dropped), -1 for
    kept rows; ``similarity``: for a dropped row its cosine to that row (above ``threshold``),
    for a kept row to the most similar *other kept* row of the same cluster (``<= threshold``;
    -1.0 where there is none); ``cluster``: k-means cluster of each row; ``threshold``:
    ``1 - eps``.
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    cluster: np.ndarray
    n_clusters: int
    threshold: float

    def clusters(self) -> list[list[int]]:
        """Groups of near duplicates: the kept row first, then the rows dropped as its duplicates,
        directly or through a chain of dropped ones (pool order); only groups with at least one
        dropped row."""
        groups: dict[int, list[int]] = {}
        for i in np.flatnonzero(~self.keep):
            root = int(self.duplicate_of[i])
            while not self.keep[root]:  # `earlier`: a duplicate of a dropped row (visited before)
                root = int(self.duplicate_of[root])
            groups.setdefault(root, []).append(int(i))
        return [[kept, *dropped] for kept, dropped in sorted(groups.items())]


def auto_clusters(n: int) -> int:
    """The default number of clusters: about sqrt(n) (1000 for a million rows), at least 1."""
    return max(1, round(math.sqrt(n)))


def normalise_rows(embeddings: np.ndarray) -> np.ndarray:
    """Float32 unit rows (a new array); ``DataError`` for non-finite or all-zero rows."""
    x = np.array(embeddings, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise DataError(f"embeddings must be a 2-d array, got shape {x.shape}")
    norms = np.sqrt(np.einsum("nd,nd->n", x, x))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise DataError(f"{int(bad.sum())} embedding rows are zero or not finite "
                        f"(first at row {int(np.flatnonzero(bad)[0])})")
    x /= norms[:, None]
    return x


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - the curate extra declares it
        raise ConfigError("semantic deduplication needs faiss-cpu: pip install 'cliplab[curate]'") from None
    return faiss


def kmeans_assign(x: np.ndarray, n_clusters: int, seed: int, iterations: int = 10,
                  max_points_per_centroid: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on unit rows ``x`` (trained on at most ``max_points_per_centroid`` rows
    per centroid, drawn by ``seed``): ``(labels [n] int64, centroids [k, d] float32)``."""
    n, dim = x.shape
    if n_clusters <= 1:
        return np.zeros(n, dtype=np.int64), x.mean(0, keepdims=True)
    faiss = _faiss()
    kmeans = faiss.Kmeans(dim, n_clusters, niter=iterations, seed=seed, spherical=True,
                          max_points_per_centroid=max_points_per_centroid, verbose=False)
    kmeans.cp.min_points_per_centroid = 1  # small pools: no warning, clusters may be tiny
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return labels[:, 0].astype(np.int64), kmeans.centroids.astype(np.float32)


def _visit_order(labels: np.ndarray, x: np.ndarray, centroids: np.ndarray, keep: KeepRule) -> np.ndarray:
    """Row indices grouped by cluster, in each cluster the order the keep rule visits them."""
    pool = np.arange(len(labels))
    if keep == "first":
        return np.lexsort((pool, labels))
    if keep == "farthest":
        to_centroid = np.einsum("nd,nd->n", x, centroids[labels])
        return np.lexsort((pool, to_centroid, labels))
    raise ConfigError(f"semantic dedup: unknown keep rule {keep!r} (choose first or farthest)")


def _blocks(m: int, columns: int):
    rows = max(1, BLOCK_ELEMENTS // max(1, columns))
    for start in range(0, m, rows):
        yield start, min(m, start + rows)


def _drop_by_kept(kept: np.ndarray, start: int, above: torch.Tensor) -> None:
    """Greedy keep over one block of rows (positions ``start``.. in visit order): a row is
    dropped when a kept row before it is its pair; ``above``: ``[block, start + block]``, which
    pairs are above the threshold. Rows before the block are decided already."""
    block = above.shape[0]
    if start:  # by the kept rows of earlier blocks, all at once
        by_kept = (above[:, :start] & torch.from_numpy(kept[:start])).any(dim=1).numpy()
        kept[start:start + block][by_kept] = False
    inner = above[:, start:start + block].numpy()
    for row in np.flatnonzero(inner.any(axis=1) & kept[start:start + block]).tolist():
        if (inner[row, :row] & kept[start:start + row]).any():  # a kept row earlier in it
            kept[start + row] = False


def _dedup_rows(xc: torch.Tensor, threshold: float, compare: CompareRule = "kept"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cluster's members (unit rows in visit order): ``(kept, similarity, position)`` as
    `SemanticDuplicates` holds them, from one pass of blocked similarity rows in visit order:
    each row's maximum, and whether it is dropped (by the kept rows, or any rows, before it),
    decided as its block is computed. Rows whose most similar member was dropped are then
    compared with the kept members again. Memory is a block of similarities, whatever the
    number of pairs (listing every pair first took 11 GB for 16 000 near-identical rows)."""
    m = len(xc)
    value = np.empty(m, dtype=np.float32)
    index = np.empty(m, dtype=np.int64)
    kept = np.ones(m, dtype=bool)
    earlier = np.full(m, -1, dtype=np.int64)
    earlier_sim = np.full(m, -math.inf, dtype=np.float32)
    for start, stop in _blocks(m, m):
        sims = xc[start:stop] @ xc.T
        block = torch.arange(stop - start)
        sims[block, block + start] = -math.inf  # not itself
        v, i = sims.max(dim=1)
        if compare == "kept":
            _drop_by_kept(kept, start, sims[:, :stop] > threshold)
        else:  # the most similar row before each: itself and later ones masked out
            before = sims[:, :stop].clone()
            before[:, start:stop].masked_fill_(
                torch.ones(stop - start, stop - start, dtype=torch.bool).triu(), -math.inf)
            ev = before.max(dim=1).values
            # of equally similar rows the first (max's index among ties is not fixed)
            ei = torch.where(before == ev[:, None], torch.arange(stop), stop).min(dim=1).values
            kept[start:stop][(ev > threshold).numpy()] = False
            earlier[start:stop], earlier_sim[start:stop] = ei.numpy(), ev.numpy()
        value[start:stop], index[start:stop] = v.numpy(), i.numpy()
    redo = np.flatnonzero(np.isfinite(value) & ~kept[np.maximum(index, 0)])
    if len(redo):  # rows whose most similar member was dropped: their most similar kept one
        kept_pos = np.flatnonzero(kept)
        xk = xc[torch.from_numpy(kept_pos)]
        column_of = np.full(m, -1, dtype=np.int64)
        column_of[kept_pos] = np.arange(len(kept_pos))
        for start, stop in _blocks(len(redo), len(kept_pos)):
            part = redo[start:stop]
            sims = xc[torch.from_numpy(part)] @ xk.T
            own = column_of[part]
            mine = np.flatnonzero(own >= 0)
            sims[torch.from_numpy(mine), torch.from_numpy(own[mine])] = -math.inf
            v, j = sims.max(dim=1)
            value[part], index[part] = v.numpy(), kept_pos[j.numpy()]
    if compare == "earlier":  # a dropped row names the earlier one it was dropped for
        dropped = ~kept
        value[dropped], index[dropped] = earlier_sim[dropped], earlier[dropped]
    lonely = ~np.isfinite(value)  # no other kept member
    return kept, np.where(lonely, -1.0, value).astype(np.float32), np.where(lonely, -1, index)


def _identical_copies(xc: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows bit-for-bit equal to an earlier row of the cluster whose self-similarity is
    certainly above ``threshold`` (so the earlier one is their near duplicate, whatever
    rounding the matrix products do): ``(copies, first)``, positions in visit order, ``first``
    the earliest row equal to each copy."""
    rows = np.ascontiguousarray(xc.numpy())
    keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel()
    _, first_of_key, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first = first_of_key[inverse.ravel()]  # np.unique's index: the first occurrence
    copies = np.flatnonzero(first != np.arange(len(rows)))
    first = first[copies]
    reps = rows[first]
    # a dot product of d float32 terms is within d * 2**-24 of the exact value however it is
    # summed, so two ways of computing it differ by less than this margin
    margin = 2 * rows.shape[1] * 2.0 ** -24
    certain = np.einsum("nd,nd->n", reps, reps) > threshold + margin
    return copies[certain], first[certain]


def _best_earlier_of_copies(xc: torch.Tensor, unique: np.ndarray, copies: np.ndarray,
                            first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``compare: earlier`` for rows identical to an earlier one: the most similar row visited
    before each (value, position; the first of equals), the row it copies counting. Rows equal
    to earlier rows are equally similar to everything and never the first of equals, so only
    ``unique`` rows (sorted positions) are compared: one similarity row per copied row."""
    sources, source_of = np.unique(first, return_inverse=True)
    last_before = np.searchsorted(unique, copies) - 1  # the unique rows before each copy
    xu = xc[torch.from_numpy(unique)]
    value = np.empty(len(copies), dtype=np.float32)
    index = np.empty(len(copies), dtype=np.int64)
    columns = np.arange(len(unique))
    # a similarity here also holds its running maximum, a flag and two int64 positions (25
    # bytes, over 6 float32s): an eighth of the block of similarities keeps to its memory
    for start, stop in _blocks(len(sources), 8 * len(unique)):
        sims = (xc[torch.from_numpy(sources[start:stop])] @ xu.T).numpy()
        best = np.maximum.accumulate(sims, axis=1)
        rises = np.ones(sims.shape, dtype=bool)
        rises[:, 1:] = sims[:, 1:] > best[:, :-1]
        arg = np.maximum.accumulate(np.where(rises, columns, 0), axis=1)
        mine = np.flatnonzero((source_of >= start) & (source_of < stop))
        row, col = source_of[mine] - start, last_before[mine]
        value[mine], index[mine] = best[row, col], unique[arg[row, col]]
    return value, index


def _dedup_cluster(xc: torch.Tensor, threshold: float, compare: CompareRule = "kept"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_dedup_rows`, with rows identical to an earlier row taken out first in large clusters
    (a placeholder image repeated 40 000 times is one cluster k-means cannot split: 1.6e9
    similarities) and their results filled in from the row they copy: the same answer, at
    the cost of the distinct rows."""
    m = len(xc)
    copies = np.zeros(0, dtype=np.int64)
    if m >= COLLAPSE_MIN_ROWS:
        copies, first = _identical_copies(xc, threshold)
    if not len(copies):
        return _dedup_rows(xc, threshold, compare)
    unique = np.setdiff1d(np.arange(m), copies, assume_unique=True)
    kept_u, value_u, index_u = _dedup_rows(xc[torch.from_numpy(unique)], threshold, compare)
    # copies are dropped (their first row is visited before them and above the threshold),
    # and a dropped row changes nothing for the others: not kept, and never the first of
    # equally similar rows, so the distinct rows decide alike without them
    kept = np.zeros(m, dtype=bool)
    kept[unique] = kept_u
    value = np.full(m, -1.0, dtype=np.float32)
    index = np.full(m, -1, dtype=np.int64)
    value[unique] = value_u
    index[unique] = np.where(index_u >= 0, unique[index_u], -1)
    if compare == "kept":  # a kept first row is its copies' most similar kept row, else the
        # first row's most similar kept row is theirs
        stands = kept[first]
        own = xc[torch.from_numpy(first)].numpy()
        # the self-similarity may differ in the last bit from a matrix product's, as the
        # products of differently shaped blocks do
        value[copies] = np.where(stands, np.einsum("nd,nd->n", own, own), value[first])
        index[copies] = np.where(stands, first, index[first])
    else:
        value[copies], index[copies] = _best_earlier_of_copies(xc, unique, copies, first)
    return kept, value, index


def semantic_duplicates(embeddings: np.ndarray, n_clusters: int | Literal["auto"] = "auto",
                        eps: float = 0.05, seed: int = 0, keep: KeepRule = "first",
                        kmeans_iterations: int = 10, max_points_per_centroid: int = 64,
                        compare: CompareRule = "kept") -> SemanticDuplicates:
    """SemDeDup over ``embeddings`` ``[n, d]`` (any scale: rows are L2-normalised first; the
    input is not modified). ``eps`` in (0, 1]: rows more similar than ``1 - eps`` to a row of
    their cluster visited before them (kept ones only with ``compare="kept"``) are dropped;
    ``n_clusters`` 1 compares all pairs (exact)."""
    if not 0 < eps <= 1:
        raise ConfigError(f"semantic dedup: eps must be in (0, 1], got {eps}")
    if compare not in ("kept", "earlier"):
        raise ConfigError(f"semantic dedup: unknown compare rule {compare!r} (choose kept or "
                          "earlier)")
    n = len(embeddings)
    threshold = 1.0 - float(eps)
    if n == 0:
        empty = np.zeros(0)
        return SemanticDuplicates(empty.astype(bool), empty.astype(np.int64),
                                  empty.astype(np.float32), empty.astype(np.int64), 0, threshold)
    k = auto_clusters(n) if n_clusters == "auto" else int(n_clusters)
    if k < 1:
        raise ConfigError(f"semantic dedup: n_clusters must be >= 1 or 'auto', got {n_clusters}")
    k = min(k, n)
    x = normalise_rows(embeddings)
    labels, centroids = kmeans_assign(x, k, seed, kmeans_iterations, max_points_per_centroid)
    order = _visit_order(labels, x, centroids, keep)
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])

    keep_mask = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, -1.0, dtype=np.float32)
    xt = torch.from_numpy(x)
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        members = order[start:stop]
        kept, best, arg = _dedup_cluster(xt[torch.from_numpy(members)], threshold, compare)
        keep_mask[members] = kept
        similarity[members] = best
        dropped = ~kept
        duplicate_of[members[dropped]] = members[arg[dropped]]
    return SemanticDuplicates(keep_mask, duplicate_of, similarity, labels, k, threshold)
