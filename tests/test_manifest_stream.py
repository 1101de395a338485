"""A manifest pool (index, curate) is read as a stream, twice, never held whole: the first
read checks the file and counts its rows, the second gives the items, the same items the
whole-file reader gave."""

from __future__ import annotations

import json
import pathlib
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliplab.data.collection import _manifest_items, _no_path
from cliplab.data.manifest import read_manifest_rows
from cliplab.errors import DataError

SPEC = {"source": "manifest"}


def _pool(path: Path, n: int) -> Path:
    captions = [f"a photo of a cat number {i} on a mat" for i in range(n)]
    if path.suffix == ".csv":
        text = "image,caption\n" + "".join(f"im{i % 4}.png,{c}\n" for i, c in enumerate(captions))
    else:
        text = "".join(json.dumps({"image": f"im{i % 4}.png", "caption": c}) + "\n"
                       for i, c in enumerate(captions))
    path.write_text(text, encoding="utf-8")
    return path


# bytes of traced memory per row that reading a 20k-row pool may hold: the whole-file reader
# measured ~590 (CSV) and ~640 (JSONL), the stream ~2 (a constant ~40 KB: a line, a row, an
# item)
HELD_BYTES_PER_ROW = 60
# `Path.resolve` interns each path part: the interpreter's table of interned strings (large in
# a pytest process) now and then grows by one allocation of several MB, which holds no row
NOT_PATHLIB = [tracemalloc.Filter(False, pathlib.__file__)]


@pytest.mark.parametrize("name", ["pool.csv", "pool.jsonl"])
def test_reading_a_manifest_pool_holds_no_row(tmp_path, name):
    n = 20_000
    path = _pool(tmp_path / name, n)
    for _ in _manifest_items(_pool(tmp_path / f"warm-{name}", 50), SPEC)[1]:  # imports
        pass
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        total, items = _manifest_items(path, SPEC)
        held = [tracemalloc.get_traced_memory()[1] - start]  # the first read's peak
        count = 0
        for count, _ in enumerate(items, 1):  # each item let go at once, as curate does
            if count % 1000 == 0:
                snapshot = tracemalloc.take_snapshot().filter_traces(NOT_PATHLIB)
                held.append(sum(stat.size for stat in snapshot.statistics("filename")))
    finally:
        tracemalloc.stop()
    assert total == count == n
    assert max(held) / n < HELD_BYTES_PER_ROW, f"{max(held) / n:.0f} bytes per row"


def _odd_pools(root: Path) -> dict[str, Path]:
    """A CSV (byte-order mark, CRLF, a quoted caption over two lines, a blank line, an empty
    caption, a row without image, a short row), a JSONL (the same, a row with an extra key) and
    a Parquet file (a null image and number)."""
    (root / "m.csv").write_bytes('\ufeffimage,caption,note\r\na.png,"two\r\nlines, here",x\r\n'
                                 '\r\n,no image,y\r\nb.png,,z\r\nc.png,  spaced  \r\n'.encode())
    (root / "m.jsonl").write_bytes('\ufeff{"image": "a.png", "caption": "one"}\n\n'
                                   '{"image": "", "caption": "no image"}\n'
                                   '{"image": "b.png", "caption": "", "extra": [1, 2]}\n  \n'
                                   '{"image": "c.png", "caption": "multi\\nline"}\n'.encode())
    pq.write_table(pa.table({"image": ["a.png", None, "b.png"],
                             "caption": ["two\nlines", "no image", ""], "n": [1, 2, None]}),
                   root / "m.parquet")
    return {name: root / name for name in ("m.csv", "m.jsonl", "m.parquet")}


# (key, caption, location, image file, meta, names no image) as the whole-file reader gave them
ODD_ITEMS = {
    "m.csv": [
        ("m.csv:1:a.png", "two\r\nlines, here", "line 2", "a.png",
         {"caption": "two\r\nlines, here", "note": "x"}, False),
        ("m.csv:2:", "no image", "line 5", "", {"caption": "no image", "note": "y"}, True),
        ("m.csv:3:b.png", "", "line 6", "b.png", {"caption": "", "note": "z"}, False),
        ("m.csv:4:c.png", "spaced", "line 7", "c.png", {"caption": "  spaced  ", "note": None},
         False)],
    "m.jsonl": [
        ("m.jsonl:1:a.png", "one", "line 1", "a.png", {"caption": "one"}, False),
        ("m.jsonl:2:", "no image", "line 3", "", {"caption": "no image"}, True),
        ("m.jsonl:3:b.png", "", "line 4", "b.png", {"caption": "", "extra": [1, 2]}, False),
        ("m.jsonl:4:c.png", "multi\nline", "line 6", "c.png", {"caption": "multi\nline"},
         False)],
    "m.parquet": [
        ("m.parquet:1:a.png", "two\nlines", "row 1", "a.png", {"caption": "two\nlines", "n": 1},
         False),
        ("m.parquet:2:", "no image", "row 2", "", {"caption": "no image", "n": 2}, True),
        ("m.parquet:3:b.png", "", "row 3", "b.png", {"caption": "", "n": None}, False)]}


def test_items_are_the_ones_the_whole_file_reader_gave(tmp_path):
    for name, path in _odd_pools(tmp_path).items():
        total, items = _manifest_items(path, SPEC)
        got = [(item.key, item.caption, item.location["line"],
                Path(item.location["file"]).relative_to(tmp_path).as_posix().strip("."),
                item.meta, item.read is _no_path) for item in items]
        assert total == len(ODD_ITEMS[name]) and got == ODD_ITEMS[name], name
        assert {item.location["manifest"] for item in _manifest_items(path, SPEC)[1]} == \
            {str(path)}


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m.parquet"])
@pytest.mark.parametrize("added", [True, False])
def test_a_manifest_that_changes_between_its_two_reads_is_refused(tmp_path, name, added):
    """Its rows were counted (and checked) by the first read: another number of rows in the
    second is an error naming the file, not items of another file under the first's count."""
    path = _odd_pools(tmp_path)[name]
    total, items = _manifest_items(path, SPEC)
    if name.endswith(".parquet"):
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table, table.slice(0, 1)]) if added else
                       table.slice(0, total - 1), path)
    else:
        data = path.read_bytes()
        row = b"d.png,new,w\r\n" if name.endswith(".csv") else b'{"image": "d.png"}\n'
        path.write_bytes(data + row if added else data[:data.rstrip().rfind(b"\n") + 1])
    then = f"more than {total}" if added else str(total - 1)
    with pytest.raises(DataError) as err:
        list(items)
    assert str(err.value) == (f"{path} changed while it was read: it held {total} rows, then "
                              f"{then}; run again once nothing writes to it")


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
    """The file is decoded as it is read, by blocks: the line is the bad byte's, however far
    in it is; after a byte-order mark it was counted three bytes short (line 1 for line 2)."""
    rows = "".join(f"im{i}.png,caption {i}\n" for i in range(3000)).encode()
    path = tmp_path / "m.csv"
    path.write_bytes(b"image,caption\n" + rows + b"x.png,caf\xe9\n" + rows)
    with pytest.raises(DataError, match=rf"^{path}:line 3002: not valid UTF-8 text; save the "
                                        "manifest as UTF-8$"):
        _manifest_items(path, SPEC)
    path.write_bytes(b"\xef\xbb\xbfimage,caption\na\xe9.png,ok\n")
    with pytest.raises(DataError, match=rf"^{path}:line 2: not valid UTF-8 text"):
        read_manifest_rows(path)
