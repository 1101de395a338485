"""A shard folder read whole into memory, so every stage accepts ``{source: shards, path: DIR}``."""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from cliplab.data.images import stack_images
from cliplab.data.shards.layout import read_index
from cliplab.data.shards.stream import ShardStream
from cliplab.data.types import ImageTextPairs
from cliplab.errors import DataError


def load_shards(path: str | os.PathLike, image_size: int | None = None,
                progress: bool = True) -> ImageTextPairs:
    """All samples of the shards at ``path`` (folder or brace pattern) in shard order, with all
    their captions and groups. Images are resized to ``image_size`` squares, else to the first
    image's size; if some are grayscale and some colour, all become colour. Corrupt samples
    are skipped and counted in ``.skipped``."""
    stream = ShardStream(path, shuffle=False, caption="all", image_size=image_size,
                         rank=0, world_size=1)
    total = sum(stream.rank_sample_counts()) if progress else None
    images, captions, groups = [], [], []
    for sample in tqdm(stream, total=total, desc="read shards", unit="img", disable=not progress):
        images.append(sample["image"])
        captions.append(sample["caption"])
        groups.append(sample["group"])
    if not images:
        raise DataError(f"no usable sample in {path} ({stream.skipped.summary()})")
    group_ids = None
    if any(g is not None for g in groups):
        fresh = iter(range(max(g for g in groups if g is not None) + 1, 2**62))
        group_ids = torch.tensor([g if g is not None else next(fresh) for g in groups])
    index = read_index(path) if os.path.isdir(path) else None
    name = (index or {}).get("name") or os.path.basename(os.path.normpath(str(path)))
    return ImageTextPairs(stack_images(images), captions, group_ids, name=name,
                          skipped=stream.skipped)
