"""``train.hard_negatives``: NegCLIP-style hard-negative captions for contrastive training.

Every caption of the training set gets negatives made from its own words by the generators the
compositional evaluation uses (`cliplab.data.caption_negatives`: attribute swap, relation swap,
word shuffle). Each step, every caption in the batch brings one of its negatives (drawn at
random among the kinds that apply to it) as an extra column of its image's image-to-text
softmax: the image must prefer its true caption over the batch's other captions *and* over
this near-miss (`cliplab.train.losses.clip_loss_hard_negatives`).

The word shuffles are drawn once, from ``seed`` (default 1; the `compositional` task's is 0).
A seed of its own only makes training's draws independent of the evaluation's: they go over
other captions in another order, so a caption may still get the same shuffle in both, by chance
(a short caption has few orders), whatever the seed. The two swaps are the same in both.

Hard-negative *images* (``images``) put near-miss images in the same batch, so each caption
must also beat them in its text-to-image softmax (and their captions are near-miss columns of
its image's): ``partners`` takes each image's partner from the data (e.g. the counterfactual
twins of ``{source: shapes, counterfactuals: true}``), ``neighbours`` one of its ``neighbours``
nearest images by the starting model's image embeddings (NegCLIP's mined hard-negative images).
Batches are then built from pairs of an image and its hard-negative image
(`cliplab.train.batches.PartnerBatches`).
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from cliplab.config import Section
from cliplab.data.caption_negatives import NEGATIVE_TYPES, caption_negatives
from cliplab.data.types import ImageTextPairs
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder

NegativeKind = Literal["attribute_swap", "relation_swap", "word_shuffle"]
NEIGHBOURS = 3  # candidate images per image when images: neighbours
# what a caption needs for each kind to give it a negative (for the messages when some do not):
# the swaps parse only the `shapes` set's own caption pattern (caption_negatives.parse_relation)
_NEEDS = {"attribute_swap": "a shapes relation caption whose objects differ in colour",
          "relation_swap": "a shapes relation caption whose objects differ",
          "word_shuffle": "two or more different words (the one kind for free-text captions)"}
_SWAP_PATTERN = ("a shapes relation caption is the lower-case 'a|an [SIZE] COLOUR SHAPE RELATION "
                 "a|an [SIZE] COLOUR SHAPE' the shapes set writes "
                 "(e.g. 'a red circle left of an orange square')")


class HardNegatives(Section):
    """``train.hard_negatives``: which negative kinds to make (``kinds``), the seed of the
    word shuffles (``seed``; the compositional evaluation uses 0), and where hard-negative
    images come from (``images``: none, the data's ``partners``, or mined ``neighbours``)."""

    kinds: list[NegativeKind] = Field(default_factory=lambda: list(NEGATIVE_TYPES), min_length=1)
    seed: int = 1
    images: Literal["none", "partners", "neighbours"] = "none"
    # with images: neighbours, the candidates per image (strict: `true` is not a count)
    neighbours: int = Field(NEIGHBOURS, ge=1, strict=True)

    @model_validator(mode="after")
    def _neighbours_only_with_mined_images(self) -> HardNegatives:
        # checked against the default, not "was it given": a run's config.yaml lists every key
        if self.neighbours != NEIGHBOURS and self.images != "neighbours":
            raise ValueError(f"neighbours: {self.neighbours} is read only with images: "
                             f"neighbours (images is {self.images!r})")
        return self


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
        if captions and not flat:
            raise ConfigError(_no_negatives(len(captions), config.kinds))
        self.kinds = list(config.kinds)
        self.captions = len(captions)
        self.without = sum(start == end for start, end in zip(offsets, offsets[1:]))
        self.texts = list(index)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def record(self) -> dict[str, int]:
        """The counts a run records: distinct captions, and those without a negative."""
        return {"captions": self.captions, "without_negative": self.without}

    def note(self, settings: str = "train") -> str | None:
        """The one-line note for captions that get no negative (None: every caption gets one);
        ``settings`` is where the user writes the trainer's keys."""
        if not self.without:
            return None
        return (f"{settings}.hard_negatives: {self.without} of {self.captions} distinct training "
                f"captions get no negative ({_needs(self.kinds)}): they train as plain CLIP")

    def sample(self, caption_ids: torch.Tensor, generator: torch.Generator | None
               ) -> torch.Tensor:
        """One random negative id per caption id (-1 where the caption has none)."""
        start, end = self.offsets[caption_ids], self.offsets[caption_ids + 1]
        count = end - start
        pick = (torch.rand(len(caption_ids), generator=generator) * count).long()
        ids = self.flat[(start + pick).clamp(max=max(len(self.flat) - 1, 0))] \
            if len(self.flat) else torch.zeros_like(caption_ids)
        return torch.where(count > 0, ids, torch.full_like(ids, -1))


def _needs(kinds: list[str]) -> str:
    """What a caption needs for each of ``kinds`` to give it a negative."""
    needs = [f"{kind} needs {_NEEDS[kind]}" for kind in kinds]
    if "attribute_swap" in kinds or "relation_swap" in kinds:
        needs.append(_SWAP_PATTERN)
    return "; ".join(needs)


def _no_negatives(n: int, kinds: list[str]) -> str:
    """The one-line error for a caption set none of ``kinds`` gives a negative."""
    fix = "train on captions they apply to" + \
        ("" if "word_shuffle" in kinds else
         " or add word_shuffle to the kinds (the one that applies to free-text captions)")
    return (f"train.hard_negatives: none of the {n} training captions gets a negative of kinds "
            f"{list(kinds)} ({_needs(kinds)}), so training would have no hard negatives; {fix}")


def nearest_neighbours(features: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """For each row of unit-length ``features`` ``[n, D]``, the indices ``[n, k]`` of its ``k``
    most similar other rows (cosine; computed ``chunk`` rows at a time, never ``n x n``)."""
    k = min(k, len(features) - 1)
    out = []
    for start in range(0, len(features), chunk):
        sims = features[start:start + chunk] @ features.t()
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = float("-inf")  # never its own neighbour
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def negative_image_candidates(data: ImageTextPairs, config: HardNegatives, model: DualEncoder,
                              progress: bool = False) -> torch.Tensor | None:
    """``[n, k]`` hard-negative image candidates of each image of ``data`` (-1: none) for
    ``config.images``, or None when hard-negative images are off."""
    if config.images == "none":
        return None
    if config.images == "partners":
        if data.partners is None or not bool((data.partners >= 0).any()):
            raise ConfigError(f"train.hard_negatives.images: partners needs data whose images "
                              f"have partners (e.g. {{source: shapes, counterfactuals: true}}); "
                              f"{data.name} has none — or use images: neighbours")
        return data.partners[:, None]
    if len(data) < 2:
        raise ConfigError("train.hard_negatives.images: neighbours needs at least two images")
    from cliplab.evaluate.features import encode_images

    features = encode_images(model, data.images, progress=progress,
                             desc="mine hard-negative images").embeddings
    return nearest_neighbours(features, config.neighbours)
