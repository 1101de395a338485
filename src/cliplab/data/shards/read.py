"""A shard folder read whole into memory, so every stage accepts ``{source: shards, path: DIR}``."""

from __future__ import annotations

import os

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cliplab.data.images import ImageStack
from cliplab.data.shards.layout import read_index
from cliplab.data.shards.samples import bare_key
from cliplab.data.shards.stream import ShardStream
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import DataError, warn


def load_shards(path: str | os.PathLike, image_size: PositiveInt | None = None,
                progress: bool = True) -> ImageTextPairs | LabelledImages:
    """All samples of the shards at ``path`` (folder or brace pattern) in shard order, with all
    their captions, groups and hard-negative partners (``partner_key``s resolved to indices; a
    partner that is not among the samples read, or whose key is not unique, becomes -1 with a
    warning). Shards of a classification source (the folder's ``index.json`` lists its class
    names, and every sample's group is one of them) come back as labelled images, so
    classification stages take them too. Images are resized to ``image_size`` squares; without
    it, images of different sizes become centre squares (`stack_images`); if some are
    grayscale and some colour, all become colour. Corrupt
    samples are skipped and counted in ``.skipped``; ``.keys`` names each sample read by its
    ``shard:key`` (``00002.tar:000000020``)."""
    stream = ShardStream(path, shuffle=False, caption="all", image_size=image_size,
                         rank=0, world_size=1)
    try:
        total = sum(stream.rank_sample_counts())  # the bar's total, the images' room
    except DataError:  # a tar cut short: the stream reads what it can and counts the rest
        total = None
    images = ImageStack(total or 1024)
    captions, groups, keys, partner_keys, sources = [], [], [], [], []
    for sample in tqdm(stream, total=total, desc="read shards", unit="img", disable=not progress):
        images.append(sample["image"])
        captions.append(sample["caption"])
        groups.append(sample["group"])
        keys.append(bare_key(sample["key"]))
        sources.append(sample["key"])
        partner_keys.append(sample["partner_key"])
    if not images:
        hint = "; its samples hold a class (KEY.cls) and no caption: read such a set as " \
               "{source: clip-benchmark, root: ROOT} (ROOT/SPLIT/*.tar, ROOT/classnames.txt)" \
            if stream.skipped.counts.get("class_only") else ""
        raise DataError(f"no usable sample in {path} ({stream.skipped.summary()}){hint}")
    group_ids = None
    if any(g is not None for g in groups):
        fresh = iter(range(max(g for g in groups if g is not None) + 1, 2**62))
        group_ids = torch.tensor([g if g is not None else next(fresh) for g in groups])
    index = read_index(path) if os.path.isdir(path) else None
    name = (index or {}).get("name") or os.path.basename(os.path.normpath(str(path)))
    if has_labels(index, groups):
        return LabelledImages(images.stacked(f"shards {path}"), group_ids,
                              list(index["classnames"]),
                              list(index.get("templates") or ["{}"]), name,
                              skipped=stream.skipped, descriptions=index.get("descriptions"),
                              keys=sources)
    partners = resolve_partners(keys, partner_keys, path)
    return ImageTextPairs(images.stacked(f"shards {path}"), captions, group_ids, name=name,
                          skipped=stream.skipped, partners=partners, keys=sources)


def has_labels(index: dict | None, groups: list[int | None]) -> bool:
    """Whether the shards hold a classification set: the index names its classes and every
    sample's group is one of them (`write_shards` writes a labelled set's class as its group)."""
    classnames = (index or {}).get("classnames")
    return (isinstance(classnames, list) and len(classnames) > 0
            and all(g is not None and 0 <= g < len(classnames) for g in groups))


def resolve_partners(keys: list[str], partner_keys: list[str | None],
                     where: str | os.PathLike) -> torch.Tensor | None:
    """Each sample's partner index (int64, -1: none) from its ``partner_key``, None when no
    sample names one. Keys that are missing, not unique or the sample's own become -1, and a
    warning says how many."""
    partners, warning = partner_indices(keys, partner_keys, where)
    if warning:
        warn(warning)
    return partners


def partner_indices(keys: list[str], partner_keys: list[str | None],
                    where: str | os.PathLike) -> tuple[torch.Tensor | None, str | None]:
    """`resolve_partners`' indices, and its warning (None: every partner key was found)
    to give, not given."""
    if all(p is None for p in partner_keys):
        return None, None
    index: dict[str, int | None] = {}
    for i, key in enumerate(keys):
        index[key] = None if key in index else i  # None: the key is not unique
    partners, lost = [-1] * len(keys), 0
    for i, key in enumerate(partner_keys):
        j = None if key is None else index.get(key)
        if j is not None and j != i:
            partners[i] = j
        elif key is not None:
            lost += 1
    text = None
    if lost:
        named = sum(key is not None for key in partner_keys)
        text = (f"{where}: {lost} of {named} partner_key(s) name no single other sample "
                "read; those samples have no partner")
    return torch.tensor(partners, dtype=torch.int64), text
