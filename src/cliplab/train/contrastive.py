"""The one contrastive-loss entry point the trainer calls: InfoNCE or SigLIP, plain or tiled,
over the local batch or (under torchrun) the global batch gathered from every rank."""

from __future__ import annotations

import torch

from cliplab.errors import ConfigError
from cliplab.train import distributed
from cliplab.train.losses import clip_loss, clip_loss_global, siglip_loss, siglip_loss_global
from cliplab.train.tiled_loss import (tiled_clip_loss, tiled_clip_loss_global, tiled_siglip_loss,
                                      tiled_siglip_loss_global)

LOSS_KINDS = ("clip", "siglip")


def _check(image, text, logit_bias, kind, keys, tile) -> None:
    if kind not in LOSS_KINDS:
        raise ConfigError(f"loss kind {kind!r} is unknown; use one of {', '.join(LOSS_KINDS)}")
    if kind == "siglip" and logit_bias is None:
        raise ConfigError("the siglip loss needs a logit_bias (this model has none); use a "
                          "model with a bias (e.g. SigLIP) or loss kind clip")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ConfigError(f"loss tile must be a positive integer or null, got {tile!r}")
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"contrastive loss: image {tuple(image.shape)} and text "
                         f"{tuple(text.shape)} features must both be [batch, dim]")
    if keys is not None and (keys.dim() not in (1, 2) or len(keys) != len(image)):
        raise ValueError(f"contrastive loss: keys {tuple(keys.shape)} must be [batch] or "
                         f"[batch, 1 + captions] with batch = {len(image)}")
    if keys is not None and keys.dim() == 2:
        _check_key_rows(keys)


def _check_key_rows(keys: torch.Tensor) -> None:
    """Key rows ``[caption, captions of its image...]``: the pair's own caption among its
    image's, each id once (else the plain and tiled losses would count it differently)."""
    sets = keys[:, 1:]
    if sets.shape[1] == 0 or not bool((sets == keys[:, :1]).any(dim=1).all()):
        raise ValueError("contrastive loss: each key row must list its own caption (column 0) "
                         "among its image's captions (columns 1:)")
    ordered = sets.sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("contrastive loss: a key row lists a caption id twice")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: str = "clip",
                     keys: torch.Tensor | None = None, tile: int | None = None,
                     gather: bool | None = None) -> torch.Tensor:
    """Contrastive loss of L2-normalised ``image``/``text`` features ``[b, D]`` of this rank.

    - ``kind``: ``"clip"`` (symmetric InfoNCE; ``logit_scale`` is the log temperature) or
      ``"siglip"`` (sigmoid loss; needs ``logit_bias``).
    - ``keys``: one integer per pair (pairs sharing a key are positives of each other), or
      per pair its caption's id followed by the ids of its image's captions (a text is a
      positive of every image it describes; :func:`~cliplab.train.losses.positive_mask`).
    - ``tile``: None computes the B x B logits at once; an int computes the same loss and
      gradients in ``tile x tile`` blocks, with memory linear in the batch.
    - ``gather``: None gathers the features of every rank when a process group is up (True
      forces it, False keeps the local batch).

    Computed in fp32 with autocast off. Distributed, each rank returns its share of the global
    loss (its rows against all columns): the mean over ranks equals the loss of the global
    batch (:func:`~cliplab.train.distributed.mean_over_ranks` gives it for logging), and with
    DDP averaging gradients every rank gets the global batch's gradients.
    """
    _check(image, text, logit_bias, kind, keys, tile)
    with torch.autocast(image.device.type, enabled=False):  # the device's own autocast
        image, text = image.float(), text.float()
        logit_scale = logit_scale.float().reshape(())
        if logit_bias is not None:
            logit_bias = logit_bias.float().reshape(())
        if gather is None:
            gather = distributed.world_size() > 1
        if not gather:
            return _local(image, text, logit_scale, logit_bias, kind, keys, tile)
        return _global(image, text, logit_scale, logit_bias, kind, keys, tile)


def _local(image, text, logit_scale, logit_bias, kind, keys, tile) -> torch.Tensor:
    if kind == "clip":
        if tile is None:
            return clip_loss(image, text, logit_scale, keys)
        return tiled_clip_loss(image, text, logit_scale, keys, tile=tile)
    if tile is None:
        return siglip_loss(image, text, logit_scale, logit_bias, keys)
    return tiled_siglip_loss(image, text, logit_scale, logit_bias, keys, tile=tile)


def _global(image, text, logit_scale, logit_bias, kind, keys, tile) -> torch.Tensor:
    sizes = distributed.gather_sizes(len(image), image.device)
    offset, world = sum(sizes[:distributed.rank()]), len(sizes)
    text_all = distributed.all_gather_with_grad(text, sizes)
    keys_all = None if keys is None else distributed.all_gather_with_grad(keys, sizes)
    if kind == "siglip":  # this rank's images against all texts
        if tile is None:
            return siglip_loss_global(image, text_all, logit_scale, logit_bias, offset, world,
                                      keys, keys_all)
        return tiled_siglip_loss_global(image, text_all, logit_scale, logit_bias, offset, world,
                                        keys, keys_all, tile=tile)
    image_all = distributed.all_gather_with_grad(image, sizes)
    if tile is None:
        return clip_loss_global(image, text, image_all, text_all, logit_scale, offset, world,
                                keys, keys_all)
    return tiled_clip_loss_global(image, text, image_all, text_all, logit_scale, offset, world,
                                  keys, keys_all, tile=tile)
