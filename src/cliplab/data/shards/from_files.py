"""`cliplab data shard` of a source read from files (an image folder, a manifest, a shard
folder), written one image at a time: memory stays flat in the number of images, and each image
keeps its own size and aspect (`load_source` would decode the whole set into one tensor, making
images of different sizes centre squares).

Each source is read by the same rules as its in-memory loader (`load_image_folder`,
`load_caption_folder`, `ManifestDataset`, `load_shards`), so the shards hold the samples, keys,
captions, labels, class names, templates and skip counts that writing the loaded set holds
(`write_shards`); images are decoded with `decode_image` (``image_size`` resizing as the loader
does) and re-encoded in the writer's ``image_format`` / ``quality``. ``holdout``, ``classes`` and
``templates`` apply to each sample as `load_source` applies them to the set; a ``shift`` (which
transforms the set's images together) is left to the in-memory path (`streams`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cliplab.data.pairs import pairs_name
from cliplab.data.shards.write import (ShardSink, check_writer_options, class_fields,
                                       clean_captions, prepare_out, shard_sample)
from cliplab.data.types import SkipReport
from cliplab.errors import ConfigError, DataError, errors_naming, warn

STREAMED = ("image-folder", "manifest", "shards")


def streams(spec: dict) -> bool:
    """Whether `write_source` writes ``spec`` image by image: a source read from files, without
    a ``shift`` (the one option that transforms the set's images together)."""
    return spec.get("source") in STREAMED and spec.get("shift") is None and "stream" not in spec


@dataclass
class Sample:
    """One readable sample of a source: its image, its captions (pairs) or its class
    (``label``, labelled sources), its group and hard-negative partner (pairs of shards)."""

    key: str
    image: torch.Tensor
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    group: int | None = None
    partner_key: str | None = None  # the partner's key in the shards written


@dataclass
class Opened:
    """A source opened for streaming: its ``name``, its classes (None for pairs), ``total``
    (candidate samples, for the bar), ``skipped`` (filled while ``samples`` is read: each
    item is a `Sample` or None for a skipped one), ``empty`` (the error when nothing could be
    read) and ``after`` (called once all is read: a loader's closing warnings)."""

    name: str
    samples: Any  # a callable giving an iterator of Sample | None
    total: int | None
    skipped: SkipReport
    empty: Any  # a callable giving the DataError message
    classnames: list[str] | None = None
    templates: list[str] | None = None
    descriptions: list[str] | None = None
    after: Any = None
    maybe_labelled: bool = False  # pairs, but a classification set if some images are unreadable


def write_source(spec: dict, out: Path, samples_per_shard: int = 1000, image_format: str = "jpg",
                 quality: int = 95, overwrite: bool = False, progress: bool = True,
                 where: str | None = None) -> dict:
    """Write the source ``spec`` (one `streams` takes) as shards under ``out`` image by image;
    return the index, as `write_shards` of the loaded set would."""
    from cliplab.data.shards.set_view import Reread
    from cliplab.data.sources import check_options, check_templates, with_paths_resolved

    check_writer_options(image_format, samples_per_shard)
    with errors_naming(where):
        options = check_options(spec, where)
        kind = options.pop("source")
        holdout, classes = options.pop("holdout", None), options.pop("classes", None)
        templates = options.pop("templates", None)
        options.pop("shift_seed", None)
        options.pop("shift", None)
        if templates is not None:
            templates = check_templates(templates, kind)
        read_bar = options.pop("progress", progress)  # the spec's own wins, as for a loader

    def open_source(unreadable: frozenset[int] = frozenset()) -> tuple[Opened, Any]:
        with errors_naming(where):
            if kind == "shards":
                opened = _shards(**options, progress=read_bar, unreadable=unreadable)
            else:
                opened = {"image-folder": _image_folder, "manifest": _manifest}[kind](**options)
            try:
                return opened, _class_options(opened, kind, holdout, classes, templates)
            except ConfigError:
                if not opened.maybe_labelled or not (
                        found := _unreadable_images(**options, progress=read_bar)):
                    raise
        return open_source(found)  # a classification set without its unreadable images?

    opened, relabel = open_source()
    out = Path(out)
    existed = out.exists()
    prepare_out(out, overwrite)
    try:
        writer, read, number = _write(opened, relabel, out, samples_per_shard, image_format,
                                      quality, progress)
    except Reread as again:  # images the first pass did not decode are unreadable
        _remove_set(out, existed)
        opened, relabel = open_source(again.unreadable)
        prepare_out(out, overwrite)
        writer, read, number = _write(opened, relabel, out, samples_per_shard, image_format,
                                      quality, progress)
    if opened.after is not None:
        opened.after()
    name = _set_name(opened)
    if number == 0:
        _remove_set(out, existed)
        if read == 0:  # the loader's own error, as load_source names it
            raise DataError(f"{where}: {opened.empty()}" if where else opened.empty())
        raise DataError(f"nothing to write: {name} has no sample with a caption "
                        f"({opened.skipped.summary()})")
    classes = class_fields(opened.classnames, opened.templates, opened.descriptions)
    return writer.write_index(name, with_paths_resolved(spec), opened.skipped,
                              image_format=image_format, **classes)


def _set_name(opened: Opened) -> str:
    return pairs_name(opened.name) if opened.classnames is not None else opened.name


def _write(opened: Opened, relabel: list[int | None] | None, out: Path, samples_per_shard: int,
           image_format: str, quality: int, progress: bool) -> tuple[ShardSink, int, int]:
    """Write ``opened``'s samples as shards in ``out``: (the writer, samples read, samples
    written); those without a caption are counted in its ``skipped``."""
    labelled = opened.classnames is not None
    if labelled:
        per_class = [[t.format(n) for t in opened.templates]
                     for n in (opened.descriptions or opened.classnames)]
    read, number = 0, 0
    no_caption = []  # counted after what the source skipped, as write_shards counts them
    with ShardSink(out, samples_per_shard, {"image_format": image_format}) as writer:
        items = tqdm(opened.samples(), total=opened.total, desc=f"shard {_set_name(opened)}",
                     unit="img", disable=not progress)
        for sample in items:
            if sample is None:
                continue  # counted in skipped by the source
            read += 1
            label = classname = None
            if labelled:
                label = relabel[sample.label]
                if label is None:
                    continue  # a class held out / not selected: dropped, as load_source drops it
                captions, group, classname = per_class[label], label, opened.classnames[label]
            else:
                captions, group = sample.captions, sample.group
            captions = clean_captions(captions)
            if not captions:
                no_caption.append(sample.key)
                continue
            writer.write(shard_sample(number, sample.image, captions, group, sample.key,
                                      image_format, quality, sample.partner_key, label,
                                      classname))
            number += 1
    for key in no_caption:
        opened.skipped.add("empty_caption", key)
    return writer, read, number


def _remove_set(out: Path, existed: bool) -> None:
    """Remove the (empty) shards written to ``out``, and ``out`` if this run made it."""
    from cliplab.data.shards.layout import set_files

    for file in set_files(out):
        file.unlink()
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _class_options(opened: Opened, kind: str, holdout: Any, classes: Any,
                   templates: list[str] | None) -> list[int | None] | None:
    """``holdout`` / ``classes`` / ``templates`` applied as `load_source` applies them:
    sets ``opened``'s classes and returns each original label's new label (None: dropped)."""
    pairs = opened.classnames is None
    hint = (" (a manifest is read as classes when label_col: COLUMN names its label column)"
            if kind == "manifest" else "")
    if holdout and pairs:
        raise ConfigError(f"holdout needs single-label images; {kind!r} gives image-text pairs")
    if classes is not None:
        classes = [classes] if isinstance(classes, str) else list(classes)
        if not classes:
            raise ConfigError(f"data source {kind!r}: classes: [] keeps no class; leave it out "
                              "to keep every class")
        if pairs:
            raise ConfigError(f"classes needs single-label images; {kind!r} gives image-text "
                              f"pairs{hint}")
    if templates is not None and pairs:
        raise ConfigError(f"templates needs a classification source; {kind!r} gives image-text "
                          f"pairs{hint}")
    if pairs:
        return None
    from cliplab.data.pairs import class_indices, twice

    relabel: list[int | None] = list(range(len(opened.classnames)))
    if holdout:
        for i in class_indices(opened.classnames, list(holdout), "holdout"):
            relabel[i] = None
    if classes is not None:
        keep = class_indices(opened.classnames, [str(c) for c in classes])
        if len(set(keep)) != len(keep):
            raise DataError(f"classes: {twice(keep, opened.classnames)!r} is named twice")
        new = {old: new for new, old in enumerate(keep)}
        relabel = [None if r is None else new.get(old) for old, r in enumerate(relabel)]
        opened.classnames = [opened.classnames[i] for i in keep]
        if opened.descriptions:
            opened.descriptions = [opened.descriptions[i] for i in keep]
    if templates is not None:
        opened.templates = templates
    return relabel


# ---- sources --------------------------------------------------------------------------------

def _image_folder(path: str, image_size: int | None = None, templates: list[str] | None = None,
                  captions: bool = False) -> Opened:
    """`load_image_folder`'s reading of ``path``, one image at a time."""
    from cliplab.data.image_folder import check_folder_options, list_class_folder

    root = Path(path)
    check_folder_options(root, image_size, templates, captions)
    if captions:
        return _caption_folder(root, image_size)
    listing = list_class_folder(root, templates)
    skipped = listing.skipped
    seen: set[int] = set()

    def samples() -> Iterator[Sample | None]:
        from cliplab.data.images import UnreadableImage, decode_image

        for label, file in listing.files:
            try:
                image = decode_image(file, image_size)
            except UnreadableImage:
                skipped.add("unreadable_image", str(file))
                yield None
                continue
            seen.add(label)
            yield Sample(file.relative_to(root).as_posix(), image, label=label)

    def after() -> None:  # load_image_folder's warning
        if seen:
            listing.warn_empty_classes(seen)

    return Opened(root.name, samples, len(listing.files), skipped, listing.nothing_readable,
                  classnames=listing.classnames, templates=listing.templates, after=after)


def _caption_folder(root: Path, image_size: int | None) -> Opened:
    """`load_caption_folder`'s reading of ``root``, one image at a time."""
    from cliplab.data.image_folder import list_caption_folder

    listing = list_caption_folder(root)

    def samples() -> Iterator[Sample | None]:
        for sample in listing.read(image_size):
            yield None if sample is None else Sample(sample[0], sample[1], captions=[sample[2]])

    return Opened(root.name, samples, len(listing.files), listing.skipped,
                  listing.nothing_readable)


def _manifest(path: str, kind: str = "auto", image_size: int | None = None,
              image_col: str | None = None, caption_col: str | None = None,
              label_col: str | None = None, classnames: list[str] | None = None,
              templates: list[str] | None = None) -> Opened:
    """`load_manifest`'s reading of ``path`` (a `ManifestDataset`, read row by row)."""
    from cliplab.data.manifest import ManifestDataset

    data = ManifestDataset(path, kind, image_size, image_col, caption_col, label_col,
                           classnames, templates)
    skipped = SkipReport()
    pairs = data.kind == "pairs"

    def samples() -> Iterator[Sample | None]:
        for i in range(len(data)):
            sample = data.try_load(i, skipped)
            if sample is None:
                yield None
            elif pairs:
                yield Sample(data.keys[i], sample[0], captions=[sample[1]])
            else:
                yield Sample(data.keys[i], sample[0], label=int(sample[1]))

    return Opened(data.path.stem, samples, len(data), skipped,
                  lambda: f"{data.path}: no usable sample in {len(data)} rows "
                          f"({skipped.summary()}); check the image paths (relative to "
                          f"{data.path.parent}) and the caption/label column",
                  classnames=None if pairs else data.classnames,
                  templates=None if pairs else data.templates)


def _metadata_stream(path: str, image_size: int | None):
    """The samples of the shards at ``path`` in order, their images left encoded
    (`ShardStream.image_of` decodes one)."""
    from cliplab.data.shards.stream import ShardStream

    return ShardStream(path, shuffle=False, caption="all", image_size=image_size, rank=0,
                       world_size=1, decode=False)


def _changed_while_read(path: str) -> DataError:
    return DataError(f"{path}: its shards changed while they were read; shard them again")


def _unreadable_images(path: str, image_size: int | None = None,
                       progress: bool = True) -> frozenset[int]:
    """The places, among the samples of the shards at ``path``, of those whose images cannot
    be decoded (each image decoded and let go)."""
    from cliplab.data.images import UnreadableImage

    stream = _metadata_stream(path, image_size)
    found = set()
    for i, sample in enumerate(tqdm(stream, desc=f"check {Path(str(path)).name}", unit="img",
                                    disable=not progress, leave=False)):
        try:
            stream.image_of(sample["image"], sample["key"])
        except UnreadableImage:
            found.add(i)
    return frozenset(found)


def _shards(path: str, image_size: int | None = None, progress: bool = True,
            unreadable: frozenset[int] = frozenset()) -> Opened:
    """`load_shards`' reading of ``path``: a first pass over the samples' metadata, no image
    decoded, learns what the set is (a classification set, its groups and partners, as
    `load_shards` sees them all at once); the second decodes the images and writes them, one
    at a time. Images that turn out unreadable then are skipped; if the set is another
    without them (its partners' numbers, its new group ids, whether it is labelled), `Reread`
    says to read it again with them left out (``unreadable``)."""
    import os

    from cliplab.data.images import UnreadableImage
    from cliplab.data.shards.layout import read_index
    from cliplab.data.shards.samples import bare_key
    from cliplab.data.shards.set_view import Reread, SetView

    first = _metadata_stream(path, image_size)
    total = sum(first.rank_sample_counts()) if progress else None
    groups, keys, partner_keys = [], [], []
    for sample in tqdm(first, total=total, desc=f"read {Path(str(path)).name}", unit="img",
                       disable=not progress, leave=False):
        groups.append(sample["group"])
        keys.append(bare_key(sample["key"]))
        partner_keys.append(sample["partner_key"])
    index = read_index(path) if os.path.isdir(path) else None
    name = (index or {}).get("name") or os.path.basename(os.path.normpath(str(path)))
    seen = SetView(index, groups, keys, partner_keys, path, unreadable)
    skipped = SkipReport()

    def samples() -> Iterator[Sample | None]:
        second, found = _metadata_stream(path, image_size), set()
        second.skipped = skipped  # the skips in the order the stream meets them
        for i, sample in enumerate(second):
            if i >= len(groups):
                break  # a shard that changed since the first pass: not a sample it counted
            try:
                image = second.image_of(sample["image"], sample["key"])
            except UnreadableImage:
                skipped.add("unreadable_image", sample["key"])
                found.add(i)
                yield None
                continue
            fields = seen.fields(i)
            if fields is None:  # unreadable when the set was read before
                raise _changed_while_read(path)
            label, group, partner = fields
            yield Sample(sample["key"], image, captions=list(sample["caption"]), label=label,
                         group=group, partner_key=partner)
        view = seen
        if found != unreadable:  # without the unreadable images the set may be another
            view = SetView(index, groups, keys, partner_keys, path, frozenset(found))
            if not view.writes_as(seen):
                if unreadable:
                    raise _changed_while_read(path)
                raise Reread(frozenset(found))
        if view.warning:
            warn(view.warning)

    opened = Opened(name, samples, len(groups) - len(unreadable), skipped,
                    lambda: f"no usable sample in {path} ({skipped.summary()})",
                    maybe_labelled=not (seen.labelled or unreadable)
                    and bool((index or {}).get("classnames")))
    if seen.labelled:
        opened.classnames = list(index["classnames"])
        opened.templates = list(index.get("templates") or ["{}"])
        opened.descriptions = index.get("descriptions")
    return opened
