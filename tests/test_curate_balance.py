"""The balance step (MetaCLIP) on hand-built caption pools whose balanced counts are known."""

import random

import numpy as np
import pytest

from cliplab.curate.concept_frequency import ConceptFrequencies
from cliplab.curate.steps.balance import (Balance, EntryMatcher, Matches, Spec,
                                          balance_sample, normalise, pool_ngrams)
from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.registry import make_step, step_spec
from cliplab.errors import ConfigError, DataError

VOCABULARY = ["cat", "dog", "red fox", "owl"]
T = 50
# one entry per caption: after balancing, entry e keeps min(count_e, t) pairs in expectation
SINGLE = (["a photo of a cat."] * 1000 + ["a Dog   running"] * 200 + ["a red fox in snow"] * 30
          + ["an owl!"] * 5
          # no entry: not inside words ("catalog", "dogs", "foxy"), not across a comma
          + ["a catalog of dogs", "a red foxy hat", "red, fox"] * 5 + [""] * 5)
MIXED = ["a dog chasing a cat"] * 100  # two entries each: kept if EITHER is drawn


def pool(captions):
    keys = [f"k{i}" for i in range(len(captions))]
    return PoolItems(keys, list(captions))


def decide(captions, tmp_path, **options):
    spec = Spec(step="balance", t=T, **{"vocabulary": VOCABULARY, **options})
    step = make_step(spec)
    step.prepare(StepContext(work=tmp_path, seed=0))
    items = pool(captions)
    assert step.map(PoolBatch(items.keys, items.captions, [])) == {}
    return step.decide(items, {}), items


def kept_counts(captions, keep):
    matcher = EntryMatcher(VOCABULARY)
    counts = dict.fromkeys(matcher.entries, 0)
    for caption, kept in zip(captions, keep):
        for e in matcher(caption):
            counts[matcher.entries[e]] += int(kept)
    return counts


def test_matching_is_the_space_padded_substring_rule():
    match = EntryMatcher(["Red Fox", "fox", "cat", "new york", "cat"])
    assert match.entries == ["red fox", "fox", "cat", "new york"]  # normalised, deduplicated
    assert match("A red  fox.") == [0, 1]
    assert match("foxes, cats and a red-fox") == []
    assert match("cat:fox?") == [1, 2]  # punctuation is spaced out, as MetaCLIP's `spacing`
    assert match("New\tYork\ncat") == [2, 3]
    assert normalise("  A cat,\tthe DOG. ") == "a cat , the dog ."
    assert match('a `cat` and a "fox"') == [1, 2]  # MetaCLIP's backtick, and the double quote


def test_head_entries_are_capped_at_t_in_expectation_and_tail_entries_kept_whole():
    """Per seed, entry e's kept count is Binomial(count_e, t/count_e): cat B(1000, 0.05) (sd
    6.9), dog B(200, 0.25) (sd 6.1); their means over 100 seeds have sd 0.69 and 0.61, so a
    tolerance of 3 is more than 4 sd. Tail entries (count <= t) have probability 1."""
    items = pool(SINGLE)
    matcher = EntryMatcher(VOCABULARY)
    matches = Matches.of(matcher(c) for c in SINGLE)
    counts = matches.counts(4)
    assert counts.tolist() == [1000, 200, 30, 5]
    per_seed = [kept_counts(SINGLE, balance_sample(matches, counts, T, items.keys, seed))
                for seed in range(100)]
    mean = {e: np.mean([c[e] for c in per_seed]) for e in matcher.entries}
    assert abs(mean["cat"] - T) < 3 and abs(mean["dog"] - T) < 3
    assert all(c["red fox"] == 30 and c["owl"] == 5 for c in per_seed)
    assert all(c["cat"] < 1000 and c["dog"] < 200 for c in per_seed)


def test_a_pair_is_kept_if_any_of_its_entries_is_drawn():
    """With MIXED added, cat has 1100 pairs (p = 1/22) and dog 300 (p = 1/6): a mixed pair is
    kept with probability 1 - (21/22)(5/6) = 27/132 (not 1/22 x 1/6 as 'all entries' would
    give, nor 1/22 as 'first entry only'). Kept mixed pairs per seed: B(100, 0.2045), sd 4.0;
    over 100 seeds the mean's sd is 0.40, so the tolerance 1.6 is 4 sd."""
    captions = SINGLE + MIXED
    items = pool(captions)
    matcher = EntryMatcher(VOCABULARY)
    matches = Matches.of(matcher(c) for c in captions)
    counts = matches.counts(4)
    assert counts.tolist() == [1100, 300, 30, 5]
    mixed = np.arange(len(SINGLE), len(captions))
    kept = [balance_sample(matches, counts, T, items.keys, seed)[mixed].sum() for seed in range(100)]
    assert abs(np.mean(kept) - 100 * 27 / 132) < 1.6


def test_pairs_sampled_a_block_at_a_time_are_kept_as_all_at_once(monkeypatch):
    """The draws' arrays cost ~100 bytes per match (GBs at millions of pairs), so pairs are
    sampled a block at a time; each pair's draws are its own, so the kept set is the same."""
    from cliplab.curate.steps import balance

    captions = SINGLE + MIXED
    items = pool(captions)
    matcher = EntryMatcher(VOCABULARY)
    matches = Matches.of(matcher(c) for c in captions)
    counts = matches.counts(4)
    monkeypatch.setattr(balance, "SAMPLE_PAIRS", 10**9)
    whole = [balance_sample(matches, counts, T, items.keys, seed) for seed in range(5)]
    monkeypatch.setattr(balance, "SAMPLE_PAIRS", 7)
    for seed in range(5):
        assert np.array_equal(balance_sample(matches, counts, T, items.keys, seed), whole[seed])
    assert 0 < whole[0].sum() < len(captions)


def test_decide_reasons_tables_and_histograms(tmp_path):
    decision, items = decide(SINGLE, tmp_path)
    reasons = dict(zip(items.captions, decision.reasons))
    assert reasons["a catalog of dogs"] == "matches no metadata entry"
    assert reasons[""] == "matches no metadata entry"
    assert reasons["a red fox in snow"] is None
    dropped_cat = next(r for c, r, k in zip(items.captions, decision.reasons, decision.keep)
                       if c == "a photo of a cat." and not k)
    assert dropped_cat == ("not drawn for any of its entries 'cat' (1000 pairs) "
                           "(each kept with probability t/count, t=50)")
    report = decision.report
    before = ConceptFrequencies.load_csv(report["files"]["counts_before"])
    after = ConceptFrequencies.load_csv(report["files"]["counts_after"])
    assert before.as_dict() == {"cat": 1000, "dog": 200, "red fox": 30, "owl": 5}
    assert before.n_samples == len(SINGLE)
    assert after.as_dict() == kept_counts(SINGLE, decision.keep)
    assert after.n_samples == int(decision.keep.sum())
    assert report["histogram_before"] == before.as_dict()
    assert report["histogram_after"] == after.as_dict()
    assert report["head_entries"] == 2


def test_an_entry_matched_exactly_t_times_is_not_a_head_entry(tmp_path):
    step = Balance(Spec(step="balance", t=2, vocabulary=VOCABULARY, seed=0))
    step.prepare(StepContext(work=tmp_path))
    # cat 3 > t is head; dog exactly t = 2 and owl 1 keep all their pairs
    decision = step.decide(pool(["a cat"] * 3 + ["a dog"] * 2 + ["an owl"]), {})
    assert decision.report["head_entries"] == 1
    assert decision.keep[3:].all()


def test_same_seed_same_kept_set_whatever_the_pool_order(tmp_path):
    first, items = decide(SINGLE + MIXED, tmp_path / "a", seed=7)
    again, _ = decide(SINGLE + MIXED, tmp_path / "b", seed=7)
    assert np.array_equal(first.keep, again.keep)
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    shuffled = PoolItems([items.keys[i] for i in order], [items.captions[i] for i in order])
    step = Balance(Spec(step="balance", t=T, vocabulary=VOCABULARY, seed=7))
    step.prepare(StepContext(work=tmp_path / "c"))
    reordered = step.decide(shuffled, {})
    assert ({k for k, kept in zip(shuffled.keys, reordered.keep) if kept}
            == {k for k, kept in zip(items.keys, first.keep) if kept})
    other, _ = decide(SINGLE + MIXED, tmp_path / "d", seed=8)
    assert not np.array_equal(first.keep, other.keep)


def test_the_pipeline_seed_is_the_default(tmp_path):
    a = Balance(Spec(step="balance", t=T, vocabulary=VOCABULARY))
    a.prepare(StepContext(work=tmp_path, seed=7))
    b, _ = decide(SINGLE, tmp_path / "b", seed=7)
    assert np.array_equal(a.decide(pool(SINGLE), {}).keep, b.keep)


def test_default_entries_are_the_pools_frequent_ngrams(tmp_path):
    captions = ["a red circle.", "the red circle left of a blue square", "a blue square",
                "one green triangle"]
    # each in two captions (ties alphabetical); "a"/"the"/"of" are stop words, the rest once
    assert pool_ngrams(captions, 2) == ["blue", "blue square", "circle", "red", "red circle",
                                        "square"]
    assert pool_ngrams(captions, 1)[:6] == ["blue", "blue square", "circle", "red",
                                            "red circle", "square"]
    assert "circle left" in pool_ngrams(captions, 1) and "of a" not in pool_ngrams(captions, 1)
    decision, items = decide(captions, tmp_path, vocabulary=None, min_count=2)
    assert decision.keep.tolist() == [True, True, True, False]  # counts <= t: all kept
    assert decision.reasons[3] == "matches no metadata entry"
    assert decision.report["histogram_before"]["blue square"] == 2


def counted_ngrams(captions, min_count):
    """`pool_ngrams` written out plainly: a Counter of every caption's n-grams, each once."""
    from collections import Counter

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    def content(word):
        return word not in ENGLISH_STOP_WORDS and word not in list(',.;:?!`"')

    counts = Counter()
    for caption in captions:
        words = normalise(caption).split()
        counts.update({w for w in words if content(w)}
                      | {f"{a} {b}" for a, b in zip(words, words[1:])
                         if content(a) and content(b)})
    return sorted((g for g, c in counts.items() if c >= min_count), key=lambda g: (-counts[g], g))


@pytest.mark.parametrize("hashed", ["python", "coarse"])
def test_default_entries_are_those_of_a_plain_count_of_every_ngram(monkeypatch, hashed):
    """`pool_ngrams` counts by text only the n-grams whose hash enough captions hold: the same
    entries in the same order as counting every n-gram, however its hashes are counted (a
    block of 5 at a time) and when n-grams share a hash (a coarse one: 7 values)."""
    from cliplab.curate.steps import balance

    monkeypatch.setattr(balance, "NGRAM_HASHES", 5)
    if hashed == "coarse":
        monkeypatch.setattr(balance, "_hash", lambda gram: hash(gram) % 7 - 3)
    rng = random.Random(3)
    words = ["cat", "Dog", "red", "fox", "a", "the", "of", "owl", "sky", "tree", "x", "y", "z",
             "big", "house", "cat.", ",", "!", '"', "`", "w1", "w2", "w3", "w4", "w5", "w6"]
    captions = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(400)]
    captions += ["red fox red fox", "the red fox", "red, fox", "Red Fox!", "", "  ", "a of the",
                 "owl owl owl", 'a "red" fox', "cat:dog", "CAT dog", "x y", "y x", "x y x y"]
    for min_count in (1, 2, 3, 4, 7, 20, 100, 10_000):
        expected = counted_ngrams(captions, min_count)
        assert pool_ngrams(captions, min_count) == expected, min_count
        assert pool_ngrams(captions[::-1], min_count) == expected, min_count
    assert pool_ngrams([], 2) == [] and pool_ngrams(["the of a", ". ,"], 1) == []


def test_entries_file(tmp_path):
    path = tmp_path / "entries.txt"
    path.write_text("cat\n\n  red fox \ndog\n")
    decision, _ = decide(["a cat", "a red fox", "an owl"], tmp_path, vocabulary=None,
                         entries=str(path))
    assert decision.keep.tolist() == [True, True, False]
    assert list(decision.report["histogram_before"]) == ["cat", "red fox"]
    with pytest.raises(ConfigError, match="cannot read the entries file .*missing.txt"):
        decide(["a cat"], tmp_path, vocabulary=None, entries=str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no entry"):
        decide(["a cat"], tmp_path, vocabulary=None, entries=str(tmp_path / "blank.txt"))
    # Windows Notepad's byte-order mark and line ends: "\ufeffcat" matched no caption
    path.write_bytes(b"\xef\xbb\xbfcat\r\n\r\n  red fox \r\ndog\r\n")
    decision, _ = decide(["a cat", "a red fox", "an owl"], tmp_path, vocabulary=None,
                         entries=str(path))
    assert decision.keep.tolist() == [True, True, False]
    assert list(decision.report["histogram_before"]) == ["cat", "red fox"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^balance: cannot read the entries file \S*latin1.txt: "
                                          r"not valid UTF-8 text$"):
        decide(["a cat"], tmp_path, vocabulary=None, entries=str(tmp_path / "latin1.txt"))


@pytest.mark.parametrize("data, message", [
    ({"step": "balance", "vocabulary": ["cat"]}, "steps.0.t"),
    ({"step": "balance", "t": 0}, "steps.0.t"),
    ({"step": "balance", "t": 5, "vocabulary": ["a"], "entries": "x.txt"}, "not both"),
    ({"step": "balance", "t": 5, "vocabulary": [" "]}, "no non-empty entry"),
    ({"step": "balance", "t": 5, "cap": 3}, "cap"),
])
def test_bad_specs_are_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        step_spec(data, "curate.yaml", "steps.0")


def test_key_uniforms_are_uniform_and_independent_per_key_and_draw():
    from cliplab.curate.steps.balance import key_hashes, key_uniforms

    hashes = key_hashes(3, [f"k{i}" for i in range(20000)])
    u0, u1 = key_uniforms(hashes, np.zeros(20000)), key_uniforms(hashes, np.ones(20000))
    for u in (u0, u1):  # mean 1/2 (sd 0.002), decile counts 2000 (sd 42)
        assert abs(u.mean() - 0.5) < 0.01 and 0 <= u.min() and u.max() < 1
        assert np.all(np.abs(np.histogram(u, bins=10, range=(0, 1))[0] - 2000) < 200)
    assert abs(np.corrcoef(u0, u1)[0, 1]) < 0.03  # sd of r: 0.007
    assert np.array_equal(key_uniforms(key_hashes(3, ["k5"]), np.ones(1)), u1[5:6])


@pytest.mark.parametrize("entries", [{"vocabulary": ["cat"]}, {"entries": "x.txt"}])
def test_min_count_with_given_entries_is_refused(entries):
    """min_count selects the pool's own n-grams; given entries are used as they are."""
    with pytest.raises(ConfigError, match=r"steps.0: min_count has no effect with entries or "
                       r"vocabulary .*; drop it$"):
        step_spec({"step": "balance", "t": 5, "min_count": 3, **entries}, "curate.yaml",
                  "steps.0")
    step_spec({"step": "balance", "t": 5, "min_count": 2, **entries}, "curate.yaml", "steps.0")
    step_spec({"step": "balance", "t": 5, "min_count": 3}, "curate.yaml", "steps.0")


def test_items_dropped_for_the_same_entries_share_one_reason_text(tmp_path):
    """A balanced pool drops most of its items for a few head entries: their reason is one
    text per set of entries, not one each (~160 bytes a dropped item held until the run let
    go of them); the texts read as before."""
    decision, items = decide(SINGLE + MIXED, tmp_path)
    cats = [r for c, r in zip(items.captions, decision.reasons) if r and c == SINGLE[0]]
    mixed = [r for c, r in zip(items.captions, decision.reasons) if r and c == MIXED[0]]
    assert len(cats) > 900 and len(mixed) > 10
    assert all(r is cats[0] for r in cats) and all(r is mixed[0] for r in mixed)
    assert cats[0] == ("not drawn for any of its entries 'cat' (1100 pairs) (each kept with "
                       f"probability t/count, t={T})")


def test_the_kept_set_is_algorithm_1_written_out_pair_by_pair(tmp_path, monkeypatch):
    """`decide` (flat match arrays, drawn a block at a time) keeps exactly the pairs a plain
    loop over each pair's entries keeps: draw ``d`` of a pair is its key's uniform number
    ``d``, its ``d``-th matched entry (ascending ids) kept with probability t/max(count, t).
    Pairs match 0, 1 or up to 6 entries; the reasons read as they did (up to 3 entries named)."""
    from cliplab.curate.steps import balance
    from cliplab.curate.steps.balance import key_hashes, key_uniforms

    vocabulary = ["cat", "dog", "red fox", "owl", "tree", "sky"]
    captions = (["a cat"] * 40 + ["a dog and a cat"] * 15 + ["red fox, owl, tree, sky, dog, cat"]
                * 9 + ["an owl in a tree"] * 3 + ["nothing at all", ""] * 2)
    t, seed = 4, 5
    matcher = EntryMatcher(vocabulary)
    ids = [matcher(c) for c in captions]
    counts = np.bincount([e for found in ids for e in found], minlength=len(vocabulary))
    assert counts.tolist() == [64, 24, 9, 12, 12, 9]
    keys = [f"k{i}" for i in range(len(captions))]
    expected = [any(key_uniforms(key_hashes(seed, [key]), np.array([d]))[0] < t / max(counts[e], t)
                    for d, e in enumerate(found)) for key, found in zip(keys, ids)]
    assert 0 < sum(expected) < len(captions) - 4
    monkeypatch.setattr(balance, "SAMPLE_PAIRS", 5)  # blocks end inside runs of pairs
    step = Balance(Spec(step="balance", t=t, vocabulary=vocabulary, seed=seed))
    step.prepare(StepContext(work=tmp_path))
    decision = step.decide(PoolItems(keys, captions), {})
    assert decision.keep.tolist() == expected
    six = next(i for i, c in enumerate(captions) if c.startswith("red fox") and not expected[i])
    assert decision.reasons[six] == ("not drawn for any of its entries 'cat' (64 pairs), 'dog' "
                                     "(24 pairs), 'red fox' (9 pairs) and 3 more (each kept with "
                                     "probability t/count, t=4)")
    assert decision.reasons[-1] == "matches no metadata entry"
    after = ConceptFrequencies.load_csv(decision.report["files"]["counts_after"]).counts
    assert after == np.bincount([e for found, kept in zip(ids, expected) if kept for e in found],
                                minlength=len(vocabulary)).tolist()


def test_matches_are_held_flat():
    """Each pair's entry ids one after another (int32) and where each pair's start (int64):
    a list of ints per pair held ~190 bytes a pair."""
    matches = Matches.of([[0, 2], [], [1], [0, 1, 2]])
    assert matches.ids.dtype == np.int32 and matches.starts.dtype == np.int64
    assert matches.ids.tolist() == [0, 2, 1, 0, 1, 2] and matches.starts.tolist() == [0, 2, 2, 3, 6]
    assert len(matches) == 4 and matches[3].tolist() == [0, 1, 2] and matches[1].tolist() == []
    part = matches.part(1, 9)
    assert len(part) == 3 and part.starts.tolist() == [0, 0, 1, 4] and part[2].tolist() == [0, 1, 2]
    assert matches.counts(4).tolist() == [2, 2, 2, 0]
    assert matches.counts(4, np.array([True, True, False, False])).tolist() == [1, 0, 1, 0]
    assert len(Matches.of([])) == 0 and Matches.of([]).counts(2).tolist() == [0, 0]
    assert matches[-1].tolist() == [0, 1, 2] and matches[-4].tolist() == [0, 2]
    with pytest.raises(IndexError, match="pair 4 of 4"):
        matches[4]
    with pytest.raises(IndexError):
        matches[-5]
    with pytest.raises(TypeError, match="part"):
        matches[0:2]
