"""``exact_dedup``: drop exact duplicates, the first in pool order being kept.

The image hash is sha256 of the DECODED pixels (RGB, with the size), not of the file bytes: the
same picture stored twice as different files (PNG vs re-saved PNG, other metadata, a shard copy
of a folder image) is a duplicate, and in-memory sources have no file bytes at all. A lossy
re-encoding changes pixels and is left to ``semantic_dedup``. Captions are compared after
normalising (lowercase, punctuation stripped, whitespace collapsed).

``match``: ``image`` (same pixels), ``caption`` (same normalised caption) or ``pair`` (both).
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Literal

import numpy as np

from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class Spec(StepSpecBase):
    step: Literal["exact_dedup"]
    match: Literal["image", "caption", "pair"] = "image"


def normalise_caption(caption: str) -> str:
    """Lowercase, punctuation removed, runs of whitespace as one space, stripped."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def image_hash(image) -> str:
    """sha256 of an RGB image's size and pixels."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def caption_hash(caption: str) -> str:
    return hashlib.sha256(normalise_caption(caption).encode("utf-8")).hexdigest()


def first_equal(columns: list[np.ndarray]) -> np.ndarray:
    """Each row's first row (in order) with the same value in every column: by a stable sort
    of the rows' positions, ~30 bytes a row (a dict of the hashes as Python bytes held ~250,
    `np.unique` of them as one array ~200)."""
    n = len(columns[0])
    order = np.lexsort(columns[::-1])  # stable: equal rows in order, the first one first
    starts = np.ones(n, dtype=bool)  # where a run of equal rows begins, in sorted order
    for at in range(1, n, COMPARED_AT_ONCE):
        here = order[at:at + COMPARED_AT_ONCE]
        before = order[at - 1:at - 1 + len(here)]
        same = np.ones(len(here), dtype=bool)
        for column in columns:
            same &= column[here] == column[before]
        starts[at:at + len(here)] = ~same
    heads = np.flatnonzero(starts)
    firsts = np.empty(n, dtype=np.int64)
    firsts[order] = np.repeat(order[heads], np.diff(np.append(heads, n)))
    return firsts


COMPARED_AT_ONCE = 65_536  # sorted neighbours `first_equal` compares at once


class ExactDedup:
    """Hashes per item in ``map``; clusters of equal hashes in ``decide``."""

    Spec = Spec

    def __init__(self, spec: Spec):
        self.spec = spec

    @property
    def needs_images(self) -> bool:
        """``match: caption`` compares captions only: no image is decoded or hashed."""
        return self.spec.match != "caption"

    def prepare(self, context: StepContext) -> None:
        pass

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        # hex digests as ASCII bytes: 64 bytes a hash where a str column takes 256, and a
        # resumed run's cached str columns concatenate with them to the same hex strings
        images = [b""] * len(batch) if batch.images is None else \
            [image_hash(im).encode("ascii") for im in batch.images]  # b"": not hashed
        captions = [caption_hash(c).encode("ascii") for c in batch.captions]
        return {"image_hash": np.array(images, dtype=np.bytes_),  # S1 when not hashed
                "caption_hash": np.array(captions, dtype="S64")}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        match = self.spec.match
        what = {"image": "identical image", "caption": "identical caption (normalised)",
                "pair": "identical image and caption"}[match]
        clusters: dict[int, list[str]] = {}
        keep, reasons = np.ones(len(items), dtype=bool), [None] * len(items)
        names = {"image": ["image_hash"], "caption": ["caption_hash"],
                 "pair": ["image_hash", "caption_hash"]}[match]
        firsts = first_equal([columns[name] for name in names])
        for i in np.flatnonzero(firsts != np.arange(len(items))):
            j = int(firsts[i])
            keep[i] = False
            reasons[i] = f"exact duplicate of {items.keys[j]} ({what})"
            clusters.setdefault(j, [items.keys[j]]).append(items.keys[i])
        return Decision(keep=keep, reasons=reasons,
                        report={"clusters": [clusters[j] for j in sorted(clusters)]})
