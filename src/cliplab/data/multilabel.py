"""Multi-label sets: images that each carry any number of the classes (a multi-hot matrix).

Two sources: ``shapes`` scenes labelled by every colour (or shape) they contain (two-object
relation scenes give one or two labels each), and manifests with several labels per row
(``"cat|dog"`` in a CSV cell, or a JSON list in a JSONL/Parquet row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cliplab.data.manifest import ManifestDataset, read_manifest_rows
from cliplab.data.shapes import COLORS, SHAPES, render, sample_scenes
from cliplab.data.types import SkipReport
from cliplab.errors import DataError

DEFAULT_TEMPLATES = ["a photo of a {}."]
SHAPES_TEMPLATES = {"color": ["a {} shape.", "a {} object.", "something coloured {}."],
                    "shape": ["a {}.", "a {} shape.", "a drawing of a {}."]}


@dataclass
class MultiLabelImages:
    """Images with a multi-hot ``targets`` matrix ``[N, C]`` (bool), class names and templates."""

    images: torch.Tensor  # uint8 [N, H, W, C]
    targets: torch.Tensor  # bool [N, num_classes]
    classnames: list[str]
    templates: list[str]
    name: str = "multilabel"
    skipped: SkipReport = field(default_factory=SkipReport)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError("images must be a uint8 tensor [N, H, W, C]")
        if self.targets.shape != (len(self.images), len(self.classnames)):
            raise ValueError(f"targets must be [{len(self.images)}, {len(self.classnames)}], "
                             f"got {list(self.targets.shape)}")
        self.targets = self.targets.bool()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def prompt_names(self) -> list[str]:
        return self.classnames


def shapes_multilabel(n: int = 1000, seed: int = 0, attribute: str = "color",
                      kinds: Sequence[str] = ("relation",), image_size: int = 64,
                      colors: Sequence[str] | None = None,
                      shapes: Sequence[str] | None = None) -> MultiLabelImages:
    """`shapes` scenes labelled by every ``attribute`` value (colour or shape) they show."""
    if attribute not in SHAPES_TEMPLATES:
        raise DataError(f"shapes: multi-label attribute must be one of "
                        f"{sorted(SHAPES_TEMPLATES)}, got {attribute!r}")
    scenes = sample_scenes(n, seed, kinds, colors, shapes, image_size)
    classnames = list(colors or COLORS) if attribute == "color" else list(shapes or SHAPES)
    targets = torch.zeros(n, len(classnames), dtype=torch.bool)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene)
        for obj in scene.objects:
            targets[i, classnames.index(getattr(obj, attribute))] = True
    return MultiLabelImages(torch.from_numpy(images), targets, classnames,
                            list(SHAPES_TEMPLATES[attribute]), name=f"shapes-multi-{attribute}")


def _split_labels(value, sep: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(sep)
    return [str(v).strip() for v in items if str(v).strip()]


def load_multilabel_manifest(path: str | os.PathLike, label_col: str = "labels", sep: str = "|",
                             image_col: str | None = None, image_size: int | None = None,
                             classnames: Sequence[str] | None = None,
                             templates: Sequence[str] | None = None,
                             progress: bool = True) -> MultiLabelImages:
    """A manifest whose ``label_col`` holds several class names per row (``sep``-separated, or
    a list in JSONL/Parquet). Classes are ``classnames`` if given, else every name seen, sorted.
    Rows without a label or with a name not in ``classnames`` are skipped and counted."""
    path = Path(path)
    data = ManifestDataset(path, kind="pairs", image_size=image_size, image_col=image_col,
                           caption_col=label_col)
    rows = read_manifest_rows(path)
    per_row = [_split_labels(r.get(label_col), sep) for r in rows]
    names = list(classnames) if classnames else sorted({n for labels in per_row for n in labels})
    index = {name: i for i, name in enumerate(names)}
    report = SkipReport()
    images, targets, size = [], [], None
    for i in tqdm(range(len(data)), desc=f"decoding {path.name}", disable=not progress,
                  leave=False):
        labels = per_row[i]
        if not labels or any(n not in index for n in labels):
            report.add("bad_label", data.keys[i])
            continue
        image, reason = data.load_image(i)
        if image is None:
            report.add(reason, data.keys[i])
            continue
        size = size or image.size
        if image.size != size:
            image = image.resize(size)
        images.append(np.asarray(image, dtype=np.uint8))
        row = torch.zeros(len(names), dtype=torch.bool)
        row[[index[n] for n in labels]] = True
        targets.append(row)
    if not images:
        raise DataError(f"{path}: no usable sample in {len(data)} rows ({report.summary()})")
    return MultiLabelImages(torch.from_numpy(np.stack(images)), torch.stack(targets), names,
                            list(templates or DEFAULT_TEMPLATES), name=path.stem, skipped=report)
