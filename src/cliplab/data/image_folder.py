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
is its caption; ``data shard`` does so by itself when any image has one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cliplab.data.folder_files import (SkippedFile, caption_dirs, image_caption,
                                       image_metadata, list_folder)
from cliplab.data.images import UnreadableImage, decode_image, stack_images
from cliplab.data.prompt_files import CLASSNAMES_FILE, read_lines, read_templates
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import DataError

def _visible(name: str) -> bool:
    return not name.startswith(".")


def folder_classnames(root: Path, folders: list[Path]) -> list[str]:
    """Names of the class ``folders``: from ``classnames.txt`` if present, else folder names
    with underscores as spaces."""
    file = root / CLASSNAMES_FILE
    if not file.is_file():
        return [f.name.replace("_", " ").strip() for f in folders]
    names = read_lines(file)
    if len(names) != len(folders):
        raise DataError(f"{file}: {len(names)} class names for {len(folders)} class folders "
                        f"({', '.join(f.name for f in folders)}); give one name per folder, "
                        "in sorted folder order")
    return names


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
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image-folder {root}: image_size must be a positive int, "
                        f"got {image_size!r}")
    if captions:
        if templates:
            raise DataError(f"image folder {root}: templates apply to a class folder, not to "
                            "captions: true")
        return load_caption_folder(root, image_size, progress)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders; expected "
                        "ROOT/<class name>/<image files>")
    classnames = folder_classnames(root, folders)
    templates = list(templates) if templates else read_templates(root)
    skipped = SkipReport()
    loose = list_folder(root, recursive=False)  # files beside the class folders
    for reason, path in [("outside_class_folder", p) for p in loose.images] + loose.skipped:
        skipped.add(reason, str(path))
    files = []
    for label, folder in enumerate(folders):
        listed = list_folder(folder, top=root)
        files += [(label, f) for f in listed.images]
        for reason, path in listed.skipped:
            skipped.add(reason, str(path))
    images, labels, keys = [], [], []
    for label, file in tqdm(files, desc=f"read {root.name}", disable=not progress, leave=False):
        try:
            images.append(decode_image(file, image_size))
        except UnreadableImage:
            skipped.add("unreadable_image", str(file))
            continue
        labels.append(label)
        keys.append(file.relative_to(root).as_posix())
    if not images:
        raise DataError(f"image folder {root}: no readable image in {len(files)} files "
                        f"({skipped.summary()})")
    empty = [folders[c].name for c in sorted(set(range(len(folders))) - set(labels))]
    if empty:  # still classes (zero-shot candidates), but nothing of theirs is scored or learnt
        print(f"image folder {root}: warning: {len(empty)} class folder(s) hold no readable "
              f"image: {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}",
              file=sys.stderr)
    return LabelledImages(stack_images(images, f"image folder {root}"), torch.tensor(labels),
                          classnames, templates, name=root.name, skipped=skipped, keys=keys)


def load_caption_folder(path: str | Path, image_size: PositiveInt | None = None,
                        progress: bool = True) -> ImageTextPairs:
    """A folder's images (searched recursively) as pairs, captioned as `image_caption` says:
    its ``NAME.txt``, in a sub-folder without any its folder's name.

    Skipped and counted by path: undecodable images, images of a caption folder without a
    caption (``missing_caption``), captions or metadata not UTF-8 text (``bad_caption``,
    ``bad_metadata``) and files that are no image. ``.keys`` holds each image's path relative
    to ``path``."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    listed = list_folder(root)
    captioned = caption_dirs(listed.images)
    skipped = SkipReport()
    for reason, file in listed.skipped:
        skipped.add(reason, str(file))
    images, captions, keys = [], [], []
    for file in tqdm(listed.images, desc=f"read {root.name}", disable=not progress, leave=False):
        try:
            image = decode_image(file, image_size)
            caption = image_caption(file, root, captioned)
            image_metadata(file)  # metadata that is not UTF-8 text skips its image too
        except UnreadableImage:
            skipped.add("unreadable_image", str(file))
            continue
        except SkippedFile as err:
            skipped.add(err.reason, str(err.path or file))
            continue
        images.append(image)
        captions.append([caption])
        keys.append(file.relative_to(root).as_posix())
    if not images:
        raise DataError(f"caption folder {root}: no readable image with a caption in "
                        f"{len(listed.images)} images ({skipped.summary()})")
    return ImageTextPairs(stack_images(images, f"caption folder {root}"), captions,
                          name=root.name, skipped=skipped, keys=keys)
