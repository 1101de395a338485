"""Where each training step's batch comes from, and how it becomes this rank's loss.

- `MemoryInputs`: an in-memory set (pairs, optionally mixed with a replay set, or labelled
  images for a classification head). Every rank draws the whole global batch (indices,
  captions, augmentation) from the same generator, so N ranks see exactly what one process
  would, and embeds its own slice.
- `StreamInputs`: WebDataset shards streamed per rank (`StreamBatches`); each rank reads and
  embeds its own local batch.

Both back-propagate the step's loss through the trainer (``trainer._backward`` /
``trainer._classification_backward``) and return it; their ``state_dict`` is the data position
a checkpoint saves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cliplab.data.pairs import concat_pairs
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import evaluating
from cliplab.train.batches import ReplayBatches
from cliplab.train.stream_batches import StreamBatches
from cliplab.train.captions import CaptionTable
from cliplab.train.frozen_features import image_backbone_features, text_backbone_features

if TYPE_CHECKING:
    from cliplab.train.trainer import Trainer


class MemoryInputs:
    """Global batches of an in-memory set; this rank embeds rows ``local`` of each."""

    def __init__(self, trainer: "Trainer", data: ImageTextPairs | LabelledImages,
                 replay: ImageTextPairs | None, replay_ratio: float):
        cfg = trainer.config
        self.trainer = trainer
        self.labelled = isinstance(data, LabelledImages)
        if self.labelled and trainer.head is None:
            raise ConfigError("training on labelled images needs a classification head "
                              "(Trainer(..., head=...)); turn them into pairs for contrastive "
                              "training")
        if self.labelled and replay is not None:
            raise ConfigError("replay mixes image-text pairs; it does not apply to training a "
                              "classification head")
        self.batches = ReplayBatches(len(data), len(replay) if replay is not None else 0,
                                     cfg.batch_size, replay_ratio, cfg.seed)
        self.data = data if replay is None else concat_pairs(data, replay)
        rank, world = trainer.rank, trainer.world
        self.local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        model = trainer.model
        # a locked image tower without augmentation: each image's features are computed once
        self.image_features = image_backbone_features(model, self.data.images,
                                                      progress=cfg.progress).to(trainer.device) \
            if cfg.cache_frozen_features and not cfg.augment \
            and model.tower_is_frozen("image") else None
        if not self.labelled:
            self.table = CaptionTable(self.data)
            self.keys_from_groups = cfg.multi_positive and self.data.groups is not None
            # A fully locked tower's caption features are computed once; otherwise captions
            # are tokenized once and encoded every step.
            self.text_source = text_backbone_features(model, self.table.texts,
                                                      progress=cfg.progress
                                                      ).to(trainer.device) \
                if cfg.cache_frozen_features and model.tower_is_frozen("text") \
                else model.tokenize(self.table.texts)

    @property
    def per_epoch(self) -> int:
        return self.batches.per_epoch

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def backward(self, rng: torch.Generator) -> torch.Tensor:
        """Draw the next global batch, back-propagate this rank's loss, return it."""
        t, idx = self.trainer, self.batches.next()
        if not self.labelled:
            caption_ids = self.table.sample(idx, rng)
            keys = (self.data.groups[idx] if self.keys_from_groups else caption_ids
                    ).to(t.device)
        pixels = t.pixels(self.data.images[idx], rng) if self.image_features is None \
            else self.image_features[idx.to(t.device)]
        if self.labelled:
            return t._classification_backward(pixels[self.local],
                                              self.data.labels[idx][self.local])
        return t._backward(pixels[self.local], caption_ids[self.local], self.text_source,
                           keys[self.local])

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict | None, legacy: dict) -> None:
        # checkpoints from before replay existed kept only the epoch and position
        self.batches.load_state_dict(state or {"new": legacy})


class StreamInputs:
    """Local batches streamed from shards; captions are tokenized (or, for a locked text
    tower, encoded without a graph) as they arrive."""

    def __init__(self, trainer: "Trainer", stream: StreamBatches):
        cfg = trainer.config
        if trainer.head is not None:
            raise ConfigError("streamed shards train contrastively; a classification head "
                              "needs labelled images in memory")
        if stream.local_batch * trainer.world != cfg.batch_size:
            raise ConfigError(f"the stream's local batch ({stream.local_batch}) x "
                              f"{trainer.world} rank(s) is not train.batch_size="
                              f"{cfg.batch_size}")
        self.trainer, self.stream = trainer, stream

    @property
    def per_epoch(self) -> int:
        return self.stream.per_epoch

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def backward(self, rng: torch.Generator) -> torch.Tensor:
        t = self.trainer
        batch = self.stream.next()
        captions = list(batch["caption"])
        tokens = t.model.tokenize(captions)
        text_source = tokens
        if t.model.tower_is_frozen("text"):
            with torch.no_grad(), evaluating(t.model.text_tower):
                text_source = t.model.text_backbone(
                    **{k: v.to(t.device) for k, v in tokens.items()}).float()
        keys = StreamBatches.keys(batch, t.config.multi_positive).to(t.device)
        pixels = t.pixels(batch["image"], rng)
        return t._backward(pixels, torch.arange(len(captions)), text_source, keys)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict | None, legacy: dict) -> None:
        if state is None:
            raise ConfigError("this checkpoint holds no stream position to resume from")
        self.stream.load_state_dict(state)
