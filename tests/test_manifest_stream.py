"""A manifest is read as a stream (CSV and JSONL line by line, Parquet by record batches),
never held whole for a pool (index, curate)."""

from __future__ import annotations

import pytest

from cliplab.data.collection import _manifest_items
from cliplab.data.manifest import read_manifest_rows
from cliplab.errors import DataError

SPEC = {"source": "manifest"}


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
