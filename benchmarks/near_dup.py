"""Semantic deduplication at scale: `semantic_duplicates` (SemDeDup: k-means, then all pairs
within each cluster) over ``--n`` embeddings with planted near-duplicate pairs, against exact
all-pairs search (``n_clusters=1``) on a ``--exact-n`` subsample as the reference. Prints one
JSON line: ``n``, ``seconds``, ``recall`` (planted pairs found: one of the two dropped as a
duplicate of the other), ``precision`` (dropped rows that are such a find), the same under
``exact``, and the settings.

Data (default 1,000,000 x 256 float32): a mixture of ``--components`` Gaussian components on
the sphere. Centres are standard normal directions; a row is its centre plus isotropic noise of
norm ``--spread`` relative to the centre's (0.8: rows of one component have cosine ~0.6, as
embeddings of similar images do), normalised. A ``--dup-fraction`` of the rows are planted near
duplicates, each of a different original row: the original plus isotropic noise of relative
norm ``--noise`` (0.15: cosine ~0.99), normalised. Rows are shuffled, so which of a pair comes
first in the pool is random. ``--eps`` 0.05 drops rows more similar than 0.95 to a kept row.

Target: <= 2 minutes at the default size on a 2-core machine with recall >= 0.95.

    python benchmarks/near_dup.py                 # 1M rows (~4 GB peak memory)
    python benchmarks/near_dup.py --n 100000      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import fraction, make_parser, non_negative_float, non_negative_int  # noqa: E402
from cli_args import positive_int, require, run_main  # noqa: E402


def planted_pool(n: int, dim: int, components: int, spread: float, dup_fraction: float,
                 noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows [n, dim], pairs [p, 2] of row indices (original, duplicate), group [n])`` where
    ``group`` is the original's index before shuffling (shared by a planted pair)."""
    rng = np.random.default_rng(seed)
    n_dup = int(round(n * dup_fraction))
    n_base = n - n_dup
    centres = rng.standard_normal((components, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n_base, 100_000):  # blocks bound the temporaries
        stop = min(n_base, start + 100_000)
        block = rng.standard_normal((stop - start, dim)).astype(np.float32)
        block *= spread / np.sqrt(dim)
        block += centres[rng.integers(0, components, stop - start)]
        rows[start:stop] = block
    originals = rng.choice(n_base, n_dup, replace=False)
    jitter = rng.standard_normal((n_dup, dim)).astype(np.float32) * (noise / np.sqrt(dim))
    rows[:n_base] /= np.linalg.norm(rows[:n_base], axis=1, keepdims=True)
    rows[n_base:] = rows[originals] + jitter
    rows[n_base:] /= np.linalg.norm(rows[n_base:], axis=1, keepdims=True)
    group = np.r_[np.arange(n_base), originals]
    perm = rng.permutation(n)  # row i of the pool is generated row perm[i]
    position = np.empty(n, dtype=np.int64)
    position[perm] = np.arange(n)
    pairs = np.stack([position[originals], position[n_base + np.arange(n_dup)]], axis=1)
    return rows[perm], pairs, group[perm]


def score(result, pairs: np.ndarray) -> dict:
    """Recall of planted pairs and precision of the dropped rows."""
    a, b = pairs[:, 0], pairs[:, 1]
    found_b = ~result.keep[b] & (result.duplicate_of[b] == a)
    found_a = ~result.keep[a] & (result.duplicate_of[a] == b)
    dropped = int((~result.keep).sum())
    true_drops = int(found_a.sum() + found_b.sum())
    return {"recall": float((found_a | found_b).mean()) if len(pairs) else 1.0,
            "precision": true_drops / dropped if dropped else 1.0,
            "dropped": dropped, "planted_pairs": int(len(pairs))}


def subsample(rows: np.ndarray, pairs: np.ndarray, group: np.ndarray, m: int):
    """About ``m`` rows: every row whose original is among the first originals (so planted
    pairs stay whole), with the pairs renumbered."""
    cut = int(round((group.max() + 1) * m / len(rows)))
    chosen = np.flatnonzero(group < cut)
    index = np.full(len(rows), -1, dtype=np.int64)
    index[chosen] = np.arange(len(chosen))
    sub_pairs = index[pairs]
    return rows[chosen], sub_pairs[(sub_pairs >= 0).all(axis=1)]


def auto_or_positive_int(text: str) -> str | int:
    """``auto`` or a cluster count."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (or auto)") from None


def dup_fraction(text: str) -> float:
    """A share in [0, 0.5): every planted duplicate copies a different original row."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5) (each duplicate has its own "
                                         f"original), got {text}")
    return value


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--n", type=positive_int, default=1_000_000,
                        help="rows (embeddings) in the pool")
    parser.add_argument("--dim", type=positive_int, default=256, help="embedding dimension")
    parser.add_argument("--components", type=positive_int, default=1000,
                        help="Gaussian components of the mixture")
    parser.add_argument("--spread", type=non_negative_float, default=0.8,
                        help="noise norm of a row relative to its centre's")
    parser.add_argument("--dup-fraction", type=dup_fraction, default=0.05,
                        help="share of the rows that are planted near duplicates")
    parser.add_argument("--noise", type=non_negative_float, default=0.15,
                        help="noise norm of a duplicate relative to its original's")
    parser.add_argument("--eps", type=fraction, default=0.05,
                        help="drop rows more similar than 1 - eps to a kept row")
    parser.add_argument("--n-clusters", type=auto_or_positive_int, default="auto",
                        help="k-means clusters (auto: semantic_duplicates' choice)")
    parser.add_argument("--exact-n", type=positive_int, default=50_000,
                        help="rows of the subsample the exact all-pairs reference runs on")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="data and k-means seed")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch and FAISS threads (default: every core)")
    args = parser.parse_args()
    require(parser, "faiss")  # semantic_duplicates' k-means: said before the pool is drawn

    import torch

    from cliplab.curate.semdedup import semantic_duplicates

    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    n_clusters = args.n_clusters

    rows, pairs, group = planted_pool(args.n, args.dim, args.components, args.spread,
                                      args.dup_fraction, args.noise, args.seed)
    start = time.perf_counter()
    result = semantic_duplicates(rows, n_clusters=n_clusters, eps=args.eps, seed=args.seed)
    seconds = time.perf_counter() - start

    sub_rows, sub_pairs = subsample(rows, pairs, group, min(args.exact_n, args.n))
    start = time.perf_counter()
    exact = semantic_duplicates(sub_rows, n_clusters=1, eps=args.eps, seed=args.seed)
    exact_seconds = time.perf_counter() - start

    print(json.dumps({
        "n": args.n, "dim": args.dim, "seconds": round(seconds, 2),
        **score(result, pairs), "n_clusters": result.n_clusters,
        "exact": {"n": len(sub_rows), "seconds": round(exact_seconds, 2), **score(exact, sub_pairs)},
        "eps": args.eps, "dup_fraction": args.dup_fraction, "noise": args.noise,
        "components": args.components, "spread": args.spread, "seed": args.seed,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    run_main(main)
