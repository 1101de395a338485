"""Data sources by name, as a config writes them: ``{source: shapes, n: 4000, seed: 1}``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from cliplab.data.clip_benchmark import load_clip_benchmark
from cliplab.data.digits import load_digits
from cliplab.data.fashion_mnist import load_fashion_mnist
from cliplab.data.image_folder import load_image_folder
from cliplab.data.manifest import load_manifest
from cliplab.data.multilabel import MultiLabelImages, load_multilabel_manifest, shapes_multilabel
from cliplab.data.pairs import labelled_to_pairs, split_classes
from cliplab.data.shard_source import load_shards
from cliplab.data.shapes import load_shapes, shapes_classification
from cliplab.data.shift import apply_shift, parse_shift
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError


def _shapes(attribute: str | None = None, multilabel: bool = False,
            **kw) -> LabelledImages | ImageTextPairs | MultiLabelImages:
    """`shapes` scenes as pairs, as labelled images by ``attribute`` (shape / color), or with
    ``multilabel: true`` as multi-label images (every colour/shape in a scene)."""
    if multilabel:
        return shapes_multilabel(attribute=attribute or "color", **kw)
    if attribute is None:
        return load_shapes(**kw)
    kw.pop("kinds", None)
    return shapes_classification(attribute=attribute, **kw)


SOURCES: dict[str, Callable[..., LabelledImages | ImageTextPairs | MultiLabelImages]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "shapes": _shapes,
    "manifest": load_manifest,
    "clip-benchmark": load_clip_benchmark,
    "shards": load_shards,
    "image-folder": load_image_folder,
    "multilabel-manifest": load_multilabel_manifest,
}


def load_source(spec: dict) -> LabelledImages | ImageTextPairs:
    """Load the dataset a spec names; ``holdout`` (a list of class names) drops those classes;
    ``shift`` (e.g. ``invert``, ``noise:0.3``, ``blur:1.5``; see `cliplab.data.shift`) transforms
    the images, seeded by ``shift_seed``."""
    spec = dict(spec)
    name = spec.pop("source", None)
    if name not in SOURCES:
        raise ConfigError(f"unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")
    holdout = spec.pop("holdout", None)
    shift, shift_seed = spec.pop("shift", None), spec.pop("shift_seed", 0)
    if shift is not None:
        parse_shift(shift)  # a bad shift fails before a slow load
    fn = SOURCES[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(spec) - set(params))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for data source {name!r}; "
                              f"valid: {sorted(params)}")
    try:
        data = fn(**spec)
    except TypeError as err:  # an option the source's signature does not take
        raise ConfigError(f"bad option for data source {name!r}: {err}") from None
    if holdout:
        if not isinstance(data, LabelledImages):
            raise ConfigError(f"holdout needs a labelled source; {name!r} gives image-text pairs")
        data, _ = split_classes(data, list(holdout))
    if shift is not None:
        data = dataclasses.replace(data, images=apply_shift(data.images, shift, int(shift_seed)),
                                   name=f"{data.name}-{shift}")
    return data


def as_pairs(data: LabelledImages | ImageTextPairs) -> ImageTextPairs:
    """Pairs as they are; labelled images become one caption per template, grouped by class."""
    return data if isinstance(data, ImageTextPairs) else labelled_to_pairs(data)


def as_labelled(data: LabelledImages | ImageTextPairs, where: str) -> LabelledImages:
    if not isinstance(data, LabelledImages):
        raise ConfigError(f"{where} needs labelled images (a classification source)")
    return data
