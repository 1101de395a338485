"""Contrastive losses over a batch of image and text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplab.errors import ConfigError


def positive_mask(image_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """``mask[i, j]`` is True when text ``j`` describes image ``i`` (their keys are equal)."""
    return image_keys[:, None] == text_keys[None, :]


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target spread evenly over each row's positives."""
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of L2-normalised features ``[B, D]``.

    ``logit_scale`` is the log temperature (the HF parameter); logits are
    ``exp(logit_scale) * image @ text.T``. Without ``keys`` pair ``i`` is the only positive of
    row/column ``i``. With ``keys`` (one integer per pair, e.g. the class of a labelled image or
    the id of its caption) every pair sharing a key is a positive, so duplicate captions in a
    batch are not pushed apart as false negatives; the target is then uniform over positives.
    """
    logits = logit_scale.exp() * image_features @ text_features.t()
    if keys is None:
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    pos = positive_mask(keys, keys)
    return 0.5 * (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits.t(), pos.t()))


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                     kind: str = "clip", keys: torch.Tensor | None = None,
                     tile: int | None = None) -> torch.Tensor:
    """The Trainer's loss entry point. Single-process InfoNCE for now: the SigLIP, tiled and
    cross-rank versions live on the `losses` branch and replace this when it is merged."""
    if kind != "clip" or tile is not None:
        raise ConfigError(f"loss {kind!r} with tile={tile} is not available in this build yet")
    return clip_loss(image_features, text_features, logit_scale, keys)
