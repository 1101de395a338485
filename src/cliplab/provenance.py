"""What every record a cliplab command writes for later reading carries about itself: the
``cliplab_version`` that wrote it and when (``created``, UTC, ISO-8601 to the second with a
trailing ``Z``). Records are compared without these (`without_provenance`): the same run resumed,
or an index added to, is the same record written at another time. Older records lack them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

__version__ = "0.1.0"  # the one version: `cliplab.__version__`, `cliplab --version`, pyproject

PROVENANCE_KEYS = ("cliplab_version", "created")


def utc_now() -> str:
    """Now in UTC as ISO-8601 to the second with a trailing ``Z`` (``2026-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``cliplab_version`` and ``created`` (now) set, in place (a caller that
    returns the record returns what was written); returns it."""
    record.update(cliplab_version=__version__, created=utc_now())
    return record


def without_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` without the keys `stamp` sets, for comparing two records."""
    return {k: v for k, v in record.items() if k not in PROVENANCE_KEYS}
