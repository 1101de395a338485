"""Concept frequency tables: how many samples of a training set mention each concept, as a table
curation writes and reads (CSV ``concept,count,n_samples``). What counts as a mention is
``cliplab.data.concepts``."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cliplab.data.concepts import count_mentions
from cliplab.errors import DataError


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
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["concept", "count", "n_samples"])
            writer.writerows([c, n, self.n_samples] for c, n in zip(self.concepts, self.counts))
        return path

    @classmethod
    def load_csv(cls, path: str | Path) -> "ConceptFrequencies":
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            return cls([r["concept"] for r in rows], [int(r["count"]) for r in rows],
                       int(rows[0]["n_samples"]) if rows else 0)
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: not a concept frequency table ({err}); expected the "
                            "columns concept,count,n_samples") from None


def count_concepts(samples: Iterable[str | Sequence[str]],
                   concepts: Sequence[str]) -> ConceptFrequencies:
    """The frequency table of ``concepts`` over ``samples`` (a caption, or a list of captions
    of one image, each)."""
    counts, n = count_mentions(samples, concepts)
    return ConceptFrequencies(list(concepts), counts, n)
