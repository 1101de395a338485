"""Datasets in CLIP_benchmark's WebDataset layout, read from a local folder with no conversion.

Layout: ``ROOT/SPLIT/*.tar`` shards whose samples are ``KEY.<image ext>`` plus ``KEY.cls`` (a class
index) or ``KEY.txt`` (captions, one per line), and, for classification, ``ROOT/classnames.txt``
(one name per line) and ``ROOT/zeroshot_classification_templates.txt`` (one template per line,
``{c}`` marking the class name).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cliplab.data.images import UnreadableImage, decode_image, stack_images
from cliplab.data.prompt_files import (CLASSNAMES_FILE, TEMPLATE_FILES, read_lines,
                                       read_templates)
from cliplab.data.shards.samples import image_part, raw_samples, sample_key, text_lines
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import DataError, warn


def load_clip_benchmark(root: str | Path, split: str = "test",
                        image_size: PositiveInt | None = None,
                        progress: bool = True) -> LabelledImages | ImageTextPairs:
    """A CLIP_benchmark WebDataset folder as labelled images (``.cls``) or pairs (``.txt``).

    Images are decoded to RGB and resized to ``image_size`` squares (default: the first
    image's size). Unreadable images and shards, and samples without a label/caption are
    skipped and counted in ``.skipped``.
    """
    root = Path(root)
    shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise DataError(f"no .tar shards in {root / split}; expected CLIP_benchmark's layout "
                        "ROOT/SPLIT/*.tar")
    classnames_file = root / CLASSNAMES_FILE
    classnames = read_lines(classnames_file) if classnames_file.is_file() else None
    templates = read_templates(root)
    if classnames is not None and not any((root / name).is_file() for name in TEMPLATE_FILES):
        # CLIP_benchmark then prompts with its per-dataset templates: numbers would differ
        warn(f"clip-benchmark {root}: no {TEMPLATE_FILES[1]}; zero-shot prompts use the default "
             f"template{'s' * (len(templates) > 1)} {', '.join(map(repr, templates))}")

    skipped = SkipReport()
    images, labels, captions, keys = [], [], [], []
    for raw in tqdm(raw_samples(shards), desc="read shards", unit="img", disable=not progress,
                    leave=False):
        key = sample_key(raw)
        if "__error__" in raw:
            skipped.add(raw["__error__"], key)
            continue
        ext = image_part(raw)
        target = raw.get("cls") if classnames is not None else raw.get("txt")
        if ext is None:
            skipped.add("missing_image", key)
            continue
        if target is None:
            labelled_only = classnames is None and "cls" in raw
            skipped.add("label_without_classnames" if labelled_only else
                        "missing_label" if classnames is not None else "missing_caption", key)
            continue
        try:
            image = decode_image(raw[ext], image_size, name=key)
        except UnreadableImage:
            skipped.add("unreadable_image", key)
            continue
        if classnames is not None:
            try:
                label = int(target.decode().strip())
            except ValueError:
                label = -1
            if not 0 <= label < len(classnames):
                skipped.add("bad_label", key)
                continue
            labels.append(label)
        else:
            caps = text_lines(target)
            if not caps:
                skipped.add("empty_caption", key)
                continue
            captions.append(caps)
        images.append(image)
        keys.append(key)  # its source item, whatever was skipped before it
    if not images and skipped.counts.get("label_without_classnames"):
        raise DataError(f"{root / split}: samples carry class labels (.cls) but "
                        f"{classnames_file} is missing; add it (one class name per line, in "
                        "label order)")
    if not images:
        raise DataError(f"no usable sample in {root / split} ({skipped.summary()})")
    pixels = stack_images(images, str(root / split))
    name = f"{root.name}-{split}"
    if classnames is not None:
        return LabelledImages(pixels, torch.tensor(labels), classnames, templates, name, skipped,
                              keys=keys)
    return ImageTextPairs(pixels, captions, name=name, skipped=skipped, keys=keys)
