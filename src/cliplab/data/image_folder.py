"""Image folders: one sub-folder per class (``ROOT/golden_retriever/001.jpg``), the layout of
torchvision's ``ImageFolder`` and of most hand-made evaluation sets.

Class names come from the sub-folder names (sorted, underscores read as spaces) unless
``ROOT/classnames.txt`` gives one name per line in the same sorted order. Prompt templates come
from ``ROOT/templates.txt`` or ``ROOT/zeroshot_classification_templates.txt`` (one per line,
``{}`` or ``{c}`` marking the class name) when present. Every non-hidden file under a class
folder is read as an image; the ones that cannot be decoded are skipped and counted with their
paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cliplab.data.types import LabelledImages, SkipReport
from cliplab.errors import DataError

DEFAULT_TEMPLATES = ["a photo of a {}."]
CLASSNAMES_FILE = "classnames.txt"
TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def folder_classnames(root: Path, folders: list[Path]) -> list[str]:
    """Names of the class ``folders``: from ``classnames.txt`` if present, else folder names
    with underscores as spaces."""
    file = root / CLASSNAMES_FILE
    if not file.is_file():
        return [f.name.replace("_", " ").strip() for f in folders]
    names = _lines(file)
    if len(names) != len(folders):
        raise DataError(f"{file}: {len(names)} class names for {len(folders)} class folders "
                        f"({', '.join(f.name for f in folders)}); give one name per folder, "
                        "in sorted folder order")
    return names


def folder_templates(root: Path) -> list[str]:
    """Templates from the first template file present, ``{c}`` rewritten as ``{}``."""
    for name in TEMPLATE_FILES:
        if (root / name).is_file():
            templates = [t.replace("{c}", "{}") for t in _lines(root / name)]
            if not templates:
                raise DataError(f"{root / name}: no templates; write one per line, e.g. "
                                "'a photo of a {}.'")
            return templates
    return list(DEFAULT_TEMPLATES)


def load_image_folder(path: str | Path, image_size: int | None = None,
                      templates: list[str] | None = None,
                      progress: bool = True) -> LabelledImages:
    """All images under ``path``'s class sub-folders as labelled images.

    Images are decoded to RGB and resized (bilinear) to ``image_size`` squares, default the
    first good image's size. Unreadable files are skipped and listed in ``.skipped`` under
    ``unreadable_image``; ``templates`` overrides the folder's template file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image-folder {root}: image_size must be a positive int, "
                        f"got {image_size!r}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders; expected "
                        "ROOT/<class name>/<image files>")
    classnames = folder_classnames(root, folders)
    templates = list(templates) if templates else folder_templates(root)
    files = [(label, f) for label, folder in enumerate(folders)
             for f in sorted(folder.rglob("*"))
             if f.is_file() and all(_visible(p) for p in f.relative_to(folder).parts)]

    skipped = SkipReport()
    images, labels = [], []
    size = (image_size, image_size) if image_size else None
    for label, file in tqdm(files, desc=f"read {root.name}", disable=not progress, leave=False):
        try:
            with Image.open(file) as im:
                image = im.convert("RGB")
        except _PIL_ERRORS:
            skipped.add("unreadable_image", str(file))
            continue
        size = size or image.size
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        images.append(np.asarray(image))
        labels.append(label)
    if not images:
        raise DataError(f"image folder {root}: no readable image in {len(files)} files "
                        f"({skipped.summary()})")
    return LabelledImages(torch.from_numpy(np.stack(images)), torch.tensor(labels),
                          classnames, templates, name=root.name, skipped=skipped)
