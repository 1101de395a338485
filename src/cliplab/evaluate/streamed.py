"""A listed labelled set (an image folder, a manifest) decoded and encoded batch by batch, so a
one-off evaluation whose tasks only encode the set holds about one encode batch of its pixels,
not the whole set's (ImageNet-val's 50,000 images at 224 px: 7.5 GB).

It gives what loading the whole set and encoding it gives: the same samples (a file that does
not decode is skipped and counted as the whole load counts it), the same pixels and the same
encode batches, so the same features. They are cached under the listing's identity (each
file's path, size and mtime, the labels and the decoding), with the indices of the readable
files, so a second evaluation of the same listing with a cache folder decodes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cliplab.data.fingerprint import image_digest
from cliplab.data.images import UnreadableImage, as_model_input, fits_each_image
from cliplab.data.listed import ListedImages
from cliplab.data.types import LabelledImages, source_keys
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import (DEFAULT_PROBE_LAYERS, ENCODE_BATCH, ImageFeatures,
                                       encode_images)
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import image_tower_fingerprint
from cliplab.models.preprocess import PreprocessConfig

STREAM_BATCH = ENCODE_BATCH  # the whole set's encode batches, so the same features


@dataclass
class StreamedSet:
    """A streamed set: ``data`` holds its readable samples (labels, keys, the skip report; its
    images are 1x1 placeholders), ``features`` their features with the extra probe ``tag``
    (`FeatureCache.probe_tag`) from the image tower ``tower`` (`image_tower_fingerprint`),
    ``shape`` one image's shape as the whole set would hold it and ``digests`` each image's
    `image_digest` (a probe's leakage check compares them)."""

    data: LabelledImages
    features: ImageFeatures
    tag: str
    tower: str
    shape: tuple[int, ...]
    digests: list[bytes]


# a streaming plan: by set key, the one extra probe (and its layers) to compute with the set
StreamPlan = dict[str, tuple[str | None, int]]


def streaming_plan(tasks: Sequence[Any], key_of: Callable[[dict], str],
                   classifier_probe: str | None = None) -> StreamPlan:
    """The sets of ``tasks`` (`TaskSpecBase`: its module imports this one) to stream (by ``key_of`` their spec): those given by spec,
    without a ``shift`` (applied to the whole set's pixels), that every task reading them
    only encodes (``TaskSpecBase.encoded``); each with the extra probe its readers need (a
    task's `probes`, ``classifier_probe``: a classifier's)."""
    only: dict[str, bool] = {}
    probes: dict[str, set[tuple[str, int]]] = {}
    for task in tasks:
        for key, spec in task.data_keys():
            if not isinstance(spec, dict):
                continue
            name = key_of(spec)
            only[name] = only.get(name, True) and key in task.encoded \
                and spec.get("shift") is None
            if classifier_probe:
                probes.setdefault(name, set()).add((classifier_probe, DEFAULT_PROBE_LAYERS))
        for spec, kind, layers in task.probes():
            if isinstance(spec, dict):  # (the layers of tokens do not matter)
                layers = layers if kind == "layers" else DEFAULT_PROBE_LAYERS
                probes.setdefault(key_of(spec), set()).add((kind, layers))
    plan: StreamPlan = {}
    for name, encoded in only.items():
        wanted = probes.get(name, set())
        # two extra probes of one set would need two streamed passes (or its pixels held
        # between them): such a set is decoded whole, as before
        if encoded and len(wanted) <= 1:
            plan[name] = next(iter(wanted), (None, DEFAULT_PROBE_LAYERS))
    return plan


class _Whole(Exception):
    """The set is not streamed as the whole load would hold it: it is loaded whole."""


# spec options that change nothing of a set's pixels: not part of its listing's identity
NOT_PIXELS = ("progress", "templates")


def listing_identity(listed: ListedImages, spec: dict, model_input: str) -> str | None:
    """A hash of what a streamed set's features depend on: ``spec`` (but `NOT_PIXELS`),
    ``model_input`` (what its images are decoded to), each listed file's key, path, size and
    mtime, the labels and classes; None when a sample has no file to identify it by."""
    data, rows = listed.data, []
    for key in source_keys(data):
        deferred = listed.decoders.get(key)
        if deferred is None or deferred.path is None:
            return None
        try:
            stat = os.stat(deferred.path)
            rows.append([key, os.path.abspath(deferred.path), stat.st_size, stat.st_mtime_ns])
        except OSError:  # counted as unreadable when streamed
            rows.append([key, os.path.abspath(deferred.path), None, None])
    pixels = {k: v for k, v in spec.items() if k not in NOT_PIXELS}
    h = hashlib.sha256(json.dumps([pixels, model_input, rows, data.labels.tolist(),
                                   data.classnames], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def stream_set(model: DualEncoder, listed: ListedImages, cache: FeatureCache, spec: dict,
               model_input: str, probe: str | None, layers: int, precision: str,
               progress: bool = True, desc: str | None = None) -> StreamedSet | None:
    """``listed`` decoded and encoded batch by batch (with ``probe``'s features; ``desc``:
    the progress bar's), or served from ``cache``; None when it must be loaded whole instead:
    a sample without a file, images of sizes the whole load would square together, no
    readable image, or a class left with none (the whole load says so)."""
    identity = listing_identity(listed, spec, model_input)
    if identity is None:
        return None
    tower = image_tower_fingerprint(model)  # (a hash of its weights: once)
    try:
        feats, extras = cache.listed_features(
            tower, identity, probe, layers, precision,
            lambda: _encode(model, listed, probe, layers, precision, progress, desc))
    except _Whole:
        return None
    data, readable = listed.data, extras["readable"]
    keys, kept = source_keys(data), torch.zeros(len(data), dtype=torch.bool)
    kept[readable] = True
    skipped = copy.deepcopy(data.skipped)
    for i in (~kept).nonzero().flatten().tolist():
        skipped.add("unreadable_image", listed.decoders[keys[i]].name)
    return StreamedSet(dataclasses.replace(data.subset(readable), skipped=skipped), feats,
                       FeatureCache.probe_tag(probe, layers), tower,
                       tuple(extras["shape"].tolist()),
                       [bytes(row) for row in extras["digests"].numpy()])


def _encode(model: DualEncoder, listed: ListedImages, probe: str | None, layers: int,
            precision: str, progress: bool, desc: str | None
            ) -> tuple[ImageFeatures, dict[str, torch.Tensor]]:
    """Decode and encode ``listed`` a batch at a time; its features, and the indices of its
    readable files, one image's shape and each image's digest."""
    data = listed.data
    keys, readable, digests, parts = source_keys(data), [], [], []
    batch: list[torch.Tensor] = []
    shape = None

    def flush() -> None:
        parts.append(encode_images(model, torch.stack(batch), STREAM_BATCH, False, probe=probe,
                                   probe_layers=layers, precision=precision))
        batch.clear()

    for i in tqdm(range(len(data)), desc=desc or f"encode {data.name}", unit="img", leave=False,
                  disable=not progress):
        deferred = listed.decoders[keys[i]]
        try:
            image = deferred.decode()
        except UnreadableImage:
            continue
        if shape is None:
            shape = tuple(image.shape)
        elif tuple(image.shape) != shape:
            image = _as_held(image, shape, deferred.model_input)
        digests.append(image_digest(image))  # 16 bytes: stored whichever tasks read the set
        readable.append(i)
        batch.append(image)
        if len(batch) == STREAM_BATCH:
            flush()
    if batch:
        flush()
    if not readable or set(data.labels[readable].tolist()) != set(data.labels.tolist()):
        raise _Whole  # the whole load's error (nothing readable) or warning (an empty class)
    feats = ImageFeatures(torch.cat([p.embeddings for p in parts]),
                          torch.cat([p.backbone for p in parts]),
                          torch.cat([p.probe for p in parts]) if parts[0].probe is not None
                          else None, parts[0].probe_kind)
    extras = {"readable": torch.tensor(readable, dtype=torch.long),
              "shape": torch.tensor(shape, dtype=torch.long),
              "digests": torch.from_numpy(
                  np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16).copy())}
    return feats, extras


def _as_held(image: torch.Tensor, shape: tuple[int, ...],
             model_input: PreprocessConfig | None) -> torch.Tensor:
    """An image of another shape than the set's first, as the whole set would hold it: the
    model's input (`as_model_input`) where the first one is that already (the whole load makes
    each of a set of mixed sizes so, `stack_images`); else the whole load would make them all
    something else (squares of their median side, or each the model's input): `_Whole`."""
    side = model_input.image_size if fits_each_image(model_input) else None
    if side is None or shape != (side, side, image.shape[-1]):
        raise _Whole
    return as_model_input(image, model_input)
