"""Where the shards of a WebDataset set are and how many samples each holds.

A shard folder written by ``cliplab data shard`` has ``index.json`` listing its shards and their
sample counts; any other folder of ``*.tar`` files, a brace pattern (``data/{00000..00009}.tar``)
or a list of paths works too, with counts read from the tar headers when asked for.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Sequence

from cliplab.errors import DataError

INDEX_FILE = "index.json"
INDEX_FORMAT = "cliplab-shards"


def read_index(folder: str | os.PathLike) -> dict | None:
    """The folder's ``index.json`` as a dict, None if it has none; ``DataError`` if it is bad."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); rewrite it with `cliplab data shard`") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{path}: expected a mapping with a 'shards' list")
    return index


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Local shard paths from a folder, a brace pattern (``::`` joins several) or a list.

    Every path must exist; order is the folder index's, else sorted, else as given.
    """
    if isinstance(urls, (str, os.PathLike)):
        text = str(urls)
        if Path(text).is_dir():
            folder = Path(text)
            index = read_index(folder)
            if index is not None:
                paths = [folder / entry["name"] for entry in index["shards"]]
            else:
                paths = sorted(folder.glob("*.tar"))
            if not paths:
                raise DataError(f"no .tar shards in {folder}; write some with `cliplab data shard`")
        else:
            from webdataset.shardlists import expand_urls

            paths = [Path(p) for p in expand_urls(text)]
    else:
        paths = [Path(p) for p in urls]
    if not paths:
        raise DataError("no shard paths given")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard not found: {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def count_tar_samples(path: Path) -> int:
    """Number of distinct sample keys in a tar (reads headers only)."""
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isreg():
                    name = member.name.rsplit("/", 1)[-1]
                    keys.add(member.name[: len(member.name) - len(name)] + name.split(".", 1)[0])
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"cannot read shard {path}: {err}") from None
    return len(keys)


def shard_sample_counts(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from each folder's ``index.json`` where it lists the shard, else counted."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = []
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            index = read_index(folder) or {"shards": []}
            indexes[folder] = {e["name"]: int(e["count"]) for e in index["shards"]
                               if isinstance(e, dict) and "name" in e and "count" in e}
        known = indexes[folder].get(path.name)
        counts.append(known if known is not None else count_tar_samples(path))
    return counts
