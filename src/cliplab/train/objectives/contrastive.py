"""The contrastive objective: CLIP (InfoNCE) or SigLIP loss of image-text pairs against the
global batch, back-propagated whole or, with ``micro_batch_size``, through GradCache; with hard
negatives in the batch, NegCLIP's loss (the images also scored against the negative captions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplab.errors import ConfigError
from cliplab.train.contrastive import contrastive_loss
from cliplab.train.embed import Embedder
from cliplab.train.grad_cache import grad_cache_backward
from cliplab.train.losses import clip_loss_hard_negatives
from cliplab.train.step_batch import StepBatch


class ContrastiveObjective:
    """``kind``: "clip" or "siglip" (needs a model with a logit bias); ``tile``: compute the
    loss in tiles (same value and gradients, memory linear in the batch); ``micro_batch_size``:
    embed that many pairs at a time (GradCache: the same update as the whole batch)."""

    labelled = False

    def __init__(self, embed: Embedder, kind: str = "clip", tile: int | None = None,
                 micro_batch_size: int | None = None):
        if kind == "siglip" and embed.model.logit_bias is None:
            raise ConfigError("train.loss=siglip needs a model with a logit bias (a SigLIP "
                              "model, e.g. the tiny-siglip preset)")
        self.embed, self.kind, self.tile = embed, kind, tile
        self.micro_batch_size = micro_batch_size

    def loss(self, image: torch.Tensor, text: torch.Tensor, keys: torch.Tensor | None
             ) -> torch.Tensor:
        """The loss of this rank's unnormalised embeddings against the global batch (under
        torchrun, this rank's share of it: features of all ranks are gathered inside)."""
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        model = self.embed.model
        return contrastive_loss(image, text, model.logit_scale, model.logit_bias,
                                kind=self.kind, keys=keys, tile=self.tile)

    def backward(self, batch: StepBatch) -> torch.Tensor:
        if batch.negatives is not None:
            return self._backward_hard_negatives(batch)
        chunk = self.micro_batch_size
        if not chunk or chunk >= len(batch):
            image, text = self.embed.pairs(batch.images, batch.texts, batch.captions)
            loss = self.loss(image, text, batch.keys)
            loss.backward()
            return loss.detach()
        return grad_cache_backward(
            lambda rows: self.embed.pairs(batch.images[rows], batch.texts, batch.captions[rows]),
            len(batch), chunk, lambda image, text: self.loss(image, text, batch.keys))

    def _backward_hard_negatives(self, batch: StepBatch) -> torch.Tensor:
        """NegCLIP: one pass over the local batch and its images' negative captions (the
        trainer allows hard negatives only for the plain single-process CLIP loss)."""
        has = batch.negatives >= 0
        image, text = self.embed.pairs(batch.images, batch.texts, batch.captions)
        negative = torch.zeros_like(text)
        if has.any():
            with self.embed.autocast():
                made = self.embed.texts(batch.texts, batch.negatives[has])
            negative[has.to(text.device)] = made.to(text.dtype)
        image, text, negative = (F.normalize(x.float(), dim=-1) for x in (image, text, negative))
        with torch.autocast(image.device.type, enabled=False):  # as Embedder's autocast
            loss = clip_loss_hard_negatives(image, text, negative, has.to(image.device),
                                            self.embed.model.logit_scale, batch.keys)
        loss.backward()
        return loss.detach()
