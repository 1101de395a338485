"""Write a folder completely or not at all: build it under a temporary name, then rename."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cliplab.errors import CliplabError, ModelError
from cliplab.output_folder import MODEL_FOLDER, built_beside, check_out, check_writable_beside


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, kind: str = "model",
                  previous=MODEL_FOLDER, inputs=()):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is
    removed and ``out`` is left as it was (`built_beside`). ``out`` must pass `check_out` (a
    non-empty ``out`` is refused unless ``overwrite`` and it is a previous ``kind`` output:
    ``previous(out)``)."""
    out = Path(out)
    check_out(out, kind, inputs, overwrite, previous, error=ModelError)
    check_writable_beside(out, ModelError)
    try:
        with built_beside(out) as tmp:
            yield tmp
    except OSError as err:  # the disk, not the input: one line
        raise CliplabError(f"cannot write the result into {out}: {err}") from None
