"""Reading a manifest's table as a stream: CSV and JSONL line by line, Parquet by record
batches, so a pool of millions of rows is never held whole (`cliplab.data.manifest` lists it
for the small datasets it loads; `cliplab.data.collection` reads it twice, holding no row).

Malformed files raise a one-line ``DataError`` naming the file and the line (``line 4``) or,
for Parquet, the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cliplab.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH = 4096  # rows a Parquet read turns into Python objects at a time


def one_line(error: Exception) -> str:
    """The first line of ``error``'s text (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def table_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` by ``path``'s suffix; a `DataError` for another
    suffix or a file that is not there."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown manifest format {path.suffix!r}; use .csv, .jsonl, "
                        ".json-lines or .parquet")
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; check the path")
    return fmt


def iter_table(path: Path, columns: dict[str, None] | None = None
               ) -> Iterator[tuple[dict, str]]:
    """Each row of the manifest ``path`` with its location (``"line 4"`` / ``"row 3"``), read
    as a stream. ``columns`` (if given) gets the column names in order as they become known:
    CSV's header and Parquet's schema before the first row, JSONL's keys as rows name them."""
    reader = {"csv": _iter_csv, "jsonl": _iter_jsonl, "parquet": _iter_parquet}[
        table_format(path)]
    return reader(path, {} if columns is None else columns)


def _text(path: Path, newline: str) -> TextIO:
    return open(path, encoding="utf-8-sig", newline=newline)  # a byte-order mark is no text


def _not_utf8(path: Path) -> DataError:
    """The error for a file that did not decode: the decoder reads ahead by blocks, so the
    line is found again by decoding line by line (a newline byte is no part of a character)."""
    number = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                break
    return DataError(f"{path}:line {number}: not valid UTF-8 text; save the manifest as UTF-8")


def _iter_csv(path: Path, columns: dict[str, None]) -> Iterator[tuple[dict, str]]:
    read: list[tuple[int, str]] = []  # (number, text) of the lines the reader took since

    def lines(f: TextIO) -> Iterator[str]:
        for number, line in enumerate(f, 1):
            read.append((number, line))
            yield line

    def start() -> int:
        """The first line of the record just read (a quoted field may run over several; blank
        lines before it are skipped)."""
        return next((n for n, line in read if line.strip()), read[-1][0] if read else 1)

    try:
        with _text(path, newline="") as f:
            reader = csv.DictReader(lines(f), strict=True)
            try:
                if not reader.fieldnames:
                    raise DataError(f"{path}:line 1: no header row; the first line must name "
                                    "the columns, e.g. image,caption")
                names = [name.strip() for name in reader.fieldnames]
                repeated = first_repeated(names)
                if repeated is not None:  # the reader would keep only the last one's values
                    raise DataError(f"{path}:line 1: the header names column {repeated!r} "
                                    "twice; give each column its own name")
                columns.update(dict.fromkeys(names))
                read.clear()
                for raw in reader:
                    if None in raw:  # more fields than the header names: a comma unquoted?
                        raise DataError(f"{path}:line {start()}: {len(names) + len(raw[None])} "
                                        f"fields, the header names {len(names)}; put a field "
                                        'holding commas in double quotes ("a cat, sleeping")')
                    where = f"line {start()}"
                    read.clear()
                    yield {k.strip(): v for k, v in raw.items()}, where
            except csv.Error as e:
                raise DataError(f"{path}:line {start()}: bad CSV ({one_line(e)}); fix the "
                                "quoting of the record starting on that line") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _iter_jsonl(path: Path, columns: dict[str, None]) -> Iterator[tuple[dict, str]]:
    try:
        with _text(path, newline="\n") as f:  # lines end at "\n" only, as JSON Lines says
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _json_row(line.removesuffix("\n"), path, number)
                columns.update(dict.fromkeys(row))
                yield row, f"line {number}"
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _json_row(line: str, path: Path, number: int) -> dict:
    """Line ``number`` of a JSONL manifest as its object; a `DataError` if it is none."""
    try:
        row = json.loads(line, object_pairs_hook=_keys_once)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:line {number}: invalid JSON ({e.msg}, column {e.colno}); "
                        "fix or delete that line (one JSON object per line)") from None
    except _RepeatedKey as e:
        raise DataError(f"{path}:line {number}: the object names {e} twice; give each key "
                        "once") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:line {number}: expected a JSON object such as "
                        f'{{"image": ..., "caption": ...}}, got {type(row).__name__}; one '
                        "object per line")
    return row


class _RepeatedKey(ValueError):
    """A JSON object naming a key twice (``json.loads`` would keep the last value silently)."""


def first_repeated(names: list[str]) -> str | None:
    """The first name ``names`` holds twice (a column, a key), None if each is there once."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _keys_once(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``'s object hook: the object, or `_RepeatedKey` naming a key it repeats."""
    row = dict(pairs)
    if len(row) < len(pairs):
        raise _RepeatedKey(repr(first_repeated([key for key, _ in pairs])))
    return row


def _unreadable(path: Path, error: Exception | str) -> DataError:
    why = error if isinstance(error, str) else one_line(error)
    return DataError(f"{path}: not a readable Parquet file ({why}); rewrite it with pyarrow or "
                     "pandas")


def _open_parquet(path: Path) -> Any:
    """``path`` as a ``pyarrow.parquet.ParquetFile``; a file it cannot open is refused with
    the words `pyarrow.parquet.read_table` refuses it with."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise _unreadable(path, f"Could not open Parquet input source '{path}': "
                                f"{one_line(e)}") from None


def _parquet_names(path: Path, file: Any) -> list[str]:
    """The columns of the open ``pyarrow.parquet.ParquetFile`` ``file``; one named twice is
    refused with the words `pyarrow.parquet.read_table` refuses it with."""
    schema = file.schema_arrow
    repeated = first_repeated(schema.names)
    if repeated is not None:
        first = schema.to_string(show_schema_metadata=False).splitlines()[0]
        raise _unreadable(path, f"Multiple matches for FieldRef.Name({repeated}) in {first}")
    return schema.names


def _iter_parquet(path: Path, columns: dict[str, None]) -> Iterator[tuple[dict, str]]:
    number = 0
    try:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        with _open_parquet(path) as file:
            columns.update(dict.fromkeys(_parquet_names(path, file)))
            for batch in file.iter_batches(batch_size=PARQUET_BATCH):
                for row in batch.to_pylist():
                    number += 1
                    yield row, f"row {number}"
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def image_data(value: Any) -> str | None:
    """What ``value`` of an image column holds if it is the image itself rather than its
    path (``image bytes``, a Hugging Face export's ``{bytes, path} records``), else None."""
    if isinstance(value, (bytes, bytearray)):
        return "image bytes"
    if isinstance(value, dict):
        return f"{{{', '.join(map(str, value))}}} records"
    return None


def image_data_error(path: Path, column: str, what: str) -> DataError:
    """The one-line error for an image column holding ``what`` (`image_data`)."""
    return DataError(f"{path}: column {column!r} holds {what}, not image file paths; write the "
                     "images to files and their paths in the column")


@dataclass
class TableScan:
    """What a manifest's first read learns, holding nothing per row: its column names (as
    `iter_table` gives them), its number of rows, and for each column whose values include
    an image itself what the first such value holds (`image_data`)."""

    columns: list[str]
    rows: int
    images_held: dict[str, str]


def scan_table(path: Path) -> TableScan:
    """Read the manifest ``path`` through once, checking every row (`iter_table`'s errors),
    and keep only its `TableScan`."""
    fmt = table_format(path)
    if fmt == "parquet":
        return _scan_parquet(path)
    columns: dict[str, None] = {}
    held: dict[str, str] = {}
    rows = 0
    for rows, (row, _) in enumerate(iter_table(path, columns), 1):
        if fmt == "jsonl":  # a CSV's values are all text
            for key, value in row.items():
                if key not in held and (what := image_data(value)) is not None:
                    held[key] = what
    return TableScan(list(columns), rows, held)


def _plain(kind: Any) -> bool:
    """Whether an Arrow column of type ``kind`` reads as no bytes and no dicts."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(test(kind) for test in (
        pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
        pa.types.is_floating, pa.types.is_boolean, pa.types.is_null, pa.types.is_temporal,
        pa.types.is_decimal, pa.types.is_list, pa.types.is_large_list,
        pa.types.is_fixed_size_list, pa.types.is_map))


def _scan_parquet(path: Path) -> TableScan:
    """`scan_table` of a Parquet file: every batch decoded (as `iter_table` would, so a damaged
    page is found now), only columns that may hold bytes or records turned into Python."""
    held: dict[str, str] = {}
    rows = 0
    try:
        with _open_parquet(path) as file:
            names = _parquet_names(path, file)
            odd = [i for i, field in enumerate(file.schema_arrow) if not _plain(field.type)]
            for batch in file.iter_batches(batch_size=PARQUET_BATCH):
                rows += batch.num_rows
                for i in [i for i in odd if names[i] not in held]:
                    what = next((w for v in batch.column(i).to_pylist()
                                 if (w := image_data(v)) is not None), None)
                    if what is not None:
                        held[names[i]] = what
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return TableScan(names, rows, held)
