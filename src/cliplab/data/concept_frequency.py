"""How often each concept (a class name) is mentioned in a training set's captions.

A sample counts once for a concept if any of its captions mentions it: case-insensitive, as a
whole word (not inside another word, nor joined to one by a hyphen, so "shirt" does not match
"t-shirt"), in singular or regular plural form ("cross"/"crosses", "berry"/"berries"). This is
the sample frequency of "No 'Zero-Shot' Without Exponential Data" (Udandarao et al. 2024); the
table is written as CSV so curation can reuse it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cliplab.data.manifest import CAPTION_COLUMNS, read_manifest_rows
from cliplab.errors import DataError

_EDGE_BEFORE, _EDGE_AFTER = r"(?<![\w-])", r"(?![\w-])"


def _plural_forms(word: str) -> list[str]:
    forms = [word, word + "s", word + "es"]
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.append(word[:-1] + "ies")
    return forms


def concept_pattern(concept: str) -> re.Pattern:
    """Regex matching ``concept`` as whole words, any case, singular or plural last word."""
    words = concept.lower().split()
    if not words:
        raise DataError("a concept must not be empty")
    last = "(?:" + "|".join(re.escape(f) for f in _plural_forms(words[-1])) + ")"
    body = r"[\s_]+".join([re.escape(w) for w in words[:-1]] + [last])
    return re.compile(_EDGE_BEFORE + body + _EDGE_AFTER, re.IGNORECASE)


@dataclass
class ConceptFrequencies:
    """``counts[i]`` samples (of ``n_samples``) mention ``concepts[i]``."""

    concepts: list[str]
    counts: list[int]
    n_samples: int

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.concepts, self.counts))

    def save_csv(self, path: str | Path) -> Path:
        """Write ``concept,count,n_samples`` rows."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["concept", "count", "n_samples"])
            writer.writerows([c, n, self.n_samples] for c, n in zip(self.concepts, self.counts))
        return path

    @classmethod
    def load_csv(cls, path: str | Path) -> "ConceptFrequencies":
        path = Path(path)
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            return cls([r["concept"] for r in rows], [int(r["count"]) for r in rows],
                       int(rows[0]["n_samples"]) if rows else 0)
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: not a concept frequency table ({err}); expected the "
                            "columns concept,count,n_samples") from None


def count_concepts(samples: Iterable[str | Sequence[str]],
                   concepts: Sequence[str]) -> ConceptFrequencies:
    """Per concept, the number of ``samples`` (a caption, or a list of captions of one image)
    with at least one caption that mentions it."""
    patterns = [concept_pattern(c) for c in concepts]
    counts = [0] * len(concepts)
    n = 0
    for sample in samples:
        text = sample if isinstance(sample, str) else "\n".join(sample)
        n += 1
        for i, pattern in enumerate(patterns):
            if pattern.search(text):
                counts[i] += 1
    return ConceptFrequencies(list(concepts), counts, n)


def manifest_captions(path: str | Path, caption_col: str | None = None) -> list[str]:
    """The caption column of a manifest, read without decoding any image."""
    rows = read_manifest_rows(path)
    columns = dict.fromkeys(k for r in rows for k in r)
    col = caption_col or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if col is None or col not in columns:
        raise DataError(f"{path}: no caption column (looked for "
                        f"{caption_col or ', '.join(CAPTION_COLUMNS)}; found: "
                        f"{', '.join(columns) or 'none'}); pass caption_col")
    return ["" if r.get(col) is None else str(r[col]) for r in rows]
