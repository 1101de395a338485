"""The Ray engine: a step's ``map`` on a set of Ray actors that each hold the prepared step
for the whole step (given to each once), fed the pool's chunks a few at a time; its ``decide``
on the driver (it sees only the columns). Each chunk's columns are saved on the driver as they
come back, so a killed run resumes exactly as with the local engine. ``ray.init(address=...)``
reaches an existing cluster (``ray_address``, else ``RAY_ADDRESS`` as Ray itself reads it);
without an address a local Ray instance is started."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from cliplab.curate.engine import (
    WorkerDied, chunk_progress, chunk_sizes, chunks_to_do, save_columns)
from cliplab.curate.pool import Record, map_chunk
from cliplab.curate.steps.base import Step
from cliplab.errors import CliplabError, ConfigError


def start_ray(address: str | None, workers: int) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``; else start a local instance
    with ``workers`` CPUs) unless Ray is already initialised in this process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine: ray needs Ray: pip install 'cliplab[ray]'") from None
    if not ray.is_initialized():
        address, named = cluster_address(address)
        if address:
            check_reachable(address, named)
        # CPUs are a local instance's to set: Ray refuses them when connecting to a cluster
        options = {"address": address} if address else {"num_cpus": workers}
        # Ray puts its own SIGTERM handler in place (a kill then aborted the run with SIGABRT):
        # cliplab's is put back, so a kill unwinds as Ctrl-C does and says "terminated"
        ours = signal.getsignal(signal.SIGTERM)
        ray.init(**options, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        if ours is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


@contextmanager
def ray_session(engine: str) -> Iterator[None]:
    """Run the block; a Ray that `start_ray` started in it is shut down at its end (a local
    instance holds ~1 GB in ten processes after a curation from Python returns); a Ray running
    before it is the caller's and stays."""
    ray = None
    if engine == "ray":
        try:
            import ray
        except ImportError:  # start_ray says what to install
            pass
    running = ray is None or ray.is_initialized()
    try:
        yield
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster a run connects to and what named it: ``ray_address``, else the
    ``RAY_ADDRESS`` environment variable (as ``ray.init`` reads it: ``ray job submit`` sets it
    for a job); None (and Ray's ``local``) for a local instance."""
    named = "ray_address"
    if not address:
        address, named = os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    return (None if address == "local" else address), named


def check_cluster(address: str | None) -> None:
    """What `start_ray` will check of the cluster, done before any work (the pool is read
    before the first step starts Ray): a one-line `ConfigError` when nothing answers at the
    address. Nothing to check when this process already runs Ray (the caller's)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return
    address, named = cluster_address(address)
    if address:
        check_reachable(address, named)


# host:port or ray://host:port (Ray's own "auto" and "local" find or start one themselves)
_HOST_PORT = re.compile(r"^(?:ray://)?(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/?$")


def check_reachable(address: str, named: str = "ray_address", timeout_s: float = 10.0) -> None:
    """A one-line `ConfigError` when nothing accepts a connection at ``address``: Ray itself
    retries its connection for minutes without a word. Only the TCP connection is tried, so
    a slow cluster that does answer is never cut short."""
    match = _HOST_PORT.match(address.strip())
    if match is None:
        return
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        instead = "unset RAY_ADDRESS" if named == "RAY_ADDRESS" else "leave ray_address out"
        raise ConfigError(f"{named} {address}: nothing answers at {host}:{port} ({why}); "
                          f"start the cluster there (ray start --head), or {instead} for a "
                          "local instance") from None


class _ChunkMapper:
    """A Ray actor: the prepared step, received once and kept for the whole step, mapping one
    chunk per call. A `CliplabError` (an image gone since the pool was read) is returned,
    raised as itself on the driver: raised here, Ray wrapped it in a page of traceback whose
    cause it does not keep."""

    def __init__(self, step: Step, work: str):
        self.step, self.work = step, Path(work)

    def ready(self) -> bool:
        """True: answered once the actor has started (Ray placed it and built it)."""
        return True

    def map(self, records: list[Record]) -> tuple[dict[str, np.ndarray], CliplabError | None]:
        """The chunk's columns and no error, or no columns and the error."""
        try:
            return map_chunk(self.step, records, self.work), None
        except CliplabError as err:
            return {}, err


# items whose records may be on their way to the actors at once (each actor is given a chunk
# however large its chunks): the driver does not send the whole pool's records at once
RAY_ITEMS_IN_FLIGHT = 200_000
# chunks queued on one actor: the next one is there when it finishes (not a round trip away)
PER_ACTOR = 2
# times an actor that died is restarted and its chunks retried: enough for a lost node, not
# for ever: a chunk that kills its actor each time (out of memory, a native crash) looped on
RAY_RETRIES = 3


def map_chunks_ray(step: Step, chunks: Mapping[int, list[Record]], out: Callable[[int], Path],
                   work: Path, workers: int = 1, desc: str = "", progress: bool = True) -> None:
    """`cliplab.curate.engine.map_chunks` on Ray (Ray must be started: `start_ray`): one set
    of ``workers`` actors for the step, each given the prepared step once, fed the chunks a
    few at a time (`RAY_ITEMS_IN_FLIGHT`) once it has started (the step runs on the actors Ray
    can place); each chunk's columns saved as they come back."""
    import ray

    todo, sizes = chunks_to_do(chunks, out), chunk_sizes(chunks)
    bar = chunk_progress(sizes, todo, desc, progress)
    actors: list = []
    try:
        if not todo:
            return
        # restarted and its chunks retried when an actor dies (a lost node)
        mapper = ray.remote(_ChunkMapper).options(num_cpus=1, max_restarts=RAY_RETRIES,
                                                  max_task_retries=RAY_RETRIES)
        shared = ray.put(step)  # in the object store once, not once per actor
        actors = [mapper.remote(shared, str(work)) for _ in range(min(max(1, workers),
                                                                      len(todo)))]
        # an actor is given chunks only once it has started: one Ray cannot place (fewer free
        # CPUs than actors) would hold the chunks queued on it for ever
        starting = {actor.ready.remote(): a for a, actor in enumerate(actors)}
        started: list[int] = []
        queued = [0] * len(actors)
        running: dict = {}  # each chunk's result (an object ref): its number and actor
        held, sent = 0, 0  # the items in flight, the chunks of todo sent

        def send() -> None:
            nonlocal held, sent
            while sent < len(todo) and len(running) < PER_ACTOR * len(started) and (
                    len(running) < len(started) or held + sizes[todo[sent]] <= RAY_ITEMS_IN_FLIGHT):
                c, a = todo[sent], min(started, key=queued.__getitem__)
                running[actors[a].map.remote(chunks[c])] = c, a
                queued[a] += 1
                held += sizes[c]
                sent += 1
        while running or sent < len(todo):
            (done,), _ = ray.wait(list(starting) + list(running), num_returns=1)
            if done in starting:
                ray.get(done)  # an actor that could not be built raises its error here
                started.append(starting.pop(done))
                send()
                continue
            c, a = running.pop(done)
            queued[a] -= 1
            held -= sizes[c]
            try:
                columns, error = ray.get(done)
            except ray.exceptions.RayActorError:
                # the chunk named may be an innocent one queued on the actor the culprit killed
                raise WorkerDied(f"step {desc} chunk {c}: the Ray actor mapping it (or a chunk "
                                 f"queued with it) died {RAY_RETRIES + 1} times (killed, or out "
                                 "of memory?); the chunks finished are kept: run the same "
                                 "command again to resume (with fewer --workers if memory is "
                                 "short)") from None
            if error is not None:
                raise error
            save_columns(out(c), columns, sizes[c], f"{desc} chunk {c}")
            bar.update(sizes[c])
            send()
    finally:
        for actor in actors:  # chunks still queued are not mapped to be thrown away
            # a Ray gone (often why the map failed) must not hide that error or spare the rest
            with suppress(Exception):
                ray.kill(actor)
        bar.close()
