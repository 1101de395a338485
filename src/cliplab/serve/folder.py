"""An index folder's files: their names and its ``index.json`` record (read by the builder and
by the searcher alike, so neither imports the other for them)."""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.errors import DataError
from cliplab.output_folder import OutputFiles

# 2 since 2026-12-07: ``skipped`` became every command's skip record and ``towers`` was named
# ``embedding_identity`` (index.json, and progress.json's request). A cliplab from before reads
# only format 1 (`_complete_record` refuses any other in one line): had the number stayed 1, it
# would misread a new index (and crash on an --add, leaving OUT.partial behind).
FORMAT = 2
READ_FORMATS = (1, 2)  # a format-1 record is read in the current shape (`current_record`)
INDEX_FILE, PROGRESS_FILE, META_FILE = "index.json", "progress.json", "meta.sqlite"
VECTORS_FILE, FAISS_FILE, IMAGES_DIR, CHUNKS_DIR = "vectors.npy", "faiss.index", "images", "chunks"
# what a complete index folder holds, all `index --overwrite` may replace (a folder holding
# anything else is the user's): its record and metadata, vectors, FAISS index (SQLite's
# journal of a write cut short), and the stored images of an in-memory source, ``ID.png``
INDEX_FOLDER = OutputFiles((INDEX_FILE, META_FILE), frozenset(
    {VECTORS_FILE, FAISS_FILE, META_FILE + "-journal", META_FILE + "-wal", META_FILE + "-shm"}),
    folders=((IMAGES_DIR, r"\d+\.png"),))


def read_index_json(folder: Path) -> dict | None:
    """The folder's ``index.json`` record in the current shape (`current_record`: an index an
    older cliplab wrote reads as a new one), None if it has none; a ``DataError`` if damaged."""
    file = folder / INDEX_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{file}: not valid JSON; the index is damaged, rebuild it") from None
    return current_record(record) if isinstance(record, dict) else record


def current_record(record: dict) -> dict:
    """An ``index.json`` record with the keys this cliplab writes: ``skipped`` as every
    command's skip record (`SkipReport.to_dict`: ``total``, ``counts``, ``keys``) where an
    index before 2026-12-07 wrote a count of rows plus ``skipped_reasons`` (its keys are in
    ``meta.sqlite`` only), and ``embedding_identity`` where it wrote ``towers``; format 1
    reads as format 2 (`FORMAT`). A copy: the record given is left as it is."""
    record = dict(record)
    if record.get("format") == 1:
        record["format"] = FORMAT
    if "towers" in record and "embedding_identity" not in record:
        record["embedding_identity"] = record.pop("towers")
    rows = record.get("skipped")
    if isinstance(rows, int) and not isinstance(rows, bool):
        counts = record.pop("skipped_reasons", None) or {}
        shards = sum(n for reason, n in counts.items() if reason.endswith("_shard"))
        record["skipped"] = {"total": rows - shards,
                             **({"shards_read_in_part": shards} if shards else {}),
                             "counts": counts, "keys": {}}
    return record

