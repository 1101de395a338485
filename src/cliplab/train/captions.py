"""Captions of a pair dataset as a table of unique strings (as the tokenizer cleans them),
sampled per image each step."""

from __future__ import annotations

import torch

from cliplab.data.types import ImageTextPairs
from cliplab.models.tokenizer import clean_text


class CaptionTable:
    """Unique captions and, per image, the ids of its captions (as one flat tensor + offsets).
    Captions that clean to one text (``tom &amp; jerry``, ``tom & jerry``) are one caption:
    the model sees the same tokens, so they must not be each other's negatives."""

    def __init__(self, pairs: ImageTextPairs):
        index: dict[str, int] = {}
        flat, offsets = [], [0]
        for caps in pairs.captions:
            for c in caps:
                flat.append(index.setdefault(clean_text(c), len(index)))
            offsets.append(len(flat))
        self.texts = list(index)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def sample(self, image_idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One random caption id for each image in ``image_idx``."""
        start, end = self.offsets[image_idx], self.offsets[image_idx + 1]
        pick = (torch.rand(len(image_idx), generator=generator) * (end - start)).long()
        return self.flat[start + pick]

    def described_sets(self, units: torch.Tensor | None = None) -> "DescribedSets | None":
        """Which captions describe which images, when one key per pair cannot say it.

        ``units`` joins images whose captions are interchangeable (a dataset's groups: every
        caption of a unit describes all its images); None makes each image its own unit. When
        no caption belongs to two units, a caption's unit is its key and this returns None.
        Otherwise a caption may be true of images that do not share all their captions (a
        small and a large green circle are both "a green circle"), and the returned sets let
        the loss count it as a positive of each (:func:`~cliplab.train.losses.positive_mask`).
        """
        counts = self.offsets[1:] - self.offsets[:-1]
        unit = torch.arange(len(counts)) if units is None else \
            torch.unique(units, return_inverse=True)[1]
        # the distinct (unit, caption) pairs, sorted by unit, as one integer each (a 1-D unique
        # is far cheaper than torch.unique(dim=1) on millions of captions)
        n = max(len(self.texts), 1)
        pairs = torch.unique(unit.repeat_interleave(counts) * n + self.flat)
        pair_units, pair_captions = pairs // n, pairs % n
        if len(torch.unique(pair_captions)) == len(pairs):  # every caption in one unit
            return None
        return DescribedSets(unit, pair_units, pair_captions)


class DescribedSets:
    """Per image, the ids of the captions describing it, as rows ``[1 + L]`` of positive keys
    (see :meth:`CaptionTable.described_sets`)."""

    def __init__(self, unit: torch.Tensor, pair_units: torch.Tensor, pair_captions: torch.Tensor):
        per_unit = torch.bincount(pair_units, minlength=int(unit.max()) + 1)
        starts = torch.cumsum(per_unit, 0) - per_unit
        column = torch.arange(len(pair_units)) - starts[pair_units]  # pairs are sorted by unit
        self.sets = torch.full((len(per_unit), int(per_unit.max())), -1, dtype=torch.long)
        self.sets[pair_units, column] = pair_captions
        self.unit = unit

    def keys(self, image_idx: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """``[b, 1 + L]``: each pair's drawn caption, then its image's captions."""
        return torch.cat([captions[:, None], self.sets[self.unit[image_idx]]], dim=1)
