"""Image folders: one sub-folder per class (``ROOT/golden_retriever/001.jpg``), the layout of
torchvision's ``ImageFolder`` and of most hand-made evaluation sets.

Class names come from the sub-folder names (sorted, underscores read as spaces) unless
``ROOT/classnames.txt`` gives one name per line in the same sorted order. Prompt templates come
from ``ROOT/templates.txt`` or ``ROOT/zeroshot_classification_templates.txt`` (one per line,
``{}`` or ``{c}`` marking the class name) when present. Which files are images follows
`cliplab.data.folder_files` (by suffix, as torchvision does); images that cannot be decoded,
other files, and images outside a class folder are skipped and counted with their paths.

``captions: true`` reads the folder as image-text pairs instead, by the caption rule every
reader of folders as pairs shares (`cliplab.data.folder_files`): ``NAME.txt`` beside an image
is its caption; ``data shard`` and ``pretrain`` do so by themselves when any image has one or
the folder has no sub-folder (its images are captioned by their file names).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cliplab.data.folder_files import (SkippedFile, caption_dirs, image_caption, image_metadata,
                                       is_utf8, list_folder, printable_path, require_folder)
from cliplab.data.images import ImageStack, UnreadableImage, decode_image
from cliplab.data.pairs import folded
from cliplab.data.prompt_files import CLASSNAMES_FILE, read_lines, read_templates
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import DataError, warn

def _visible(name: str) -> bool:
    return not name.startswith(".")


def folder_classnames(root: Path, folders: list[Path]) -> list[str]:
    """Names of the class ``folders``: from ``classnames.txt`` if present, else folder names
    with underscores as spaces."""
    file = root / CLASSNAMES_FILE
    if not file.is_file():
        names = [f.name.replace("_", " ").strip() for f in folders]
    else:
        names = read_lines(file)
        if len(names) != len(folders):
            raise DataError(f"{file}: {len(names)} class names for {len(folders)} class folders "
                            f"({', '.join(f.name for f in folders)}); give one name per folder, "
                            "in sorted folder order")
    _warn_repeated_names(root, folders, names)
    return names


def _warn_repeated_names(root: Path, folders: list[Path], names: list[str]) -> None:
    """Tell on stderr of class folders that share a name (``a_b/`` and ``a b/``, or WordNet's
    two "crane"s): their zero-shot prompts are the same, so the later one never wins; and of
    names that differ only in case or spacing (``Dog/`` and ``dog/``): a lowercasing
    tokenizer (cliplab's are) reads their prompts as one, and prompts collapse spaces."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(folded(name), []).append(i)
    shared = [found for found in groups.values() if len(found) > 1]
    # a group holding one name twice as written cannot be told apart, whatever the tokenizer
    same = [found for found in shared if len({names[i] for i in found}) < len(found)]
    alike = [found for found in shared if len({names[i] for i in found}) == len(found)]
    for groups_of, but, why in ((same, "", "cannot"),
                                (alike, " but for case or spacing",
                                 "may not (a lowercasing tokenizer cannot)")):
        if not groups_of:
            continue
        said = "; ".join(_named_folders(folders, names, found) for found in groups_of[:3])
        warn(f"image folder {root}: {len(groups_of)} class name(s) name several class folders"
             f"{but} ({said}{'; ...' if len(groups_of) > 3 else ''}): zero-shot {why} tell "
             f"them apart; give them distinct names in {CLASSNAMES_FILE}")


def _named_folders(folders: list[Path], names: list[str], found: list[int]) -> str:
    """``'hot dog': hot dog, hot_dog`` (one name) or ``'Dog' / 'dog': Dog, dog``: the names
    of the class folders ``found`` and the folders."""
    shown = " / ".join(repr(n) for n in dict.fromkeys(names[i] for i in found))
    return f"{shown}: {', '.join(folders[i].name for i in found)}"


def load_image_folder(path: str | Path, image_size: PositiveInt | None = None,
                      templates: list[str] | None = None, progress: bool = True,
                      captions: bool = False) -> LabelledImages | ImageTextPairs:
    """All images under ``path``'s class sub-folders as labelled images (with ``captions``:
    as image-text pairs, `load_caption_folder`).

    Images are decoded to RGB and resized (bilinear) to ``image_size`` squares; without it,
    images of different sizes become centre squares (`stack_images`). Files that are not
    usable images are skipped and listed in
    ``.skipped`` (``unreadable_image``, ``not_an_image``, ``missing_file``, and
    ``outside_class_folder`` for an image at the root); ``templates`` overrides the folder's
    template file. ``.keys`` holds each image's path relative to ``path`` (``cat/001.jpg``).
    """
    root = Path(path)
    check_folder_options(root, image_size, templates, captions)
    if captions:
        return load_caption_folder(root, image_size, progress)
    listing = list_class_folder(root, templates)
    skipped = listing.skipped
    images, labels, keys = ImageStack(len(listing.files)), [], []
    for label, file in tqdm(listing.files, desc=f"read {root.name}", disable=not progress,
                            leave=False):
        key = file.relative_to(root).as_posix()
        try:
            images.add_file(key, functools.partial(decode_image, file, image_size),
                            name=str(file), path=file)
        except UnreadableImage:
            skipped.add("unreadable_image", str(file))
            continue
        labels.append(label)
        keys.append(key)
    if not images:
        raise DataError(listing.nothing_readable())
    listing.warn_empty_classes(set(labels))
    return LabelledImages(images.stacked(f"image folder {root}"), torch.tensor(labels),
                          listing.classnames, listing.templates, name=root.name,
                          skipped=skipped, keys=keys)


def check_folder_options(root: Path, image_size: object, templates: list[str] | None,
                         captions: bool) -> None:
    """Refuse a missing folder, an ``image_size`` that is no positive int, and ``templates``
    with ``captions``."""
    require_folder(root)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image-folder {root}: image_size must be a positive int, "
                        f"got {image_size!r}")
    if captions and templates:
        raise DataError(f"image folder {root}: templates apply to a class folder, not to "
                        "captions: true")


@dataclass
class ClassFolderListing:
    """A class folder as listed, before any image is decoded: its class ``folders`` (sorted),
    ``classnames``, ``templates``, the image ``files`` with their labels, and what was
    ``skipped`` (not images, images outside a class folder)."""

    root: Path
    folders: list[Path]
    classnames: list[str]
    templates: list[str]
    files: list[tuple[int, Path]]
    skipped: SkipReport

    def nothing_readable(self) -> str:
        """The error when no file decoded."""
        return (f"image folder {self.root}: no readable image in {len(self.files)} files "
                f"({self.skipped.summary()})")

    def warn_empty_classes(self, read_labels: set[int]) -> None:
        """Tell on stderr which class folders hold no readable image: still classes (zero-shot
        candidates), but nothing of theirs is scored or learnt."""
        empty = [self.folders[c].name for c in sorted(set(range(len(self.folders))) - read_labels)]
        if empty:
            warn(f"image folder {self.root}: {len(empty)} class folder(s) hold no readable "
                 f"image: {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}")


def list_class_folder(root: Path, templates: list[str] | None = None) -> ClassFolderListing:
    """``root``'s class sub-folders and their image files (`list_folder`), and the class
    names and templates (``templates`` overriding the folder's file)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders; expected "
                        "ROOT/<class name>/<image files>")
    unnamed = next((folder for folder in folders if not is_utf8(folder.name)), None)
    if unnamed is not None:  # its name is the class name: no prompt or record could hold it
        raise DataError(f"image folder {root}: class folder {printable_path(str(unnamed)).name} "
                        "is named in another encoding than UTF-8; rename it")
    classnames = folder_classnames(root, folders)
    templates = list(templates) if templates else read_templates(root)
    skipped = SkipReport()
    loose = list_folder(root, recursive=False)  # files beside the class folders
    for reason, path in [("outside_class_folder", p) for p in loose.images] + loose.skipped:
        skipped.add(reason, str(path))
    files = []
    # a link inside a class folder back to the root or into another class is not followed
    classes = [os.path.realpath(folder) for folder in folders]
    for label, folder in enumerate(folders):
        listed = list_folder(folder, top=root, elsewhere=classes)
        files += [(label, f) for f in listed.images]
        for reason, path in listed.skipped:
            skipped.add(reason, str(path))
    return ClassFolderListing(root, folders, classnames, templates, files, skipped)


def load_caption_folder(path: str | Path, image_size: PositiveInt | None = None,
                        progress: bool = True) -> ImageTextPairs:
    """A folder's images (searched recursively) as pairs, captioned as `image_caption` says:
    its ``NAME.txt``, in a sub-folder without any its folder's name.

    Skipped and counted by path: undecodable images, images of a caption folder without a
    caption (``missing_caption``), captions or metadata not UTF-8 text (``bad_caption``,
    ``bad_metadata``) and files that are no image. ``.keys`` holds each image's path relative
    to ``path``."""
    root = Path(path)
    require_folder(root)
    listing = list_caption_folder(root)
    images, captions, keys = ImageStack(len(listing.files)), [], []
    for sample in tqdm(listing.read(image_size), total=len(listing.files),
                       desc=f"read {root.name}", disable=not progress, leave=False):
        if sample is not None:
            keys.append(sample[0])
            images.append(sample[1])
            captions.append([sample[2]])
    if not images:
        raise DataError(listing.nothing_readable())
    return ImageTextPairs(images.stacked(f"caption folder {root}"), captions,
                          name=root.name, skipped=listing.skipped, keys=keys)


@dataclass
class CaptionFolderListing:
    """A caption folder as listed, before any image is decoded: its image ``files``, the
    folders whose images are captioned by ``NAME.txt`` (``captioned``, `caption_dirs`), and
    what was ``skipped`` (more is added as `read` goes)."""

    root: Path
    files: list[Path]
    captioned: set[Path]
    skipped: SkipReport

    def read(self, image_size: int | None = None
             ) -> Iterator[tuple[str, torch.Tensor, str] | None]:
        """Each file as ``(key, image, caption)``, or None for one skipped (and counted):
        undecodable, without a caption in a caption folder or with an empty one (as a
        manifest's empty caption and a shard's are), caption or metadata not UTF-8."""
        for file in self.files:
            try:
                image = decode_image(file, image_size)
                caption = image_caption(file, self.root, self.captioned)
                image_metadata(file)  # metadata that is not UTF-8 text skips its image too
            except UnreadableImage:
                self.skipped.add("unreadable_image", str(file))
                yield None
                continue
            except SkippedFile as err:
                self.skipped.add(err.reason, str(err.path or file))
                yield None
                continue
            if not caption:  # image_caption strips: a file of blanks is empty too
                self.skipped.add("empty_caption", str(file))
                yield None
                continue
            yield file.relative_to(self.root).as_posix(), image, caption

    def nothing_readable(self) -> str:
        """The error when no image was read with a caption."""
        return (f"caption folder {self.root}: no readable image with a caption in "
                f"{len(self.files)} images ({self.skipped.summary()})")


def list_caption_folder(root: Path) -> CaptionFolderListing:
    """``root``'s images (searched recursively) and how each is captioned."""
    listed = list_folder(root)
    skipped = SkipReport()
    for reason, file in listed.skipped:
        skipped.add(reason, str(file))
    return CaptionFolderListing(root, listed.images, caption_dirs(listed.images), skipped)
