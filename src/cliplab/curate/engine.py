"""The local engine: a step's ``map`` over the pool's chunks, in this process or in a pool of
worker processes (the step is pickled once per worker, after ``prepare``). Every finished
chunk's columns are saved at once, so a killed run maps only the chunks it had not finished."""

from __future__ import annotations

import multiprocessing
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cliplab.curate.pool import Record, map_chunk
from cliplab.data.images import hide_pils_unnamed_size_warning
from cliplab.curate.steps.base import Step
from cliplab.errors import CliplabError, show_warning_on_one_line
from cliplab.output_folder import atomic_path

_WORKER_STEP: list = []


def save_columns(path: Path, columns: dict[str, np.ndarray], n: int, where: str) -> None:
    """Write one chunk's columns atomically (checked: arrays, one row per item)."""
    for name, column in columns.items():
        column = np.asarray(column)
        if column.dtype == object or len(column) != n:
            raise CliplabError(f"{where}: map column {name!r} must be a numeric or string array "
                               f"with one row per item ({n}), got {column.dtype} x {len(column)}")
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(tmp, **{name: np.asarray(c) for name, c in columns.items()})


def load_columns(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _map_records(step: Step, records: list[Record], work: Path) -> dict[str, np.ndarray]:
    return map_chunk(step, records, work)


def _init_worker(step: Step, filters: list, one_line: bool) -> None:
    # a spawned worker starts with Python's warning filters and display: the parent's (a
    # script's filterwarnings, the command line's one-line form) apply here too
    warnings.filters[:] = filters
    hide_pils_unnamed_size_warning()  # as the command line that started the worker does
    if one_line:
        warnings.showwarning = show_warning_on_one_line
    _exit_with_parent()
    _WORKER_STEP[:] = [step]


def _exit_with_parent() -> None:
    """End this worker when the process that started it dies: killed (kill -9, the OOM
    killer), it cannot stop its pool, and a spawned worker waiting on the pool's queue never
    sees it close (python/cpython#111873) — each kept ~450 MB for ever."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes: it has exited
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _map_in_worker(records: list[Record], work: Path) -> dict[str, np.ndarray]:
    return _map_records(_WORKER_STEP[0], records, work)


class LazyChunks(Mapping):
    """``{chunk number: its records}`` whose records are loaded (``load(number)``) each time
    a chunk is asked for, not held: an engine holds only the chunks it is mapping, not the
    pool (a dict of every chunk's records held ~1 KB per item, GBs at millions)."""

    def __init__(self, sizes: dict[int, int], load: Callable[[int], list[Record]]):
        self.sizes, self._load = sizes, load

    def __getitem__(self, c: int) -> list[Record]:
        if c not in self.sizes:
            raise KeyError(c)
        return self._load(c)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)


def chunk_sizes(chunks: Mapping[int, list[Record]]) -> dict[int, int]:
    """Each chunk's number of records (of a `LazyChunks`, without loading them)."""
    if isinstance(chunks, LazyChunks):
        return dict(chunks.sizes)
    return {c: len(records) for c, records in chunks.items()}


def chunks_to_do(chunks: Mapping[int, list[Record]], out: Callable[[int], Path]) -> list[int]:
    """The chunks (sorted) whose columns file does not exist yet (a resumed run skips the
    others)."""
    return [c for c in sorted(chunks) if not out(c).exists()]


def chunk_progress(sizes: dict[int, int], todo: list[int], desc: str, progress: bool) -> tqdm:
    """A bar over every item of the chunks of ``sizes``, those outside ``todo`` already
    counted."""
    total = sum(sizes.values())
    return tqdm(total=total, initial=total - sum(sizes[c] for c in todo), desc=desc,
                unit="item", disable=not progress)


def stop_workers(pool: ProcessPoolExecutor, wait_s: float = 10.0) -> None:
    """Stop a pool at once (Ctrl-C, kill, a chunk's error): the queued chunks are dropped and
    the running ones stopped, not mapped to be thrown away — a worker mapping on after the run
    ended held the CPU for minutes, after the run had let go of its ``--out``."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    # no public handle: the pool's table of worker processes, read once shutdown has stopped
    # new work (shutdown drops the pool's own reference to it)
    table = getattr(pool, "_processes", None) or {}
    pool.shutdown(wait=False, cancel_futures=True)
    processes = list(table.values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(wait_s)
        if process.is_alive():  # SIGTERM not acted on (a loaded machine, a blocked signal)
            process.kill()
            process.join(wait_s)


class WorkerDied(CliplabError):
    """A curate worker process ended without its chunk (the OOM killer, ``kill -9``)."""


def map_chunks(step: Step, chunks: Mapping[int, list[Record]], out: Callable[[int], Path],
               work: Path, workers: int = 1, desc: str = "", progress: bool = True) -> None:
    """``step.map`` over every chunk (``{chunk number: records}``, e.g. `LazyChunks`) whose
    columns file ``out(number)`` does not exist yet; each result is saved as soon as it is
    ready. A few chunks per worker are under way at once, not the whole pool."""
    todo, sizes = chunks_to_do(chunks, out), chunk_sizes(chunks)
    bar = chunk_progress(sizes, todo, desc, progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for c in todo:
                records = chunks[c]
                save_columns(out(c), _map_records(step, records, work), len(records),
                             f"{desc} chunk {c}")
                bar.update(len(records))
            return
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker,
                                 initargs=(step, list(warnings.filters),
                                           warnings.showwarning is show_warning_on_one_line)
                                 ) as pool:
            waiting, running = iter(todo), {}

            def submit_next() -> None:
                c = next(waiting, None)
                if c is not None:
                    running[pool.submit(_map_in_worker, chunks[c], work)] = c
            for _ in range(2 * workers):  # a queued chunk's records are held until mapped
                submit_next()
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in sorted(finished, key=running.get):
                        c = running.pop(future)
                        save_columns(out(c), future.result(), sizes[c], f"{desc} chunk {c}")
                        bar.update(sizes[c])
                        submit_next()
            except BrokenProcessPool:
                stop_workers(pool)
                raise WorkerDied(f"step {desc}: a worker process died (killed, or out of "
                                 "memory?); the chunks finished are kept: run the same command "
                                 "again to resume (with fewer --workers if memory is short)"
                                 ) from None
            except BaseException:
                stop_workers(pool)
                raise
    finally:
        bar.close()
