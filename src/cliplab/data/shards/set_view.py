"""What a shard folder's samples make as a set, learnt from their metadata alone (no image
decoded), for `cliplab data shard` of a shard folder (`cliplab.data.shards.from_files`):
whether they are a classification set, and each sample's label, group and partner as the
shards written hold them, as `load_shards` makes them of the samples it reads. Images that
turn out unreadable while the samples are written may make the set another (`Reread`)."""

from __future__ import annotations

import os

import torch

from cliplab.data.shards.read import has_labels, partner_indices

Fields = tuple[int | None, int | None, str | None]  # a sample's (label, group, partner key)


class Reread(Exception):
    """The samples must be read again: images a first pass did not decode turned out
    unreadable, and without them the set is another (``unreadable``: their places among the
    samples that pass found)."""

    def __init__(self, unreadable: frozenset[int]):
        super().__init__(f"{len(unreadable)} unreadable image(s) change the set")
        self.unreadable = unreadable


class SetView:
    """What `load_shards` makes of the samples a first pass found (their ``groups``, ``keys``
    and ``partner_keys``, by their places) but those at the places ``left_out``: whether they
    are a classification set (``labelled``), each sample's `Fields` (`fields`) and the warning
    of partner keys naming no sample (``warning``, or None)."""

    def __init__(self, index: dict | None, groups: list[int | None], keys: list[str],
                 partner_keys: list[str | None], where: str | os.PathLike,
                 left_out: frozenset[int] = frozenset()):
        kept = range(len(groups)) if not left_out else \
            [i for i in range(len(groups)) if i not in left_out]
        read = groups if not left_out else [groups[i] for i in kept]
        self.labelled = bool(read) and has_labels(index, read)
        self._groups: list[int | None] = list(read)
        if not self.labelled and any(g is not None for g in read):
            fresh = iter(range(max(g for g in read if g is not None) + 1, 2**62))
            self._groups = [g if g is not None else next(fresh) for g in read]
        self._partners: torch.Tensor | None = None
        self.warning: str | None = None
        if not self.labelled and read:
            # each sample read is written as the sample of its number (the stream's captions
            # are stripped and non-empty), so a partner's place among them is its key
            self._partners, self.warning = partner_indices(
                keys if not left_out else [keys[i] for i in kept],
                partner_keys if not left_out else [partner_keys[i] for i in kept], where)
        # a sample's number among those read: its place, unless some are left out (rare)
        self._numbers = None if not left_out else {i: n for n, i in enumerate(kept)}
        self.places = kept

    def fields(self, place: int) -> Fields | None:
        """The (label, group, partner key) the sample at ``place`` is written with (None: a
        sample left out, or none there)."""
        number = place if self._numbers is None else self._numbers.get(place)
        if number is None or not 0 <= number < len(self._groups):
            return None
        group = self._groups[number]
        partner = -1 if self._partners is None else int(self._partners[number])
        return (group if self.labelled else None, group,
                f"{partner:09d}" if partner >= 0 else None)

    def writes_as(self, other: SetView) -> bool:
        """Whether this view's samples are written as ``other`` writes them."""
        return self.labelled == other.labelled and all(
            self.fields(i) == other.fields(i) for i in self.places)

