"""The exceptions cliplab raises for bad input, and the warnings it gives.

The CLI prints ``str(error)`` on one line and exits with code 2; every message says what was
wrong, where, and what to do. Warnings are `CliplabWarning`s, given through Python's `warnings`
(so a library user filters or records them as any other); the CLI shows each on one line.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Iterator


class CliplabError(Exception):
    """Base class of every error cliplab raises on purpose (bad input, missing file, bad config)."""


class ConfigError(CliplabError):
    """A config file, key or value is wrong."""


class RunComplete(ConfigError):
    """A resume of a run that has trained every step already."""


class DataError(CliplabError):
    """A dataset, manifest or data folder is missing or malformed."""


class InputError(DataError, ValueError):
    """A Python argument of the wrong kind or shape (images as floats or channels first): a
    `DataError`, and a ValueError too, as before it had a class of its own."""


class ModelError(CliplabError):
    """A model folder or preset cannot be built or loaded."""


class UnknownModelError(ModelError):
    """A model name that names no model (no preset, no existing path, no Hub id in reach).
    ``name`` is the name given; ``where`` (the option or config key that gave it: ``--model``,
    ``x.yaml: model``) goes before the message once known (`at`)."""

    def __init__(self, message: str, name: str = "", where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.message, self.name, self.where = message, name, where

    def at(self, where: str) -> UnknownModelError:
        """The same error, naming ``where`` the name came from (in place of any it named)."""
        return UnknownModelError(self.message, self.name, where)


class DistributedError(CliplabError):
    """A distributed run cannot go on: the process group cannot form, or another rank stopped
    or stopped answering (its own error, if any, is in that rank's log)."""


class TrainingDiverged(CliplabError):
    """The loss, the gradients or the weights of a run became NaN or infinite: its weights are
    lost from that step on, so the run stops instead of saving or evaluating them."""


class CliplabWarning(UserWarning):
    """Every warning cliplab gives: something was done, but maybe not what was meant (e.g. a
    class with fewer images than asked for). ``warnings.filterwarnings("ignore",
    category=CliplabWarning)`` silences them."""


def warn(message: str, stacklevel: int = 1) -> None:
    """Give ``message`` as a `CliplabWarning`; ``stacklevel`` as `warnings.warn`'s, counted
    from the caller."""
    warnings.warn(message, CliplabWarning, stacklevel=stacklevel + 1)


_SHOW_WARNING = warnings.showwarning


def show_warning_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A `warnings.showwarning` for cliplab's command lines and worker processes: cliplab's own
    warnings (every one a `CliplabWarning`) as ``cliplab: warning: ...``, not Python's
    source-line form; other libraries' as Python shows them."""
    if issubclass(category, CliplabWarning):
        print(f"cliplab: warning: {message}", file=file or sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


def first_line(err: BaseException) -> str:
    """``TypeName: first line of the message`` of a library's exception, for a one-line error
    that says why (``TypeName`` alone when the message is empty)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def last_line(err: BaseException) -> str:
    """The last line of a library's multi-line message (transformers' config checks put their
    reason there: "Class validation error for validator ...:" comes first)."""
    lines = str(err).strip().splitlines()
    return lines[-1].strip().removeprefix("ValueError: ") if lines else type(err).__name__


@contextlib.contextmanager
def errors_naming(where: str | None,
                  kinds: tuple[type[CliplabError], ...] = (CliplabError,)) -> Iterator[None]:
    """Re-raise a `CliplabError` of the block (of ``kinds``) as ``where: message`` (the config
    file or key path its message is about), unless it already starts so; ``where`` None:
    unchanged."""
    try:
        yield
    except kinds as err:
        if where and not str(err).startswith(where):
            raise type(err)(f"{where}: {err}") from None
        raise


def checked_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int of 1 or more; an `InputError` otherwise (``-1`` gave an empty
    result, ``0`` a ``range()`` error)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of 1 or more, got {batch_size!r}")
    return int(batch_size)


def kind_of(value: object) -> str:
    """What an error says was given: ``a str 'cat.jpg'``, ``a PosixPath '/m'``, ``an int``, ``a
    Linear`` (the value itself only for a string or path, cut to 80 characters)."""
    name = type(value).__name__
    article = "an" if name[0].lower() in "aeiou" else "a"
    path = isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")
    return f"{article} {name}" + (f" {str(value)[:80]!r}" if path else "")
