"""Where each training step's batch comes from: every input yields `StepBatch`es.

- `MemoryInputs`: an in-memory set (image-text pairs, optionally mixed with a replay set, or
  labelled images). Every rank draws the whole global batch (indices, captions, augmentation)
  from the same generator, so N ranks see exactly what one process would, and keeps its own
  slice.
- `StreamInputs`: WebDataset shards streamed per rank (`StreamBatches`); each rank reads its
  own local batch.

``state_dict`` is the data position a checkpoint saves (an in-memory set's with its count and
fingerprint); ``load_state_dict`` restores it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cliplab.data.fingerprint import set_fingerprint
from cliplab.data.pairs import concat_pairs
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.train.batches import ReplayBatches
from cliplab.train.captions import CaptionTable
from cliplab.train.config import TrainConfig
from cliplab.train.hard_negatives import NegativeTable, negative_image_candidates
from cliplab.train.frozen_features import image_backbone_features, text_backbone_features
from cliplab.train.step_batch import StepBatch
from cliplab.train.stream_batches import StreamBatches

# uint8 images [b, H, W, C] and the step's generator -> model inputs [b, C, H, W]
Pixels = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def build_inputs(data: ImageTextPairs | LabelledImages | StreamBatches, *, labelled: bool,
                 config: TrainConfig, model: DualEncoder, pixels: Pixels, rank: int, world: int,
                 device: torch.device, replay: ImageTextPairs | None = None,
                 replay_ratio: float = 0.0) -> "MemoryInputs | StreamInputs":
    """The inputs over ``data`` for an objective that trains on labelled images
    (``labelled``) or on image-text pairs; a clear error when the data does not fit it."""
    if isinstance(data, StreamBatches):
        if labelled:
            raise ConfigError("streamed shards train contrastively; a classification head "
                              "needs labelled images in memory")
        if replay is not None:
            raise ConfigError("replay mixes in-memory sets; it is not available with "
                              "streamed shards")
        if config.hard_negatives is not None:
            raise ConfigError("train.hard_negatives needs the pairs in memory; it is not "
                              "available with streamed shards")
        return StreamInputs(data, config, model, pixels, world, device)
    if isinstance(data, LabelledImages) and not labelled:
        raise ConfigError("training on labelled images needs a classification head "
                          "(Trainer(..., head=...)); turn them into pairs for contrastive "
                          "training")
    if labelled and not isinstance(data, LabelledImages):
        raise ConfigError("a classification head trains on labelled images; without a head "
                          "the trainer trains image-text pairs contrastively")
    if labelled and replay is not None:
        raise ConfigError("replay mixes image-text pairs; it does not apply to training a "
                          "classification head")
    return MemoryInputs(data, config, model, pixels, rank, world, device, replay, replay_ratio)


class MemoryInputs:
    """Global batches of an in-memory set; this rank keeps rows ``local`` of each."""

    ranks_draw_alike = True  # every rank draws the same global batch (and augmentation)

    def __init__(self, data: ImageTextPairs | LabelledImages, config: TrainConfig,
                 model: DualEncoder, pixels: Pixels, rank: int, world: int,
                 device: torch.device, replay: ImageTextPairs | None = None,
                 replay_ratio: float = 0.0):
        cfg = config
        self.pixels, self.device = pixels, device
        self._record: dict | None = None
        self.labelled = isinstance(data, LabelledImages)
        partners = negative_image_candidates(data, cfg.hard_negatives, model, cfg.progress) \
            if cfg.hard_negatives is not None and not self.labelled else None
        self.batches = ReplayBatches(len(data), len(replay) if replay is not None else 0,
                                     cfg.batch_size, replay_ratio, cfg.seed, partners)
        self.data = data if replay is None else concat_pairs(data, replay)
        self.local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        # a locked image tower without augmentation: each image's features are computed once
        self.image_features = image_backbone_features(model, self.data.images,
                                                      progress=cfg.progress).to(device) \
            if cfg.cache_frozen_features and not cfg.augment \
            and model.tower_is_frozen("image") else None
        if not self.labelled:
            self.table = CaptionTable(self.data)
            self.keys_from_groups = cfg.multi_positive and self.data.groups is not None
            # a caption true of images that do not share all their captions needs key rows
            self.described = self.table.described_sets(
                self.data.groups if self.keys_from_groups else None) \
                if cfg.multi_positive else None
            # hard negatives' texts follow the captions' in one text source
            self.negatives = NegativeTable(self.table.texts, cfg.hard_negatives) \
                if cfg.hard_negatives is not None else None
            texts = self.table.texts + (self.negatives.texts if self.negatives else [])
            # A fully locked tower's caption features are computed once; otherwise captions
            # are tokenized once and encoded every step.
            self.texts = text_backbone_features(model, texts, progress=cfg.progress).to(device) \
                if cfg.cache_frozen_features and model.tower_is_frozen("text") \
                else model.tokenize(texts)

    @property
    def per_epoch(self) -> int:
        return self.batches.per_epoch

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def next(self, rng: torch.Generator) -> StepBatch:
        """This rank's share of the next global batch (captions drawn before augmentation)."""
        idx, local = self.batches.next(), self.local
        if self.labelled:
            return StepBatch(self._images(idx, rng)[local],
                             labels=self.data.labels[idx][local])
        captions = self.table.sample(idx, rng)
        if self.described is not None:
            keys = self.described.keys(idx, captions)
        else:
            keys = self.data.groups[idx] if self.keys_from_groups else captions
        keys = keys.to(self.device)
        negatives = None
        if self.negatives is not None:  # rows after the captions'; -1 stays "none"
            negatives = self.negatives.sample(captions, rng)
            negatives = torch.where(negatives >= 0, negatives + len(self.table.texts),
                                    negatives)[local]
        return StepBatch(self._images(idx, rng)[local], texts=self.texts,
                         captions=captions[local], keys=keys[local], negatives=negatives)

    def _images(self, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if self.image_features is not None:
            return self.image_features[idx.to(self.device)]
        return self.pixels(self.data.images[idx], rng)

    def state_dict(self) -> dict:
        return {**self.batches.state_dict(), "data": self.data_record()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("data")  # None in a checkpoint of an older version
        if saved is not None and saved != self.data_record():
            now = self.data_record()
            what = (f"{saved['count']} samples then, {now['count']} now"
                    if saved["count"] != now["count"] else
                    f"the same {now['count']} samples with other pixels, captions or labels")
            raise ConfigError(f"cannot resume: the training data changed since the checkpoint "
                              f"({what}): resumed, the run would draw other batches than the "
                              "run that stopped; put the data back, or start a new run")
        self.batches.load_state_dict({k: v for k, v in state.items() if k != "data"})

    def data_record(self) -> dict:
        """``{count, fingerprint}`` of the set drawn from (with its replay set): what a
        checkpoint keeps so a resume on changed data is refused, not silently another run."""
        if self._record is None:
            self._record = {"count": len(self.data), "fingerprint": set_fingerprint(self.data)}
        return self._record


class StreamInputs:
    """Local batches streamed from shards; captions are tokenized (or, for a locked text
    tower, encoded without a graph) as they arrive."""

    ranks_draw_alike = False  # streamed ranks hold different images

    def __init__(self, stream: StreamBatches, config: TrainConfig, model: DualEncoder,
                 pixels: Pixels, world: int, device: torch.device):
        if stream.local_batch * world != config.batch_size:
            raise ConfigError(f"the stream's local batch ({stream.local_batch}) x "
                              f"{world} rank(s) is not train.batch_size={config.batch_size}")
        self.stream, self.model, self.pixels, self.device = stream, model, pixels, device
        self.multi_positive = config.multi_positive

    @property
    def per_epoch(self) -> int:
        return self.stream.per_epoch

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def next(self, rng: torch.Generator) -> StepBatch:
        batch = self.stream.next()
        captions = list(batch["caption"])
        texts = self.model.tokenize(captions)
        if self.model.tower_is_frozen("text"):
            with torch.no_grad(), evaluating(self.model.text_tower):
                texts = self.model.text_backbone(
                    **{k: v.to(self.device) for k, v in texts.items()}).float()
        keys = StreamBatches.keys(batch, self.multi_positive).to(self.device)
        return StepBatch(self.pixels(batch["image"], rng), texts=texts,
                         captions=torch.arange(len(captions)), keys=keys)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
