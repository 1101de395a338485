"""The classification objective: cross-entropy of ``head(image embeddings)`` on labelled
images, back-propagated ``micro_batch_size`` images at a time (a per-sample loss: plain
accumulation gives the whole-batch update)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.train.embed import Embedder
from cliplab.train.step_batch import StepBatch


class ClassificationObjective:
    """``head`` maps unnormalised image embeddings to class logits; it trains with the model."""

    labelled = True

    def __init__(self, embed: Embedder, head: nn.Module, micro_batch_size: int | None = None):
        self.embed, self.head, self.micro_batch_size = embed, head, micro_batch_size

    def backward(self, batch: StepBatch) -> torch.Tensor:
        device = self.embed.device
        labels = batch.labels.to(device)
        n = len(batch)
        chunk = self.micro_batch_size or n
        total = torch.zeros((), device=device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            with self.embed.autocast():
                embeddings = self.embed.images(batch.images[rows])
            # the head and the loss in fp32, as the contrastive loss: bf16 logits rounded by
            # up to 0.03 at CLIP's scale (flipping predictions the loss then trains on)
            logits = self.head(embeddings.float())
            loss = F.cross_entropy(logits, labels[rows], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        return total
