"""Output folders built where a reader cannot mistake them for finished work: a long job writes
into ``OUT.partial/`` (so a killed run can resume there) and renames it to ``OUT`` once complete.
Used by ``cliplab curate`` and ``cliplab index``; JSON files are written atomically.

`check_out` is the one rule every command applies to its ``--out`` before any work: a file is
refused, an ``--out`` that is, holds or lies inside an input (or a run's checkpoints) is refused,
a non-empty folder needs ``--overwrite``, and ``--overwrite`` replaces only a previous output of
the same kind: a folder replaced whole must hold nothing but that output's own files
(`OutputFiles`), so a file of the user's beside them keeps it from being replaced. While a
command runs, each output it checked is held (`hold`; `cliplab.output_lock`): a second cliplab
process given the same output is refused."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from cliplab.errors import CliplabError, ConfigError, warn
from cliplab.file_modes import as_umask
from cliplab.output_lock import check_no_run_inside, is_left_lock, take_hold, visible_entries

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


def resolved_path(path: str | os.PathLike | None) -> str | None:
    """``path`` with ``~`` expanded and made absolute, as a record keeps it (results.json, a
    config's spec): it names the file from whatever folder it is read or resumed in."""
    return None if path is None or path == "" else str(_resolved(path))


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


def missing_out(what: str) -> ConfigError:
    """The error of a command given no output folder (no ``--out``, no config ``out``): one
    wording for every command; ``what`` is what it writes (``the merged model``)."""
    return ConfigError(f"say where to write {what}: --out DIR")


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


def hold(out: str | os.PathLike, error: type[CliplabError] = ConfigError) -> None:
    """Hold ``out`` for the command running (`cliplab.output_lock.take_hold`: an ``error``
    naming the holder if another process has it); once held, no other run builds beside it, so
    the hidden folders a killed run left there go (`remove_killed_builds`)."""
    if take_hold(out, error):
        remove_killed_builds(Path(out).expanduser())


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


def write_json_streamed(path: Path, data: Any, indent: int | None = None) -> None:
    """`write_json` for a document of a value per item (a curation step's decision): encoded
    as it is written, the same bytes, not held whole as a string and then its bytes (~300 bytes
    an item dropped with a reason)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=indent, default=_plain, allow_nan=False)


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
