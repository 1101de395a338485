"""Write a folder completely or not at all: build it under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from cliplab.errors import CliplabError, ModelError
from cliplab.output_folder import MODEL_FOLDER, check_out


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, kind: str = "model",
                  previous=MODEL_FOLDER, inputs=()):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is
    removed and ``out`` is left as it was. ``out`` must pass `check_out` (a non-empty ``out`` is
    refused unless ``overwrite`` and it is a previous ``kind`` output: ``previous(out)``)."""
    out = Path(out)
    check_out(out, kind, inputs, overwrite, previous, error=ModelError)
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
