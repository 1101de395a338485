"""The layout of a shard folder: file names, ``index.json``, stats, and where the shards are.

A folder written by ``cliplab data shard`` holds ``00000.tar, 00001.tar, …``, beside each shard
``00000_stats.json`` (its count), ``stats.json`` for the whole set and ``index.json`` (shard names
and counts, the source spec, skipped samples), written last so a folder that has it is complete.
Any other folder of ``*.tar`` (``*.tar.gz``, ``*.tgz``) files, a brace pattern
(``data/{00000..00009}.tar``) or a list of paths works too for reading, with counts read from
the tar headers when asked for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from cliplab.data.shards.tar_members import count_tar_samples, tar_is_whole
from cliplab.errors import DataError, warn

INDEX_FILE = "index.json"
INDEX_FORMAT = "cliplab-shards"
STATS_FILE = "stats.json"
SIZES_FILE = "sizes.json"  # {shard name: samples}, where OpenCLIP's loader looks for the counts
# in a shard folder while `cliplab data shard` writes it: gone once index.json is written, so a
# run stopped half-way (Ctrl-C, a kill) is never read as the whole set
UNFINISHED_FILE = "_unfinished"
SHARD_PATTERN = "%05d.tar"  # webdataset.ShardWriter's pattern: 00000.tar, 00001.tar, …


def shard_stats_name(shard_name: str) -> str:
    """``00000.tar`` → ``00000_stats.json``, the per-shard stats file img2dataset writes."""
    return shard_name.replace(".tar", "_stats.json")


def set_files(folder: Path) -> list[Path]:
    """The files of the shard set in ``folder`` and nothing else there: the shards its
    ``index.json`` lists (without one, a run that stopped: those named as the writer names
    them), their stats files, and the set's own files."""
    try:
        index = read_index(folder, quiet=True)
    except DataError:  # unreadable: not a set whose shards it could name
        index = None
    if index is not None:
        shards = [folder / e["name"] for e in index["shards"]
                  if isinstance(e, dict) and isinstance(e.get("name"), str)]
    else:
        shards = [p for p in folder.glob("*.tar") if re.fullmatch(r"\d{5}\.tar", p.name)]
    candidates = [*shards, *(folder / shard_stats_name(p.name) for p in shards),
                  folder / INDEX_FILE, folder / STATS_FILE, folder / SIZES_FILE,
                  folder / UNFINISHED_FILE]
    return [p for p in candidates if p.is_file()]


def check_finished(folder: Path) -> None:
    """A `DataError` for a shard folder a `cliplab data shard` run is writing or stopped
    writing (`UNFINISHED_FILE`): its shards are only part of the set."""
    if (folder / UNFINISHED_FILE).exists():
        written = len(list(folder.glob("*.tar")))
        raise DataError(f"{folder} holds an unfinished `cliplab data shard` run ({written} "
                        "shard(s) of an unknown total; it stopped, or still runs, before writing "
                        f"{INDEX_FILE}): run it again with --overwrite, or delete "
                        f"{folder / UNFINISHED_FILE} to read what it wrote")


def read_index(folder: str | os.PathLike, quiet: bool = False) -> dict | None:
    """The folder's ``index.json`` as a dict; None if it has none, or if another tool's file
    has the name (MosaicML's, a wids shard list: no ``"format": "cliplab-shards"``; warned of
    unless ``quiet``); ``DataError`` if it is bad."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); rewrite it with `cliplab data shard`") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        if not quiet:  # every index cliplab has written says its format
            warn(f"{path} is not a cliplab shard index (no \"format\": \"{INDEX_FORMAT}\"): "
                 "the folder's tars are read")
        return None
    if not isinstance(index.get("shards"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in index["shards"]):
        raise DataError(f"{path}: expected a 'shards' list of {{name: ..., count: ...}} "
                        "entries; rewrite it with `cliplab data shard`")
    return index


def _listed(folder: Path) -> dict[str, dict]:
    """Shard name → its entry in the folder's ``index.json`` (empty without one)."""
    index = read_index(folder) or {"shards": []}
    return {e["name"]: e for e in index["shards"] if isinstance(e, dict) and "name" in e}


def index_counts(folder: Path) -> dict[str, int]:
    """Shard name → sample count, as the folder's ``index.json`` lists them (empty without one)."""
    return {name: int(e["count"]) for name, e in _listed(folder).items() if "count" in e}


# the shard files of a folder: webdataset reads compressed tars as well
TAR_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def folder_tars(folder: Path) -> list[Path]:
    """The tar files in ``folder`` (``TAR_PATTERNS``), sorted by name."""
    return sorted({p for pattern in TAR_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def _warn_unlisted(folder: Path, listed: list[Path]) -> None:
    """Warn of tars in ``folder`` its ``index.json`` does not list: the index decides the set."""
    known = set(listed)
    unlisted = [p.name for p in folder_tars(folder) if p not in known]
    if unlisted:
        warn(f"{folder}: {len(unlisted)} tar file(s) not listed in its {INDEX_FILE} are not read "
             f"({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''}); name the "
             "shards in a brace pattern (DIR/{00000..00009}.tar) or a `::` list to read them")


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Local shard paths from a folder, a file, a brace pattern (``::`` joins several) or a
    list (``~`` is the home folder); a path naming an existing file is no pattern.

    Every path must exist; order is the folder index's, else sorted, else as given.
    """
    if isinstance(urls, (str, os.PathLike)):
        text = os.path.expanduser(str(urls))
        if Path(text).is_dir():
            folder = Path(text)
            check_finished(folder)
            index = read_index(folder)
            if index is not None:
                paths = [folder / entry["name"] for entry in index["shards"]]
                _warn_unlisted(folder, paths)
            else:
                paths = folder_tars(folder)
            if not paths:
                raise DataError(f"no .tar shards in {folder}; write some with `cliplab data shard`")
        elif Path(text).is_file():  # a tar whose path has braces or "::" is that tar
            paths = [Path(text)]
        else:
            from webdataset.shardlists import expand_urls

            try:
                paths = [Path(p) for p in expand_urls(text)]
            except ValueError as err:  # braceexpand's UnbalancedBracesError
                raise DataError(f"shard pattern {text}: {err}; a pattern is "
                                "DIR/{00000..00009}.tar") from None
    else:
        paths = [Path(p).expanduser() for p in urls]
    if not paths:
        raise DataError("no shard paths given")
    for folder in dict.fromkeys(p.parent for p in paths):  # named one by one: their folders
        check_finished(folder)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard not found: {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def shard_sample_counts(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from each folder's ``index.json`` where it lists the shard, else
    counted. A whole tar of another size than the one listed (replaced since: its count may
    be anything) is counted, with a warning; a cut-off one keeps the listed count (its lost
    samples are counted as such where it is read)."""
    indexes: dict[Path, dict[str, dict]] = {}
    counts = []
    for path in paths:
        if path.parent not in indexes:
            indexes[path.parent] = _listed(path.parent)
        entry = indexes[path.parent].get(path.name, {})
        known = int(entry["count"]) if "count" in entry else None
        try:
            written, size = entry.get("bytes"), path.stat().st_size
        except OSError:  # gone since it was listed: the stream says so where it reads it
            written = size = None
        if known is not None and written is not None and size != written and tar_is_whole(path):
            warn(f"{path}: not the shard {INDEX_FILE} lists ({written} bytes when "
                 f"written, {size} now): its samples are counted")
            known = None
        counts.append(known if known is not None else count_tar_samples(path))
    return counts
