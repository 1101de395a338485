"""Write a folder completely or not at all: build it under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from cliplab.errors import CliplabError, ModelError


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is
    removed and ``out`` is left as it was. A non-empty ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CliplabError(f"cannot move the result into {out}: {err}") from None
