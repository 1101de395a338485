"""Data sources by name, as a config writes them: ``{source: shapes, n: 4000, seed: 1}``.

A source is one function (its keyword arguments are the spec's options) returning labelled
images, image-text pairs or multi-label images. Adding one = its module + one ``SOURCES`` line
(``"name": "module:function"``, imported only when that source is used).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable

from cliplab.data.pairs import labelled_to_pairs, select_classes, split_classes
from cliplab.data.shift import apply_shift, parse_shift
from cliplab.data.types import ImageTextPairs, LabelledImages, MultiLabelImages
from cliplab.errors import ConfigError

Dataset = LabelledImages | ImageTextPairs | MultiLabelImages
# what `load_source` itself does to any source's data
COMMON_OPTIONS = ["classes", "holdout", "shift", "shift_seed", "templates"]

SOURCES: dict[str, str] = {
    "fashion-mnist": "cliplab.data.fashion_mnist:load_fashion_mnist",
    "digits": "cliplab.data.digits:load_digits",
    "shapes": "cliplab.data.shapes:shapes_source",
    "manifest": "cliplab.data.manifest:load_manifest",
    "clip-benchmark": "cliplab.data.clip_benchmark:load_clip_benchmark",
    "shards": "cliplab.data.shards.read:load_shards",
    "image-folder": "cliplab.data.image_folder:load_image_folder",
    "multilabel-manifest": "cliplab.data.multilabel:load_multilabel_manifest",
}


def source_loader(name: str) -> Callable[..., Dataset]:
    """The function behind source ``name``; ``ConfigError`` for an unknown name."""
    if name not in SOURCES:
        raise ConfigError(f"unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")
    module, _, function = SOURCES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def needs_options(name: str) -> bool:
    """Whether source ``name`` has a required option (a ``path``, a ``root``): its bare name
    names no data."""
    params = inspect.signature(source_loader(name)).parameters.values()
    return any(p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
               for p in params)


def load_source(spec: dict, progress: bool | None = None) -> Dataset:
    """Load the dataset a spec names; ``progress`` is the default of a loader's own
    ``progress`` option (e.g. the shards' read bar; the spec's own wins); ``holdout`` (a list
    of class names) drops those classes; ``classes`` (a list of class names) keeps only those,
    relabelled in that order;
    ``shift`` (e.g. ``invert``, ``noise:0.3``, ``blur:1.5``; see `cliplab.data.shift`) transforms
    the images, seeded by ``shift_seed``; ``templates`` (a list of prompts, ``{}`` marking the
    class) replaces a classification source's own prompt templates."""
    spec = dict(spec)
    name = spec.pop("source", None)
    fn = source_loader(name)
    holdout = spec.pop("holdout", None)
    classes = spec.pop("classes", None)
    shift, shift_seed = spec.pop("shift", None), spec.pop("shift_seed", 0)
    if shift is not None:
        parse_shift(shift)  # a bad shift fails before a slow load
    templates = spec.pop("templates", None)
    if templates is not None:
        templates = check_templates(templates, name)
    params = inspect.signature(fn).parameters
    if progress is not None and "progress" in params:
        spec.setdefault("progress", progress)
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for data source {name!r}; valid: "
                          f"{sorted(params)} and, for any source, {COMMON_OPTIONS}")
    data = fn(**spec)
    if holdout:
        if not isinstance(data, LabelledImages):
            raise ConfigError(f"holdout needs a labelled source; {name!r} gives image-text pairs")
        data, _ = split_classes(data, list(holdout))
    if classes is not None:
        classes = [classes] if isinstance(classes, str) else list(classes)  # not its letters
        if not classes:
            raise ConfigError(f"data source {name!r}: classes: [] keeps no class; leave it out "
                              "to keep every class")
        if not isinstance(data, LabelledImages):
            raise ConfigError(f"classes needs a labelled source; {name!r} gives image-text pairs")
        data = select_classes(data, [str(c) for c in classes])
    if templates is not None:
        if isinstance(data, ImageTextPairs):
            raise ConfigError(f"templates needs a classification source; {name!r} gives "
                              "image-text pairs")
        data = dataclasses.replace(data, templates=templates)
    if shift is not None:
        data = dataclasses.replace(data, images=apply_shift(data.images, shift, int(shift_seed)),
                                   name=f"{data.name}-{shift}")
    return data


def check_templates(templates: object, source: str | None) -> list[str]:
    """``templates`` as a list of prompt strings, each with one ``{}`` (or ``{c}``, as template
    files write it) for the class; a one-line ``ConfigError`` naming the source otherwise."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise ConfigError(f"templates of data source {source!r} must be a non-empty list of "
                          f"prompts, e.g. ['a photo of a {{}}.'], got {templates!r}")
    templates = [t.replace("{c}", "{}") if isinstance(t, str) else t for t in templates]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ConfigError(f"templates of data source {source!r}: every prompt needs one '{{}}' "
                          f"where the class goes; not {bad[0]!r}")
    return templates


def as_pairs(data: LabelledImages | ImageTextPairs) -> ImageTextPairs:
    """Pairs as they are; labelled images become one caption per template, grouped by class."""
    return data if isinstance(data, ImageTextPairs) else labelled_to_pairs(data)


def as_labelled(data: LabelledImages | ImageTextPairs, where: str) -> LabelledImages:
    if not isinstance(data, LabelledImages):
        raise ConfigError(f"{where} needs labelled images (a classification source)")
    return data
