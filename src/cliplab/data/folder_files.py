"""Which files of an image folder are its images: one rule for every reader of folders (the
labelled ``image-folder`` source of eval/adapt/pretrain/``data shard``, and the collections
that ``index`` and ``curate`` read), so both see the same images of one folder.

- Names starting with ``.`` (files or folders) are hidden and not part of the data.
- A file is an image by its suffix (``IMAGE_SUFFIXES``, any case), as torchvision's
  ``ImageFolder`` decides; one that then fails to decode is the reader's ``unreadable_image``.
- ``NAME.txt`` / ``NAME.json`` beside an image ``NAME.<suffix>`` are that image's caption and
  metadata (img2dataset's ``files`` layout); ``classnames.txt`` and the template files at the
  root describe the folder. Neither is data.
- Any other file is skipped and counted as ``not_an_image``; a link to nothing as
  ``missing_file``. Nothing is dropped without a count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cliplab.data.images import IMAGE_EXTS
from cliplab.data.prompt_files import CLASSNAMES_FILE, TEMPLATE_FILES

IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)
SIDECAR_SUFFIXES = (".txt", ".json")
FOLDER_FILES = (CLASSNAMES_FILE, *TEMPLATE_FILES)


@dataclass
class FolderFiles:
    """The files under a folder, sorted: ``images``, and ``skipped`` ``(reason, path)`` pairs
    for the files that are not data a reader can use."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, Path]] = field(default_factory=list)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is an image by its suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_folder(root: Path, top: Path | None = None, recursive: bool = True) -> FolderFiles:
    """Every image under ``root`` (sorted; in its sub-folders too when ``recursive``) and the
    files skipped with their reason. ``top`` is the dataset's root when ``root`` is one of its
    class folders (its template and class-name files are not skipped as non-images)."""
    top = root if top is None else top
    paths = sorted(_walk(root) if recursive else
                   (p for p in root.iterdir() if not p.name.startswith(".")))
    stems = {(p.parent, p.stem) for p in paths if p.is_file() and is_image_file(p)}
    found = FolderFiles()
    for path in paths:
        if path.is_symlink() and not path.exists():
            found.skipped.append(("missing_file", path))
        elif not path.is_file():
            continue  # a folder: its files are listed themselves
        elif is_image_file(path):
            found.images.append(path)
        elif path.parent == top and path.name in FOLDER_FILES:
            continue
        elif path.suffix.lower() in SIDECAR_SUFFIXES and (path.parent, path.stem) in stems:
            continue
        else:
            found.skipped.append(("not_an_image", path))
    return found


def _walk(root: Path) -> Iterator[Path]:
    """Every visible file (and link to nothing) under ``root``, following linked folders as
    the labelled reader's class folders do (each real folder once: a link loop ends)."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        yield from (Path(folder) / name for name in files if not name.startswith("."))


def sidecar(image: Path, suffix: str) -> Path | None:
    """The ``.txt`` / ``.json`` file (either case) beside ``image`` with its name, if any."""
    for candidate in (suffix, suffix.upper()):
        if (path := image.with_suffix(candidate)).is_file():
            return path
    return None
