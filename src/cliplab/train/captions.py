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
