"""Output folders built where a reader cannot mistake them for finished work: a long job writes
into ``OUT.partial/`` (so a killed run can resume there) and renames it to ``OUT`` once complete.
Used by ``cliplab curate`` and ``cliplab index``; JSON files are written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def partial_path(out: Path) -> Path:
    """Where the output ``out`` is built until it is complete."""
    return out.with_name(out.name + ".partial")


def swap_in(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``; an existing ``out`` (an overwritten or
    appended-to output) is moved aside first and removed last, so ``out`` is never missing
    while an old copy could still be read."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    if old.exists():
        shutil.rmtree(old)


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """JSON written atomically (temp file + rename); numpy values and paths as plain values."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=_plain))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
