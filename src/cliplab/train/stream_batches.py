"""Training batches streamed from WebDataset shards: each rank reads its own shards (see
`cliplab.data.shards.stream`) and embeds its own local batch; the loss gathers the global one.

Every rank takes the same number of steps per epoch (the smallest rank's batch count, so no
rank waits at a collective for one that has run dry), and the position of every rank is saved
in the checkpoint so a resumed run continues each rank's stream exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from cliplab.data.shards import ShardLoader, ShardStream
from cliplab.errors import ConfigError, DataError
from cliplab.train import distributed

_GROUPLESS = 1 << 62  # caption keys live above any group id


def caption_key(caption: str) -> int:
    """A stable 62-bit integer per caption text, equal on every rank and in every process
    (Python's ``hash`` is salted per process), so equal captions are positives across ranks."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return _GROUPLESS | (int.from_bytes(digest, "little") >> 2)


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
    def from_spec(cls, spec: dict, global_batch: int, seed: int) -> "StreamBatches":
        """From a ``{source: shards, path, stream: true, …}`` data spec, for this rank."""
        known = {"source", "path", "stream", "image_size", "channels", "caption",
                 "shuffle_buffer", "num_workers"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} of a streamed shard source; "
                              f"valid: {sorted(known)}")
        if "path" not in spec:
            raise ConfigError("a streamed shard source needs path: a shard folder or pattern")
        world = distributed.world_size()
        stream = ShardStream(spec["path"], seed=seed, image_size=spec.get("image_size"),
                             channels=spec.get("channels", 3),
                             caption=spec.get("caption", "random"),
                             shuffle_buffer=int(spec.get("shuffle_buffer", 1000)),
                             rank=distributed.rank(), world_size=world)
        loader = ShardLoader(stream, global_batch // world, int(spec.get("num_workers", 0)),
                             drop_last=True)
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
            batch = next(self._batches)
        self.in_epoch += 1
        return batch

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.in_epoch, self._batches = epoch, 0, None
        self.loader.set_epoch(epoch)

    @staticmethod
    def keys(batch: dict, use_groups: bool) -> torch.Tensor:
        """Positive keys: the sample's group where it has one (and ``use_groups``), else its
        caption's text, so duplicates in the global batch are not negatives."""
        groups = batch["group"].tolist()
        return torch.tensor([g if use_groups and g >= 0 else caption_key(c)
                             for g, c in zip(groups, batch["caption"])], dtype=torch.int64)

    def state_dict(self) -> dict:
        """Every rank's position (a collective: rank 0 writes it for all)."""
        mine = {"stream": self.loader.state_dict(), "epoch": self.epoch,
                "in_epoch": self.in_epoch}
        return {"ranks": distributed.gather_objects(mine)}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != distributed.world_size():
            raise ConfigError(f"cannot resume a streamed run saved with "
                              f"{len(ranks) if isinstance(ranks, list) else '?'} rank(s) on "
                              f"{distributed.world_size()}")
        mine = ranks[distributed.rank()]
        self.loader.load_state_dict(mine["stream"])
        self.epoch, self.in_epoch, self._batches = int(mine["epoch"]), int(mine["in_epoch"]), None
