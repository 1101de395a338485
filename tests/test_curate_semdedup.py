"""`semantic_duplicates` (SemDeDup) on hand-built embeddings with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.curate import semdedup
from cliplab.curate.semdedup import auto_clusters, semantic_duplicates
from cliplab.errors import ConfigError, DataError


def unit(*parts: tuple[int, float], dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    for axis, value in parts:
        v[axis] = value
    return v / np.linalg.norm(v)


def angle(theta: float) -> np.ndarray:
    return unit((0, np.cos(theta)), (1, np.sin(theta)))


def test_planted_near_duplicates_keep_the_first_in_pool_order():
    rows = np.stack([
        unit((0, 1)),                 # 0 kept
        unit((2, 1)),                 # 1 kept
        unit((0, 1), (1, 0.1)),       # 2 near duplicate of 0 (cosine 0.995)
        unit((0, 1), (3, 0.8)),       # 3 same topic as 0, not a duplicate (cosine 0.78)
        unit((2, 1), (4, 0.2)) * 5,   # 4 near duplicate of 1 (cosine 0.98); scale is ignored
        unit((0, 1), (1, -0.1)),      # 5 near duplicate of 0 and of 2
    ])
    original = rows.copy()
    result = semantic_duplicates(rows, n_clusters=2, eps=0.05, seed=0)
    np.testing.assert_array_equal(rows, original)  # the input is not modified
    assert result.keep.tolist() == [True, True, False, True, False, False]
    assert result.duplicate_of.tolist() == [-1, -1, 0, -1, 1, 0]
    assert result.clusters() == [[0, 2, 5], [1, 4]]
    assert result.threshold == pytest.approx(0.95)
    # similarity: to the most similar other kept row of the cluster
    c03 = 1 / np.sqrt(1.64)
    np.testing.assert_allclose(result.similarity, [c03, -1.0, 1 / np.sqrt(1.01), c03,
                                                   1 / np.sqrt(1.04), 1 / np.sqrt(1.01)], atol=1e-5)
    assert (result.similarity[result.keep] <= 0.95).all()
    assert (result.similarity[~result.keep] > 0.95).all()


def test_a_chain_keeps_both_ends_compared_against_kept_rows_only():
    theta = np.arccos(0.97)  # a~b and b~c at 0.97, a~c at 2*0.97^2-1 = 0.882
    rows = np.stack([angle(0), angle(theta), angle(2 * theta)])
    result = semantic_duplicates(rows, n_clusters=1, eps=0.05)
    assert result.keep.tolist() == [True, False, True]
    assert result.duplicate_of[1] in (0, 2)
    np.testing.assert_allclose(result.similarity, [0.8818, 0.97, 0.8818], atol=1e-4)


def test_compare_earlier_drops_a_chain_as_semdedups_reference_code_does():
    """SemDeDup's code drops an item near ANY member before it, kept or dropped
    (max(triu(S, 1), dim=0) > 1 - eps): the chain a~b~c keeps only a, c named as b's duplicate
    and grouped under a."""
    theta = np.arccos(0.97)
    rows = np.stack([angle(0), angle(theta), angle(2 * theta)])
    result = semantic_duplicates(rows, n_clusters=1, eps=0.05, compare="earlier")
    assert result.keep.tolist() == [True, False, False]
    assert result.duplicate_of.tolist() == [-1, 0, 1]
    np.testing.assert_allclose(result.similarity, [-1.0, 0.97, 0.97], atol=1e-5)
    assert result.clusters() == [[0, 1, 2]]
    with pytest.raises(ConfigError, match="unknown compare rule 'all' \\(choose kept or earlier"):
        semantic_duplicates(rows, n_clusters=1, compare="all")


@pytest.mark.parametrize("keep", ["first", "farthest"])
def test_compare_earlier_equals_the_reference_codes_rule_on_real_images(keep):
    """sklearn's digits (1797 real 8x8 images): in every cluster, visited in the keep order,
    an item is dropped exactly when the max of the upper triangle of its column is above
    1 - eps, and named as a duplicate of that earlier item (the reference's M and its argmax)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    result = semantic_duplicates(x, n_clusters=12, eps=0.03, seed=0, keep=keep,
                                 compare="earlier")
    greedy = semantic_duplicates(x, n_clusters=12, eps=0.03, seed=0, keep=keep)
    labels, centroids = semdedup.kmeans_assign(x, 12, 0)  # as semantic_duplicates draws it
    assert labels.tolist() == result.cluster.tolist()
    order = semdedup._visit_order(labels, x, centroids, keep)
    for c in range(result.n_clusters):
        members = [i for i in order if result.cluster[i] == c]
        sims = x[members] @ x[members].T
        upper = np.triu(sims, 1)
        upper[np.tril_indices(len(members))] = -np.inf
        column_max = upper.max(axis=0)
        dropped = column_max > 1 - 0.03
        assert result.keep[members].tolist() == (~dropped).tolist(), c
        for j in np.flatnonzero(dropped):
            assert result.duplicate_of[members[j]] == members[int(upper[:, j].argmax())]
    assert 0 < result.keep.sum() < greedy.keep.sum() < len(x)  # it drops more at the same eps


def test_a_pair_exactly_at_the_threshold_is_not_a_duplicate():
    """eps 1: threshold 0. c = (a + b)/sqrt 2 is at 0.707 from a and b: a duplicate of a.
    b's cosine with a is exactly 0, at the threshold, not above it: b is kept (although its
    most similar row, c, is above the threshold, so its pairs are looked at)."""
    a, b = unit((0, 1)), unit((1, 1))
    rows = np.stack([a, b, unit((0, 1), (1, 1))])
    result = semantic_duplicates(rows, n_clusters=1, eps=1.0)
    assert result.threshold == 0.0
    assert result.keep.tolist() == [True, True, False] and result.duplicate_of[2] == 0
    assert result.similarity[1] == 0.0  # a, the only other kept row


def test_keep_farthest_visits_rows_farthest_from_the_centroid_first():
    a = unit((0, 1))
    b = unit((0, 1), (1, 0.2))   # near duplicate of a (0.98)
    c = unit((1, -1))            # pulls the centroid away from b
    rows = np.stack([a, b, c])
    # centroid = mean: a.m = (1 + 0.981 + 0)/3, b.m = (0.981 + 1 - 0.196)/3: b is farther
    first = semantic_duplicates(rows, n_clusters=1, eps=0.05, keep="first")
    farthest = semantic_duplicates(rows, n_clusters=1, eps=0.05, keep="farthest")
    assert first.keep.tolist() == [True, False, True] and first.duplicate_of[1] == 0
    assert farthest.keep.tolist() == [False, True, True] and farthest.duplicate_of[0] == 1
    with pytest.raises(ConfigError, match="keep rule"):
        semantic_duplicates(rows, n_clusters=1, keep="best")


def planted(n_base: int, n_dup: int, seed: int, dim: int = 32):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, dim))
    base = centres[rng.integers(0, 6, n_base)] + 0.8 / np.sqrt(dim) * np.linalg.norm(
        centres, axis=1).mean() * rng.standard_normal((n_base, dim))
    originals = rng.choice(n_base, n_dup, replace=False)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    dups = base[originals] + 0.1 / np.sqrt(dim) * rng.standard_normal((n_dup, dim))
    rows = np.concatenate([base, dups]).astype(np.float32)
    return rows, originals, n_base + np.arange(n_dup)


def test_planted_pairs_are_found_and_nothing_else_and_the_seed_fixes_everything():
    rows, originals, copies = planted(600, 60, seed=1)
    one = semantic_duplicates(rows, n_clusters=6, eps=0.05, seed=3)
    two = semantic_duplicates(rows, n_clusters=6, eps=0.05, seed=3)
    for field in ("keep", "duplicate_of", "similarity", "cluster"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field))
    assert one.n_clusters == 6 and len(set(one.cluster.tolist())) == 6
    # copies come after their originals in pool order, so exactly the copies go
    assert np.flatnonzero(~one.keep).tolist() == copies.tolist()
    assert one.duplicate_of[copies].tolist() == originals.tolist()
    exact = semantic_duplicates(rows, n_clusters=1, eps=0.05)
    np.testing.assert_array_equal(exact.keep, one.keep)


def test_blocked_passes_give_the_same_answer_as_one_matrix(monkeypatch):
    rows, _, _ = planted(300, 40, seed=2)
    whole = semantic_duplicates(rows, n_clusters=2, eps=0.05, seed=0)
    monkeypatch.setattr(semdedup, "BLOCK_ELEMENTS", 1000)  # forces the blocked path
    blocked = semantic_duplicates(rows, n_clusters=2, eps=0.05, seed=0)
    np.testing.assert_array_equal(blocked.keep, whole.keep)
    np.testing.assert_array_equal(blocked.duplicate_of, whole.duplicate_of)
    np.testing.assert_allclose(blocked.similarity, whole.similarity, atol=1e-6)


def _greedy_by_hand(x: np.ndarray, threshold: float, compare: str) -> tuple[list, list]:
    """The rule read literally, one row at a time in float64: (kept, duplicate_of)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims, kept, duplicate_of = x @ x.T, [], []
    for b in range(len(x)):
        earlier = [a for a in range(b) if sims[a, b] > threshold and (compare == "earlier" or
                                                                      kept[a])]
        kept.append(not earlier)
        duplicate_of.append(-1)
        if earlier and compare == "earlier":
            duplicate_of[b] = max(earlier, key=lambda a: sims[a, b])
    for b in range(len(x)):  # "kept": the most similar kept row, before or after
        if not kept[b] and compare == "kept":
            duplicate_of[b] = max((a for a in range(len(x)) if kept[a]), key=lambda a: sims[a, b])
    return kept, duplicate_of


@pytest.mark.parametrize("compare", ["kept", "earlier"])
def test_a_large_group_of_chains_in_small_blocks_is_the_rule_by_hand(monkeypatch, compare):
    """Near duplicates in chains (so kept and earlier differ) decided one block of rows at a
    time (the whole group's pairs are never listed: 16 000 near-identical rows took 11 GB)."""
    rng = np.random.default_rng(5)
    walk = np.cumsum(rng.normal(scale=0.12, size=(240, 6)), axis=0) + np.r_[3.0, 0, 0, 0, 0, 0]
    monkeypatch.setattr(semdedup, "BLOCK_ELEMENTS", 240 * 7)  # blocks of 7 rows
    result = semantic_duplicates(walk.astype(np.float32), n_clusters=1, eps=0.01,
                                 compare=compare)
    kept, duplicate_of = _greedy_by_hand(walk, 0.99, compare)
    assert 10 < sum(kept) < 230  # chains: many dropped, many kept
    assert result.keep.tolist() == kept
    assert result.duplicate_of.tolist() == duplicate_of


def test_sizes_and_bad_input():
    assert auto_clusters(1_000_000) == 1000 and auto_clusters(1) == 1
    assert semantic_duplicates(np.zeros((0, 4))).keep.shape == (0,)
    single = semantic_duplicates(np.ones((1, 4)), n_clusters=10)
    assert single.keep.tolist() == [True] and single.n_clusters == 1
    with pytest.raises(ConfigError, match="eps"):
        semantic_duplicates(np.ones((2, 4)), eps=0)
    rows = np.ones((3, 4))
    rows[1] = np.nan
    with pytest.raises(DataError, match="row 1"):
        semantic_duplicates(rows)


def test_compare_earlier_names_the_first_of_equally_similar_earlier_rows():
    """Guards the tie rule of ``compare="earlier"`` (the reference's argmax, first maximum):
    of three identical rows, row 2 is equally similar to rows 0 and 1 and names row 0."""
    result = semantic_duplicates(np.ones((3, 4), dtype=np.float32), n_clusters=1,
                                 compare="earlier")
    assert result.keep.tolist() == [True, False, False]
    assert result.duplicate_of.tolist() == [-1, 0, 0]


def _rule_in_one_matrix(x: np.ndarray, threshold: float, compare: str):
    """One cluster (unit rows in visit order) decided from its whole similarity matrix, as
    `_dedup_cluster` did before identical rows were taken out: (kept, similarity, position)."""
    xt = torch.from_numpy(x)
    sims = (xt @ xt.T).numpy()
    kept = np.ones(len(x), dtype=bool)
    for b in range(1, len(x)):
        before = sims[b, :b] if compare == "earlier" else np.where(kept[:b], sims[b, :b],
                                                                   -np.inf)
        kept[b] = not before.max() > threshold
    others = sims.copy()
    np.fill_diagonal(others, -np.inf)
    others[:, ~kept] = -np.inf  # a row's most similar other kept row (the first of equals)
    value, index = others.max(axis=1), others.argmax(axis=1)
    if compare == "earlier":  # a dropped row: the most similar row before it
        for b in np.flatnonzero(~kept):
            value[b], index[b] = sims[b, :b].max(), sims[b, :b].argmax()
    lonely = ~np.isfinite(value)
    return kept, np.where(lonely, -1.0, value), np.where(lonely, -1, index)


def with_identical_rows(seed: int, m: int = 400, dim: int = 16) -> np.ndarray:
    """Unit rows: random ones, a fifth near duplicates of others, a third copies of 8 rows
    (some of which are near duplicates themselves, so their first copy is dropped too)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, dim))
    near = rng.choice(m, m // 5, replace=False)
    x[near] = x[rng.integers(0, m, len(near))] + 0.1 * rng.standard_normal((len(near), dim))
    same = rng.choice(m, m // 3, replace=False)
    x[same] = x[rng.choice(m, 8)][rng.integers(0, 8, len(same))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("compare", ["kept", "earlier"])
@pytest.mark.parametrize("eps", [0.05, 0.3, 1e-9])  # 1e-9: identical rows are not above it
def test_taking_identical_rows_out_first_changes_no_decision(monkeypatch, compare, eps):
    monkeypatch.setattr(semdedup, "COLLAPSE_MIN_ROWS", 0)  # every cluster
    for seed in range(6):
        x = with_identical_rows(seed)
        kept, similarity, position = semdedup._dedup_cluster(torch.from_numpy(x), 1 - eps,
                                                             compare)
        want_kept, want_similarity, want_position = _rule_in_one_matrix(x, 1 - eps, compare)
        assert kept.tolist() == want_kept.tolist()
        assert position.tolist() == want_position.tolist()
        np.testing.assert_allclose(similarity, want_similarity, atol=1e-6)


@pytest.mark.parametrize("compare", ["kept", "earlier"])
@pytest.mark.parametrize("keep", ["first", "farthest"])
def test_identical_rows_give_the_same_result_taken_out_or_not(monkeypatch, compare, keep):
    x = np.concatenate([with_identical_rows(seed, m=300) for seed in range(3)])
    found = {}
    for least in (0, len(x) + 1):  # identical rows taken out of every cluster, of none
        monkeypatch.setattr(semdedup, "COLLAPSE_MIN_ROWS", least)
        found[least] = semantic_duplicates(x, n_clusters=4, eps=0.05, keep=keep,
                                           compare=compare)
    one, other = found.values()
    assert (~one.keep).sum() > 300
    np.testing.assert_array_equal(one.keep, other.keep)
    np.testing.assert_array_equal(one.duplicate_of, other.duplicate_of)
    np.testing.assert_allclose(one.similarity, other.similarity, atol=1e-6)


@pytest.mark.parametrize("compare", ["kept", "earlier"])
def test_a_cluster_of_identical_rows_costs_its_distinct_rows_not_all_pairs(monkeypatch,
                                                                           compare):
    """A placeholder image repeated m times is one cluster k-means cannot split: its rows
    are compared O(m) times (counted: similarities computed), not m * m."""
    rng = np.random.default_rng(0)
    m = 3000
    x = np.repeat(rng.standard_normal((1, 8)), m, axis=0)
    distinct = rng.choice(m, 40, replace=False)
    x[distinct] = rng.standard_normal((40, 8))
    computed = []
    matmul = torch.Tensor.__matmul__

    def counting(a, b):
        out = matmul(a, b)
        computed.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    result = semantic_duplicates(x.astype(np.float32), n_clusters=1, eps=0.05,
                                 compare=compare)
    first = min(set(range(m)) - set(distinct.tolist()))
    copies = np.setdiff1d(np.arange(m), np.r_[distinct, first])
    assert not result.keep[copies].any() and result.keep[first]
    assert (result.duplicate_of[copies] == first).all()
    assert sum(computed) < 10 * m  # all pairs: 9 000 000
