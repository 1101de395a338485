"""Whether a caption mentions a concept (a class name), and how many samples do.

A sample counts once for a concept if any of its captions mentions it: case-insensitive, as a
whole word (not inside another word, nor joined to one by a hyphen, so "shirt" does not match
"t-shirt"), in singular or regular plural form ("cross"/"crosses", "berry"/"berries"). This is
the sample frequency of "No 'Zero-Shot' Without Exponential Data" (Udandarao et al. 2024). The
counting lives here so that evaluation (long-tail) and curation's frequency tables
(``cliplab.curate.concept_frequency``) share it; MetaCLIP balancing matches entries by its own
substring rule (``cliplab.curate.steps.balance``), so its entry counts are not these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

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


def count_mentions(samples: Iterable[str | Sequence[str]],
                   concepts: Sequence[str]) -> tuple[list[int], int]:
    """``(counts, n_samples)``: per concept, the number of ``samples`` (a caption, or a list of
    captions of one image) with at least one caption that mentions it, and how many samples
    there were."""
    patterns = [concept_pattern(c) for c in concepts]
    counts = [0] * len(concepts)
    n = 0
    for sample in samples:
        # each caption searched alone: a concept's words split over two captions are no mention
        texts = [sample] if isinstance(sample, str) else list(sample)
        n += 1
        for i, pattern in enumerate(patterns):
            if any(pattern.search(text) for text in texts):
                counts[i] += 1
    return counts, n
