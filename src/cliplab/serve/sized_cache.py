"""A least-recently-used cache bounded by the bytes it holds, not by its number of entries:
a thumbnail can be a few KB or, for an original small enough to send as it is, most of a MB."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class SizedLru:
    """Values by key, the least recently used dropped once their sizes pass ``budget`` bytes
    (a value larger than the budget is returned but not kept). Safe across threads; two
    threads missing the same key may each make it (the first kept)."""

    def __init__(self, budget: int):
        self.budget, self.held = budget, 0
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object], size: Callable[[object], int]):
        """The value of ``key``, made by ``make()`` (outside the lock) when missing; ``size``
        gives a value's bytes."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = make()
        nbytes = size(value)
        with self._lock:
            if key in self._entries or nbytes > self.budget:
                return value
            self._entries[key] = (value, nbytes)
            self.held += nbytes
            while self.held > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.held -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)
