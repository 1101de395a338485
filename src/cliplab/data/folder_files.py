"""Which files of an image folder are its images: one rule for every reader of folders (the
labelled ``image-folder`` source of eval/adapt/pretrain/``data shard``, and the collections
that ``index`` and ``curate`` read), so both see the same images of one folder.

- Names starting with ``.`` (files or folders) are hidden and not part of the data.
- A file is an image by its suffix (``IMAGE_SUFFIXES``, any case), as torchvision's
  ``ImageFolder`` decides; one that then fails to decode is the reader's ``unreadable_image``.
- ``NAME.txt`` / ``NAME.json`` beside an image ``NAME.<suffix>`` are that image's caption and
  metadata (img2dataset's ``files`` layout); ``classnames.txt`` and the template files at the
  root describe the folder. Neither is data.
- Read as image-text pairs (``data shard``, ``index``, ``curate``; ``pretrain`` with
  ``captions: true``), an image's caption is its ``NAME.txt``. A directory none of whose
  images has one is a class folder: its images' caption is its name (the file name at the
  root). In a directory where some image has a ``NAME.txt`` (a caption folder) an image without
  one is skipped as ``missing_caption``, never captioned with the folder's name. A
  ``NAME.txt`` / ``NAME.json`` that is not UTF-8 text skips its image (``bad_caption`` /
  ``bad_metadata``), naming the file.
- Any other file is skipped and counted as ``not_an_image``; a link to nothing as
  ``missing_file``. Nothing is dropped without a count.
"""

from __future__ import annotations

import json
import os
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


def list_folder(root: Path, top: Path | None = None, recursive: bool = True) -> FolderFiles:
    """Every image under ``root`` (sorted; in its sub-folders too when ``recursive``) and the
    files skipped with their reason. ``top`` is the dataset's root when ``root`` is one of its
    class folders (its template and class-name files are not skipped as non-images)."""
    top = root if top is None else top
    entries = sorted(_scan(root, recursive), key=lambda found: found[0])  # as Paths sort
    stems = {(parts[:-1], _stem(entry.name)) for parts, entry in entries
             if _suffix(entry.name).lower() in IMAGE_SUFFIXES and entry.is_file()}
    found = FolderFiles()
    for parts, entry in entries:
        name = entry.name
        if entry.is_symlink() and not os.path.exists(entry.path):
            found.skipped.append(("missing_file", Path(entry.path)))
        elif not entry.is_file():
            continue  # a folder: its files are listed themselves
        elif _suffix(name).lower() in IMAGE_SUFFIXES:
            found.images.append(Path(entry.path))
        elif name in FOLDER_FILES and root.joinpath(*parts[:-1]) == top:
            continue
        elif _suffix(name).lower() in SIDECAR_SUFFIXES and (parts[:-1], _stem(name)) in stems:
            continue
        else:
            found.skipped.append(("not_an_image", Path(entry.path)))
    return found


def _scan(root: Path, recursive: bool) -> list[tuple[tuple[str, ...], os.DirEntry]]:
    """Every visible entry of ``root`` with its path's parts below it; ``recursive``: the files
    (and links to nothing) of every visible folder under it instead, following linked folders
    as the labelled reader's class folders do (each real folder once: a link loop ends). Folders
    that cannot be read are passed over, as `os.walk` does. `os.scandir` knows most entries'
    kind without a `stat` per file (an ImageNet-sized folder lists several times faster)."""
    found: list[tuple[tuple[str, ...], os.DirEntry]] = []
    seen: set[str] = set()
    folders = [(str(root), ())]
    while folders:
        folder, parts = folders.pop()
        if recursive:
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
        try:
            with os.scandir(folder) as scan:
                visible = [entry for entry in scan if not entry.name.startswith(".")]
        except OSError:
            continue
        for entry in visible:
            if recursive and _is_folder(entry):
                folders.append((entry.path, (*parts, entry.name)))
            else:
                found.append(((*parts, entry.name), entry))
    return found


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder too
    except OSError:
        return False


def _suffix(name: str) -> str:
    """``name``'s suffix, as `Path.suffix` gives it."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _stem(name: str) -> str:
    """``name`` without its suffix, as `Path.stem` gives it."""
    suffix = _suffix(name)
    return name[:-len(suffix)] if suffix else name


def sidecar(image: Path, suffix: str) -> Path | None:
    """The ``.txt`` / ``.json`` file (either case) beside ``image`` with its name, if any."""
    for candidate in (suffix, suffix.upper()):
        if (path := image.with_suffix(candidate)).is_file():
            return path
    return None


class SkippedFile(OSError):
    """An item with no usable image or caption; ``reason`` names the skip (``not_an_image``,
    ``missing_file``, ``missing_caption``, ``bad_caption``, ``bad_metadata``)."""

    def __init__(self, reason: str, message: str, path: Path | None = None):
        super().__init__(message)
        self.reason, self.path = reason, path


def caption_dirs(images: list[Path]) -> set[Path]:
    """The directories (caption folders) in which some of ``images`` has a ``NAME.txt``."""
    return {image.parent for image in images if sidecar(image, ".txt") is not None}


def is_caption_folder(root: Path) -> bool:
    """Whether an image under the folder ``root`` has a ``NAME.txt`` (it holds captions)."""
    return bool(caption_dirs(list_folder(Path(root)).images))


def sidecar_text(path: Path, what: str, reason: str) -> str:
    """The text of sidecar ``path``; `SkippedFile` (``reason``) if it is not UTF-8 text."""
    try:
        return path.read_bytes().decode("utf-8-sig")  # a BOM (Windows Notepad) is no text
    except UnicodeDecodeError:
        raise SkippedFile(reason, f"{path}: {what} file not UTF-8 text", path) from None


def image_caption(image: Path, root: Path, captioned: set[Path]) -> str:
    """The caption of ``image`` under ``root``: in a caption folder (one of ``captioned``,
    `caption_dirs`) its ``NAME.txt`` (`SkippedFile` ``missing_caption`` without one), else
    its sub-folder's name, else its file name (underscores as spaces)."""
    if image.parent in captioned:
        text = sidecar(image, ".txt")
        if text is None:
            raise SkippedFile("missing_caption", f"{image}: no caption file {image.stem}.txt "
                              "beside it (other images of its folder have one)", image)
        return sidecar_text(text, "caption", "bad_caption").strip()
    folder = image.relative_to(root).parent
    return (str(folder) if folder != Path(".") else image.stem).replace("_", " ")


def image_metadata(image: Path) -> dict:
    """The ``NAME.json`` object beside ``image`` ({} if none, or not a JSON object);
    `SkippedFile` ``bad_metadata`` if it is not UTF-8 text."""
    extra = sidecar(image, ".json")
    if extra is None:
        return {}
    try:
        loaded = json.loads(sidecar_text(extra, "metadata", "bad_metadata"))
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def with_folder_captions(spec: dict) -> dict:
    """``spec``, an image folder holding ``NAME.txt`` captions read as those (``captions:
    true``, `cliplab.data.folder_files`' rule) unless the spec says ``captions`` itself."""
    if spec.get("source") != "image-folder" or "captions" in spec or "path" not in spec:
        return spec
    path = Path(str(spec["path"])).expanduser()
    return {**spec, "captions": True} if path.is_dir() and is_caption_folder(path) else spec
