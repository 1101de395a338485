"""Which pairs make each training batch: epoch-wise shuffles of an in-memory set, optionally
mixed with a replay set, with a position that checkpoints save and resume restores."""

from __future__ import annotations

import torch

from cliplab.errors import ConfigError


def check_batch_fits(n_new: int, n_old: int, batch_size: int, ratio: float,
                     n_replay: int) -> None:
    """A one-line error naming the keys when a batch's share of the new data (``data.train``,
    ``batch_size - n_replay``) or of the replay set (``data.replay``, ``n_replay``) is larger
    than that set (``n_new`` / ``n_old`` pairs)."""
    share = f"of train.batch_size={batch_size} at data.replay.ratio={ratio}"
    if n_replay > n_old:
        raise ConfigError(f"the replay share of each batch ({n_replay} {share}) is larger than "
                          f"data.replay ({n_old} pairs); lower data.replay.ratio or "
                          "train.batch_size, or replay more pairs")
    if batch_size - n_replay > n_new:
        what = f"the new-data share of each batch ({batch_size - n_replay} {share})" \
            if n_replay else f"train.batch_size: a batch of {batch_size}"
        raise ConfigError(f"{what} is larger than the dataset ({n_new} pairs) in data.train; "
                          "lower train.batch_size or train on more pairs")


def check_batch_over_ranks(batch_size: int, world: int) -> None:
    """Every rank embeds an equal slice of the global batch: ``batch_size`` must divide by
    the number of ranks."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} must divide evenly over {world} ranks")


class EpochBatches:
    """Batches of ``batch_size`` indices from a fresh permutation of ``range(n)`` each epoch
    (seeded by ``seed + epoch``); the last incomplete batch of an epoch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, offset: int = 0):
        check_batch_fits(n, 0, batch_size, 0.0, 0)
        self.n, self.batch_size, self.seed, self.offset = n, batch_size, seed, offset
        self.epoch, self.pos = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def per_epoch(self) -> int:
        return self.n // self.batch_size

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.n, generator=gen) + self.offset
        return self._order

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        idx = self._permutation()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


class PartnerBatches(EpochBatches):
    """`EpochBatches` whose epoch order places each index next to one of its hard-negative
    ``candidates`` (``[n, k]`` indices, -1 padding): walking a fresh permutation, an index not
    yet placed is followed by a random candidate of it not yet placed, if any. Every index is
    still placed once per epoch; a pair stays in one batch unless a batch boundary cuts it."""

    def __init__(self, candidates: torch.Tensor, batch_size: int, seed: int, offset: int = 0):
        super().__init__(len(candidates), batch_size, seed, offset)
        self.candidates = candidates

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            walk = torch.randperm(self.n, generator=gen).tolist()
            ranked = self.candidates.gather(
                1, torch.rand(self.candidates.shape, generator=gen).argsort(dim=1)).tolist()
            placed = [False] * self.n
            order: list[int] = []
            for i in walk:
                if placed[i]:
                    continue
                placed[i] = True
                order.append(i)
                partner = next((j for j in ranked[i] if j >= 0 and not placed[j]), None)
                if partner is not None:
                    placed[partner] = True
                    order.append(partner)
            self._order = torch.tensor(order) + self.offset
        return self._order


class ReplayBatches:
    """Global batches of ``batch_size`` where ``round(ratio * batch_size)`` come from the replay
    set (indices ``n_new…n_new+n_old-1``) and the rest from the new data; epochs count the new
    data. ``ratio = 0`` is plain `EpochBatches` over the new data. With ``partners`` (hard-negative
    candidates of the new data, ``[n_new, k]``) the new data's batches are `PartnerBatches`."""

    def __init__(self, n_new: int, n_old: int, batch_size: int, ratio: float, seed: int,
                 partners: torch.Tensor | None = None):
        if not 0 <= ratio < 1:
            raise ConfigError(f"data.replay.ratio must be in [0, 1), not {ratio}")
        n_replay = round(ratio * batch_size) if n_old else 0
        if ratio > 0 and n_replay == 0:
            raise ConfigError(f"data.replay.ratio={ratio} gives no replayed pair in a batch of "
                              f"train.batch_size={batch_size}")
        check_batch_fits(n_new, n_old, batch_size, ratio, n_replay)
        self.new = EpochBatches(n_new, batch_size - n_replay, seed) if partners is None \
            else PartnerBatches(partners, batch_size - n_replay, seed)
        self.old = EpochBatches(n_old, n_replay, seed + 7919, offset=n_new) if n_replay else None

    @property
    def per_epoch(self) -> int:
        return self.new.per_epoch

    @property
    def epoch(self) -> int:
        return self.new.epoch

    def next(self) -> torch.Tensor:
        idx = self.new.next()
        return idx if self.old is None else torch.cat([idx, self.old.next()])

    def state_dict(self) -> dict:
        state = {"new": self.new.state_dict()}
        if self.old is not None:
            state["old"] = self.old.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.new.load_state_dict(state["new"])
        if self.old is not None and "old" in state:
            self.old.load_state_dict(state["old"])
