"""``train.hard_negatives``: NegCLIP-style hard-negative captions for contrastive training.

Every caption of the training set gets negatives made from its own words by the generators the
compositional evaluation uses (`cliplab.data.caption_negatives`: attribute swap, relation swap,
word shuffle). Each step, every caption in the batch brings one of its negatives (drawn at
random among the kinds that apply to it) as an extra column of its image's image-to-text
softmax: the image must prefer its true caption over the batch's other captions *and* over
this near-miss (`cliplab.train.losses.clip_loss_hard_negatives`).

The word shuffles are drawn once, from ``seed``; keep it apart from the evaluation's seed (the
`compositional` task's default is 0) so the model never trains on the shuffles it is tested on.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from cliplab.config import Section
from cliplab.data.caption_negatives import NEGATIVE_TYPES, caption_negatives

NegativeKind = Literal["attribute_swap", "relation_swap", "word_shuffle"]


class HardNegatives(Section):
    """``train.hard_negatives``: which negative kinds to make (``kinds``) and the seed of the
    word shuffles (``seed``; the compositional evaluation uses 0)."""

    kinds: list[NegativeKind] = Field(default_factory=lambda: list(NEGATIVE_TYPES), min_length=1)
    seed: int = 1


class NegativeTable:
    """The negatives of a table of unique captions: ``texts`` (unique negative strings) and,
    per caption id, the ids of its negatives in ``texts`` (flat + offsets). A caption none of
    the kinds applies to has no negative. A negative may be another image's true caption: the
    loss scores it only against the image whose caption it was made from."""

    def __init__(self, captions: list[str], config: HardNegatives):
        rng = random.Random(config.seed)
        index: dict[str, int] = {}
        flat, offsets = [], [0]
        for caption in captions:
            for text in caption_negatives(caption, rng, config.kinds).values():
                flat.append(index.setdefault(text, len(index)))
            offsets.append(len(flat))
        self.texts = list(index)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def sample(self, caption_ids: torch.Tensor, generator: torch.Generator | None
               ) -> torch.Tensor:
        """One random negative id per caption id (-1 where the caption has none)."""
        start, end = self.offsets[caption_ids], self.offsets[caption_ids + 1]
        count = end - start
        pick = (torch.rand(len(caption_ids), generator=generator) * count).long()
        ids = self.flat[(start + pick).clamp(max=max(len(self.flat) - 1, 0))] \
            if len(self.flat) else torch.zeros_like(caption_ids)
        return torch.where(count > 0, ids, torch.full_like(ids, -1))
