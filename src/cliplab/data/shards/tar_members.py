"""How tar members make samples, and what a tar's headers say about it: webdataset's rule
for member names (`member_key`), members gathered into samples (`MemberGroups`), a tar's
`TarLayout` (samples, end marker, parts stored apart) and what damage reads as in plain words.
"""

from __future__ import annotations

import functools
import re
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


# webdataset's member names: ``dir/KEY.ext``, the key up to the first dot of the file name (a
# name starting with a dot, macOS tar's ``._KEY.jpg``, is no sample's part)
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member as webdataset reads it (extension lower-cased); None for a
    member that is no sample's part (``__*__`` metadata, a hidden file, no extension)."""
    if re.match(r"__[^/]*__($|/)", name):
        return None
    match = MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


class MemberGroups:
    """Tar members gathered into samples (``(key, {ext: member}, duplicate)``, in the order of
    each sample's first member): consecutive members of a key make one sample, and so do a
    key's parts stored apart (a ``tar`` of a folder lists them in directory order; ``apart``
    names the first such key); a part its key's sample already has begins another sample of
    that key, marked ``duplicate``."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, dict, bool]] = []
        self.apart: str | None = None
        self._first: dict[str, int] = {}  # key -> its first sample's index

    def add(self, key: str, ext: str, member: object) -> None:
        """Put ``member``, part ``ext`` of ``key``, into its sample."""
        last = self.samples[-1] if self.samples else None
        if last is not None and last[0] == key and ext not in last[1]:
            entry = last  # the sample being read
        elif key in self._first and ext not in self.samples[self._first[key]][1]:
            entry = self.samples[self._first[key]]  # a part stored apart
            self.apart = self.apart or key
        else:  # a new key, or a part the key's sample already has: another sample
            entry = (key, {}, key in self._first)
            self._first.setdefault(key, len(self.samples))
            self.samples.append(entry)
        entry[1][ext] = member

    def add_members(self, tar: tarfile.TarFile,
                    part: Callable[[tarfile.TarInfo], object] = lambda member: member) -> None:
        """Add every sample part of ``tar`` as ``part(member)``, reading it to its end (an
        error propagates, with what was read before it added)."""
        for member in tar:
            named = member_key(member.name) if member.isreg() else None
            if named is not None:
                self.add(*named, part(member))


def damage_text(err: BaseException) -> str:
    """What stopped the reading of a tar, in plain words (no Python object reprs)."""
    lines = str(err.args[0] if err.args else err).splitlines()
    # tarfile.open tries each compression: "could not be opened successfully:" then one line
    # per method; the plain tar's says what was wrong
    plain = [line.split("ReadError(", 1)[-1].strip("')\"") for line in lines
             if line.startswith("- method tar:")]
    text = plain[0] if plain else lines[0] if lines else type(err).__name__
    if isinstance(err, EOFError) or "unexpected end of data" in text:
        return "the file ends early, cut off inside a member"
    if text == "empty file":
        return "the file is empty"
    if isinstance(err, tarfile.TarError):
        return f"damaged tar header: {text}"
    if isinstance(err, OSError) and err.strerror:
        return f"read error: {err.strerror}"
    return f"read error: {text}"


class TarLayout(NamedTuple):
    """What a tar's headers say: ``samples`` (distinct keys, up to any damage), whether it
    reads to its end-of-archive marker (``whole``), the first key whose parts lie apart
    (``apart``, see `MemberGroups`) and what stopped the reading early (``damage``)."""

    samples: int
    whole: bool
    apart: str | None
    damage: str | None


def tar_layout(path: Path) -> TarLayout:
    """The `TarLayout` of the tar at ``path`` (reads headers only; once per file and version,
    though the stream asks every epoch)."""
    try:
        stat = path.stat()
    except OSError as err:
        return TarLayout(0, False, None, damage_text(err))
    return _tar_layout(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _tar_layout(path: str, size: int, mtime_ns: int) -> TarLayout:
    groups, whole, damage = MemberGroups(), False, None
    try:
        with tarfile.open(path) as tar:
            groups.add_members(tar, lambda member: None)
            whole = marker_follows(tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        damage = damage_text(err)
    keys = {key for key, _, _ in groups.samples}
    return TarLayout(len(keys), whole, groups.apart, damage)


def count_tar_samples(path: Path) -> int:
    """Number of distinct sample keys in a tar (reads headers only), up to any damage: the
    stream reads what is there and counts the rest as lost."""
    return tar_layout(path).samples


def marker_follows(tar: tarfile.TarFile) -> bool:
    """Whether a zero block follows the last member ``tar`` has read (read to its end), as it
    does in every complete tar; `tarfile` stops without an error where a cut-off file runs out
    instead. Read through the tar's own file (uncompressed, for a ``.tar.gz``)."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(512)
    return len(block) == 512 and not any(block)


def tar_is_whole(path: Path) -> bool:
    """Whether the tar at ``path`` reads to its end-of-archive marker (reads headers only)."""
    return tar_layout(path).whole


def compression(path: Path) -> str | None:
    """``gzip``, ``bzip2`` or ``xz`` when the file at ``path`` is compressed so (by its first
    bytes), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    for name, magic in (("gzip", b"\x1f\x8b"), ("bzip2", b"BZh"), ("xz", b"\xfd7zXZ\x00")):
        if head.startswith(magic):
            return name
    return None
