"""``balance``: MetaCLIP's curation (Xu et al. 2023, "Demystifying CLIP Data", Algorithm 1).

Matching: a caption matches metadata entry ``e`` when ``" e "`` is a substring of
``" caption "``, both normalised alike: the punctuation MetaCLIP's ``spacing`` wraps in spaces
(``, . ; : ? !`` and the backtick, so ``"a cat."`` matches ``"cat"``) and the double quote
(``a "coat"`` matches ``coat``), whitespace collapsed to single spaces, and lowercase — unlike
MetaCLIP's ``substr_matching``, which is case-sensitive (``"A Shirt"`` matches no ``shirt``)
and leaves quotes on words. On normalised text that is exactly "the entry's words occur
contiguously among the caption's words", which is how it is computed (a dictionary lookup of
every word n-gram up to the longest entry, instead of one ``in`` per entry).

Sampling, Algorithm 1 part 2::

    entry_count[entry_count < t] = t
    entry_prob = t / entry_count
    for image, text in D:
        for entry_id in text.matched_entry_ids:
            if random.random() < entry_prob[entry_id]:
                D_curated.append((image, text)); break

i.e. a pair is kept if ANY of its matched entries is drawn, each independently with probability
``t / max(count, t)``: entries matched by at most ``t`` pairs keep all their pairs, a head entry
is sampled down to ``t`` pairs in expectation (plus pairs kept through another of their entries).
Pairs that match no entry are dropped (``"matches no metadata entry"``). The uniforms of a pair
come from a counter-based generator keyed by a hash of (``seed``, its key), so the kept set depends only on the seed,
the pool's items and their keys and the entries, never on chunking; a key names where an item is
read from (a manifest's file name and row, a folder's path), so a renamed manifest or reordered
rows draw anew.

Entries: ``entries`` (a text file, one entry per line), ``vocabulary`` (an inline list), or by
default n-grams of the pool's own captions: every word unigram and bigram (after the
normalisation above) that contains no punctuation token and no English stop word
(scikit-learn's list), kept if at least ``min_count`` captions contain it.

Counts (how many pairs match each entry, before and after) are written as concept frequency
tables (`cliplab.curate.concept_frequency.ConceptFrequencies` CSV) into the step's work folder.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from cliplab.config import refuse_unused
from cliplab.curate.concept_frequency import ConceptFrequencies
from cliplab.curate.steps.base import (Decision, PoolBatch, PoolItems, StepContext,
                                       StepSpecBase)
from cliplab.data.prompt_files import read_lines
from cliplab.errors import ConfigError, DataError
from cliplab.output_folder import resolved_path

PUNCTUATION = ',.;:?!`"'  # MetaCLIP's spacing, and the double quote
_PUNCT = re.compile("([" + re.escape(PUNCTUATION) + "])")
HISTOGRAM_ENTRIES = 1000  # the report's histograms show at most this many entries (the CSVs all)


class Spec(StepSpecBase):
    """``{step: balance, entries: FILE | vocabulary: [...] (default: pool n-grams), t, seed}``."""

    step: Literal["balance"]
    entries: str | None = None
    vocabulary: list[str] | None = None
    min_count: int = Field(2, ge=1)  # of the default n-gram entries
    t: int = Field(ge=1)
    seed: int | None = None  # default: the pipeline's seed

    @field_validator("entries")
    @classmethod
    def _entries_resolved(cls, value: str | None) -> str | None:
        return resolved_path(value)

    @model_validator(mode="after")
    def _one_entry_list(self) -> "Spec":
        if self.entries is not None and self.vocabulary is not None:
            raise ValueError("give entries (a file) or vocabulary (a list), not both")
        if self.vocabulary is not None and not [e for e in self.vocabulary if normalise(e)]:
            raise ValueError("vocabulary holds no non-empty entry")
        if self.entries is not None or self.vocabulary is not None:
            refuse_unused(self, ["min_count"], "with entries or vocabulary (it selects the "
                          "default entries, the pool's own n-grams)")
        return self

    def input_paths(self) -> list[str]:
        return [self.entries] if self.entries is not None else []


def normalise(text: str) -> str:
    """Lowercase, punctuation wrapped in spaces, whitespace collapsed (no outer spaces)."""
    return " ".join(_PUNCT.sub(r" \1 ", text.lower()).split())


def read_entries(path: str | Path) -> list[str]:
    """The entries of a metadata file: one a line, blank lines skipped (`read_lines`)."""
    try:
        entries = read_lines(Path(path))
    except OSError as err:
        raise ConfigError(f"balance: cannot read the entries file {path}: "
                          f"{err.strerror or err}") from None
    except DataError as err:  # names the file itself
        raise ConfigError(f"balance: cannot read the entries file {err}") from None
    if not entries:
        raise DataError(f"balance: the entries file {path} holds no entry")
    return entries


def pool_ngrams(captions: Sequence[str], min_count: int) -> list[str]:
    """Unigrams and bigrams of the captions (no stop words, no punctuation) that at least
    ``min_count`` captions contain, most frequent first (ties alphabetical)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    # a word that is no content word: a stop word or a punctuation token (one character,
    # spaced out by `normalise`)
    skip = ENGLISH_STOP_WORDS | frozenset(PUNCTUATION)
    # only the n-grams whose hash at least min_count captions hold are counted by their text:
    # a Counter of every n-gram peaked at ~340 bytes per caption at 300k long-tailed captions
    # (79% of their n-grams in one caption only), this at ~130 (and the same entries); with
    # min_count 1 every n-gram is an entry, counted by its text
    frequent = _frequent_hashes(captions, skip, min_count) if min_count > 1 else None
    counts: Counter = Counter()
    for caption in captions:
        words = normalise(caption).split()
        grams = {w for w in words
                 if w not in skip and (frequent is None or _hash(w) in frequent)}
        grams |= {f"{a} {b}" for a, b in zip(words, words[1:])
                  if a not in skip and b not in skip
                  and (frequent is None or _hash((a, b)) in frequent)}
        counts.update(grams)
    entries = sorted(g for g, c in counts.items() if c >= min_count)
    entries.sort(key=counts.__getitem__, reverse=True)  # stable: ties stay alphabetical
    return entries


# the fewest n-gram hashes `_frequent_hashes` gathers before it counts them (1 << 18 of them
# and their sorted copies set the peak of a balance run of 20k captions: 344 B a pair, not 279)
NGRAM_HASHES = 1 << 16
_hash = hash  # of an n-gram (a module name: tests put in one whose n-grams share hashes)


def _frequent_hashes(captions: Sequence[str], skip: frozenset[str], min_count: int) -> set[int]:
    """The hashes (Python's ``hash``: of a unigram's text, of a bigram's pair of words) that at
    least ``min_count`` captions hold: every n-gram of ``pool_ngrams`` that many captions hold
    has one (n-grams sharing a hash only add to its count; `pool_ngrams` counts them again)."""
    held = np.empty(0, dtype=np.int64)  # hashes counted so far, ascending, each once
    counted = np.empty(0, dtype=np.int64)  # how many captions hold each
    block = array("q")  # hashes not counted yet, each caption's once
    for caption in captions:
        words = normalise(caption).split()
        block.extend({_hash(w) for w in words if w not in skip}
                     | {_hash((a, b)) for a, b in zip(words, words[1:])
                        if a not in skip and b not in skip})
        # a block at least a quarter of those held: counting copies them all (linear time)
        if len(block) >= max(NGRAM_HASHES, len(held) // 4):
            held, counted = _count_hashes(held, counted, block)
            block = array("q")
    held, counted = _count_hashes(held, counted, block)
    return set(held[counted >= min_count].tolist())


def _count_hashes(held: np.ndarray, counted: np.ndarray,
                  block: array) -> tuple[np.ndarray, np.ndarray]:
    """``held`` (ascending, each once) and ``counted`` with the hashes of ``block`` added."""
    hashes, counts = np.unique(np.frombuffer(block, dtype=np.int64), return_counts=True)
    at = np.searchsorted(held, hashes)
    known = at < len(held)
    known[known] = held[at[known]] == hashes[known]
    counted[at[known]] += counts[known]  # each hash once: no index repeats
    new = ~known
    return np.insert(held, at[new], hashes[new]), np.insert(counted, at[new], counts[new])


class EntryMatcher:
    """Which entries a caption matches (MetaCLIP's substring rule, see the module docstring)."""

    def __init__(self, entries: Sequence[str]):
        self.entries: list[str] = []
        # keyed by the normalised text itself (a tuple of its words held ~140 bytes an entry
        # more: 20 MB at the 150k n-grams of 300k captions)
        self.index: dict[str, int] = {}
        self.longest = 0  # words of the longest entry
        for entry in entries:
            text = normalise(entry)
            text = entry if text == entry else text  # one string where it is one already
            if text and text not in self.index:
                self.index[text] = len(self.entries)
                self.entries.append(text)
                self.longest = max(self.longest, text.count(" ") + 1)

    def __call__(self, caption: str) -> list[int]:
        """Ids of the entries ``caption`` matches, in entry order, each once."""
        text = normalise(caption)  # words parted by single spaces
        starts = [0]  # where each word starts in ``text`` (and one past the end)
        for word in text.split():
            starts.append(starts[-1] + len(word) + 1)
        words = len(starts) - 1
        # a run of words is a slice of the text (joining each run took 40% longer at long
        # entries)
        found = {self.index[gram]
                 for i in range(words) for n in range(1, min(self.longest, words - i) + 1)
                 if (gram := text[starts[i]:starts[i + n] - 1]) in self.index}
        return sorted(found)


_GOLDEN, _MIX1, _MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                         np.uint64(0x94D049BB133111EB))


def key_hashes(seed: int, keys: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of (``seed``, key) per pool item."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8)
                                    .digest(), "little") for k in keys], dtype=np.uint64)


def key_uniforms(hashes: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Uniform ``[0, 1)`` number ``draws[i]`` of the item hashed to ``hashes[i]`` (SplitMix64
    of hash + (draw + 1) * golden ratio: a counter-based generator, vectorised)."""
    with np.errstate(over="ignore"):
        z = hashes + (draws.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass
class Matches:
    """Each pair's matched entry ids, flat: pair ``i``'s are ``ids[starts[i]:starts[i + 1]]``
    (ascending). A list of ints per pair held ~190 bytes a pair; these arrays hold 8 bytes a
    pair and 4 a match."""

    ids: np.ndarray  # int32, every pair's ids one after another
    starts: np.ndarray  # int64 [pairs + 1], where each pair's ids start (and the end)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Pair ``i``'s ids (a negative ``i`` counts from the end; a slice is `part`'s)."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"Matches index must be a pair's number, not {type(i).__name__} "
                            "(a range of pairs: part(start, stop))")
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        i = i % len(self)
        return self.ids[self.starts[i]:self.starts[i + 1]]

    def sizes(self) -> np.ndarray:
        """How many entries each pair matches."""
        return np.diff(self.starts)

    def part(self, start: int, stop: int) -> "Matches":
        """Pairs ``start`` to ``stop`` (a view of the ids)."""
        stop = min(stop, len(self))
        starts = self.starts[start:stop + 1]
        return Matches(self.ids[starts[0]:starts[-1]], starts - starts[0])

    def counts(self, entries: int, pairs: np.ndarray | None = None) -> np.ndarray:
        """How many pairs (those where the mask ``pairs`` is true, default all) match each of
        ``entries`` entries (int64)."""
        counts = np.zeros(entries, dtype=np.int64)
        # a block of pairs at a time: bincount takes its ids as int64 (a copy of them all
        # held 8 bytes per match more than the ids themselves)
        for start in range(0, len(self), COUNT_PAIRS):
            part = self.part(start, start + COUNT_PAIRS)
            ids = part.ids if pairs is None else \
                part.ids[np.repeat(pairs[start:start + COUNT_PAIRS], part.sizes())]
            counts += np.bincount(ids, minlength=entries)
        return counts

    @classmethod
    def of(cls, lists: Iterable[Sequence[int]]) -> "Matches":
        """Held from one sequence of ids per pair (each ascending, each id once)."""
        ids, ends = array("i"), array("q", [0])  # C int: 32 bits
        for found in lists:
            ids.extend(found)
            ends.append(len(ids))
        # views of the arrays' buffers, not copies (a copy doubled the peak)
        return cls(np.frombuffer(ids, dtype=np.int32) if ids.itemsize == 4 else
                   np.array(ids, dtype=np.int32), np.frombuffer(ends, dtype=np.int64))


def balance_sample(matches: Matches, counts: np.ndarray, t: int, keys: Sequence[str],
                   seed: int) -> np.ndarray:
    """Algorithm 1's sampling: per pair (``matches``: each pair's entry ids, ``keys``: its
    key), one uniform per matched entry (drawn from its key's stream); kept if any uniform is
    below its entry's probability ``t / max(count, t)`` (``counts``: pairs per entry)."""
    prob = t / np.maximum(np.asarray(counts, dtype=np.float64), t)
    keep = np.zeros(len(matches), dtype=bool)
    # a block of pairs at a time: the draws' arrays cost ~100 bytes per match (GBs at millions
    # of pairs at once); each pair's draws are its own, so blocks decide as the whole would
    for start in range(0, len(matches), SAMPLE_PAIRS):
        block = slice(start, start + SAMPLE_PAIRS)
        keep[block] = _sample(matches.part(start, start + SAMPLE_PAIRS), prob, keys[block], seed)
    return keep


SAMPLE_PAIRS = 16_384  # pairs `balance_sample` draws for at once
COUNT_PAIRS = 65_536  # pairs `Matches.counts` counts at once


def _sample(matches: Matches, prob: np.ndarray, keys: Sequence[str], seed: int) -> np.ndarray:
    sizes = matches.sizes()
    item = np.repeat(np.arange(len(matches)), sizes)
    draw = np.arange(len(item)) - np.repeat(matches.starts[:-1], sizes)  # a pair's 0, 1, ...
    drawn = key_uniforms(key_hashes(seed, keys)[item], draw) < prob[matches.ids]
    keep = np.zeros(len(matches), dtype=bool)
    np.logical_or.at(keep, item[drawn], True)
    return keep


class Balance:
    """MetaCLIP balancing of the pairs that reach it over a list of metadata entries."""

    Spec = Spec
    needs_images = False  # matching reads only captions

    def __init__(self, spec: Spec):
        self.spec = spec
        self.work: Path | None = None
        self.seed = spec.seed or 0
        self.entries: list[str] | None = None

    def prepare(self, context: StepContext) -> None:
        """Read the entries (a file or the vocabulary; pool n-grams wait for ``decide``)."""
        self.work = Path(context.work)
        self.seed = self.spec.seed if self.spec.seed is not None else context.seed
        if self.spec.entries is not None:
            self.entries = read_entries(self.spec.entries)
        elif self.spec.vocabulary is not None:
            self.entries = list(self.spec.vocabulary)

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        """Nothing per item: matching needs only captions, which ``decide`` has (and the
        default entries are built from every caption of the pool)."""
        return {}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        """Match, count, sample; write the count tables before and after."""
        entries = self.entries if self.entries is not None else \
            pool_ngrams(items.captions, self.spec.min_count)
        matcher = EntryMatcher(entries)
        matches = Matches.of(matcher(c) for c in items.captions)
        before = matches.counts(len(matcher.entries))
        keep = balance_sample(matches, before, self.spec.t, items.keys, self.seed)
        after = matches.counts(len(matcher.entries), keep)
        reasons = self._reasons(matches, keep, matcher.entries, before)
        return Decision(keep, reasons, report=self._report(matcher.entries, before, after,
                                                            len(items), int(keep.sum())))

    def _reasons(self, matches: Matches, keep: np.ndarray, entries: list[str],
                 before: np.ndarray) -> list[str | None]:
        """Why each pair not kept is dropped: one text per distinct text, shared by its pairs
        (a text per dropped pair held ~160 bytes each)."""
        t = self.spec.t
        reasons: list[str | None] = [None] * len(matches)
        told: dict[tuple[int, ...], str] = {}  # by what a text shows: 3 ids and how many
        starts = matches.starts
        for i in np.flatnonzero(~keep):  # (sliced here: `Matches[i]` checks its index)
            ids = matches.ids[starts[i]:starts[i + 1]]
            if not len(ids):
                reasons[i] = "matches no metadata entry"
                continue
            shows = (*ids[:3].tolist(), len(ids))
            if shows not in told:
                shown = ", ".join(f"'{entries[e]}' ({before[e]} pairs)" for e in shows[:-1])
                more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
                told[shows] = (f"not drawn for any of its entries {shown}{more} (each kept "
                               f"with probability t/count, t={t})")
            reasons[i] = told[shows]
        return reasons

    def _report(self, entries: list[str], before: np.ndarray, after: np.ndarray,
                n_before: int, n_after: int) -> dict:
        assert self.work is not None, "prepare() first"
        files = {
            "counts_before": str(ConceptFrequencies(entries, before.tolist(), n_before)
                                 .save_csv(self.work / "entry_counts_before.csv")),
            "counts_after": str(ConceptFrequencies(entries, after.tolist(), n_after)
                                .save_csv(self.work / "entry_counts_after.csv")),
        }
        shown = [e for e in np.argsort(-before, kind="stable") if before[e] > 0][:HISTOGRAM_ENTRIES]
        return {"files": files,
                "histogram_before": {entries[e]: int(before[e]) for e in shown},
                "histogram_after": {entries[e]: int(after[e]) for e in shown},
                "entries": len(entries), "entries_matched": int((before > 0).sum()),
                "head_entries": int((before > self.spec.t).sum()), "t": self.spec.t,
                "seed": self.seed}
