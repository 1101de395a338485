"""Batches from a ``ShardStream`` through DataLoader workers, with a resumable position.

Each worker reads its own stream and builds whole batches (``collate_samples``; with
``drop_last`` each worker drops its own remainder), tagged with the stream and its position;
the ``ShardLoader`` in the main process records those tags as it hands batches out, so
``state_dict()`` is the position of what the caller has actually received (prefetched batches
do not count).

Trainer use::

    stream = ShardStream("shards/", seed=0, image_size=32)        # rank from torch.distributed
    loader = ShardLoader(stream, batch_size=256, num_workers=2, drop_last=True)
    loader.load_state_dict(saved)                                  # when resuming
    for epoch in range(loader.stream.epoch, epochs):
        loader.set_epoch(epoch)                                     # no-op in the resumed epoch
        steps = min(loader.batches_per_rank())                      # same on every rank
        for batch in itertools.islice(loader, steps): ...           # image uint8 [B,H,W,C]
            state = loader.state_dict()                             # save with the checkpoint

Stopping a pass early (``islice``) leaves the stream inside the epoch, so call ``set_epoch`` for
the next one.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from cliplab.data.shards.stream import ShardStream
from cliplab.errors import ConfigError, DataError, warn


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into ``{"image": uint8 [B,H,W,C], "caption": [...], "key": [...],
    "group": int64 [B] (-1 where none)}``; images must share one size."""
    if not samples:
        raise DataError("cannot collate an empty batch")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        first = samples[0]
        other = next(s for s in samples if tuple(s["image"].shape) != tuple(first["image"].shape))
        raise DataError(f"images of one batch differ in size: {first['key']} is "
                        f"{tuple(first['image'].shape)}, {other['key']} is {tuple(other['image'].shape)}"
                        "; give the stream image_size (and channels), or the model_input of the "
                        "model the images are for, to give every image one shape")
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "group": torch.tensor([-1 if s["group"] is None else s["group"] for s in samples],
                                  dtype=torch.int64)}


class _WorkerBatches(IterableDataset):
    """Runs in each worker: its stream's samples as tagged batches; a final tag-only item
    carries the end position and any trailing skips."""

    def __init__(self, stream: ShardStream, batch_size: int, drop_last: bool) -> None:
        self.stream, self.batch_size, self.drop_last = stream, batch_size, drop_last

    def __iter__(self) -> Iterator[dict]:
        local, workers, start = self.stream._worker_stream()
        samples: list[dict] = []
        skipped: list[tuple[str, str]] = []
        pos = start

        def tagged(batch):
            return {"batch": batch, "stream": local, "workers": workers, "pos": pos,
                    "skipped": list(skipped)}

        for pos, sample, skip in self.stream._events(local, workers, start):
            if sample is None:
                skipped.append(skip)
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield tagged(collate_samples(samples))
                samples, skipped = [], []
        if samples and not self.drop_last:
            yield tagged(collate_samples(samples))
        elif samples or skipped:
            yield tagged(None)


def _as_is(item):
    return item


def _one_line(err: DataError) -> str:
    """A worker's DataError arrives wrapped with its traceback; keep the original message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        for prefix in ("cliplab.errors.DataError: ", "DataError: "):
            if line.startswith(prefix):
                return line[len(prefix):]
    return lines[-1] if lines else "data error"


class ShardLoader:
    """Iterate batches of one epoch of ``stream``; each pass starts where the last one stopped.

    A pass that runs to the end moves the stream to the next epoch. ``state_dict()`` /
    ``load_state_dict()`` save and restore the position (needs the same ``num_workers`` and
    world size). ``dataloader_kw`` go to ``torch.utils.data.DataLoader`` (e.g. ``pin_memory``,
    ``prefetch_factor``); workers are never persistent, since each pass must see the position.
    """

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0,
                 drop_last: bool = False, **dataloader_kw) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, not {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, not {num_workers}")
        for key in ("batch_size", "collate_fn", "persistent_workers", "in_order", "sampler"):
            if key in dataloader_kw:
                raise ConfigError(f"ShardLoader sets {key} itself")
        self.stream, self.batch_size = stream, batch_size
        self.num_workers, self.drop_last, self.dataloader_kw = num_workers, drop_last, dataloader_kw

    @property
    def workers(self) -> int:
        """Streams per rank: one per worker, one without workers."""
        return max(self.num_workers, 1)

    def batches_per_rank(self, epoch: int | None = None) -> list[int]:
        """Batches each rank yields in ``epoch`` if no sample is corrupt (an upper bound);
        take ``min()`` as the step count so every rank stops together."""
        per_stream = self.stream.stream_sample_counts(self.workers, epoch)
        if self.drop_last:
            return [sum(n // self.batch_size for n in rank) for rank in per_stream]
        return [sum(-(-n // self.batch_size) for n in rank) for rank in per_stream]

    def _warn_if_drop_last_leaves_nothing(self) -> None:
        """One stderr line when this rank's streams all hold fewer samples than a batch, so
        ``drop_last`` will yield nothing (each worker batches its own stream)."""
        if not self.drop_last:
            return
        mine = self.stream.stream_sample_counts(self.workers)[self.stream.rank]
        if sum(mine) and max(mine) < self.batch_size:
            warn(f"ShardLoader: each of this rank's {self.workers} stream(s) holds fewer than "
                 f"batch_size={self.batch_size} samples (at most {max(mine)}), so "
                 "drop_last=True yields no batch; use fewer workers, a smaller batch or "
                 "drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        self.stream._check_workers(self.workers)
        self._warn_if_drop_last_leaves_nothing()
        loader = DataLoader(_WorkerBatches(self.stream, self.batch_size, self.drop_last),
                            batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            persistent_workers=False, in_order=True, **self.dataloader_kw)
        try:
            for item in loader:
                self.stream._record(item["stream"], item["workers"], item["pos"], item["skipped"])
                if item["batch"] is not None:
                    yield item["batch"]
        except DataError as err:
            raise DataError(_one_line(err)) from None
        self.stream._end_epoch()
