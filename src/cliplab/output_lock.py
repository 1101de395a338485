"""The hold on a command's outputs: while a command runs, each output it checked is held
(`holding_outputs`, `hold`), so a second cliplab process given the same output is refused in one
line, naming the holder. The lock is a hidden file beside the output, ``.OUT.cliplab-lock``: every
process that can write the output sees it, whatever its temporary folder (a scheduler's per-job
``$TMPDIR``, a container's), and so do other machines where the shared file system passes
``flock``. Only where no lock file can be made there (a read-only parent, no ``flock``) is it a file
in the temporary folder's ``cliplab-locks-UID/``. Windows has no advisory locks: there the
output checks (`cliplab.output_folder.check_out`) stand alone."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cliplab.errors import CliplabError, ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


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


def take_hold(out: str | os.PathLike, error: type[CliplabError] = ConfigError) -> bool:
    """Hold ``out`` for the command running (`holding_outputs`; nothing outside one, and
    nothing on torchrun's ranks but rank 0, which writes for them): an advisory lock on a
    hidden file beside it, ``.OUT.cliplab-lock`` (`_take_lock`), which the system releases
    however the process ends (a kill included; the next run into ``out`` takes over a killed
    run's file). An ``error`` naming the holder if another process has it. Whether this call
    took it (False: held already, or nothing to hold)."""
    held = _HELD.get()
    other_rank = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and \
        os.environ.get("RANK", "0") != "0"
    if held is None or other_rank or fcntl is None:  # Windows: no advisory locks
        return False
    path = Path(out).expanduser().resolve()
    if path in held:
        return False
    lock = _take_lock(path, out, error)
    if lock is None:
        return False
    if lock.handle.writable():
        lock.handle.seek(0)
        lock.handle.truncate()
        lock.handle.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        lock.handle.flush()
    held[path] = lock
    return True


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
