"""Stream image-text samples from local WebDataset tar shards, for training at scale.

How samples are split, shuffled and resumed (all of it deterministic):

* **Streams.** Each rank runs ``W`` streams, one per DataLoader worker (``W = 1`` without
  workers). In epoch ``e`` the shard list is permuted with ``(seed, e)`` and global stream
  ``g = local * world_size + rank`` reads shards ``order[g::world_size * W]``. Every shard
  belongs to exactly one stream, so every sample is seen exactly once per epoch across ranks and
  workers. Ranks can get unequal sample counts (shards differ in size, or do not divide evenly);
  ``rank_sample_counts()`` gives them up front so a trainer can stop every rank together
  (e.g. after the smallest rank's number of batches).
* **Shuffle.** Within a stream, samples pass a shuffle buffer seeded with ``(seed, e, stream)``.
* **Position.** A stream's position is how many samples (good or corrupt) it has emitted after
  shuffling. Resuming re-reads the stream's shards, replays the same shuffle without decoding
  images, and drops the first ``position`` samples. The state therefore holds one position per
  stream plus which stream's batch comes next: a ``DataLoader`` hands out worker batches round
  robin from worker 0, so on resume worker ``w`` serves stream ``(w + next) % W`` and the
  batches come out in the uninterrupted order. Workers cannot report back, so positions are
  counted in the main process from the batches it receives (``ShardLoader``): resume needs the
  same world size and number of workers as the run that saved the state (checked).
* **Corrupt samples** (unreadable image, missing image, empty caption, unreadable metadata) are
  skipped and recorded with their ``shard:key`` in ``.skipped`` (a ``SkipReport``). A shard that
  cannot be read to its end keeps every whole sample before the damage and is recorded as
  ``unreadable_shard``, or ``truncated_shard`` when it silently holds fewer samples than its
  folder's ``index.json`` says; the samples it lost then count as ``cut_off`` each
  (``raw_samples``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cliplab.data.images import (UnreadableImage, as_model_input, decode_image, decoding_for,
                                 fits_each_image)
from cliplab.data.shards.layout import expand_shards, index_counts, shard_sample_counts
from cliplab.data.folder_files import SkippedFile
from cliplab.data.shards.samples import image_part, raw_samples, sample_key, sample_meta
from cliplab.data.types import SkipReport
from cliplab.errors import ConfigError, DataError
from cliplab.models.preprocess import PreprocessConfig

CAPTION_MODES = ("first", "random", "all")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's if initialised, else (0, 1)."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ConfigError("give both rank and world_size, or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return rank, world_size


class ShardStream(IterableDataset):
    """Samples ``{"image": uint8 [H, W, C], "caption", "key", "group", "partner_key"}`` from
    tar shards.

    ``urls``: a shard folder, a brace pattern (``data/{00000..00009}.tar``) or a list of paths.
    ``caption``: ``"first"``, ``"random"`` (chosen with ``(seed, epoch, key)``) or ``"all"`` (the
    list). ``image_size`` resizes every image to that square; without it, ``model_input``
    (the preprocessing of the model the images are for) makes each image that model's input as
    its preprocessing makes it of the file alone (`as_model_input`): the pixels a whole read
    for that model holds (`load_source`; of a set of one size below the input's, which a whole
    read keeps as stored, within one level of 255), so mixed sizes batch; without either (or
    for a model that pads, ``longest``), images come as stored (a batch of mixed sizes is an
    error);
    ``channels`` forces 1 or 3 channels. ``group`` is the sample's caption group or None,
    ``partner_key`` the key of its hard-negative partner (e.g. its counterfactual twin) or None.
    ``decode=False`` leaves each image undecoded: ``image`` is its part's bytes (`image_of`
    decodes them as the stream would) and a sample whose image is unreadable is not skipped,
    for a pass that needs no pixels.
    Iterate it directly (in-process) or through a ``ShardLoader`` (``cliplab.data.shards.loader``)
    for batches, workers and a resumable position; see the module docstring for how splitting
    and resuming work.
    """

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], *, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, image_size: int | None = None,
                 channels: int | None = None, caption: str = "random", rank: int | None = None,
                 world_size: int | None = None,
                 model_input: PreprocessConfig | None = None, decode: bool = True) -> None:
        if caption not in CAPTION_MODES:
            raise ConfigError(f"caption must be one of {CAPTION_MODES}, not {caption!r}")
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or None, not {channels!r}")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, not {image_size}")
        self.shards: list[Path] = expand_shards(urls)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.image_size, self.channels, self.caption = image_size, channels, caption
        self.decode = decode
        # a model that pads (``longest``) has no input per image: its images come as stored
        self.model_input = model_input if not image_size and fits_each_image(model_input) \
            else None
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.skipped = SkipReport()
        self._counts: list[int] | None = None
        # (workers, epoch) -> [rank][stream] sample counts: asked every training step
        self._stream_counts: tuple[tuple[int, int], list[list[int]]] | None = None
        self._index_counts: dict[Path, int] | None = None
        self._reset_position()

    # ---- position -------------------------------------------------------------------------
    def _reset_position(self) -> None:
        self._workers: int | None = None  # streams per rank the positions belong to
        self._positions: list[int] = []
        self._next_stream = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op if already in it)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    def state_dict(self) -> dict:
        """The position in the current epoch, and the skips so far (plain Python values)."""
        return {"epoch": self.epoch, "positions": list(self._positions),
                "next_stream": self._next_stream, "num_workers": self._workers,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shards": [p.name for p in self.shards], "skipped": self.skipped.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; the next pass yields exactly the epoch's remaining samples."""
        for name, mine in (("rank", self.rank), ("world_size", self.world_size), ("seed", self.seed),
                           ("shards", [p.name for p in self.shards])):
            if state.get(name) != mine:
                raise DataError(f"cannot resume the shard stream: it was saved with {name}="
                                f"{state.get(name)!r}, this one has {mine!r}")
        self.epoch = int(state["epoch"])
        self._workers = state["num_workers"]
        self._positions = [int(p) for p in state["positions"]]
        self._next_stream = int(state["next_stream"])
        self.skipped = SkipReport.from_dict(state.get("skipped", {}))

    def _check_workers(self, workers: int) -> None:
        if self._workers is not None and self._workers != workers:
            raise DataError(f"cannot resume the shard stream with {workers} worker(s): its position "
                            f"was saved with {self._workers}; use the same number of workers")

    def _record(self, local: int, workers: int, pos: int, skipped: list[tuple[str, str]]) -> None:
        """Note that stream ``local`` has been consumed up to ``pos`` (and what it skipped)."""
        if self._workers is None:
            self._workers, self._positions = workers, [0] * workers
        self._positions[local] = pos
        self._next_stream = (local + 1) % workers
        for reason, key in skipped:
            self.skipped.add(reason, key)

    def _end_epoch(self) -> None:
        self.epoch += 1
        self._reset_position()

    # ---- splitting ------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in the order of ``epoch``."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        return order

    def stream_shards(self, epoch: int, rank: int, local: int, workers: int,
                      order: list[int] | None = None) -> list[int]:
        """Shard indices read by worker stream ``local`` of ``rank`` in ``epoch`` (``order``:
        `shard_order` of ``epoch``, when the caller has it)."""
        streams = self.world_size * workers
        order = self.shard_order(epoch) if order is None else order
        return order[local * self.world_size + rank::streams]

    def stream_sample_counts(self, workers: int = 1, epoch: int | None = None) -> list[list[int]]:
        """``[rank][stream]``: samples (before skipping corrupt ones) each stream reads in ``epoch``."""
        if self._counts is None:
            self._counts = shard_sample_counts(self.shards)
        epoch = self.epoch if epoch is None else epoch
        if self._stream_counts is None or self._stream_counts[0] != (workers, epoch):
            # one shuffle for all streams (each stream_shards call shuffles all shards again:
            # ranks x workers shuffles of 40k shards every step, seconds on 64 GPUs)
            order = self.shard_order(epoch)
            counts = [[sum(self._counts[i]
                           for i in self.stream_shards(epoch, r, w, workers, order))
                       for w in range(workers)] for r in range(self.world_size)]
            self._stream_counts = ((workers, epoch), counts)
        return [list(per_stream) for per_stream in self._stream_counts[1]]

    def rank_sample_counts(self, workers: int = 1, epoch: int | None = None) -> list[int]:
        """Samples (before skipping corrupt ones) each rank reads in ``epoch``."""
        return [sum(per_stream) for per_stream in self.stream_sample_counts(workers, epoch)]

    # ---- reading --------------------------------------------------------------------------
    def _expected_counts(self) -> dict[Path, int]:
        """Sample counts that shard folders' ``index.json`` promise, to notice truncated shards."""
        if self._index_counts is None:
            self._index_counts = {folder / name: count
                                  for folder in {p.parent for p in self.shards}
                                  for name, count in index_counts(folder).items()}
        return self._index_counts

    def _events(self, local: int, workers: int, start: int) -> Iterator[tuple[int, dict | None, tuple]]:
        """``(position, sample or None, (skip reason, key))`` for one stream, from ``start`` on."""
        from webdataset.filters import _shuffle

        shards = [self.shards[i] for i in self.stream_shards(self.epoch, self.rank, local, workers)]
        raw = raw_samples(shards, self._expected_counts())
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{local}:buffer")
            raw = _shuffle(raw, self.shuffle_buffer, self.shuffle_buffer, rng=rng)
        for pos, sample in enumerate(raw, 1):
            if pos <= start:
                continue  # already consumed before the resume; not decoded
            decoded, reason = self._decode(sample)
            yield pos, decoded, (reason, sample_key(sample))

    def _decode(self, raw: dict) -> tuple[dict | None, str | None]:
        if "__error__" in raw:
            return None, raw["__error__"]
        ext = image_part(raw)
        if ext is None:
            return None, "missing_image"
        try:
            captions, group, partner_key = sample_meta(raw)
        except SkippedFile as err:  # a caption that is no UTF-8 text
            return None, err.reason
        except (ValueError, UnicodeDecodeError):
            return None, "bad_metadata"
        if not captions:  # a class without captions: a classification set's shard
            return None, "class_only" if "cls" in raw else "empty_caption"
        image = raw[ext]
        if self.decode:
            try:
                image = self.image_of(image, sample_key(raw))
            except UnreadableImage:
                return None, "unreadable_image"
        key = raw["__key__"]
        if self.caption == "first":
            caption = captions[0]
        elif self.caption == "random":
            caption = random.Random(f"{self.seed}:{self.epoch}:{key}").choice(captions)
        else:
            caption = captions
        return {"image": image, "caption": caption, "key": sample_key(raw),
                "group": group, "partner_key": partner_key}, None

    def image_of(self, data: bytes, name: str) -> torch.Tensor:
        """A sample's image bytes decoded, resized to ``image_size`` or made ``model_input``
        (`UnreadableImage` naming ``name``, the sample's ``shard:key``, if they cannot be)."""
        if self.model_input is None:
            return decode_image(data, self.image_size, self.channels, name)
        with decoding_for(self.model_input):  # as a whole read for the model decodes it
            return as_model_input(decode_image(data, None, self.channels, name), self.model_input)

    def _worker_stream(self) -> tuple[int, int, int]:
        """(this worker's stream, streams per rank, its start position)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._check_workers(workers)
        local = (worker + self._next_stream) % workers
        return local, workers, (self._positions[local] if self._positions else 0)

    def __iter__(self) -> Iterator[dict]:
        local, workers, start = self._worker_stream()
        in_process = get_worker_info() is None
        for pos, sample, skip in self._events(local, workers, start):
            self._record(local, workers, pos, [] if sample is not None else [skip])
            if sample is not None:
                yield sample
        if in_process:
            self._end_epoch()
