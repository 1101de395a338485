"""The check every command's record test makes of its provenance (`cliplab.provenance.stamp`):
the version that wrote it and a ``created`` time within the run."""

from __future__ import annotations

from datetime import datetime, timezone

import cliplab


def now() -> datetime:
    """The time to pass as ``before`` or ``after`` (UTC)."""
    return datetime.now(timezone.utc)


def assert_stamped(record: dict, before: datetime, after: datetime) -> None:
    """``record`` says this cliplab wrote it, at a UTC second between ``before`` and ``after``."""
    assert record["cliplab_version"] == cliplab.__version__
    text = record["created"]
    assert isinstance(text, str) and text.endswith("Z"), text
    created = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before.replace(microsecond=0) <= created <= after, (before, text, after)
