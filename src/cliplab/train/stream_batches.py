"""Training batches streamed from WebDataset shards: each rank reads its own shards (see
`cliplab.data.shards.stream`) and embeds its own local batch; the loss gathers the global one.

Every rank takes the same number of steps per epoch (the smallest rank's batch count, so no
rank waits at a collective for one that has run dry), and the position of every rank is saved
in the checkpoint so a resumed run continues each rank's stream exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import StrictBool, field_validator

from cliplab.config import Section, validate
from cliplab.data.shards import ShardLoader, ShardStream
from cliplab.data.types import SkipReport
from cliplab.errors import ConfigError, DataError, warn
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.tokenizer import clean_text
from cliplab.train import distributed
from cliplab.train.config import NonNegativeInt, NotABool, PositiveInt

_GROUPLESS = 1 << 62  # caption keys live above any group id


def caption_key(caption: str) -> int:
    """A stable 62-bit integer per caption text, equal on every rank and in every process
    (Python's ``hash`` is salted per process), so equal captions are positives across ranks."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return _GROUPLESS | (int.from_bytes(digest, "little") >> 2)


class StreamedShards(Section):
    """``data.train: {source: shards, path, stream: true, …}``: WebDataset shards streamed
    by each rank (see `ShardStream`, `ShardLoader`)."""

    source: Literal["shards"]
    path: str | list[str]  # a shard folder, a pattern (dir/{00000..00099}.tar) or a list
    stream: Literal[True]
    # resize to this square (None: the model's input; as stored for a model that pads)
    image_size: PositiveInt | None = None
    channels: Annotated[Literal[1, 3], NotABool] = 3
    caption: Literal["random", "first"] = "random"  # the caption a sample trains with
    shuffle_buffer: NonNegativeInt = 1000  # samples shuffled in memory (0 or 1: none)
    num_workers: NonNegativeInt = 0  # DataLoader workers per rank

    @field_validator("caption", mode="before")
    @classmethod
    def _one_caption(cls, value: Any) -> Any:
        if value == "all":  # ShardStream's mode for readers of every caption
            raise ValueError("'all' gives a sample every caption, and a training step takes "
                             "one per image: use random or first")
        return value


class _StreamSwitch(Section):
    stream: StrictBool


def checked_stream_spec(spec: dict) -> dict:
    """A ``data.train`` spec that has a ``stream`` key, checked at config load: ``stream:
    false`` is dropped (the source is read whole, as without it); with ``stream: true`` every
    option is validated by `StreamedShards` (a ValidationError keeps the key path). Returns the
    spec with its values parsed (only the keys given)."""
    if not _StreamSwitch.model_validate({"stream": spec["stream"]}).stream:
        return {k: v for k, v in spec.items() if k != "stream"}
    if spec.get("source") != "shards":
        raise ValueError("stream: true streams WebDataset shards; use {source: shards, path: "
                         "DIR, stream: true}")
    known = list(StreamedShards.model_fields)
    unknown = sorted(set(spec) - set(known), key=str)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of a streamed shard source; valid: "
                         f"{', '.join(known)}")
    return StreamedShards.model_validate(spec).model_dump(mode="json", exclude_unset=True)


# share of an epoch's samples that an uneven split over the ranks may leave unseen unwarned
# (drop_last's remainders alone leave less than a batch per stream)
UNSEEN_WARN_FRACTION = 0.05


def check_rank_split(loader: ShardLoader) -> None:
    """Refuse shards that leave a rank without samples (no batch size can help that), and warn
    (rank 0) when the split is so uneven that stopping every rank after the smallest rank's
    batches leaves over 5% of an epoch's samples unseen."""
    stream, world = loader.stream, loader.stream.world_size
    if world < 2:
        return
    counts = stream.rank_sample_counts(loader.workers)
    idle = [str(r) for r, n in enumerate(counts) if n == 0]
    if idle:
        raise DataError(f"{_where(stream.shards)}: {len(stream.shards)} shard(s) for {world} "
                        f"ranks leave rank(s) "
                        f"{', '.join(idle)} without samples; write more, smaller shards "
                        "(cliplab data shard --samples-per-shard N) or launch fewer ranks")
    steps, total = min(loader.batches_per_rank()), sum(counts)
    unseen = total - steps * loader.batch_size * world
    if unseen > UNSEEN_WARN_FRACTION * total and distributed.rank() == 0:
        warn(f"data.train: {len(stream.shards)} shards split unevenly over {world} "
             f"ranks ({', '.join(map(str, counts))} samples): every rank stops after "
             f"the smallest rank's {steps} batches, so {unseen} of {total} samples go "
             "unseen in an epoch; write more, smaller shards (cliplab data shard "
             "--samples-per-shard N) for an even split", stacklevel=2)


def _where(shards: list) -> str:
    """The folder of ``shards`` (or the first shard, when they lie in several)."""
    folders = {str(Path(str(shard)).parent) for shard in shards}
    return folders.pop() if len(folders) == 1 else str(shards[0])


class StreamBatches:
    """Local batches of ``loader`` for the trainer, epoch by epoch, with a resumable position."""

    def __init__(self, loader: ShardLoader):
        if not loader.drop_last:
            raise ConfigError("streamed training needs equal local batches: use drop_last=True")
        self.loader = loader
        self.epoch = loader.stream.epoch
        self.in_epoch = 0
        self._batches: Iterator[dict] | None = None

    @classmethod
    def from_spec(cls, spec: dict, global_batch: int, seed: int,
                  model_input: PreprocessConfig | None = None) -> "StreamBatches":
        """From a ``{source: shards, path, stream: true, …}`` data spec, for this rank (a bad
        option: a one-line error naming ``data.train.KEY``); without ``image_size``, each image
        becomes ``model_input`` (the model's preprocessing), as a whole read makes it."""
        opts = validate(StreamedShards, spec, "", prefix="data.train")
        world = distributed.world_size()
        stream = ShardStream(opts.path, seed=seed, image_size=opts.image_size,
                             channels=opts.channels, caption=opts.caption,
                             shuffle_buffer=opts.shuffle_buffer, rank=distributed.rank(),
                             world_size=world, model_input=model_input)
        loader = ShardLoader(stream, global_batch // world, opts.num_workers, drop_last=True)
        check_rank_split(loader)
        return cls(loader)

    @property
    def local_batch(self) -> int:
        return self.loader.batch_size

    @property
    def per_epoch(self) -> int:
        """Steps per epoch: the smallest rank's number of full batches."""
        steps = min(self.loader.batches_per_rank(self.epoch))
        if steps < 1:
            raise DataError(f"the shards hold fewer than one batch of {self.local_batch} per "
                            f"rank; lower train.batch_size or add shards")
        return steps

    @property
    def skipped(self):
        return self.loader.stream.skipped

    def next(self) -> dict:
        """The next local batch: ``{"image": uint8 [b,H,W,C], "caption": [...], "group": ...}``."""
        if self.in_epoch >= self.per_epoch:
            self._start_epoch(self.epoch + 1)
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            batch = next(self._batches)
        except StopIteration:  # corrupt samples left this rank short: its next epoch starts
            self._start_epoch(self.epoch + 1)
            self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is None:
                self._refuse_dry()
        self.in_epoch += 1
        return batch

    def _refuse_dry(self) -> None:
        """A whole epoch of this rank's shards gave no full batch (every sample unreadable)."""
        stream = self.loader.stream
        workers = self.loader.workers
        names = [stream.shards[i].name for w in range(workers)
                 for i in stream.stream_shards(self.epoch, stream.rank, w, workers)]
        where = f"rank {stream.rank}'s shards" if stream.world_size > 1 else "the shards"
        raise DataError(f"{where} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) gave "
                        f"no batch of {self.local_batch} readable samples in a whole epoch "
                        f"({SkipReport.merged([self.skipped]).summary()}); check or replace them")

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.in_epoch, self._batches = epoch, 0, None
        self.loader.set_epoch(epoch)

    @staticmethod
    def keys(batch: dict, use_groups: bool) -> torch.Tensor:
        """Positive keys: the sample's group where it has one (and ``use_groups``), else its
        caption's text (as the tokenizer cleans it), so duplicates in the global batch are not
        negatives."""
        groups = batch["group"].tolist()
        return torch.tensor([g if use_groups and g >= 0 else caption_key(clean_text(c))
                             for g, c in zip(groups, batch["caption"])], dtype=torch.int64)

    def state_dict(self) -> dict:
        """Every rank's position (a collective: rank 0 writes it for all)."""
        mine = {"stream": self.loader.state_dict(), "epoch": self.epoch,
                "in_epoch": self.in_epoch}
        return {"ranks": distributed.gather_objects(mine)}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != distributed.world_size():
            saved = len(ranks) if isinstance(ranks, list) else "?"
            raise ConfigError(f"cannot resume a streamed run saved with {saved} rank(s) on "
                              f"{distributed.world_size()}: its checkpoint holds each rank's "
                              f"place in its own shards; resume it on {saved} rank(s) "
                              + ("(without torchrun)" if saved == 1 else
                                 f"(torchrun --nproc-per-node {saved})"))
        mine = ranks[distributed.rank()]
        self.loader.load_state_dict(mine["stream"])
        self.epoch, self.in_epoch, self._batches = int(mine["epoch"]), int(mine["in_epoch"]), None
