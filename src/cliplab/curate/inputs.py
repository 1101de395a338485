"""Stamps of the files a curation step's spec names (an entries file, a trusted set, the
evaluation sets and suite to decontaminate against), taken when the step starts: a resumed run
whose step read a file that changed since is refused rather than keep a decision made from the
file as it was.

A file's stamp is its size and modification time (`file_stamp`) and, for a file of at most
`DIGEST_LIMIT` bytes (an entries list, a suite, a manifest), a digest of its bytes: one merely
touched (``touch``, a copy that kept the bytes) still resumes. A larger file, and a folder
(each file's size and modification time; hidden names skipped, as cliplab's readers skip
them), are told changed by a ``stat`` alone, a touch included."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cliplab.curate.pool import file_stamp

DIGEST_LIMIT = 4 << 20  # bytes: a file up to this size is stamped with a digest of its bytes


def stamp_inputs(paths: Iterable[str]) -> dict[str, list]:
    """``{path: stamp}`` of each existing file or folder of ``paths`` (resolved); a name that
    is no path (a Hub dataset, a built-in source) has none."""
    return {path: path_stamp(Path(path)) for path in _existing(paths)}


def _existing(paths: Iterable[str]) -> list[str]:
    found = (Path(given).expanduser().resolve() for given in paths)
    return [str(path) for path in found if path.exists()]


def path_stamp(path: Path) -> list:
    """A file's `file_stamp` (and its bytes' digest when small); a folder's count of visible
    files and a digest of each one's relative name and `file_stamp` (an image folder of a
    million files is one short entry)."""
    if not path.is_dir():
        stamp = file_stamp(str(path))
        digest = _digest(path) if stamp[0] <= DIGEST_LIMIT else None
        return stamp if digest is None else [*stamp, digest]
    digest, count = hashlib.sha256(), 0
    for root, folders, files in os.walk(path):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(name for name in files if not name.startswith(".")):
            file = Path(root, name)
            try:
                stamp = file_stamp(str(file))
            except OSError:  # a dangling link: one the step cannot read either
                stamp = []
            digest.update(f"{file.relative_to(path).as_posix()}\0{stamp}\n".encode())
            count += 1
    return ["folder", count, digest.hexdigest()]


def _digest(path: Path) -> str | None:
    """The digest of regular file ``path``'s bytes; None for another kind (a FIFO's read would
    wait for a writer) or an unreadable one."""
    try:
        if not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # unreadable: the step says so when it reads it; the stamp is a stat
        return None


def _unchanged(path: str, then: list) -> bool:
    """Whether ``path`` is as its stamp ``then`` took it: a folder's stamp alike; a file's
    size and modification time alike, else (a touch) its bytes' digest, when one was taken."""
    file = Path(path)
    if then and then[0] == "folder":
        return file.is_dir() and path_stamp(file) == then
    if file.is_dir():
        return False
    try:
        now = file_stamp(path)
        return now == then[:2] or (len(then) > 2 and now[0] == then[0]
                                   and _digest(file) == then[2])
    except OSError:
        return False


def changed_input(then: dict[str, list], paths: Iterable[str]) -> str | None:
    """How the files ``paths`` names (what a step reads now) differ from their stamps ``then``
    (``"FILE is gone"``, ``"FILE holds other bytes now"``, ``"a file in FOLDER was added,
    removed or changed ..."``, ``"FILE is new"``), or None when none does. A file is
    digested only when its size is the same and its modification time is not."""
    now = _existing(paths)
    new = [path for path in now if path not in then]
    for path, stamp in then.items():
        if path not in now:
            if Path(path).exists():  # e.g. the suite's relative paths, read from elsewhere
                return f"{path} is no longer one it reads" + (
                    f"; it reads {new[0]} now" if new else "")
            return f"{path} is gone"
        if _unchanged(path, stamp):
            continue
        if stamp and stamp[0] == "folder":
            return (f"a file in {path} was added, removed or changed (told by size and "
                    "modification time: a touch counts)")
        if len(stamp) > 2:
            return f"{path} holds other bytes now"
        return (f"{path} has another size or modification time (a file over "
                f"{DIGEST_LIMIT >> 20} MB is not read to compare: a touch counts)")
    return f"{new[0]} is new" if new else None
