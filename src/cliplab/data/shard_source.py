"""A shard folder read whole into memory, so every stage accepts ``{source: shards, path: DIR}``."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cliplab.data.shard_index import read_index
from cliplab.data.shard_stream import ShardStream
from cliplab.data.types import ImageTextPairs
from cliplab.errors import DataError


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    array = image.numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    out = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(out[..., None] if out.ndim == 2 else out.copy())


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
    size = tuple(images[0].shape[:2])
    images = [im if tuple(im.shape[:2]) == size else _resized(im, size) for im in images]
    if len({im.shape[-1] for im in images}) > 1:
        images = [im.expand(-1, -1, 3) if im.shape[-1] == 1 else im for im in images]
    group_ids = None
    if any(g is not None for g in groups):
        fresh = iter(range(max(g for g in groups if g is not None) + 1, 2**62))
        group_ids = torch.tensor([g if g is not None else next(fresh) for g in groups])
    index = read_index(path) if os.path.isdir(path) else None
    name = (index or {}).get("name") or os.path.basename(os.path.normpath(str(path)))
    return ImageTextPairs(torch.stack(images), captions, group_ids, name=name,
                          skipped=stream.skipped)
