"""Vector search at scale: build time, single-query latency (p50/p99 of top-10) and recall@10
against exact search, for exact search, the index `cliplab index` chooses automatically, and
one alternative (compressed IVF-PQ). One JSON line per index.

Data (default 1,000,000 x 512, float32 unit vectors, ~2 GB): a mixture of ``--clusters``
Gaussian clusters. Centres are standard normal directions; a point is its centre plus isotropic
noise of norm ``--spread`` relative to the centre's, then normalised. Even at 0.8 the clusters
stay apart (a query's ten nearest neighbours come from its own cluster), so the data is kinder
to IVF than a real collection's embeddings, which have no discrete clusters. Queries are fresh
draws from the same mixture (held out: not in the index); the automatic index's nprobe is tuned
as `cliplab index` tunes it for image queries, on indexed vectors plus noise (which can pick a
narrower breadth than the queries need; `cliplab index` also tunes on the collection's captions
embedded as text queries, which these vectors have none of). Peak memory is about three copies of the vectors (raw, exact index, IVF
index): ~7 GB at the default size, inside 24 GiB.

Target: p50 <= 5 ms at recall@10 >= 0.95 for the automatic index.

    python benchmarks/search_latency.py            # 1M x 512, a few minutes
    python benchmarks/search_latency.py --n 200000 # smaller
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from cliplab.errors import ConfigError
from cliplab.serve import faiss_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import fraction, make_parser, non_negative_float, non_negative_int  # noqa: E402
from cli_args import positive_float, positive_int, require, run_main  # noqa: E402


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int,
                      centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors from the mixture (and its centres), drawn in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        which = rng.integers(0, len(centres), stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block = centres[which] + noise * (spread / np.sqrt(dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, centres


WARMUP_QUERIES = 10  # untimed single queries before the timed ones (first-call costs)
MIN_FOR_P99 = 100  # fewer timed queries: the p99 would be little more than the maximum


def latencies_ms(index, queries: np.ndarray, k: int = 10,
                 warmup: int = WARMUP_QUERIES) -> np.ndarray:
    """Milliseconds per single query, one thread (as a server answers concurrent requests),
    after ``warmup`` untimed queries (the first of ``queries``, searched again when timed)."""
    faiss = faiss_index._faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    for q in queries[:warmup]:
        index.search(q[None], k)
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
    faiss.omp_set_num_threads(threads)
    return np.asarray(times)


def measure(name: str, factory: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            recall_target: float, latency_queries: int) -> dict:
    start = time.perf_counter()
    index = faiss_index.build_faiss(vectors, factory)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned = faiss_index.tune_search(index, vectors, recall_target)  # its image queries
    tune_s = time.perf_counter() - start
    faiss_index.set_search_parameter(index, tuned["value"])
    found = index.search(queries, 10)[1]
    lat = latencies_ms(index, queries[:latency_queries])
    return {"index": name, "type": factory, "n": len(vectors), "dim": vectors.shape[1],
            "build_s": round(build_s, 2), "tune_s": round(tune_s, 2),
            "search_parameter": tuned["parameter"], "search_value": tuned["value"],
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) >= MIN_FOR_P99
            else None, "max_ms": round(float(lat.max()), 3),
            "recall_at_10": round(faiss_index.recall_at_k(found, truth), 4),
            "bytes_per_vector": _bytes_per_vector(index, vectors.shape[1]),
            "queries": len(queries), "latency_queries": len(lat),
            "warmup_queries": min(WARMUP_QUERIES, len(lat))}


def _bytes_per_vector(index, dim: int) -> int:
    ivf = faiss_index._ivf(index)
    return int(ivf.code_size) if ivf is not None else 4 * dim


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--n", type=positive_int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=positive_int, default=512, help="vector dimension")
    parser.add_argument("--clusters", type=positive_int, default=1000,
                        help="Gaussian clusters of the mixture")
    parser.add_argument("--spread", type=non_negative_float, default=0.8,
                        help="noise norm of a point relative to its centre's")
    parser.add_argument("--queries", type=positive_int, default=500,
                        help="held-out queries for recall")
    parser.add_argument("--latency-queries", type=positive_int, default=500,
                        help="single queries timed per index, after 10 untimed ones (exact: a "
                        "fifth of it); p99 is null below 100 timed queries (max_ms is given)")
    parser.add_argument("--recall", type=fraction, default=0.95, help="recall@10 target")
    parser.add_argument("--memory-gb", type=positive_float, default=24,
                        help="memory budget for auto")
    parser.add_argument("--alternative", default="ivf-pq",
                        help="the other index to compare (named type or FAISS factory)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="data seed")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="FAISS threads for building (0: all cores)")
    args = parser.parse_args()
    require(parser, "faiss")
    budget = int(args.memory_gb * (1 << 30))
    runs = [("exact", "Flat", max(20, args.latency_queries // 5)),
            ("auto", faiss_index.choose_index_type(args.n, args.dim, "auto", budget),
             args.latency_queries),
            ("alternative", faiss_index.choose_index_type(args.n, args.dim, args.alternative,
                                                          budget), args.latency_queries)]
    for name, factory, _ in runs:  # a bad type or too few vectors: said before any data
        flag = "--alternative" if name == "alternative" else "--n"
        try:
            index = faiss_index.empty_faiss(args.dim, factory)
        except ConfigError as err:
            parser.error(f"argument {flag}: {err}")
        ivf = faiss_index._ivf(index)
        if ivf is not None and args.n < ivf.nlist:
            parser.error(f"argument --n: the {name} index ({factory}) needs at least {ivf.nlist} "
                         f"vectors, got {args.n}")
    if args.threads:
        faiss_index._faiss().omp_set_num_threads(args.threads)
    start = time.perf_counter()
    vectors, centres = clustered_vectors(args.n, args.dim, args.clusters, args.spread, args.seed)
    queries, _ = clustered_vectors(args.queries, args.dim, args.clusters, args.spread,
                                   args.seed + 1, centres)
    truth = faiss_index.exact_neighbours(queries, vectors, 10)
    print(json.dumps({"data": "gaussian-mixture", "n": args.n, "dim": args.dim,
                      "clusters": args.clusters, "spread": args.spread,
                      "draw_and_truth_s": round(time.perf_counter() - start, 2)}), flush=True)
    for name, factory, timed in runs:
        print(json.dumps(measure(name, factory, vectors, queries, truth, args.recall, timed)),
              flush=True)


if __name__ == "__main__":
    run_main(main)
