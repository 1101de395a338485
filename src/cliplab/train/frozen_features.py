"""Features of a frozen tower, computed once per dataset.

A fully locked tower gives the same pooled features for a caption (or an un-augmented image)
every step, so they are computed once, in eval mode, and each step only runs the trainable
projection on them: a few hundred distinct captions for a classification set; every image
when the image tower is locked and augmentation is off.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from cliplab.models.dual_encoder import DualEncoder, evaluating


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


@torch.no_grad()
def image_backbone_features(model: DualEncoder, images: torch.Tensor, batch_size: int = 256,
                            progress: bool = True) -> torch.Tensor:
    """Pooled (pre-projection) image-tower features of uint8 ``images`` (no augmentation),
    in eval mode."""
    out = []
    with evaluating(model.vision_tower):
        for i in tqdm(range(0, len(images), batch_size), desc="encode images",
                      disable=not progress, leave=False):
            pixels = model.preprocess(images[i:i + batch_size]).to(model.device)
            out.append(model.image_backbone(pixels).float())
    return torch.cat(out)
