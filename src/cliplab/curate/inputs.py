"""Stamps of the files a curation step's spec names (an entries file, a trusted set, the
evaluation sets and suite to decontaminate against), taken when the step starts: a resumed run
whose step read a file that changed since is refused rather than keep a decision made from the
file as it was. A stamp is a ``stat``, never a read (`file_stamp`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cliplab.curate.pool import file_stamp


def stamp_inputs(paths: Iterable[str]) -> dict[str, list]:
    """``{path: stamp}`` of each existing file or folder of ``paths`` (resolved); a name that
    is no path (a Hub dataset, a built-in source) has none."""
    stamps: dict[str, list] = {}
    for given in paths:
        path = Path(given).expanduser().resolve()
        if path.exists():
            stamps[str(path)] = path_stamp(path)
    return stamps


def path_stamp(path: Path) -> list:
    """A file's `file_stamp`; a folder's count of files and a digest of each one's relative
    name and stamp (an image folder of a million files is one short entry)."""
    if not path.is_dir():
        return file_stamp(str(path))
    digest, count = hashlib.sha256(), 0
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            file = Path(root, name)
            try:
                stamp = file_stamp(str(file))
            except OSError:  # a dangling link: one the step cannot read either
                stamp = []
            digest.update(f"{file.relative_to(path).as_posix()}\0{stamp}\n".encode())
            count += 1
    return ["folder", count, digest.hexdigest()]


def changed_input(then: dict[str, list], now: dict[str, list]) -> str | None:
    """How the files a step read differ from their stamps ``then`` (``"FILE is gone"``, ``"FILE
    was rewritten or replaced"``, ``"a file in FOLDER was added, removed or rewritten"``,
    ``"FILE is new"``), or None when none does."""
    for path, stamp in then.items():
        if path not in now:
            return f"{path} is gone"
        if now[path] != stamp:
            if stamp and stamp[0] == "folder":
                return f"a file in {path} was added, removed or rewritten"
            return f"{path} was rewritten or replaced"
    new = [path for path in now if path not in then]
    return f"{new[0]} is new" if new else None
