"""Captions of a pair dataset as a table of unique strings, and a frozen tower's features of it.

A locked text tower gives the same features for a caption every step, so they are computed
once per dataset (a few hundred distinct captions for a classification set) and each step only
runs the trainable projection.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from cliplab.data.types import ImageTextPairs
from cliplab.models.dual_encoder import DualEncoder, evaluating


class CaptionTable:
    """Unique captions and, per image, the ids of its captions (as one flat tensor + offsets)."""

    def __init__(self, pairs: ImageTextPairs):
        index: dict[str, int] = {}
        flat, offsets = [], [0]
        for caps in pairs.captions:
            for c in caps:
                flat.append(index.setdefault(c, len(index)))
            offsets.append(len(flat))
        self.texts = list(index)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def sample(self, image_idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One random caption id for each image in ``image_idx``."""
        start, end = self.offsets[image_idx], self.offsets[image_idx + 1]
        pick = (torch.rand(len(image_idx), generator=generator) * (end - start)).long()
        return self.flat[start + pick]


@torch.no_grad()
def text_backbone_features(model: DualEncoder, texts: list[str], batch_size: int = 256,
                           progress: bool = True) -> torch.Tensor:
    """Pooled (pre-projection) text-tower features of ``texts``, in eval mode."""
    out = []
    with evaluating(model.text_tower):
        for i in tqdm(range(0, len(texts), batch_size), desc="encode captions",
                      disable=not progress, leave=False):
            tok = {k: v.to(model.device)
                   for k, v in model.tokenize(texts[i:i + batch_size]).items()}
            out.append(model.text_backbone(**tok).float())
    return torch.cat(out)
