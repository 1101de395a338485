"""The metadata of an index in SQLite: one row per id (key, caption, image location, metadata),
plus the skipped entries with their reasons. Look-ups by id are one indexed query, whatever k."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from cliplab.errors import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, caption TEXT NOT NULL,
    location TEXT NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skipped (key TEXT NOT NULL, reason TEXT NOT NULL);
"""


# the skipped entries of a damaged shard (collection.py): each sample lost past the damage,
# ``TAR:sample N of M``, and the shard itself when its count is known (``read K of M samples``)
_CUT_OFF_KEY = re.compile(r"(?P<shard>.+):sample \d+ of (?P<total>\d+)")
_TRUNCATED_REASON = re.compile(r"truncated_shard: .*\bread \d+ of (?P<total>\d+) samples")


def _file_uri(path: Path, readonly: bool) -> str:
    """An SQLite ``file:`` URI naming exactly ``path``: its bytes percent-quoted, since SQLite
    reads ``#``, ``?`` and ``%`` in a URI as fragment, query and escape (a read-only open must
    also keep its ``mode=ro``, or it creates a file)."""
    uri = Path(os.path.abspath(path)).as_uri()  # file:///… with every other byte %XX
    return f"{uri}?mode=ro" if readonly else uri


class MetadataStore:
    """Rows ``{id, key, caption, location, meta}``; safe to share between server threads."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self._db = sqlite3.connect(_file_uri(self.path, readonly), uri=True,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        if not readonly:
            self._db.executescript(SCHEMA)
            self._db.commit()

    def close(self) -> None:
        self._db.close()

    def check(self) -> None:
        """Read the database once (a damaged file fails only on first read): a ``DataError``
        naming it if it is not a readable index metadata database."""
        try:
            with self._lock:
                self._db.execute("SELECT id, key, caption, location, meta FROM items LIMIT 1")
        except sqlite3.DatabaseError as err:
            raise DataError(f"{self.path}: not a readable index metadata database ({err}); the "
                            "index is damaged, rebuild it with `cliplab index`") from None

    def add(self, rows: Iterable[dict], skipped: Iterable[tuple[str, str]] = ()) -> None:
        """Insert rows and skipped ``(key, reason)`` pairs in one transaction."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO items (id, key, caption, location, meta) VALUES (?, ?, ?, ?, ?)",
                [(r["id"], r["key"], r["caption"], json.dumps(r["location"]), json.dumps(r["meta"]))
                 for r in rows])
            self._db.executemany("INSERT INTO skipped (key, reason) VALUES (?, ?)", list(skipped))

    def truncate(self, count: int, skipped_count: int) -> None:
        """Drop rows with ``id >= count`` and skipped entries past the first ``skipped_count``
        (what a killed run wrote after its last recorded progress)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM items WHERE id >= ?", (count,))
            self._db.execute("DELETE FROM skipped WHERE rowid NOT IN "
                             "(SELECT rowid FROM skipped ORDER BY rowid LIMIT ?)", (skipped_count,))

    def drop_recovered_skips(self) -> int:
        """Remove the skipped entries an ``--add`` has since indexed: an item whose key is
        indexed now, and a damaged shard's entries once as many of its items are indexed as
        it holds (a duplicate key's entry stays: its key is the earlier item's). Returns how
        many went."""
        with self._lock, self._db:
            rows = list(self._db.execute("SELECT rowid, key, reason FROM skipped"))
            gone = [(rowid,) for rowid, key, reason in rows
                    if not reason.startswith("duplicate_key") and self._recovered(key, reason)]
            self._db.executemany("DELETE FROM skipped WHERE rowid = ?", gone)
        return len(gone)

    def _recovered(self, key: str, reason: str) -> bool:
        cut_off, truncated = _CUT_OFF_KEY.fullmatch(key), _TRUNCATED_REASON.match(reason)
        if cut_off is None and truncated is None:
            return self._db.execute("SELECT 1 FROM items WHERE key = ?", (key,)).fetchone() \
                is not None
        shard, total = (cut_off["shard"], cut_off["total"]) if cut_off else \
            (key, truncated["total"])
        # the shard's items: keys from "SHARD:" up to (not including) "SHARD;"
        held = self._db.execute("SELECT COUNT(*) FROM items WHERE key >= ? AND key < ?",
                                (shard + ":", shard + ";")).fetchone()[0]
        return held >= int(total)

    def has_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are already indexed."""
        if not keys:
            return set()
        with self._lock:
            marks = ",".join("?" * len(keys))
            return {k for (k,) in self._db.execute(
                f"SELECT key FROM items WHERE key IN ({marks})", list(keys))}

    def key_starting(self, start: str) -> str | None:
        """An indexed key that begins with ``start`` (a non-empty string), if any: one indexed
        range query (SQLite compares text by its UTF-8 bytes, as this bound assumes)."""
        end = start[:-1] + chr(ord(start[-1]) + 1)
        with self._lock:
            row = self._db.execute("SELECT key FROM items WHERE key >= ? AND key < ? LIMIT 1",
                                   (start, end)).fetchone()
        return row[0] if row else None

    def get_many(self, ids: Sequence[int]) -> dict[int, dict]:
        """Rows by id (ids not in the index are absent)."""
        out: dict[int, dict] = {}
        ids = [int(i) for i in ids]
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute("SELECT id, key, caption, location, meta FROM items "
                                            f"WHERE id IN ({marks})", chunk):
                    out[row[0]] = {"id": row[0], "key": row[1], "caption": row[2],
                                   "location": json.loads(row[3]), "meta": json.loads(row[4])}
        return out

    def get(self, item_id: int) -> dict | None:
        return self.get_many([item_id]).get(int(item_id))

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def skipped(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._db.execute("SELECT key, reason FROM skipped ORDER BY rowid"))

    def skipped_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM skipped").fetchone()[0]
