"""Datasets in CLIP_benchmark's WebDataset layout, read from a local folder with no conversion.

Layout: ``ROOT/SPLIT/*.tar`` shards whose samples are ``KEY.<image ext>`` plus ``KEY.cls`` (a class
index) or ``KEY.txt`` (captions, one per line), and, for classification, ``ROOT/classnames.txt``
(one name per line) and ``ROOT/zeroshot_classification_templates.txt`` (one template per line,
``{c}`` marking the class name).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
DEFAULT_TEMPLATES = ["a photo of a {}."]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _samples(shards: list[Path], progress: bool):
    """Yield (shard:key, {ext: bytes}) per sample; members of one key are adjacent in a shard."""
    for shard in tqdm(shards, desc="read shards", disable=not progress, leave=False):
        try:
            tar = tarfile.open(shard)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"cannot read shard {shard}: {err}") from None
        with tar:
            current, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key, _, ext = name.partition(".")
                if key != current and current is not None:
                    yield f"{shard.name}:{current}", parts
                    parts = {}
                current = key
                parts[ext.lower()] = tar.extractfile(member).read()
            if current is not None:
                yield f"{shard.name}:{current}", parts


def load_clip_benchmark(root: str | Path, split: str = "test", image_size: int | None = None,
                        progress: bool = True) -> LabelledImages | ImageTextPairs:
    """A CLIP_benchmark WebDataset folder as labelled images (``.cls``) or pairs (``.txt``).

    Images are decoded to RGB and resized to ``image_size`` squares (default: the first
    image's size). Unreadable images and samples without a label/caption are skipped and
    counted in ``.skipped``.
    """
    root = Path(root)
    shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise DataError(f"no .tar shards in {root / split}; expected CLIP_benchmark's layout "
                        "ROOT/SPLIT/*.tar")
    classnames_file = root / "classnames.txt"
    classnames = _read_lines(classnames_file) if classnames_file.is_file() else None
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = [t.replace("{c}", "{}") for t in _read_lines(templates_file)] \
        if templates_file.is_file() else list(DEFAULT_TEMPLATES)

    skipped = SkipReport()
    images, labels, captions = [], [], []
    size = image_size
    for key, parts in _samples(shards, progress):
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        target = parts.get("cls") if classnames is not None else parts.get("txt")
        if ext is None:
            skipped.add("missing_image", key)
            continue
        if target is None:
            skipped.add("missing_label" if classnames is not None else "missing_caption", key)
            continue
        try:
            image = Image.open(io.BytesIO(parts[ext])).convert("RGB")
        except Exception:  # PIL raises many types for corrupt files
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
            caps = [c.strip() for c in target.decode("utf-8", "replace").splitlines() if c.strip()]
            if not caps:
                skipped.add("empty_caption", key)
                continue
            captions.append(caps)
        size = size or image.width
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        images.append(np.asarray(image))
    if not images:
        raise DataError(f"no usable sample in {root / split} ({skipped.summary()})")
    pixels = torch.from_numpy(np.stack(images))
    name = f"{root.name}-{split}"
    if classnames is not None:
        return LabelledImages(pixels, torch.tensor(labels), classnames, templates, name, skipped)
    return ImageTextPairs(pixels, captions, name=name, skipped=skipped)
