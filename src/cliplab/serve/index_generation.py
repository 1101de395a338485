"""A running server's index kept current: when its folder holds another generation of the
index (an ``index --add`` that completed, or a rebuild in place), the server loads it in the
background and switches to it, with no restart.

`cliplab index` writes in ``OUT.partial`` and puts only a complete index in place, swapping the
folder whole, so ``index.json``'s stamp (`index_stamp`, one stat) changes exactly when another
complete generation is there; it is looked at on a request at most once every
`CHECK_EVERY_S`. The next generation is opened and checked whole (`SearchIndex`, the model)
while the current one goes on answering; a request keeps the generation it started on to its
end, and a replaced generation is closed once its last request ends. A generation that is
itself at fault (damaged, other weights: a ``CliplabError``) is warned of once and refused: the
server keeps the one it serves, and says so (its stored images' 503, ``/api/health``). Any
other failure (too many open files, Milvus unreachable) may pass: warned of once, tried again
every `RETRY_AFTER_S`; so is a refused one while the generation served cannot search (its
Milvus collection dropped by the ``--add``).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from cliplab.errors import CliplabError, ModelError, first_line, warn
from cliplab.serve.index import SearchIndex, image_only_tuning, index_stamp, unchecked_identity
from cliplab.serve.milvus_index import MilvusUnavailable
from cliplab.serve.search_service import SearchService

CHECK_EVERY_S = 1.0  # how often a request looks at index.json (a stat)
RETRY_AFTER_S = 30.0  # how long before a generation that failed to load is tried again


def prepare_index(index: SearchIndex, shown: str | Path) -> None:
    """What serving ``index`` takes beyond opening it (at start and on a switch): FAISS
    searched one thread per search, and warnings of an index tuned on image queries only or
    whose model's preprocessing cannot be checked (``shown``: its path as the user gave it)."""
    if index.backend == "faiss":  # the server's process only (a library user's torch not)
        from cliplab.serve.faiss_index import one_thread_per_search

        one_thread_per_search()
    stale = image_only_tuning(index.record)
    if stale:
        warn(f"serve: {shown}: {stale}")
    unchecked = unchecked_identity(index.record, shown)
    if unchecked:  # --model or the recorded one: neither can be checked beyond its weights
        warn(f"serve: {unchecked}")


class Generation:
    """One loaded generation of the index: its service, and how many requests use it."""

    def __init__(self, service: SearchService):
        self.service = service
        self.stamp = service.index.stamp  # index.json's, as it was opened
        self.users = 0
        self.retired = False


class IndexGenerations:
    """The generation a server answers from, switched to the index folder's next one."""

    def __init__(self, service: SearchService):
        self.path = service.index.path
        self._current = Generation(service)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._loading = False
        self._next_try: dict[str, float] = {}  # stamps that failed: when to try them again
        self._refused: set[str] = set()  # stamps of generations at fault (tried again only
        # while the one served cannot search)
        self._warned: set[str] = set()

    @property
    def service(self) -> SearchService:
        """The service of the generation served now, not held: a switch may close its index
        at any time (a request takes it with `acquire`)."""
        return self._current.service

    def acquire(self) -> Generation:
        """The generation served now, held until `release` (a look for a newer one first, at
        most once every `CHECK_EVERY_S`)."""
        self._look()
        with self._lock:
            self._current.users += 1
            return self._current

    def release(self, generation: Generation) -> None:
        """A request on ``generation`` ended: close it if it was replaced and this was its
        last."""
        with self._lock:
            generation.users -= 1
            done = generation.retired and generation.users == 0
        if done:
            generation.service.index.close()

    def _look(self) -> None:
        """Start loading the folder's generation in the background if it is another one (one
        that failed: once it is time to try it again)."""
        now = time.monotonic()
        with self._lock:
            if self._loading or now - self._checked < CHECK_EVERY_S:
                return
            self._checked = now
        stamp = index_stamp(self.path)
        if stamp is None or stamp == self._current.stamp or now < self._next_try.get(stamp, 0):
            return
        if stamp in self._refused and not self._cannot_search():
            self._next_try[stamp] = now + RETRY_AFTER_S  # asked again then
            return
        with self._lock:
            if self._loading:
                return
            self._loading = True
        if stamp not in self._refused:  # a refusal said of a generation the folder no longer holds
            self._current.service.next_refused = None
        threading.Thread(target=self._load, name="cliplab-index-load", daemon=True).start()

    def _cannot_search(self) -> bool:
        """Whether the generation served cannot search (its Milvus collection dropped, or
        Milvus unreachable)."""
        return self._served_problem() is not None

    def _served_problem(self) -> str | None:
        """What keeps the generation served from searching (its Milvus collection dropped,
        Milvus unreachable), or None."""
        try:
            return self._current.service.index.backend_problem()
        except Exception as err:  # pymilvus raises its own MilvusException family
            return first_line(err)

    def _load(self) -> None:
        try:
            self._switch()
        finally:
            with self._lock:
                self._loading = False

    def _switch(self) -> None:
        """Open the folder's generation whole and serve it; a failure is warned of once per
        generation, unless the folder changed again meanwhile (then the next look loads it)."""
        stamp = index_stamp(self.path)
        try:
            index = SearchIndex(self.path)
        except Exception as err:  # a library's own error on a damaged file too: said once
            self._failed(stamp, err)
            return
        try:
            service = self._current.service.with_index(index)
            if index_stamp(self.path) != index.stamp:  # swapped again while it loaded: mixed
                index.close()
                return
            prepare_index(index, self.path)
        except Exception as err:
            index.close()
            self._failed(index.stamp, err)
            return
        with self._lock:
            old, self._current = self._current, Generation(service)
            old.retired = True
            done = old.users == 0
        if done:
            old.service.index.close()
        print(f"cliplab serve: now serving {self.path}: {index.count} items (build "
              f"{index.record.get('build')})", file=sys.stderr, flush=True)

    def _failed(self, stamp: str | None, err: Exception) -> None:
        """The generation at ``stamp`` did not load: refused if it is at fault, else tried
        again after `RETRY_AFTER_S`; warned of once, unless the folder holds another now."""
        if stamp is None or stamp != index_stamp(self.path):
            return
        self._next_try[stamp] = time.monotonic() + RETRY_AFTER_S
        served = self._current.service
        if isinstance(err, CliplabError) and not isinstance(err, MilvusUnavailable):
            self._refused.add(stamp)
            served.next_refused = refusal(self.path, err)
            said, then = served.next_refused, ""
        else:
            said = (f"{self.path} holds another generation of the index, which did not load "
                    f"({first_line(err)})")
            then = f"; trying it again every {RETRY_AFTER_S:g} s"
        if stamp in self._warned:
            return
        self._warned.add(stamp)
        problem = self._served_problem()  # (a Milvus generation whose collection went)
        kept = f"the one loaded before cannot search either ({problem})" if problem else \
            f"still serving the one loaded before ({served.index.count} items)"
        warn(f"serve: {said}; {kept}{then}")


def refusal(path: Path, err: CliplabError) -> str:
    """What to say of the index folder's generation at ``path`` refused for ``err``: that this
    server cannot serve it, and what can."""
    said = (f"{path} holds another generation of the index, which this server cannot serve "
            f"({err})")
    if isinstance(err, ModelError):  # what a restart does: load the model the index records
        return f"{said}; restart `cliplab serve` to serve it (with the model it was built with)"
    return said
