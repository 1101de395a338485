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
  ``NAME.txt`` / ``NAME.json`` that is not UTF-8 text or cannot be read (no permission), or a
  ``NAME.json`` that is no JSON object, skips its image (``bad_caption`` / ``bad_metadata``),
  naming the file.
- Any other file is skipped and counted as ``not_an_image``; a link to nothing as
  ``missing_file``; a file whose name (or folder's) is not UTF-8 text as ``bad_name``.
  Nothing is dropped without a count.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from cliplab.data.images import IMAGE_EXTS
from cliplab.data.prompt_files import CLASSNAMES_FILE, TEMPLATE_FILES
from cliplab.errors import DataError
from cliplab.report_text import printable

IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)
SIDECAR_SUFFIXES = (".txt", ".json")
FOLDER_FILES = (CLASSNAMES_FILE, *TEMPLATE_FILES)


@dataclass
class FolderFiles:
    """The files under a folder, sorted: ``images``, and ``skipped`` ``(reason, path)`` pairs
    for the files that are not data a reader can use."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, Path]] = field(default_factory=list)


def list_folder(root: Path, top: Path | None = None, recursive: bool = True,
                elsewhere: Collection[str] = ()) -> FolderFiles:
    """Every image under ``root`` (sorted; in its sub-folders too when ``recursive``) and the
    files skipped with their reason. ``top`` is the dataset's root when ``root`` is one of its
    class folders (its template and class-name files are not skipped as non-images);
    ``elsewhere`` are the real paths of folders read on their own (the class folders): a link
    below ``root`` that leads into another of them, or to a folder holding one, is not
    followed, so no image is read twice under two labels."""
    top = root if top is None else top
    entries = sorted(_scan(root, recursive, elsewhere),
                     key=lambda found: found[0])  # as Paths sort
    stems = {(parts[:-1], _stem(entry.name)) for parts, entry in entries
             if _suffix(entry.name).lower() in IMAGE_SUFFIXES and entry.is_file()}
    found = FolderFiles()
    mixed: dict[str, dict[str, str]] = {}  # folder -> sidecars named a.Txt, by "a.txt"
    for parts, entry in entries:
        name, suffix = entry.name, _suffix(entry.name)
        named = is_utf8("/".join(parts))  # else no key, caption or record can hold the name
        if entry.is_symlink() and not os.path.exists(entry.path):
            found.skipped.append(("missing_file", Path(entry.path)) if named else
                                 ("bad_name", printable_path(entry.path)))
        elif not entry.is_file():
            continue  # a folder: its files are listed themselves
        elif name in FOLDER_FILES and root.joinpath(*parts[:-1]) == top:
            continue
        elif suffix.lower() in SIDECAR_SUFFIXES and (parts[:-1], _stem(name)) in stems:
            if suffix not in (suffix.lower(), suffix.upper()):  # its image's, counted there
                folder = os.path.dirname(entry.path)
                mixed.setdefault(folder, {})[_stem(name) + suffix.lower()] = name
        elif not named:
            found.skipped.append(("bad_name", printable_path(entry.path)))
        elif suffix.lower() in IMAGE_SUFFIXES:
            found.images.append(Path(entry.path))
        else:
            found.skipped.append(("not_an_image", Path(entry.path)))
    # the folders listed now (every path below root starts with it, links' too): as listed now
    under = str(root).rstrip(os.sep) + os.sep
    for folder in [f for f in _MIXED_CASE if f == str(root) or recursive and f.startswith(under)]:
        del _MIXED_CASE[folder]
    _MIXED_CASE.update(mixed)
    return found


def _scan(root: Path, recursive: bool, elsewhere: Collection[str] = ()
          ) -> list[tuple[tuple[str, ...], os.DirEntry]]:
    """Every visible entry of ``root`` with its path's parts below it; ``recursive``: the files
    (and links to nothing) of every visible folder under it instead, following linked folders
    as the labelled reader's class folders do (each real folder once, and no link to a folder
    holding ``root``: a link loop ends; nor one to a folder inside, or holding, another folder
    ``elsewhere``). A folder reached by several paths is read by its own path, or else by the
    first link in sorted order, whatever order the file system lists them in. Folders that
    cannot be read are passed over, as `os.walk` does. `os.scandir` knows most entries' kind
    without a `stat` per file (an ImageNet-sized folder lists several times faster)."""
    found: list[tuple[tuple[str, ...], os.DirEntry]] = []
    seen: set[str] = set()
    top = os.path.realpath(root)
    folders: list[tuple[str, tuple[str, ...]]] = [(str(root), ())]
    links: list[tuple[tuple[str, ...], str]] = []  # a heap: linked folders once no other is left
    while folders or links:
        linked = not folders  # reached through a link below root
        folder, parts = folders.pop() if folders else heapq.heappop(links)[::-1]
        if recursive:
            real = os.path.realpath(folder)
            if real in seen or (linked and _leads_elsewhere(real, top, elsewhere)):
                continue
            seen.add(real)
        try:
            with os.scandir(folder) as scan:
                visible = [entry for entry in scan if not entry.name.startswith(".")]
        except OSError:
            continue
        for entry in visible:
            if recursive and _is_folder(entry):
                if entry.is_symlink():
                    heapq.heappush(links, ((*parts, entry.name), entry.path))
                else:
                    folders.append((entry.path, (*parts, entry.name)))
            else:
                found.append(((*parts, entry.name), entry))
    return found


def is_utf8(name: str) -> bool:
    """Whether ``name`` is UTF-8 text: a file named in another encoding (Latin-1, from an old
    zip or a Samba share) is listed with its bytes as lone surrogates, which no caption, key or
    database can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str) -> Path:
    """``path`` as a printable name, its bytes that are not UTF-8 written ``\\xe9``
    (`cliplab.report_text.printable`)."""
    return Path(printable(path))


def _leads_elsewhere(real: str, top: str, elsewhere: Collection[str]) -> bool:
    """Whether a linked folder (real path ``real``) holds the folder being listed (``top``: a
    loop) or is inside, or holds, another folder read on its own."""
    return _nested(top, real) or any(
        other != top and (_nested(real, other) or _nested(other, real)) for other in elsewhere)


def _nested(inner: str, outer: str) -> bool:
    """Whether the real path ``inner`` is ``outer`` or a folder inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


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


# the sidecars with a suffix in mixed case (a.Txt) of each folder `list_folder` listed last,
# by their name with the suffix lower-cased: `sidecar` finds them without a stat per image
_MIXED_CASE: dict[str, dict[str, str]] = {}


def sidecar(image: Path, suffix: str) -> Path | None:
    """The ``.txt`` / ``.json`` file beside ``image`` with its name, if any: its suffix in any
    case (``a.Txt``, as `list_folder`, which listed the image's folder, found it)."""
    for candidate in (suffix, suffix.upper()):
        if (path := image.with_suffix(candidate)).is_file():
            return path
    name = _MIXED_CASE.get(str(image.parent), {}).get(_stem(image.name) + suffix)
    return image.parent / name if name else None


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
    """The text of sidecar ``path``; `SkippedFile` (``reason``) if it is not UTF-8 text or
    cannot be read (no permission: skipped and counted, as an unreadable image is)."""
    try:
        return path.read_bytes().decode("utf-8-sig")  # a BOM (Windows Notepad) is no text
    except UnicodeDecodeError:
        raise SkippedFile(reason, f"{path}: {what} file not UTF-8 text", path) from None
    except OSError as err:
        then = "fix its permissions or remove it" if err.errno in (errno.EACCES, errno.EPERM) \
            else "check the disk it is on, or remove it"
        raise SkippedFile(reason, f"{path}: {what} file cannot be read "
                          f"({err.strerror or err}); {then}", path) from None


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
    """The ``NAME.json`` object beside ``image`` ({} if none); `SkippedFile` ``bad_metadata``
    if it is not UTF-8 text or not a JSON object (its metadata was dropped unseen)."""
    extra = sidecar(image, ".json")
    if extra is None:
        return {}
    try:
        loaded = json.loads(sidecar_text(extra, "metadata", "bad_metadata"))
    except ValueError as err:
        raise SkippedFile("bad_metadata", f"{extra}: metadata file not JSON ({err})",
                          extra) from None
    if not isinstance(loaded, dict):
        raise SkippedFile("bad_metadata", f"{extra}: metadata file holds a JSON "
                          f"{type(loaded).__name__}, not an object", extra)
    return loaded


def with_folder_captions(spec: dict) -> dict:
    """``spec``, an image folder read as pairs by `cliplab.data.folder_files`' rule (``captions:
    true``) when it holds ``NAME.txt`` captions or has no sub-folder (its images captioned by
    their file names, as ``index`` and ``curate`` read it; it has no class folders to be read
    as labelled images), unless the spec says ``captions`` itself."""
    if spec.get("source") != "image-folder" or "captions" in spec or "path" not in spec:
        return spec
    path = Path(str(spec["path"])).expanduser()
    if not path.is_dir():
        return spec
    try:
        flat = not any(found.is_dir() for found in path.iterdir()
                       if not found.name.startswith("."))
    except OSError:  # unreadable: the reader names it
        return spec
    return {**spec, "captions": True} if flat or is_caption_folder(path) else spec


def require_folder(root: Path) -> None:
    """A `DataError` unless ``root`` is a folder: one that does not exist is said as every
    reader says a missing input (``image-folder X does not exist; check the path``)."""
    if not root.is_dir():
        raise DataError(f"image-folder {root} " + ("is not a folder" if root.exists()
                                                   else "does not exist; check the path"))
