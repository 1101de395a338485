"""Data sources by name, as a config writes them: ``{source: shapes, n: 4000, seed: 1}``.

A source is one function (its keyword arguments are the spec's options) returning labelled
images, image-text pairs or multi-label images. Adding one = its module + one ``SOURCES`` line
(``"name": "module:function"``, imported only when that source is used).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, ConfigDict, TypeAdapter, create_model

from cliplab.data.images import decoding_for
from cliplab.data.pairs import labelled_to_pairs, select_classes, split_classes
from cliplab.data.shift import apply_shift, parse_shift
from cliplab.data.types import ImageTextPairs, LabelledImages, MultiLabelImages
from cliplab.config import Section, validate
from cliplab.errors import ConfigError, errors_naming
from cliplab.models.preprocess import PreprocessConfig

Dataset = LabelledImages | ImageTextPairs | MultiLabelImages
# what `load_source` itself does to a source's data: to any, and to class-labelled data only
ANY_DATA_OPTIONS = ["shift", "shift_seed"]
LABELLED_DATA_OPTIONS = ["classes", "holdout", "templates"]
COMMON_OPTIONS = sorted(ANY_DATA_OPTIONS + LABELLED_DATA_OPTIONS)
PATH_OPTIONS = ("path", "root", "data_dir")  # a source's file or folder: ``~`` expanded

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


def filled_spec(spec: object) -> dict | None:
    """``spec`` with its source's defaults filled in, None values left out and its path or
    root resolved, so two specs of the same data compare equal (None: no spec mapping)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("source"), str) \
            or spec["source"] not in SOURCES:
        return None
    params = inspect.signature(source_loader(spec["source"])).parameters.values()
    filled = {p.name: p.default for p in params if p.default not in (p.empty, None)}
    filled.update({key: value for key, value in spec.items() if value is not None})
    return with_paths_resolved(filled)


def with_paths_resolved(spec: dict) -> dict:
    """``spec`` with its file or folder options (`PATH_OPTIONS`) expanded and resolved (each
    part of a ``::`` list of shard patterns, each path of a list): as an output records its
    source, so the record still names it when read from another folder."""
    return {key: _resolved(value) if key in PATH_OPTIONS else value
            for key, value in spec.items()}


def _resolved(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_resolved(part) for part in value]
    if not isinstance(value, str):
        return value
    return "::".join(str(Path(part).expanduser().resolve()) for part in value.split("::"))


# options that change how a set's images look (a shift: a noisy copy of each), not which
# images it holds
PRESENTATION_OPTIONS = ("image_size", "progress", "templates", "shift", "shift_seed")


def same_images(a: dict | None, b: dict | None) -> bool:
    """Whether filled specs ``a`` and ``b`` (`filled_spec`) hold the same images: alike but
    for `PRESENTATION_OPTIONS` (another ``seed`` of ``shapes``, or another ``offset``, is
    other images)."""
    if a is None or b is None:
        return False
    return {k: v for k, v in a.items() if k not in PRESENTATION_OPTIONS} == \
        {k: v for k, v in b.items() if k not in PRESENTATION_OPTIONS}


def source_loader(name: str) -> Callable[..., Dataset]:
    """The function behind source ``name``; ``ConfigError`` for an unknown name."""
    if not isinstance(name, str):  # e.g. a nested spec: {source: {source: shapes}}
        kind = "a mapping" if isinstance(name, dict) else "a list" if isinstance(name, list) \
            else repr(name)
        raise ConfigError(f"a data source is a name ({', '.join(SOURCES)}) or a path, not "
                          f"{kind}")
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


def load_source(spec: dict, progress: bool | None = None, where: str | None = None,
                model_input: PreprocessConfig | None = None) -> Dataset:
    """Load the dataset a spec names; ``progress`` is the default of a loader's own
    ``progress`` option (e.g. the shards' read bar; the spec's own wins); ``holdout`` (a list
    of class names) drops those classes' images (the names stay classes: a zero-shot head
    still offers them); ``classes`` (a list of class names) keeps only those,
    relabelled in that order;
    ``shift`` (e.g. ``invert``, ``noise:0.3``, ``blur:1.5``; see `cliplab.data.shift`) transforms
    the images, seeded by ``shift_seed``; ``templates`` (a list of prompts, ``{}`` marking the
    class) replaces a classification source's own prompt templates.
    ``where``: the spec's key path in its config (e.g. ``data.test``), named by every error
    about its options (see `check_options`). ``model_input``: the preprocessing of the model
    the images are for; image files larger than its input are decoded to what it makes of them
    (`decoding_for`), unless the spec gives ``image_size`` or a ``shift`` (whose blur and noise
    are in the file's pixels)."""
    spec = check_options(spec, where)
    name = spec.pop("source", None)
    fn = source_loader(name)
    holdout = spec.pop("holdout", None)
    classes = spec.pop("classes", None)
    shift, shift_seed = spec.pop("shift", None), spec.pop("shift_seed", 0)
    templates = spec.pop("templates", None)
    if templates is not None:
        templates = check_templates(templates, name)
    params = inspect.signature(fn).parameters
    if progress is not None and "progress" in params:
        spec.setdefault("progress", progress)
    with errors_naming(where), decoding_for(model_input if shift is None else None):
        return _load(fn, name, spec, holdout, classes, shift, shift_seed, templates)


def check_options(spec: dict, where: str | None = None, typed_errors: bool = False) -> dict:
    """``spec`` (a copy) with its options checked against its source function's signature
    (and `COMMON_OPTIONS`): unknown or missing options and values of the wrong type (``n:
    abc``) are a one-line `ConfigError` naming ``where`` (the spec's key path, e.g.
    ``data.test``; None: the source) and the key; numbers written as strings become numbers.
    ``typed_errors``: a wrong value stays pydantic's ValidationError (see `checked_spec`)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where or 'a data spec'} must be a mapping such as "
                          f"{{source: shapes, n: 100}}, not {spec!r}")
    spec = dict(spec)
    name = spec.get("source")
    if name is None:
        raise ConfigError(f"{where or 'data spec ' + repr(spec)}: no 'source' key "
                          f"(one of: {', '.join(SOURCES)})")
    try:
        fn = source_loader(name)
    except ConfigError as err:
        raise ConfigError(f"{where}.source: {err}" if where else str(err)) from None
    params = inspect.signature(fn).parameters
    options = {k: v for k, v in spec.items() if k != "source"}
    at = f"{where}: " if where else ""
    unknown = sorted(set(options) - set(params) - set(COMMON_OPTIONS))
    if unknown:
        s = "s" * (len(unknown) > 1)
        raise ConfigError(f"{at}unknown option{s} {', '.join(map(repr, unknown))} for "
                          f"{name} (valid: {', '.join(sorted(params))}; for any source: "
                          f"{', '.join(ANY_DATA_OPTIONS)}; for class-labelled data: "
                          f"{', '.join(LABELLED_DATA_OPTIONS)})")
    missing = [p.name for p in params.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and options.get(p.name) is None]
    if missing:
        s = "s" * (len(missing) > 1)
        raise ConfigError(f"{at}{name} needs the option{s} {', '.join(missing)} "
                          f"(e.g. {{source: {name}, {missing[0]}: ...}})")
    if spec.get("shift") is not None:
        try:
            parse_shift(spec["shift"])  # a bad shift fails before a slow load
        except ConfigError as err:
            raise ConfigError(f"{where}.shift: {err}" if where else str(err)) from None
    if spec.get("shift_seed") not in (None, 0) and not _draws_noise(spec.get("shift")):
        raise ConfigError(f"{where + '.' if where else ''}shift_seed has no effect unless shift "
                          "adds noise (noise:S, the only random shift); drop it")
    schema = _options_schema(fn)
    given = {k: ([v] if isinstance(v, str) and _one_for_a_list(schema, k, v) else v)
             for k, v in options.items() if k in params}
    checked = schema.model_validate(given) if typed_errors else \
        validate(schema, given, where="" if where else f"data source {name!r}", prefix=where or "")
    for key in options:
        if key in params:
            spec[key] = getattr(checked, key)
            if key in PATH_OPTIONS and isinstance(spec[key], str):  # as a shell would
                spec[key] = os.path.expanduser(spec[key])
    return spec


def _draws_noise(shift: str | None) -> bool:
    """Whether the (valid) ``shift`` draws random numbers: a ``noise:S`` step with S > 0."""
    return shift is not None and any(name == "noise" and value
                                     for name, value in parse_shift(shift))


def checked_spec(spec: Any) -> dict:
    """A config schema's check of a data spec (the validator of `DataSpecField`): as
    `check_options`, with a wrong value left as pydantic's error so that the config names it
    by its whole key path (``x.yaml: data.test.seed: ...``), and the rest raised as ValueError
    at the spec's key. A streamed shard spec (``stream:``) is its schema's to check."""
    if isinstance(spec, dict) and "stream" in spec:
        return spec
    if isinstance(spec, dict) and spec.get("source") is None:
        raise ValueError(f"no 'source' key (one of: {', '.join(SOURCES)})")
    try:
        return check_options(spec, typed_errors=True)
    except ConfigError as err:
        raise ValueError(str(err)) from None


# a stage config's data spec ({source: digits, split: test}), checked with the config
DataSpecField = Annotated[dict[str, Any], AfterValidator(checked_spec)]


def _one_for_a_list(schema: type[Section], key: str, value: str) -> bool:
    """Whether ``key`` takes a list of strings but not one string: ``kinds: single`` is one
    kind, as the loaders read it (pydantic refuses a str as a sequence)."""
    adapter = TypeAdapter(schema.model_fields[key].annotation)
    for candidate, wanted in ((value, False), ([value], True)):
        try:
            adapter.validate_python(candidate)
            return wanted
        except Exception:  # noqa: BLE001 - pydantic's ValidationError, or a type it cannot check
            continue
    return False


@functools.lru_cache(maxsize=None)
def _options_schema(fn: Callable) -> type[Section]:
    """A `Section` whose fields are ``fn``'s keyword arguments, typed by its type hints (a
    hint pydantic cannot check counts as any value; constraints such as ``PositiveInt``
    hold; required ones are optional here: `check_options` names a missing one first)."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)  # constraints too
    except Exception:  # noqa: BLE001 - a hint that does not resolve: check no types
        hints = {}
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(param.name, Any)
        try:
            TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - not a type pydantic knows
            hint = Any
        default = None if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hint, default)
    return create_model(f"{fn.__name__}_options", __base__=_Options, **fields)


class _Options(Section):
    """A source function's options (defaults are the function's business, not checked)."""

    model_config = ConfigDict(extra="forbid", validate_default=False,
                              arbitrary_types_allowed=True, protected_namespaces=())


def _class_names(value: Any, key: str, name: str) -> list[str]:
    """``holdout`` / ``classes`` as class names: one name is one class (not its letters), and
    numbers are names too (a class folder ``3``); anything else is one line."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or \
            not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key}: expected a class name or a list of class names (source "
                          f"{name!r}), got {value!r}")
    return [str(v) for v in value]


def _load(fn: Callable, name: str, spec: dict, holdout: Any, classes: Any, shift: Any,
          shift_seed: Any, templates: list[str] | None) -> Dataset:
    holdout = _class_names(holdout, "holdout", name) if holdout is not None else None
    classes = _class_names(classes, "classes", name) if classes is not None else None
    data = fn(**spec)
    if holdout:
        if not isinstance(data, LabelledImages):
            raise ConfigError(f"holdout needs single-label images; {name!r} gives {_kind(data)}")
        data, _ = split_classes(data, holdout)
    if classes is not None:
        if not classes:
            raise ConfigError(f"data source {name!r}: classes: [] keeps no class; leave it out "
                              "to keep every class")
        if not isinstance(data, LabelledImages):
            raise ConfigError(f"classes needs single-label images; {name!r} gives "
                              f"{_kind(data)}{_label_col_hint(name, data)}")
        data = select_classes(data, classes)
    if templates is not None:
        if isinstance(data, ImageTextPairs):
            raise ConfigError(f"templates needs a classification source; {name!r} gives "
                              f"image-text pairs{_label_col_hint(name, data)}")
        data = dataclasses.replace(data, templates=templates)
    if shift is not None:
        data = dataclasses.replace(data, images=apply_shift(data.images, shift, int(shift_seed)),
                                   name=f"{data.name}-{shift}")
    return data


def _label_col_hint(name: str | None, data: Dataset) -> str:
    """How to read a manifest of pairs as classes: its label column, named by ``label_col``."""
    if name != "manifest" or not isinstance(data, ImageTextPairs):
        return ""
    return " (a manifest is read as classes when label_col: COLUMN names its label column)"


def _kind(data: Dataset) -> str:
    """What a source gave, as its errors say it."""
    return "image-text pairs" if isinstance(data, ImageTextPairs) else \
        "multi-label images" if isinstance(data, MultiLabelImages) else "labelled images"


def check_templates(templates: object, source: str | None) -> list[str]:
    """``templates`` as a list of prompt strings, each with one ``{}`` (or ``{c}``, as template
    files write it) for the class; a one-line ``ConfigError`` naming the source otherwise."""
    templates, problem = checked_templates(templates)
    if problem:
        separator = " " if problem.startswith("must") else ": "
        raise ConfigError(f"templates of data source {source!r}{separator}{problem}")
    return templates


def checked_templates(templates: object) -> tuple[list[str], str | None]:
    """(``templates`` with ``{c}`` written as ``{}``, what is wrong with them or None): each
    must be a string with one ``{}`` where the class goes and no other format field (other
    braces doubled: ``{0}``, ``{.x}``, ``{style}`` fail when the class is put in), and there
    must be one at least (a prompt without a place for the class gives every class the same
    prompt)."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        return [], (f"must be a non-empty list of prompts, e.g. ['a photo of a {{}}.'], got "
                    f"{templates!r}")
    templates = [t.replace("{c}", "{}") if isinstance(t, str) else t for t in templates]
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        return templates, f"every prompt needs one '{{}}' where the class goes; not {bad[0]!r}"
    bad = [t for t in templates if not formats_once(t)]  # a second '{}', another field
    if bad:
        return templates, ("every prompt needs one '{}' where the class goes and every other "
                           f"brace doubled ('{{{{' for a literal '{{'); not {bad[0]!r}")
    return templates, None


def formats_once(template: str) -> bool:
    """Whether ``template.format(class)`` works and puts the class in once ("{{}}" is a
    literal "{}", no class)."""
    try:
        return template.format("\0").count("\0") == 1
    except (ValueError, IndexError, KeyError, AttributeError, TypeError):
        return False


def as_pairs(data: Dataset, where: str = "data") -> ImageTextPairs:
    """Pairs as they are; labelled images become one caption per template, grouped by class;
    multi-label images are a one-line error naming ``where``."""
    refuse_multilabel(data, where)
    return data if isinstance(data, ImageTextPairs) else labelled_to_pairs(data)


def refuse_multilabel(data: Dataset, where: str,
                      needs: str = "image-text pairs or labelled images") -> None:
    """A one-line `ConfigError` when ``data`` is multi-label images, which only the
    ``multilabel_zeroshot`` task reads (there is no one caption or label to give an image)."""
    if isinstance(data, MultiLabelImages):
        raise ConfigError(f"{where} needs {needs}, not multi-label images (those are for the "
                          "multilabel_zeroshot eval task)")


def as_labelled(data: Dataset, where: str) -> LabelledImages:
    """``data`` as labelled images of two classes at least; a one-line error naming ``where``
    otherwise (over one class every image scores as right, whatever the model)."""
    if not isinstance(data, LabelledImages):
        hint = (", not image-text pairs; a manifest with a caption column is read as pairs, "
                "and as classes when label_col: COLUMN names its label column"
                if isinstance(data, ImageTextPairs) else f", not {_kind(data)}")
        raise ConfigError(f"{where} needs labelled images (a classification source){hint}")
    if len(data.classnames) < 2:
        raise ConfigError(f"{where} holds one class ({', '.join(data.classnames)}): a "
                          "classifier over it scores every image as right, whatever the model; "
                          "give data of two classes at least")
    return data
