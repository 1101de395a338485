"""An index folder's files: their names and its ``index.json`` record (read by the builder and
by the searcher alike, so neither imports the other for them)."""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.errors import DataError

FORMAT = 1
INDEX_FILE, PROGRESS_FILE, META_FILE = "index.json", "progress.json", "meta.sqlite"
VECTORS_FILE, FAISS_FILE, IMAGES_DIR, CHUNKS_DIR = "vectors.npy", "faiss.index", "images", "chunks"


def read_index_json(folder: Path) -> dict | None:
    """The folder's ``index.json`` record, None if it has none; a ``DataError`` if damaged."""
    file = folder / INDEX_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{file}: not valid JSON; the index is damaged, rebuild it") from None
