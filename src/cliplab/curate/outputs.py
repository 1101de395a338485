"""What `cliplab curate` writes besides the report: the kept pool (WebDataset shards with each
image's original bytes, or a manifest) and ``dropped.parquet`` (key, step, reason, score and
source key of every dropped item, those dropped at ``read`` included)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cliplab.curate.config import OutputSpec
from cliplab.curate.pool import Record, image_bytes
from cliplab.data.folder_files import is_utf8
from cliplab.data.shards.write import ShardSink, clean_captions
from cliplab.data.types import SkipReport
from cliplab.report_text import printable

SHARDS_DIR, MANIFEST_FILE, IMAGES_DIR = "shards", "kept.parquet", "images"


def write_kept(records: Collection[Record], work: Path, output: OutputSpec, source: dict,
               progress: bool = True) -> dict:
    """Write the kept pool under ``work`` as ``output`` says; returns what was written.
    ``records`` is read through once or twice (a list, or one that loads them as it goes)."""
    if output.format == "shards":
        return write_kept_shards(records, work, work / SHARDS_DIR, output.samples_per_shard,
                                 source, progress)
    return write_kept_manifest(records, work, work, progress)


def write_kept_shards(records: Collection[Record], work: Path, dest: Path, samples_per_shard: int,
                      source: dict, progress: bool = True) -> dict:
    """Shards in `cliplab data shard`'s layout (``00000.tar`` ..., ``index.json``); per sample the
    original image bytes (``KEY.jpg|png|...``), ``KEY.txt`` (the caption) and ``KEY.json``
    (all its captions, group, class and partner as the source had them, the pool key, the
    source's metadata)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():  # a killed run's half-written shards
        old.unlink()
    new_keys = kept_keys(records)
    with ShardSink(dest, samples_per_shard) as writer:
        for number, record in enumerate(tqdm(records, desc="write shards", unit="item",
                                             total=len(records), disable=not progress)):
            data, ext = image_bytes(record["location"], work, record["key"])
            key = f"{number:09d}"
            meta = {"key": key, **carried_fields(record, new_keys),
                    "source_key": record["key"], "meta": record["meta"]}
            writer.write({"__key__": key, ext or "jpg": data,
                          "txt": meta["captions"][0].encode("utf-8"),
                          "json": json.dumps(meta).encode("utf-8")})
    writer.write_index("curated", source, SkipReport())  # curation's drops: dropped.parquet
    return {"format": "shards", "path": SHARDS_DIR, "count": writer.total,
            "shards": len(writer.shards)}


def kept_keys(records: Collection[Record]) -> dict[str, str]:
    """The output key (its number) of each kept record a kept record's ``partner_key`` names,
    by its pool key and by its source sample's own key (a shard's ``json`` key, which a
    partner's ``partner_key`` names). A key two samples share names neither (as the shard
    reader resolves partners). Only named keys are held (a key per kept item cost ~150 bytes
    an item, and most pools name no partner): ``records`` is gone through once to find them,
    and again only if there are some."""
    named = {partner for record in records if isinstance(
        partner := _meta(record).get("partner_key"), str)}
    if not named:
        return {}
    keys: dict[str, str] = {}
    shared: set[str] = set()
    for number, record in enumerate(records):
        own = _meta(record).get("key")
        for key in ((own, record["key"]) if isinstance(own, str) else (record["key"],)):
            if key not in named:
                continue
            if key in keys and keys[key] != f"{number:09d}":
                shared.add(key)
            keys[key] = f"{number:09d}"
    return {key: new for key, new in keys.items() if key not in shared}


def _meta(record: Record) -> dict:
    return record["meta"] if isinstance(record["meta"], dict) else {}


def carried_fields(record: Record, new_keys: dict[str, str]) -> dict:
    """What a kept sample keeps of its source sample, as `cliplab data shard` writes it: every
    caption (the one the steps scored first), its group, its class, and its hard-negative
    partner's key when the partner is kept too (renumbered)."""
    meta = _meta(record)
    given = meta.get("captions")
    if isinstance(given, str):  # a manifest's column (kept.parquet's is JSON)
        try:
            given = json.loads(given)
        except ValueError:
            given = None
    captions = clean_captions(given) if isinstance(given, list) else []
    caption = record["caption"].strip()
    if caption in captions:  # the scored one first, the others as they were
        captions.remove(caption)
    out: dict = {"captions": [caption, *captions], "group": _whole(meta.get("group"))}
    partner = meta.get("partner_key")
    if isinstance(partner, str) and partner in new_keys:
        out["partner_key"] = new_keys[partner]
    if _whole(meta.get("label")) is not None:
        out["label"] = meta["label"]
        if isinstance(meta.get("classname"), str):
            out["classname"] = meta["classname"]
    return out


def _whole(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write_kept_manifest(records: Collection[Record], work: Path, dest: Path,
                        progress: bool = True) -> dict:
    """``kept.parquet``: ``image`` (the original file, or a copy under ``images/`` for images
    that live in a tar or in memory or whose path is not UTF-8), ``caption`` (the one the
    steps scored), ``key``, ``location``, ``meta`` (JSON), ``captions`` (JSON: all the
    sample's) and ``group``.
    ``location`` is the source's (a file, a tar member); an in-memory source's image, which
    lived only in the run's cache, is ``{"stored": "images/N.png"}``, its copy in ``dest``."""
    images = dest / IMAGES_DIR
    schema = pa.schema([*((name, pa.string()) for name in ("image", "caption", "key", "location",
                                                           "meta", "captions")),
                        ("group", pa.int64())])
    rows, parts, count = [], [], 0
    for number, record in enumerate(tqdm(records, desc="write manifest", unit="item",
                                         total=len(records), disable=not progress)):
        location = record["location"]
        # a Parquet string is UTF-8: a file whose path is not (a folder named in Latin-1) is
        # copied, its exact path kept in ``location`` (JSON escapes it)
        if "file" in location and is_utf8(location["file"]):
            image = location["file"]
        else:
            data, ext = image_bytes(location, work, record["key"])
            images.mkdir(exist_ok=True)
            image = f"{IMAGES_DIR}/{number:09d}.{ext or 'bin'}"
            (dest / image).write_bytes(data)
            if "stored" in location:  # the cache it was read from is removed after the run
                location = {"stored": image}
        carried = carried_fields(record, {})
        rows.append({"image": image, "caption": record["caption"], "key": record["key"],
                     "location": json.dumps(location), "meta": json.dumps(record["meta"]),
                     "captions": json.dumps(carried["captions"]), "group": carried["group"]})
        count += 1
        if len(rows) == ROWS_AT_ONCE:  # as Arrow columns: a dict per row held ~1 KB
            parts.append(pa.Table.from_pylist(rows, schema=schema))
            rows = []
    parts.append(pa.Table.from_pylist(rows, schema=schema))
    pq.write_table(whole(parts), dest / MANIFEST_FILE)
    return {"format": "manifest", "path": MANIFEST_FILE, "count": count}


ROWS_AT_ONCE = 10_000  # rows gathered as dicts before they become Arrow columns


def whole(parts: list[pa.Table]) -> pa.Table:
    """``parts`` as one table of one chunk per column: written as a table made at once is
    (the same row groups, the same bytes)."""
    return pa.concat_tables(parts).combine_chunks()


DROPPED_SCHEMA = pa.schema([("key", pa.string()), ("step", pa.string()),
                            ("reason", pa.string()), ("score", pa.float64()),
                            ("source_key", pa.string())])


SHARED_COLUMNS = ("step", "reason")  # texts many rows share, held once per part


class DroppedTable:
    """Every dropped item's row, gathered step by step as Arrow columns (a reason held as its
    bytes, not in a dict per item) and written at the end as ``dropped.parquet``: ``key``,
    ``step``, ``reason``, ``score`` (NaN where none) and ``source_key`` (the item a shard
    sample was made from; None where the pool has none). A step's rows whose reasons are
    mostly the same few texts (a balanced pool drops most of its items for a few) are held
    dictionary-encoded until written (each row's copy held ~150 bytes), distinct reasons
    (a duplicate names its original) plainly; all are written as plain strings."""

    def __init__(self) -> None:
        self.parts = [_held(DROPPED_SCHEMA.empty_table())]
        self.count = 0

    def add(self, keys: Sequence[str], step: str, reasons: Sequence[str | None],
            scores: Sequence[float], source_keys: Sequence[str | None]) -> None:
        """Add the rows of items dropped by ``step``, in pool order."""
        self._add(keys, [step] * len(keys), reasons, scores, source_keys)

    def add_rows(self, rows: list[dict]) -> None:
        """Add rows given as dicts (``key``, ``step``, ``reason``, ``score``, ``source_key``)."""
        self._add(*([row[f.name] for row in rows] for f in DROPPED_SCHEMA))

    def _add(self, *columns: Sequence) -> None:
        # a reason names its file, whose path may not be UTF-8 (a Parquet string must be)
        arrays = [pa.array([printable(v) if isinstance(v, str) else v for v in column]
                           if field.type == pa.string() else [float(v) for v in column],
                           type=field.type) for column, field in zip(columns, DROPPED_SCHEMA)]
        self.parts.append(_held(pa.Table.from_arrays(arrays, schema=DROPPED_SCHEMA)))
        self.count += len(arrays[0])

    def table(self) -> pa.Table:
        """Every row as one table of one chunk per column (`whole`), strings plain."""
        columns = []
        for field in DROPPED_SCHEMA:
            chunks = [c for part in self.parts for c in part[field.name].chunks]
            if chunks and all(pa.types.is_dictionary(c.type) for c in chunks):
                # one dictionary, then its texts per row once
                columns.append(pa.chunked_array(chunks, type=chunks[0].type)
                               .unify_dictionaries().combine_chunks().cast(field.type))
            else:
                plain = [c.cast(field.type) if pa.types.is_dictionary(c.type) else c
                         for c in chunks]
                columns.append(pa.chunked_array(plain, type=field.type).combine_chunks())
        return pa.Table.from_arrays(columns, schema=DROPPED_SCHEMA)

    def write(self, path: Path) -> None:
        pq.write_table(self.table(), path)


def _held(table: pa.Table) -> pa.Table:
    """``table`` with those of its `SHARED_COLUMNS` dictionary-encoded that hold at most one
    distinct text in two rows (distinct texts cost more so: their indices and a second copy
    when written)."""
    for name in SHARED_COLUMNS:
        encoded = table[name].dictionary_encode()
        if sum(len(c.dictionary) for c in encoded.chunks) * 2 <= max(len(table), 1):
            table = table.set_column(table.schema.get_field_index(name), name, encoded)
    return table
