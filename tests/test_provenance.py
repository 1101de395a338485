"""`cliplab.provenance`: the version and time every record carries, and records compared
without them."""

from __future__ import annotations

import cliplab
from cliplab.provenance import PROVENANCE_KEYS, stamp, utc_now, without_provenance
from tests.stamped import assert_stamped, now


def test_stamp_sets_the_version_and_a_utc_second_in_place():
    before = now()
    record = {"acc1": 0.5}
    assert stamp(record) is record
    assert_stamped(record, before, now())
    assert len(record["created"]) == len("2026-01-31T12:00:00Z") and record["acc1"] == 0.5
    assert len(utc_now()) == 20 and cliplab.__version__ == record["cliplab_version"]


def test_records_compare_without_provenance_and_older_records_read_alike():
    first, second = stamp({"acc1": 0.5}), {"acc1": 0.5, "cliplab_version": "0.0.9",
                                          "created": "2020-01-01T00:00:00Z"}
    assert first != second and without_provenance(first) == without_provenance(second)
    older = {"acc1": 0.5}  # written before records carried them
    assert without_provenance(older) == without_provenance(first) == older
    assert set(PROVENANCE_KEYS) == {"cliplab_version", "created"}
