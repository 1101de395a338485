"""The pool as a run holds it: per item only what deciding and the dropped table need (key,
caption, source key: each column one UTF-8 buffer, `Texts`), per chunk the cache file
(``cache/pool/N.json``) its whole records are loaded from when a step maps the chunk, the
report shows an item or the kept pool is written. The pool's records held at once cost
~2.9 KB per item (37 GB at DataComp's 12.8M "small" pool); these columns ~90 bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cliplab.curate.pool import Record
from cliplab.errors import DataError, first_line


def chunk_path(folder: Path, c: int) -> Path:
    """Chunk ``c``'s cache file in ``folder`` (``cache/pool``)."""
    return folder / f"{c:06d}.json"


def read_chunk(folder: Path, c: int) -> dict:
    """Chunk ``c``'s cache file as written: ``records``, ``dropped``, ``seconds``, ..."""
    return json.loads(chunk_path(folder, c).read_text(encoding="utf-8"))


class Texts(Sequence):
    """Strings (or None) held as one UTF-8 buffer and end offsets, each given back as a new
    ``str`` when asked for: ~9 bytes an item besides its text, where a list of ``str`` held
    ~60 (an object and a pointer each: 150 of a caption-only run's ~750 bytes an item)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []  # (ends, is None) per extend
        self._ends = np.zeros(0, dtype=np.int64)
        self._none = np.zeros(0, dtype=bool)

    def extend(self, values: Sequence[str | None]) -> None:
        """Add ``values`` at the end."""
        ends = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if value is not None:  # a lone surrogate (a path's undecodable byte) kept as is
                self._data += value.encode("utf-8", "surrogatepass")
            ends[i] = len(self._data)
        self._parts.append((ends, np.array([v is None for v in values], dtype=bool)))

    def _whole(self) -> None:
        if self._parts:  # (once after the extends: per extend it cost O(items²))
            self._ends = np.concatenate([self._ends, *(e for e, _ in self._parts)])
            self._none = np.concatenate([self._none, *(n for _, n in self._parts)])
            self._parts = []

    def __len__(self) -> int:
        return len(self._ends) + sum(len(e) for e, _ in self._parts)

    def __getitem__(self, i):
        self._whole()
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(len(self._ends)))]
        return self._at(range(len(self._ends))[i])

    def _at(self, i: int) -> str | None:
        if self._none[i]:
            return None
        start = int(self._ends[i - 1]) if i else 0
        return str(memoryview(self._data)[start:int(self._ends[i])], "utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str | None]:
        self._whole()
        return (self._at(i) for i in range(len(self._ends)))


class Picked(Sequence):
    """``values`` at ``positions`` (e.g. the keys of the items a step decides on among the
    pool's), not copied; a slice is a list."""

    def __init__(self, values: Sequence, positions: np.ndarray):
        self.values, self.positions = values, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.values[int(p)] for p in self.positions[i]]
        return self.values[int(self.positions[i])]

    def __iter__(self) -> Iterator:
        return (self.values[int(p)] for p in self.positions)


class PoolIndex:
    """The items read into ``folder``'s chunks (`add_chunk` each in order): their keys,
    captions and source keys; a chunk's records are loaded again when asked for."""

    def __init__(self, folder: Path, source_key: Callable[[object], str | None]):
        self.folder, self._source_key = folder, source_key
        self.sizes: list[int] = []
        self.keys, self.captions, self.source_keys = Texts(), Texts(), Texts()
        self._starts: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        """Each chunk's first pool position, and the pool's size last."""
        if self._starts is None:  # (once: made at each of 50k chunks it cost O(chunks²))
            self._starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        return self._starts

    def add_chunk(self, records: list[Record]) -> None:
        """Index the next chunk's records (as its cache file holds them)."""
        self.sizes.append(len(records))
        self.keys.extend([r["key"] for r in records])
        self.captions.extend([r["caption"] for r in records])
        self.source_keys.extend([self._source_key(r["meta"]) for r in records])
        self._starts = None

    def __len__(self) -> int:
        return len(self.keys)

    def records(self, c: int) -> list[Record]:
        """Chunk ``c``'s records, loaded from its cache file: a `DataError` unless they are the
        ones indexed at the start (a cache file changed or removed under the run would have
        other items written, silently)."""
        where = chunk_path(self.folder, c)
        try:
            records = read_chunk(self.folder, c)["records"]
            keys = [r["key"] for r in records]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{where}: the run's cache of the pool cannot be read again "
                            f"({first_line(err)}); delete {self.folder.parents[1]} to start "
                            "this run over") from None
        start = int(self.starts[c])
        if keys != self.keys[start:start + self.sizes[c]]:
            raise DataError(f"{where}: the run's cache of the pool changed since it was read; "
                            f"delete {self.folder.parents[1]} to start this run over")
        return records

    def alive_records(self, c: int, alive: np.ndarray) -> list[Record]:
        """Chunk ``c``'s records still alive (``alive``: its mask)."""
        return [r for r, a in zip(self.records(c), alive) if a]

    def alive_items(self, alive: list[np.ndarray]) -> np.ndarray:
        """The pool positions of every item alive (``alive``: a mask per chunk), in order."""
        return np.concatenate([self.starts[c] + np.flatnonzero(a) for c, a in enumerate(alive)]
                              + [np.zeros(0, dtype=np.int64)]).astype(np.int64)

    def records_at(self, positions: Sequence[int]) -> list[Record]:
        """The records at pool ``positions`` (each chunk loaded once)."""
        chunks = np.searchsorted(self.starts, positions, side="right") - 1
        loaded: dict[int, list[Record]] = {}
        out = []
        for position, c in zip(positions, chunks):
            if c not in loaded:
                loaded[c] = self.records(int(c))
            out.append(loaded[c][int(position - self.starts[c])])
        return out


class KeptRecords:
    """The records alive at the end, in pool order, loaded a chunk at a time each time they
    are gone through (the writers go through them twice: partners' keys, then the samples)."""

    def __init__(self, pool: PoolIndex, alive: list[np.ndarray]):
        self.pool, self.alive = pool, alive

    def __len__(self) -> int:
        return int(sum(int(a.sum()) for a in self.alive))

    def __iter__(self) -> Iterator[Record]:
        for c, alive in enumerate(self.alive):
            if alive.any():
                yield from self.pool.alive_records(c, alive)
