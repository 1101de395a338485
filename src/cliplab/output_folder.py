"""Output folders built where a reader cannot mistake them for finished work: a long job writes
into ``OUT.partial/`` (so a killed run can resume there) and renames it to ``OUT`` once complete.
Used by ``cliplab curate`` and ``cliplab index``; JSON files are written atomically.

`check_out` is the one rule every command applies to its ``--out`` before any work: a file is
refused, an ``--out`` that is, holds or lies inside an input (or a run's checkpoints) is refused,
a non-empty folder needs ``--overwrite``, and ``--overwrite`` replaces only a previous output of
the same kind: a folder replaced whole must hold nothing but that output's own files
(`OutputFiles`), so a file of the user's beside them keeps it from being replaced. While a
command runs, each output it checked is held (`holding_outputs`, `hold`): a second cliplab process
given the same output is refused."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from cliplab.errors import CliplabError, ConfigError, warn
from cliplab.file_modes import as_umask

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUN_MARKERS = ("metrics.jsonl", "config.yaml")  # what a run writes first


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a training run (its metrics.jsonl or config.yaml; a folder that
    merely has a checkpoints/ sub-folder is not one)."""
    return folder.is_dir() and any((folder / name).is_file() for name in RUN_MARKERS)


@dataclass(frozen=True)
class OutputFiles:
    """A previous-output test for an output a command replaces whole: the folder holds every
    file of ``markers`` and no entry but files this kind of output writes (``names``, names
    matching a regex of ``patterns``, or a file ``more(folder)`` lists; each also as the
    ``NAME.tmp`` an atomic write of it left), and sub-folders only as ``folders`` names them,
    ``(name, regex)``: a folder of that name holding only files the regex matches (an index's
    stored images). Any other sub-folder or file is the user's, so ``--overwrite`` must not
    replace the folder."""

    markers: tuple[str, ...]
    names: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    more: Callable[[Path], Iterable[str]] | None = None
    folders: tuple[tuple[str, str], ...] = ()

    def __call__(self, folder: Path) -> bool:
        return self.missing(folder) is None and self.foreign(folder) is None

    def missing(self, folder: Path) -> str | None:
        """The first of ``markers`` that ``folder`` does not hold as a file."""
        return next((name for name in self.markers if not (folder / name).is_file()), None)

    def foreign(self, folder: Path) -> str | None:
        """The first entry of ``folder`` (by name) that is not a file of this output; in one of
        its ``folders``, the first file there that is not (``images/notes.txt``: what to move)."""
        unknown = sorted(p.name for p in folder.iterdir() if not self._own(p))
        if unknown and self.more is not None:  # read only when needed: it may parse files
            listed = set(self.more(folder))
            unknown = [n for n in unknown if n not in listed or not (folder / n).is_file()]
        if not unknown:
            return None
        inside, pattern = folder / unknown[0], dict(self.folders).get(unknown[0])
        if pattern is not None and inside.is_dir() and not inside.is_symlink():
            other = sorted(f.name for f in inside.iterdir() if not _stored(f, pattern))
            return f"{unknown[0]}/{other[0]}" if other else unknown[0]
        return unknown[0]

    def plus(self, *markers: str) -> "OutputFiles":
        """This output with more files it always holds (a merge: a model folder + merge.json)."""
        return replace(self, markers=self.markers + markers)

    def why_not(self, folder: Path) -> str:
        """Why ``folder`` is not such an output, for an error message."""
        foreign = self.foreign(folder)
        if foreign is not None:
            return f"holds other files (e.g. {foreign})"
        return f"has no {self.missing(folder)}"

    def _own(self, entry: Path) -> bool:
        if is_left_lock(entry):  # a killed run's into a folder inside this one: cliplab's
            return True
        pattern = dict(self.folders).get(entry.name)
        if pattern is not None and entry.is_dir() and not entry.is_symlink():
            return all(_stored(f, pattern) for f in entry.iterdir())
        # NAME.tmp: what an atomic write of NAME left when the process was killed mid-write
        name = entry.name.removesuffix(".tmp")
        return entry.is_file() and (name in self.markers or name in self.names
                                    or any(re.fullmatch(p, name) for p in self.patterns))


def _stored(file: Path, pattern: str) -> bool:
    """Whether ``file`` is one an output stores in a folder of its files named by ``pattern``
    (or what an atomic write of one left, ``NAME.tmp``)."""
    return file.is_file() and re.fullmatch(pattern, file.name.removesuffix(".tmp")) is not None


def only_files(*names: str) -> OutputFiles:
    """A previous-output test: the folder holds ``names[0]`` and nothing but ``names``."""
    return OutputFiles(markers=names[:1], names=frozenset(names))


# What `DualEncoder.save` writes: transformers' save_pretrained of the model (weights, sharded
# above 50 GB, and config.json) and of the tokenizer (tokenizer_config.json, tokenizer.json or a
# slow tokenizer's vocabulary files, added tokens, a chat template), preprocessor_config.json,
# the model card README.md and cliplab.json. tests/test_model_outputs_overwrite.py checks that
# every file a save writes is listed; an unlisted one is refused, never deleted.
TOKENIZER_FILES = frozenset({
    "tokenizer_config.json", "tokenizer.json", "added_tokens.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model",
    "sentencepiece.bpe.model"})
MODEL_FILES = TOKENIZER_FILES | {"config.json", "model.safetensors",
                                 "model.safetensors.index.json", "preprocessor_config.json",
                                 "README.md", "cliplab.json"}
WEIGHT_SHARD = r"model-\d{5}-of-\d{5}\.safetensors"  # save_pretrained's shard names
MODEL_FOLDER = OutputFiles(("cliplab.json", "config.json"), MODEL_FILES, (WEIGHT_SHARD,))


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def same_folder(a: Path, b: Path) -> bool:
    """Whether two resolved paths name one folder: equal, or the same file on disk (``Photos``
    and ``photos`` on a case-insensitive file system, as macOS's and Windows' are)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def lies_inside(path: Path, folder: Path) -> bool:
    """Whether the resolved ``path`` lies inside the resolved ``folder`` (by `same_folder`)."""
    return not same_folder(path, folder) and \
        any(same_folder(parent, folder) for parent in path.parents)


# the keys of data specs that name a folder or file of the user's (a manifest's or image
# folder's path, a CLIP_benchmark root, Fashion-MNIST's data_dir)
DATA_PATH_KEYS = ("path", "root", "data_dir")


def spec_paths(*specs: object) -> list[str]:
    """The paths a data spec names (``{source: manifest, path: X}``), of every spec given; a
    shard pattern (``dir/{00000..00009}.tar``, ``a.tar::b.tar``) as each file it names."""
    return [path for spec in specs if isinstance(spec, dict)
            for key in DATA_PATH_KEYS if spec.get(key) is not None
            for path in _named_files(str(spec[key]))]


def _named_files(path: str) -> list[str]:
    """``path``, or the files a shard pattern that is no file of its own names."""
    if ("{" not in path and "::" not in path) or Path(path).expanduser().exists():
        return [path]
    from webdataset.shardlists import expand_urls

    try:
        return expand_urls(path)
    except ValueError:  # unbalanced braces: the reader says so in its own words
        return [path]


def check_apart_from_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                            error: type[CliplabError] = ConfigError, flag: str = "--out",
                            holding: bool = True) -> None:
    """Refuse an ``--out`` equal to, holding (unless not ``holding``) or inside an existing
    input (paths compared resolved; a preset or Hub id is no folder) or inside a run's
    checkpoints/. ``flag`` names the option in the message (e.g. ``--cache-dir``)."""
    here = _resolved(out)
    for given in inputs:
        if given is None or not Path(str(given)).expanduser().exists():
            continue  # a preset or Hub id: no folder of the user's
        source = _resolved(str(given))
        how = "is" if same_folder(here, source) else "holds" if holding and \
            lies_inside(source, here) else "lies inside" if lies_inside(here, source) else None
        if how:
            raise error(f"{flag} {out} {how} the input {given}; choose another folder")
    for parent in here.parents:
        if parent.name.casefold() == "checkpoints" and is_run_folder(parent.parent):
            raise error(f"{flag} {out} lies inside the checkpoints of the run folder "
                        f"{parent.parent}; choose another folder")


def check_cache_apart_from_inputs(cache_dir: str | os.PathLike | None,
                                  inputs: Iterable[str | os.PathLike | None],
                                  error: type[CliplabError] = ConfigError) -> None:
    """Refuse a ``--cache-dir`` that is or lies inside an input (a model or data folder), whose
    files the cache would add to; one holding inputs is fine (it only adds hashed files)."""
    if cache_dir:
        check_apart_from_inputs(cache_dir, inputs, error, flag="--cache-dir", holding=False)


def check_cache_dir(cache_dir: str | os.PathLike | None,
                    inputs: Iterable[str | os.PathLike | None],
                    error: type[CliplabError] = ConfigError) -> None:
    """Every check of a ``--cache-dir`` before any work: apart from the inputs
    (`check_cache_apart_from_inputs`) and writable (`check_writable`), as ``--out`` is: a
    read-only one failed only after the features were computed."""
    if cache_dir:
        check_cache_apart_from_inputs(cache_dir, inputs, error)
        check_writable(cache_dir, error, flag="--cache-dir")


def check_out(out: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
              overwrite: bool = False, previous: Callable[[Path], bool] | None = None,
              error: type[CliplabError] = ConfigError, may_exist: bool = False) -> Path:
    """Refuse an ``--out`` a ``kind`` command (``merge``, ``eval``, ...) must not write, before any
    work, touching nothing: a file; a path equal to, holding or inside an existing input (paths
    compared resolved) or inside a run's checkpoints/; a non-empty folder without ``overwrite``
    (``may_exist``: the command rewrites a previous output in place without it); with it, a
    folder that is not a previous output of that kind (``previous(folder)``). Returns ``out``."""
    path = Path(out).expanduser()
    if path.name in ("", ".", ".."):
        raise error(f"--out {out} names the current or a parent folder; give the name of a "
                    "folder to write")
    if path.exists() and not path.is_dir():
        raise error(f"--out {out} is a file; choose a folder")
    check_apart_from_inputs(out, inputs, error)
    check_writable(out, error)
    hold(path, error)
    if not path.is_dir() or not visible_entries(path):
        return path
    check_no_run_inside(out, error)
    is_previous = previous is not None and previous(path)
    if is_previous and (overwrite or may_exist):
        return path
    why = previous.why_not(path) if isinstance(previous, OutputFiles) else \
        f"holds other files (e.g. {sorted(p.name for p in visible_entries(path))[0]})"
    if not overwrite and not may_exist:
        if previous is not None and not is_previous:  # --overwrite would be refused too
            raise error(f"--out {out} is not empty and no previous {kind} output: it {why}; "
                        "choose a new folder")
        raise error(f"--out {out} is not empty; give a new folder or --overwrite to replace a "
                    f"previous {kind} output")
    flag = "--overwrite replaces" if overwrite else f"cliplab {kind} rewrites"
    raise error(f"{flag} only a previous {kind} output; {out} {why}; choose a new folder")


def check_writable(out: str | os.PathLike, error: type[CliplabError] = ConfigError,
                   flag: str = "--out") -> None:
    """Refuse an ``--out`` (or the folder ``flag`` names) that cannot be written (a read-only
    file system, no permission, a file where a folder would be made), by the folder it is or
    the nearest existing one it would be made in, before any work (an eval found it only after
    running every task; an export below a file, only after loading the model)."""
    place = Path(out).expanduser()  # as the user spelled it, to name the file
    while not place.exists() and place != place.parent:
        place = place.parent
    # (``out`` itself a file is each caller's to refuse, in its own words: check_out's, the
    # feature cache's)
    if place.exists() and not place.is_dir() and place != Path(out).expanduser():
        raise error(f"{flag} {out}: {place} is a file, so no folder can be made in it; choose "
                    "another folder")
    place = place.absolute()
    if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
        raise error(f"{flag} {out}: cannot write in {place} (a read-only file system, or no "
                    "permission); choose another folder")


def check_writable_beside(out: str | os.PathLike, error: type[CliplabError] = ConfigError
                          ) -> None:
    """`check_writable` for an output built in a folder beside it and renamed into place
    (merge, export, convert, curate, index): its parent folder must take new entries too."""
    check_writable(out, error)
    parent = Path(out).expanduser().absolute().parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"--out {out}: cannot write in {parent}, where it is built before it is "
                    "renamed into place (a read-only file system, or no permission); choose "
                    "another folder")


LOCK_ATTEMPTS = 5  # a lock file removed by the run releasing it is opened anew this often
LOCK_SUFFIX = ".cliplab-lock"  # the lock beside an output: PARENT/.OUT.cliplab-lock
_LOCK_TEXT = re.compile(r"(?:pid (\d+)(?: on (\S+))?)?")  # what a holder writes in its lock
_LOCK_MAX_BYTES = 512  # a lock file holds one short line: a larger file is no lock of cliplab's
# flock's "not on this file system" (some NFS set-ups, FUSE): the temporary folder's lock is
# taken instead; but not for NFS's EBADF on another user's lock, open read-only (`_others_free`)
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF,
                       getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})
_READ_ONLY = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_NO_ACCESS = frozenset({errno.EACCES, errno.EPERM})  # another user's file, not readable
# a link is never followed, nor does a FIFO planted at a lock's name block the open
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK if fcntl is not None else 0


@dataclass(frozen=True)
class _Lock:
    """A lock file open (read-only: another user's, which locks as well), its path, the folders
    made for it (its parent and the parent's missing parents) and whether this run made it."""

    handle: Any
    path: Path
    made: tuple[Path, ...] = ()
    created: bool = False


# the outputs this command holds (`holding_outputs`); None outside a command (the Python API)
_HELD: contextvars.ContextVar[dict[Path, _Lock] | None] = contextvars.ContextVar(
    "held_outputs", default=None)


@contextlib.contextmanager
def holding_outputs() -> Iterator[None]:
    """Within it (a command's run), each output the command checks (`hold`) is held until the
    block ends: another cliplab process given the same output — two runs started together,
    each passing the checks before the other wrote anything — is refused in one line instead
    of mixing, losing or hiding results."""
    held: dict[Path, _Lock] = {}
    token = _HELD.set(held)
    try:
        yield
    finally:
        _HELD.reset(token)
        for lock in held.values():
            # removed while still locked, then released: a run that opened it meanwhile finds
            # it gone once it gets the lock (`hold` checks) and makes a new one. Only if it is
            # still this lock's file (removed by hand meanwhile, its path may be another run's)
            if _still_named(lock.handle, lock.path):
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
            _let_go(lock)  # closing the file releases its lock
        if any(lock.path.parent == _locks_folder() for lock in held.values()):
            remove_stale_locks(_locks_folder())


def remove_stale_locks(locks: Path, limit: int = 256) -> int:
    """Remove up to ``limit`` lock files of ``locks``, the temporary folder's (`_temp_lock`),
    that no process holds: those of runs killed with SIGKILL, which had no chance to remove
    theirs (thousands piled up on a busy machine). Each is locked before it is removed, as a
    run removes its own, so a run that opened it meanwhile finds it gone and makes a new one.
    Returns how many went. (A killed run's lock beside its output is the next run's there.)"""
    removed = 0
    try:
        names = [entry.name for entry in os.scandir(locks) if entry.name.endswith(".lock")]
    except OSError:
        return 0
    for name in names[:limit]:
        try:
            fd = os.open(locks / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "rb+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a run is writing that output
                continue
            if _still_named(handle, locks / name):
                with contextlib.suppress(OSError):
                    os.unlink(locks / name)
                    removed += 1
    return removed


def beside_lock_path(path: Path) -> Path:
    """The lock file of the resolved output ``path``: hidden, beside it in its parent folder
    (``.OUT.cliplab-lock``; for a name too long for that, a hash of it)."""
    name = f".{path.name}{LOCK_SUFFIX}"
    if len(os.fsencode(name)) > 255:
        name = f".{hashlib.sha1(os.fsencode(path.name)).hexdigest()[:24]}{LOCK_SUFFIX}"
    return path.parent / name


def _take_lock(path: Path, out: str | os.PathLike, error: type[CliplabError]) -> _Lock | None:
    """The lock of the resolved output ``path``, locked: the one beside it (`_beside_lock`) or,
    where none can be had there, the temporary folder's (`_temp_lock`); None when neither can.
    An ``error`` naming the holder if another process holds it."""
    beside = True
    for _ in range(LOCK_ATTEMPTS):
        lock = _beside_lock(path, out, error) if beside else _temp_lock(path)
        if lock is None:
            if not beside:  # no private temporary folder: the checks stand without the hold
                return None
            beside = False
            continue
        try:
            locked = _locked(lock.handle)
        except OSError as err:
            if not beside or err.errno not in _NO_FLOCK:
                raise
            if err.errno == errno.EBADF and not lock.handle.writable() and \
                    _others_free(lock, out, error):
                continue  # another user's lock no run held, removed: this run makes its own
            if lock.created:  # no process can lock it there: no use to anyone
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
            _let_go(lock)
            beside = False
            continue
        if not locked:
            holder = _holder(lock.handle)
            _let_go(lock)
            raise _being_written(out, holder, error) from None
        if not _still_named(lock.handle, lock.path):
            _let_go(lock)  # released and removed as this run opened it: open the new one
            continue
        if beside and not _is_lock_file(lock.handle):
            _let_go(lock)
            raise _not_a_lock(out, lock.path, error)
        if not lock.handle.writable():  # another user's: replaced by one this run can write
            try:
                os.unlink(lock.path)
            except OSError:  # held read-only: it says its maker's pid
                return lock
            _let_go(lock)
            continue
        return lock
    # removed under it every time: other runs take and release it as fast as this one
    # tries, and going on unheld could write with them
    raise _being_written(out, "other processes, which took it in turn", error)


def _others_free(lock: _Lock, out: str | os.PathLike, error: type[CliplabError]) -> bool:
    """For another user's lock open read-only, whose exclusive lock failed with EBADF (NFS
    emulates flock with byte-range locks, and an exclusive one needs a file open for writing):
    True once it is found free and removed (a killed run's), False where this file system has
    no flock at all. An ``error`` if a run holds it (a shared lock is refused), or if this user
    cannot remove it: the temporary folder's lock, which their run never looks at, would let
    both write."""
    try:
        fcntl.flock(lock.handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(lock.handle)
        _let_go(lock)
        raise _being_written(out, holder, error) from None
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return False
        _let_go(lock)
        raise
    if not _is_lock_file(lock.handle):
        _let_go(lock)
        raise _not_a_lock(out, lock.path, error)
    try:  # removed while locked, as a run removes its own
        if _still_named(lock.handle, lock.path):
            os.unlink(lock.path)
    except OSError as err:
        refusal = _others_lock(out, lock.path, "held by no run now, but on this file system "
                               "(NFS) this user can neither lock it nor remove it",
                               "ask them to remove it", error)
        _let_go(lock)
        raise refusal from err
    _let_go(lock)
    return True


def _beside_lock(path: Path, out: str | os.PathLike, error: type[CliplabError]
                 ) -> _Lock | None:
    """The lock file beside the resolved output ``path``, open, not yet locked (its parent
    made if missing). The lock lives with the output, so every process that can write the
    output sees it, whatever its temporary folder (a scheduler's per-job $TMPDIR, a container's
    private /tmp) and on any machine sharing the folder. None where no lock file can be made
    there (a parent that takes no new file); an ``error`` where that name holds something else
    than a lock file (a link, a folder: never followed nor opened), or where other runs made
    and removed it under each attempt (going on with the temporary folder's lock, which they
    never look at, could write with them)."""
    lock = beside_lock_path(path)
    if path.parent == path:
        return None
    made: tuple[Path, ...] = ()
    for _ in range(LOCK_ATTEMPTS):
        try:
            made += _make_folders(lock.parent)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
            # readable by all whatever the umask (077 on many clusters): another user's run
            # must open it to see it held
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o644)
            return _Lock(os.fdopen(fd, "rb+"), lock, made, created=True)
        except FileExistsError:
            pass
        except FileNotFoundError:  # its folder removed as made (a run released it): anew
            continue
        except OSError:  # no new file there (read-only, no permission): an existing one only
            if not os.path.lexists(lock):
                _remove_empty(made)
                return None
        try:
            try:
                handle = os.fdopen(_open_file(lock, os.O_RDWR), "rb+")
            except OSError as err:
                if err.errno not in _READ_ONLY:
                    raise
                handle = os.fdopen(_open_file(lock, os.O_RDONLY), "rb")
        except FileNotFoundError:  # removed by the run releasing it: made anew
            continue
        except OSError as err:
            if err.errno in _NO_ACCESS:  # its run may be writing: never "move it away"
                raise _others_lock(out, lock, _UNSEEN, "wait for that run to end or ask them",
                                   error) from err
            raise _not_a_lock(out, lock, error) from err
        return _Lock(handle, lock, made)
    _remove_empty(made)
    raise _being_written(out, "other processes, which took it in turn", error)


def _open_file(path: Path, flags: int) -> int:
    """``os.open`` of ``path`` if it is a regular file (a device's open may act: never opened),
    never through a link."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(errno.EINVAL, "not a file", str(path))
    return os.open(path, flags | _OPEN_FLAGS)


def _make_folders(folder: Path) -> tuple[Path, ...]:
    """Make ``folder`` and its missing parents; those made, outermost first."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made by another run meanwhile
                folder.mkdir()
                made.append(folder)
    except OSError:
        _remove_empty(made)
        raise
    return tuple(made)


def _let_go(lock: _Lock) -> None:
    """Close ``lock``'s file (which releases the lock) and remove the folders made for it that
    stayed empty (the command wrote nothing there)."""
    if lock.handle is not None:
        lock.handle.close()
    _remove_empty(lock.made)


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` (outermost first) that are empty, innermost first."""
    for folder in reversed(list(folders)):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _is_lock_file(handle) -> bool:
    """Whether the file ``handle`` has open reads as a lock file cliplab made (only then is it
    written over): a regular file of one name holding nothing or a holder's line."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or info.st_size > _LOCK_MAX_BYTES:
        return False
    handle.seek(0)
    text = handle.read(_LOCK_MAX_BYTES).decode("utf-8", "replace").strip()
    return _LOCK_TEXT.fullmatch(text) is not None


def _holder(handle) -> str:
    """Who holds the lock file ``handle`` has open, as its holder wrote it: ``pid N``, with
    the machine's name when it is another's (a folder shared by two machines)."""
    handle.seek(0)
    text = handle.read(_LOCK_MAX_BYTES).decode("utf-8", "replace").strip()
    found = _LOCK_TEXT.fullmatch(text)
    if found is None or found.group(1) is None:
        return "another process"
    pid, host = found.groups()
    return f"pid {pid}" if host in (None, socket.gethostname()) else f"pid {pid} on {host}"


def _temp_lock(path: Path) -> _Lock | None:
    """The lock file of the resolved output ``path`` in this user's private folder of the
    temporary directory, open for reading and writing; None when that folder is not this user's
    alone (on a shared machine another user could have made it, with a link planted in it to a
    file of yours). Used only where no lock can be had beside the output: it holds off only the
    runs of this machine that share this temporary folder."""
    locks = _locks_folder()
    try:
        locks.mkdir(mode=0o700, exist_ok=True)
        mine = locks.lstat()
        if not stat.S_ISDIR(mine.st_mode) or mine.st_uid != os.getuid() or \
                mine.st_mode & 0o077:
            return None
        fd = os.open(locks / _lock_name(path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    return _Lock(os.fdopen(fd, "rb+"), locks / _lock_name(path))


def _still_named(handle, lock_path: Path) -> bool:
    """Whether the lock file ``handle`` has open is still the one ``lock_path`` names (a run
    that released it removed it: a lock got on the removed file holds nothing)."""
    try:
        named, opened = os.stat(lock_path), os.fstat(handle.fileno())
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def hold(out: str | os.PathLike, error: type[CliplabError] = ConfigError) -> None:
    """Hold ``out`` for the command running (`holding_outputs`; nothing outside one, and
    nothing on torchrun's ranks but rank 0, which writes for them): an advisory lock on a
    hidden file beside it, ``.OUT.cliplab-lock`` (`_take_lock`), which the system releases
    however the process ends (a kill included; the next run into ``out`` takes over a killed
    run's file). An ``error`` naming the holder if another process has it."""
    held = _HELD.get()
    other_rank = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and \
        os.environ.get("RANK", "0") != "0"
    if held is None or other_rank or fcntl is None:  # Windows: no advisory locks
        return
    path = Path(out).expanduser().resolve()
    if path in held:
        return
    lock = _take_lock(path, out, error)
    if lock is None:
        return
    if lock.handle.writable():
        lock.handle.seek(0)
        lock.handle.truncate()
        lock.handle.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        lock.handle.flush()
    held[path] = lock
    remove_killed_builds(Path(out).expanduser())  # held: no other run builds beside it now


def _locked(handle, tries: int = 20, wait_s: float = 0.01) -> bool:
    """Whether this process got the exclusive lock on ``handle``; a few tries, since
    `check_not_held` takes a shared lock for an instant to look (a holder holds for a run)."""
    for attempt in range(tries):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(wait_s)
    return False


NAME_MAX = 255  # bytes in a file name (Linux, macOS)


def _name_beside(name: str, suffix: str, room: int = 0) -> str:
    """``name + suffix`` for a folder beside ``name``, leaving ``room`` bytes for what
    `tempfile.mkdtemp` adds; past the file-name limit, ``name`` is cut short and a hash of it
    added (the same each time: a killed run's folder is found again)."""
    raw = os.fsencode(name)
    if len(raw) + len(os.fsencode(suffix)) + room <= NAME_MAX:
        return name + suffix
    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    keep = NAME_MAX - room - len(os.fsencode(tag + suffix))
    head = ""
    for char in name:  # whole characters only: a UTF-8 name stays UTF-8
        if len(os.fsencode(head + char)) > keep:
            break
        head += char
    return head + tag + suffix


def partial_path(out: Path) -> Path:
    """Where the output ``out`` is built until it is complete (``OUT.partial``, shortened to fit
    a file name for a long ``OUT``)."""
    return out.with_name(_name_beside(out.name, ".partial"))


_TEMP_SUFFIX = 8  # the random characters tempfile.mkdtemp adds to its prefix


def _temp_prefix(out: Path, kind: str) -> str:
    """The prefix of the hidden folder ``.OUT.KIND-XXXXXXXX`` beside ``out``."""
    return _name_beside(f".{out.name}", f".{kind}-", _TEMP_SUFFIX)


def remove_own_work(work: Path, kind: str, own: tuple[str, ...]) -> None:
    """Remove the work folder ``work`` (``OUT.partial``) of a ``kind`` run that never recorded
    progress, if it holds only what such a run writes there (``own``); a folder of that name
    holding anything else is the user's: refused, untouched."""
    if not work.exists():
        return
    other = sorted(p.name for p in work.iterdir() if p.name not in own) if work.is_dir() \
        else [work.name]
    if other:
        raise ConfigError(f"{work} is not a `cliplab {kind}` work folder (it holds {other[0]}); "
                          "move it away or choose another --out")
    shutil.rmtree(work)


@contextlib.contextmanager
def built_beside(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``out`` to build the output in; it replaces ``out``
    (`swap_in`) when the block succeeds and is removed if it fails, leaving ``out`` as it was.
    The name is new each time, so no folder of the user's is ever taken for it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "partial"), dir=out.parent))
    as_umask(work)  # mkdtemp's 0700 would become the output's
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    swap_in(work, out)


def check_not_held(out: str | os.PathLike, error: type[CliplabError] = ConfigError) -> None:
    """Refuse ``out`` with `hold`'s error if another process holds it now, without holding it:
    a check that is about to refuse a run folder says a live run writes it, not how its run
    ended."""
    holder = holder_of(out)
    if holder is not None and not holder.sure:
        raise _others_lock(out, holder.lock, _UNSEEN, "wait for that run to end or ask them",
                           error)
    if holder is not None:
        raise _being_written(out, holder.who, error)


class Holder(NamedTuple):
    """Who holds an output's ``lock`` file: ``pid N`` as `hold`'s refusal says it; not ``sure``
    for another user's lock this user cannot open (``uid N``: their run may hold it, or be
    gone)."""
    who: str
    lock: Path
    sure: bool = True


def holder_of(out: str | os.PathLike) -> Holder | None:
    """Who holds ``out`` now, if another process does (or may: `Holder.sure`); looked at
    without holding it."""
    held = _HELD.get()
    path = Path(out).expanduser().resolve()
    if fcntl is None or (held is not None and path in held):
        return None
    # beside it, or in the temporary folder of a run that could have no lock there
    for lock in (beside_lock_path(path), _locks_folder() / _lock_name(path)):
        try:  # no lock file: no run holds it (nothing is made to find that out)
            fd = _open_file(lock, os.O_RDONLY)
        except OSError as err:
            if err.errno in _NO_ACCESS:  # could not look: another user's run may hold it
                return Holder(_owner(lock), lock, sure=False)
            continue
        with os.fdopen(fd, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return Holder(_holder(handle), lock)
            except OSError:  # no flock on that file system: no run holds it there
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _locks_folder() -> Path:
    """This user's folder of lock files in the temporary directory (`_temp_lock`)."""
    return Path(tempfile.gettempdir()) / f"cliplab-locks-{os.getuid()}"


def _lock_name(path: Path) -> str:
    """The name of the lock file of resolved output ``path`` in the temporary folder."""
    # its bytes: a name that is not UTF-8 comes as lone surrogates, which encode() refuses
    return hashlib.sha1(os.fsencode(path)).hexdigest()[:24] + ".lock"


def _being_written(out: str | os.PathLike, holder: str,
                   error: type[CliplabError]) -> CliplabError:
    return error(f"--out {out} is being written by another cliplab run ({holder}); "
                 "wait for it to end, or choose another --out")


_UNSEEN = "which this user cannot open to see whether their run writes it now"


def _others_lock(out: str | os.PathLike, lock: Path, why: str, todo: str,
                 error: type[CliplabError]) -> CliplabError:
    """Refusal of another user's lock file ``lock`` of ``out``, naming its owner."""
    return error(f"--out {out}: {lock} is another user's lock file ({_owner(lock)}), {why}; "
                 f"{todo}, or choose another --out")


def _owner(path: Path) -> str:
    try:
        return f"uid {os.lstat(path).st_uid}"
    except OSError:
        return "owner unknown"


def is_left_lock(entry: Path) -> bool:
    """Whether ``entry`` is the lock file a killed run (no clean-up ran) left beside its output
    X, ``.X.cliplab-lock``: it reads as cliplab's and no process holds it. It is cliplab's, not
    the user's: it keeps no folder holding it from being taken as an output (the next run into
    X takes it over)."""
    return _look_at_lock(entry) == (True, None)


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` but the locks killed runs left in it (`is_left_lock`): a folder
    holding only those is empty, as `ls` shows it."""
    return [entry for entry in folder.iterdir() if not is_left_lock(entry)]


def check_no_run_inside(out: str | os.PathLike, error: type[CliplabError] = ConfigError
                        ) -> None:
    """Refuse the folder ``out`` while a live cliplab run writes an output inside it (the lock
    of that output, ``.X.cliplab-lock``, is held): the folder would be written or replaced
    under that run."""
    folder = Path(out).expanduser()
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        holder = _look_at_lock(entry)[1]
        if holder is not None:
            inside = folder / entry.name[1:-len(LOCK_SUFFIX)]
            raise error(f"--out {out}: another cliplab run ({holder}) writes {inside} inside "
                        "it; wait for it to end, or choose another --out")


def _look_at_lock(entry: Path) -> tuple[bool, str | None]:
    """Whether ``entry`` is a lock file of an output (named ``.X.cliplab-lock``, reading as
    cliplab's), and who holds it (None: no process); looked at without holding it."""
    if fcntl is None or not (entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX)):
        return False, None
    try:
        fd = _open_file(entry, os.O_RDONLY)
    except OSError:  # not a file, or not ours to read: not taken for a left lock
        return False, None
    with os.fdopen(fd, "rb") as handle:
        # an empty one is a run's between making and writing it (or killed in that instant):
        # not taken for a killed run's, whose holder line is written as soon as it is locked
        if not _is_lock_file(handle) or os.fstat(handle.fileno()).st_size == 0:
            return False, None
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _holder(handle)
        except OSError:  # no flock there: whether a run holds it cannot be told
            return False, None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True, None


def _not_a_lock(out: str | os.PathLike, lock: Path, error: type[CliplabError]) -> CliplabError:
    return error(f"--out {out}: {lock} is not a lock file of cliplab's (that name keeps two runs "
                 "from writing the output together); move it away, or choose another --out")


def remove_killed_builds(out: Path) -> None:
    """Remove the hidden folders beside ``out`` that a killed run (SIGKILL, a power cut: no
    clean-up ran) left building or replacing it, ``.OUT.partial-*`` and ``.OUT.old-*``; called
    by `hold`, so no other run is building them now. With ``out`` missing and an
    ``.OUT.old-*`` there, the run was killed between moving the old output aside and renaming
    the new one in: both are kept, and said, for the user to choose."""
    if not out.parent.is_dir():
        return
    left = {kind: re.compile(re.escape(_temp_prefix(out, kind)) + r"[A-Za-z0-9_]{8}")
            for kind in ("partial", "old")}
    found: dict[Path, str] = {}
    for path in sorted(out.parent.iterdir()):
        kind = next((k for k, pattern in left.items() if pattern.fullmatch(path.name)), None)
        if kind and path.is_dir() and not path.is_symlink():
            found[path] = kind
    old = [path for path, kind in found.items() if kind == "old"]
    if old and not out.exists():
        warn(f"{out} is missing and {old[0]} holds the output it replaced (a run was killed "
             "while swapping them); move it back to keep it, the hidden folders beside "
             f"{out} are left as they are")
        return
    for path in found:
        try:
            shutil.rmtree(path)
        except OSError as err:
            warn(f"could not remove {path}, left by a killed run into {out} "
                 f"({err.strerror or err})")
        else:
            print(f"cliplab: removed {path}, left by a killed run into {out}", file=sys.stderr)


def swap_in(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``; an existing ``out`` (an overwritten or
    appended-to output) is moved aside first and removed last, so ``out`` is never missing
    while an old copy could still be read."""
    if out.exists():
        # a fresh hidden name beside ``out`` (a user's own ``OUT.old`` is never touched), free
        # again before the rename: Windows renames a folder onto no existing folder, not even
        # an empty one
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(work, out)
        except OSError:  # (Windows: a file under work still open) the old output goes back
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """JSON written atomically (temp file + rename); numpy values and paths as plain values."""
    write_utf8(path, json_text(data, indent))


def json_text(data: Any, indent: int | None = None) -> str:
    """``data`` as strict JSON: numpy values and paths as plain values, a NaN or infinite
    number as null (Python's ``NaN`` token is not JSON: JavaScript, Go and Rust refuse the
    file)."""
    return json.dumps(_finite(data), indent=indent, default=_plain, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return _finite(value.tolist())
    return value


def write_utf8(path: Path, text: str) -> None:
    """UTF-8 text written atomically (temp file + rename): a stop leaves the old file or the
    new one, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield the temporary path ``PATH`` + ``suffix`` for the block to write; it is renamed to
    ``path`` when the block succeeds and removed when it fails (a full disk leaves no half
    file, which a re-run would take for someone else's)."""
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # a write's error names no file, an open's or the rename's the temporary one: the
        # user's is ``path``
        if isinstance(err, OSError) and err.errno and err.filename in (None, str(tmp), tmp):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
