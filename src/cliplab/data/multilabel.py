"""Multi-label manifests: several class names per row (``"cat|dog"`` in a CSV cell, or a JSON
list in a JSONL/Parquet row). The ``shapes`` multi-label scenes are in ``cliplab.data.shapes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cliplab.data.images import ImageStack
from cliplab.data.manifest import ManifestDataset
from cliplab.data.prompt_files import DEFAULT_TEMPLATES
from cliplab.data.types import MultiLabelImages, SkipReport
from cliplab.errors import DataError

__all__ = ["MultiLabelImages", "load_multilabel_manifest"]



def _split_labels(value, sep: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(sep)
    return [str(v).strip() for v in items if str(v).strip()]


def load_multilabel_manifest(path: str | os.PathLike, label_col: str = "labels", sep: str = "|",
                             image_col: str | None = None, image_size: PositiveInt | None = None,
                             classnames: Sequence[str] | None = None,
                             templates: Sequence[str] | None = None,
                             progress: bool = True) -> MultiLabelImages:
    """A manifest whose ``label_col`` holds several class names per row (``sep``-separated, or
    a list in JSONL/Parquet). Classes are ``classnames`` if given, else every name seen, sorted.
    Rows without a label or with a name not in ``classnames`` are skipped and counted."""
    path = Path(path)
    data = ManifestDataset(path, kind="pairs", image_size=image_size, image_col=image_col,
                           caption_col=label_col, caption_flag="label_col")
    per_row = [_split_labels(r.get(label_col), sep) for r in data.rows]
    names = list(classnames) if classnames else sorted({n for labels in per_row for n in labels})
    index = {name: i for i, name in enumerate(names)}
    report = SkipReport()
    images, targets = ImageStack(len(data)), []
    for i in tqdm(range(len(data)), desc=f"decoding {path.name}", disable=not progress,
                  leave=False):
        labels = per_row[i]
        if not labels or any(n not in index for n in labels):
            report.add("bad_label", data.keys[i])
            continue
        image, reason = data.read_image(i)  # its labels were checked above
        if image is None:
            report.add(reason, data.keys[i])
            continue
        images.append(image)
        row = torch.zeros(len(names), dtype=torch.bool)
        row[[index[n] for n in labels]] = True
        targets.append(row)
    if not images:
        raise DataError(f"{path}: no usable sample in {len(data)} rows ({report.summary()})")
    return MultiLabelImages(images.stacked(str(path)), torch.stack(targets), names,
                            list(templates or DEFAULT_TEMPLATES), name=path.stem, skipped=report)
