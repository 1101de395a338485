"""The Ray engine: a step's ``map`` as Ray Data ``map_batches`` over the pool's chunks (one
chunk per batch, the prepared step held by a pool of actors), its ``decide`` on the driver (it
sees only the columns). Each chunk's columns are saved on the driver as they stream back, so
a killed run resumes exactly as with the local engine. ``ray.init(address=...)`` reaches an
existing cluster (``ray_address``, else ``RAY_ADDRESS`` as Ray itself reads it); without an
address a local Ray instance is started."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cliplab.curate.engine import chunk_progress, chunk_sizes, chunks_to_do, save_columns
from cliplab.curate.pool import Record, map_chunk
from cliplab.curate.steps.base import Step
from cliplab.errors import CliplabError, ConfigError


def start_ray(address: str | None, workers: int) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``; else start a local instance
    with ``workers`` CPUs) unless Ray is already initialised in this process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine: ray needs Ray Data: pip install 'cliplab[ray]'") from None
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
    ray.data.DataContext.get_current().enable_progress_bars = False


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
    """A Ray Data actor: the prepared step, mapping one chunk (JSON records) per call. A
    `CliplabError` (an image gone since the pool was read) comes back as the row's ``error``
    (pickled), raised as itself on the driver: raised here, Ray wrapped it in a page of
    traceback whose cause it does not keep."""

    def __init__(self, step: Step, work: str):
        self.step, self.work = step, Path(work)

    def __call__(self, batch: dict) -> dict:
        chunks, blobs, errors = [], [], []
        for chunk, records in zip(batch["chunk"], batch["records"]):
            try:
                columns = map_chunk(self.step, json.loads(records), self.work)
            except CliplabError as err:
                columns, error = {}, pickle.dumps(err)
            else:
                error = b""
            buffer = io.BytesIO()
            np.savez(buffer, **{name: np.asarray(col) for name, col in columns.items()})
            chunks.append(int(chunk))
            blobs.append(buffer.getvalue())
            errors.append(error)
        return {"chunk": np.array(chunks), "columns": np.array(blobs, dtype=object),
                "error": np.array(errors, dtype=object)}


# items whose records one Ray dataset carries: the chunks to map are sent a group at a time,
# not the whole pool at once (its records as JSON in the driver and the object store)
RAY_GROUP_ITEMS = 200_000


def chunk_groups(todo: list[int], sizes: dict[int, int], workers: int,
                 items: int = RAY_GROUP_ITEMS) -> list[list[int]]:
    """``todo`` in groups of consecutive chunks of about ``items`` items (at least
    ``workers`` chunks each, so every actor has one)."""
    groups: list[list[int]] = [[]]
    held = 0
    for c in todo:
        if groups[-1] and held >= items and len(groups[-1]) >= workers:
            groups.append([])
            held = 0
        groups[-1].append(c)
        held += sizes[c]
    return [g for g in groups if g]


def map_chunks_ray(step: Step, chunks: Mapping[int, list[Record]], out: Callable[[int], Path],
                   work: Path, workers: int = 1, desc: str = "", progress: bool = True) -> None:
    """`cliplab.curate.engine.map_chunks` on Ray Data (Ray must be started: `start_ray`); the
    chunks go to Ray a group (`chunk_groups`) at a time."""
    import ray

    todo, sizes = chunks_to_do(chunks, out), chunk_sizes(chunks)
    bar = chunk_progress(sizes, todo, desc, progress)
    try:
        # none to do: Ray Data refuses an empty dataset (no group is made)
        for group in chunk_groups(todo, sizes, max(1, workers)):
            dataset = ray.data.from_items([{"chunk": c, "records": json.dumps(chunks[c])}
                                           for c in group], override_num_blocks=len(group))
            mapped = dataset.map_batches(_ChunkMapper, fn_constructor_args=(step, str(work)),
                                         batch_size=1, compute=ray.data.ActorPoolStrategy(
                                             size=max(1, min(workers, len(group)))))
            for row in mapped.iter_rows():
                if row["error"]:
                    raise pickle.loads(row["error"])
                c = int(row["chunk"])
                with np.load(io.BytesIO(row["columns"]), allow_pickle=False) as data:
                    columns = {name: data[name] for name in data.files}
                save_columns(out(c), columns, sizes[c], f"{desc} chunk {c}")
                bar.update(sizes[c])
    finally:
        bar.close()
