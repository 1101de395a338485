"""A collection: any image source as a deterministic sequence of items that remember where
their image lives, so a later stage reads it from the original file (`cliplab index` / `serve`
serve it from there, `cliplab curate` copies its original bytes into the kept pool).

- an image folder (any folder of images, searched recursively; the sub-folder is metadata,
  ``NAME.txt`` / ``NAME.json`` beside an image its caption and metadata: see
  `cliplab.data.folder_files` for when a folder's captions are its ``NAME.txt`` files),
- a manifest (CSV/JSONL/Parquet: path + caption/label; every other column kept as metadata),
- a shard folder (WebDataset tars: the image is served from its byte range in the tar),
- any other source `cliplab.data.sources.load_source` knows (``shapes``, ``digits``, ...): those
  live in memory, so their images are written as PNGs into the index's own folder.
"""

from __future__ import annotations

import errno
import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from cliplab.data.folder_files import (IMAGE_SUFFIXES, SkippedFile, caption_dirs, image_caption,
                                       image_metadata, list_folder, require_folder)
from cliplab.data.images import open_image, to_pil
from cliplab.data.shards.samples import image_part, txt_caption
from cliplab.data.shards.tar_members import (MemberGroups, compression, damage_text,
                                             marker_follows)
from cliplab.errors import CliplabError, DataError
from cliplab.models.preprocess import convert_image

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json-lines", ".parquet")
# sources a collection reads item by item itself, and the options it reads them with
COLLECTION_OPTIONS = {"image-folder": ("path",), "manifest": ("path", "image_col", "caption_col"),
                      "shards": ("path",)}
READ_BY_COLLECTION = tuple(COLLECTION_OPTIONS)
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class Item:
    """One entry of a collection: ``key`` is unique and stable (a path, ``shard.tar:key``,
    ``source#i``); ``location`` says where the image is read from (``{"file": path}``, plus ``manifest`` and
    ``line`` for a manifest row,
    ``{"tar": path, "offset": o, "size": s, "name": member}`` or ``{"stored": None}``: to be
    written by the index); ``read`` decodes the image (raises a PIL error if it cannot)."""

    key: str
    caption: str
    location: dict
    read: Callable[[], Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)


def source_spec_field(value: Any) -> dict:
    """A config schema's check of a collection's ``data`` (curate's, index's): `source_spec`,
    its errors raised as a validator raises them, so the config names the file and key path
    (a wrong option value by its own key: ``data.n``, see `checked_spec`)."""
    from cliplab.data.sources import checked_spec

    if not isinstance(value, (str, Mapping)):
        raise ValueError("expected a source name or path, or a {source: ...} mapping")
    if isinstance(value, Mapping) and value.get("source") not in READ_BY_COLLECTION:
        return checked_spec(dict(value))
    try:
        return source_spec(value if isinstance(value, str) else dict(value))
    except CliplabError as err:
        raise ValueError(str(err)) from None


def _folder_kind(path: Path) -> str:
    """``shards`` for a folder of ``.tar`` shards, else ``image-folder``; a folder holding
    both shards and images (beside them, or in a sub-folder of its own) is refused, naming both
    spellings (a stray archive made a photo folder a shard folder, its photos unread). Other
    files and folders beside shards (logs, an img2dataset's parquet) are no matter."""
    from cliplab.data.shards.layout import folder_tars

    tars = next(iter(folder_tars(path)), None)
    if tars is None:
        return "image-folder"
    other = next((entry for entry in path.iterdir() if _holds_images(entry)), None)
    if other is not None:
        raise DataError(f"{path} holds .tar shards ({tars.name}) and images "
                        f"({other.name}{'/' if other.is_dir() else ''}): say which it is, "
                        f"--data image-folder data.path={path} or --data shards "
                        f"data.path={path} ({{source: image-folder, path: ...}} in a config)")
    return "shards"


def _holds_images(entry: Path) -> bool:
    """Whether ``entry`` (not hidden) is an image file, or a folder with one directly in it."""
    if entry.name.startswith("."):
        return False
    if entry.is_dir():
        try:
            return any(not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
                       for f in entry.iterdir())
        except OSError:
            return False
    return entry.suffix.lower() in IMAGE_SUFFIXES


def source_spec(data: str | dict) -> dict:
    """``{source: ...}`` for a `--data` value: a built-in source name, a manifest file, a shard
    folder (holding .tar files) or any other folder (of images). A mapping's options are
    checked against its source (unknown options, wrong types: `check_options`) unless the
    collection reads that kind itself; a path that does not exist says so."""
    from cliplab.data.sources import SOURCES, check_options, needs_options

    if isinstance(data, dict):
        if "source" not in data:
            raise DataError(f"data spec {data} has no 'source' key")
        if data["source"] in READ_BY_COLLECTION:
            _reject_options(data)
            check_collection_path(data)
            return dict(data)
        return check_options(data)
    path = Path(data).expanduser()  # ~ as a shell reads it (a config's value meets none)
    # a bare name is a built-in source unless that source needs a path and a file or folder
    # of that name exists (`--data shards` for a folder called shards)
    if data in SOURCES and not (needs_options(data) and path.exists()):
        return {"source": data}
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return {"source": "manifest", "path": str(path)}
    if path.is_dir():
        return {"source": _folder_kind(path), "path": str(path)}
    if not path.exists() and ("/" in data or "\\" in data or data.startswith((".", "~"))):
        raise DataError(f"{data} does not exist (no such file or folder, and no built-in "
                        f"source of that name: {', '.join(SOURCES)})")
    raise DataError(f"unknown data {data!r}: not a built-in source ({', '.join(SOURCES)}), "
                    "a manifest (.csv/.jsonl/.parquet), a shard folder or an image folder")


def iter_items(spec: dict, progress: bool = True) -> Iterator[Item]:
    """The items of the collection ``spec`` names, always in the same order."""
    return open_collection(spec, progress)[1]


def open_collection(spec: dict, progress: bool = True) -> tuple[int | None, Iterator[Item]]:
    """How many items the collection ``spec`` names holds, where its listing tells (a
    manifest's rows, a folder's files; None for shards and in-memory sources: a progress bar's
    total), and its items (`iter_items`); a folder or manifest is listed once, here."""
    spec = dict(spec)
    kind = spec.get("source")
    if kind == "image-folder":
        return _folder_items(_path(spec), spec)
    if kind == "manifest":
        return _manifest_items(_path(spec), spec)
    if kind == "shards":
        return None, _shard_items(_path(spec), spec)
    return None, _memory_items(spec, progress)


def check_collection_path(spec: dict) -> None:
    """A one-line `DataError` when ``spec`` reads files (an image folder, manifest or shard
    folder) at a path that does not exist: before a run makes its work folder."""
    if spec.get("source") in READ_BY_COLLECTION and "path" in spec \
            and not (path := _path(spec)).exists():
        raise DataError(f"{spec['source']} {path} does not exist; check the path")


def _path(spec: dict) -> Path:
    if "path" not in spec:
        raise DataError(f"data source {spec['source']!r} needs a path")
    return Path(spec["path"]).expanduser().resolve()


def _reject_options(spec: dict) -> None:
    """A one-line `DataError` naming the options of ``spec`` that index and curate do not read
    its source with (a loader's ``holdout`` or ``label_col``, a typo)."""
    valid = COLLECTION_OPTIONS[spec["source"]]
    unknown = sorted((str(key) for key in spec if key != "source" and key not in valid))
    if unknown:
        s = "s" * (len(unknown) > 1)
        raise DataError(f"unknown option{s} {', '.join(map(repr, unknown))} for "
                        f"{spec['source']} (index and curate read it with: {', '.join(valid)})")


def open_rgb(source: Path | bytes, name: str | None = None) -> Image.Image:
    """An image file or encoded bytes (called ``name`` in warnings) decoded as RGB (a PIL
    error, one of ``PIL_ERRORS``, if it cannot be: a decoder's own failure of another type is
    an ``OSError`` naming it, so a corrupt file is skipped and counted like any other)."""
    try:
        with open_image(source, name) as im:
            return convert_image(im, "RGB")
    except PIL_ERRORS:
        raise
    except Exception as err:  # PIL's decoders raise struct.error, IndexError, ... on odd files
        raise OSError(f"cannot decode the image ({type(err).__name__}: {err})") from err


def _folder_items(root: Path, spec: dict) -> tuple[int, Iterator[Item]]:
    """The folder's images (`cliplab.data.folder_files`' rule): the caption is the image's
    ``NAME.txt``, in a folder without any its sub-folder's name, else its file name; a
    ``NAME.json`` object beside it joins its metadata. Files that are no image, images of a
    caption folder without a caption and sidecars that are not UTF-8 text come as items that
    fail to read, so index and curate count them."""
    _reject_options(spec)
    require_folder(root)
    listed = list_folder(root)
    if not listed.images:
        raise DataError(f"image folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    skipped = {path: reason for reason, path in listed.skipped}
    captioned = caption_dirs(listed.images)
    files = sorted(listed.images + list(skipped))

    def items() -> Iterator[Item]:
        for file in files:
            if file in skipped:
                yield Item(str(file.relative_to(root)), "", {"file": str(file)},
                           lambda f=file, r=skipped[file]: _refuse(f, r))
                continue
            yield _folder_item(file, root, captioned)
    return len(files), items()


def _folder_item(file: Path, root: Path, captioned: set[Path]) -> Item:
    """The item of image ``file`` of the folder ``root``; one whose read fails (a PIL error
    for a bad image, else a `SkippedFile`) if its caption or metadata cannot be had."""
    rel = file.relative_to(root)
    folder = str(rel.parent) if rel.parent != Path(".") else ""
    meta = {"folder": folder} if folder else {}
    try:
        caption = image_caption(file, root, captioned)
        meta.update(image_metadata(file))
    except SkippedFile as err:
        return Item(str(rel), "", {"file": str(file)}, lambda f=file, e=err: _read_then(f, e),
                    meta)
    return Item(str(rel), caption, {"file": str(file)}, lambda f=file: open_rgb(f), meta)


def _read_then(file: Path, err: SkippedFile) -> Image.Image:
    """Decode ``file`` (an unreadable image is counted as that), then raise ``err``."""
    open_rgb(file)
    raise err


def _refuse(path: Path, reason: str) -> Image.Image:
    why = {"missing_file": "no file behind the link",
           "bad_name": "its name is not UTF-8 text (rename it)"}.get(
        reason, f"not an image (its suffix is not one of {', '.join(IMAGE_SUFFIXES)})")
    raise SkippedFile(reason, f"{path.name}: {why}")


def _no_path() -> Image.Image:
    raise SkippedFile("missing_file", "the row names no image file")


def skip_reason(err: BaseException) -> str:
    """The skip reason an item's failed ``read`` is counted under: the error's own ``reason``
    (a damaged shard, a file that is no image), ``missing_file`` for a file that is gone, else
    ``unreadable_image``."""
    if isinstance(err, FileNotFoundError) or getattr(err, "errno", None) == errno.ENAMETOOLONG:
        return "missing_file"
    return getattr(err, "reason", "unreadable_image")


def skip_message(err: BaseException) -> str:
    """The first line of an item's read error, without the in-memory buffer PIL names for
    bytes it could not decode (``<_io.BytesIO object at 0x...>``: the item is named beside)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", first)[:200]


def _manifest_items(path: Path, spec: dict) -> tuple[int, Iterator[Item]]:
    """The rows of the manifest ``path`` as items: a first read checks the whole file and
    counts its rows, holding none (a pool of millions of rows), a second gives the items."""
    from cliplab.data.manifest import (CAPTION_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, _column,
                                       spec_option_hint)
    from cliplab.data.manifest_table import image_data_error, scan_table

    _reject_options(spec)
    scan = scan_table(path)
    if not scan.rows:
        raise DataError(f"{path}: manifest has no rows")
    columns = scan.columns
    # named as the manifest reader names them (no Python tuple; the option to pass)
    image_col = _column(columns, spec.get("image_col"), IMAGE_COLUMNS, "image_col", str(path))
    if image_col in scan.images_held:
        raise image_data_error(path, image_col, scan.images_held[image_col])
    if spec.get("caption_col"):
        _column(columns, spec["caption_col"], CAPTION_COLUMNS, "caption_col", str(path))
    # one text column, as the manifest reader takes it: a row with an empty caption has none
    # (it is not captioned by its label, which data shard and pretrain would skip)
    text_cols = [spec["caption_col"]] if spec.get("caption_col") else \
        [c for c in CAPTION_COLUMNS if c in columns][:1] or \
        [c for c in LABEL_COLUMNS if c in columns][:1]
    if not text_cols:  # else every row would be dropped as an empty caption
        raise DataError(f"{path}: no caption column (looked for "
                        f"{', '.join(CAPTION_COLUMNS + LABEL_COLUMNS)}; found: "
                        f"{', '.join(columns)}); rename a column or "
                        f"{spec_option_hint('caption_col')}")
    return scan.rows, _manifest_rows(path, scan.rows, image_col, text_cols)


def _manifest_rows(path: Path, count: int, image_col: str, text_cols: list[str]
                   ) -> Iterator[Item]:
    """The items of the ``count`` rows of the manifest ``path``, read again as a stream; a
    `DataError` if it holds another number of rows now (it changed since it was counted)."""
    from cliplab.data.manifest_table import iter_table

    number = 0
    for number, (row, line) in enumerate(iter_table(path), 1):
        if number > count:
            raise _changed(path, count, f"more than {count}")
        name = str(row.get(image_col) or "").strip()
        file = (path.parent / Path(name).expanduser()).resolve()
        # a caption that is no text (a list, an object) is none, not its Python repr
        caption = next((str(row[c]).strip() for c in text_cols if row.get(c) not in
                        (None, "") and not isinstance(row[c], (list, dict))), "")
        meta = {k: v for k, v in row.items() if k != image_col}
        where = {"manifest": str(path), "line": line}  # "line 4" / "row 3"
        yield Item(f"{path.name}:{number}:{name}", caption, {"file": str(file), **where},
                   (lambda f=file: open_rgb(f)) if name else _no_path,
                   json.loads(json.dumps(meta, default=str)))
    if number != count:
        raise _changed(path, count, str(number))


def _changed(path: Path, count: int, now: str) -> DataError:
    return DataError(f"{path} changed while it was read: it held {count} rows, then {now}; "
                     "run again once nothing writes to it")


def read_range(tar: str | Path, offset: int, size: int) -> bytes:
    """``size`` bytes of ``tar`` from ``offset``: one member of a shard, read in place; an
    ``OSError`` if the file ends before them (a shard cut short since it was read)."""
    with open(tar, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{tar} ends {size - len(data)} bytes into the member at byte {offset}")
    return data


class ShardReadError(OSError):
    """A shard that could be read only in part (or not at all); ``reason`` names the skip."""

    reason = "truncated_shard"


class CutOffSample(OSError):
    """A sample a damaged shard lost: its folder's ``index.json`` counts more samples than
    could be read before the damage."""

    reason = "cut_off"


class DuplicateKeyError(OSError):
    """A sample whose key an earlier sample of the same tar already has: which of the two a key
    means is ambiguous, so the later one is skipped and counted."""

    reason = "duplicate_key"


Members = dict[str, tuple[int, int, str]]


def _shard_items(folder: Path, spec: dict) -> Iterator[Item]:
    """Samples of every tar (in the shard index's order): an image member plus ``.txt`` /
    ``.json`` members of the same key. A tar that cannot be read to its end gives the samples
    before the damage, then one item named after the tar that fails to read with a
    `ShardReadError` saying how far it got (so the loss is counted, not hidden) and, where the
    folder's ``index.json`` gives the tar's count, one `CutOffSample` item per sample lost."""
    from cliplab.data.shards import expand_shards
    from cliplab.data.shards.layout import index_counts

    _reject_options(spec)
    tars = expand_shards(folder)
    _refuse_compressed(tars)
    for tar in tars:
        samples, damage = _tar_samples(tar)
        for key, members, duplicate in samples:
            yield _duplicate_item(tar, key) if duplicate else _tar_item(tar, key, members)
        if damage is not None:
            expected = index_counts(tar.parent).get(tar.name)
            message = (f"{tar.name}: read {len(samples)}"
                       + (f" of {expected}" if expected is not None else "")
                       + f" samples, then: {damage}")

            def fail(message=message):
                raise ShardReadError(message)
            yield Item(tar.name, "", {"tar": str(tar), "offset": 0, "size": 0}, fail)
            for number in range(len(samples) + 1, (expected or 0) + 1):
                yield _cut_off_item(tar, number, expected)


def _refuse_compressed(tars: list[Path]) -> None:
    """A `DataError` naming the first compressed tar: index and curate (and serve, after
    them) read each image in place by its byte range, which a compressed file does not keep."""
    for tar in tars:
        if (kind := compression(tar)) is not None:
            raise DataError(f"{tar} is {kind}-compressed: index and curate read images in place "
                            "and need plain .tar shards (pretrain and eval take them); write them "
                            f"with `cliplab data shard --data {tar.parent} --out NEW_FOLDER`")


def _cut_off_item(tar: Path, number: int, count: int) -> Item:
    """The item of the ``number``-th of the ``count`` samples of ``tar`` that its damage lost
    (the key `raw_samples` gives it too): skipped and counted when read."""
    key = f"{tar.name}:sample {number} of {count}"

    def fail(key=key):
        raise CutOffSample(f"{key}: lost where the shard is damaged")
    return Item(key, "", {"tar": str(tar), "offset": 0, "size": 0}, fail)


def _duplicate_item(tar: Path, key: str) -> Item:
    """The item of a sample whose key an earlier sample of ``tar`` has: skipped when read."""
    def fail(key=key):
        raise DuplicateKeyError(f"key {key} is also an earlier sample's in {tar.name}")
    return Item(f"{tar.name}:{key}", "", {"tar": str(tar), "offset": 0, "size": 0}, fail)


def _tar_item(tar: Path, key: str, members: Members) -> Item:
    """The item of sample ``key`` of ``tar``: its image read from its byte range."""
    image = members.get(image_part(members) or "")  # the member training and eval read
    caption, meta = "", {}
    try:
        if "txt" in members:
            caption = txt_caption(read_range(tar, *members["txt"][:2]), f"{tar.name}:{key}")
        if "json" in members:
            try:
                meta = json.loads(read_range(tar, *members["json"][:2]))
            except ValueError:
                meta = {}
    except (SkippedFile, OSError) as err:  # OSError: the shard gone or cut since it was listed
        def bad(err=err):
            raise err
        return Item(f"{tar.name}:{key}", "", {"tar": str(tar), "offset": 0, "size": 0}, bad)
    meta = meta if isinstance(meta, dict) else {}
    if image is None:
        def fail(key=key):
            raise SkippedFile("missing_image", f"no image member for {key}")  # as streamed
        return Item(f"{tar.name}:{key}", caption, {"tar": str(tar), "offset": 0, "size": 0},
                    fail, meta)
    offset, size, name = image
    return Item(f"{tar.name}:{key}", caption,
                {"tar": str(tar), "offset": offset, "size": size, "name": name},
                lambda t=tar, o=offset, s=size: open_rgb(read_range(t, o, s), f"{t}:{key}"),
                meta)


def _tar_samples(tar: Path) -> tuple[list[tuple[str, Members, bool]], str | None]:
    """``[(key, {ext: (offset, size, member name)}, duplicate)]`` as `MemberGroups` gathers
    them (a sample's parts may lie apart: a tar of a folder is in listing order), and what
    stopped the reading early (None when the tar was read to its end). A sample whose members
    the damage cut off is left out; one whose data runs past the end fails when its image is
    read."""
    groups = MemberGroups()
    try:
        with tarfile.open(tar) as archive:
            groups.add_members(archive, lambda m: (m.offset_data, m.size, m.name))
            damage = None if marker_follows(archive) else \
                "the file ends early (no end-of-archive marker)"
    except (tarfile.TarError, OSError) as err:
        damage = damage_text(err)
    samples = groups.samples
    if damage is not None and samples:  # the damage may have cut the last sample's data
        size = tar.stat().st_size  # kept when its members are whole, as the stream keeps it
        if any(offset + length > size for offset, length, _ in samples[-1][1].values()) \
                or image_part(samples[-1][1]) is None:  # or come before its image
            samples.pop()
    return samples, damage


def _memory_items(spec: dict, progress: bool) -> Iterator[Item]:
    """Items of an in-memory source; their images are stored by the index (``{"stored": None}``)."""
    from cliplab.data.sources import load_source, refuse_multilabel
    from cliplab.data.types import ImageTextPairs

    data = load_source(spec, progress)
    name = spec["source"]
    refuse_multilabel(data, "data")
    for i in range(len(data)):
        image = data.images[i].numpy()
        if isinstance(data, ImageTextPairs):
            captions = list(data.captions[i])
            caption, meta = (captions[0] if captions else ""), {"captions": captions}
            if data.groups is not None:
                meta["group"] = int(data.groups[i])
            if data.partners is not None and int(data.partners[i]) >= 0:
                meta["partner_key"] = f"{name}#{int(data.partners[i])}"  # its item's key
        else:
            label = int(data.labels[i])
            caption = data.classnames[label]
            meta = {"label": label, "classname": caption, "group": label}  # as data shard
        yield Item(f"{name}#{i}", caption, {"stored": None},
                   lambda a=image: to_pil(a).convert("RGB"),
                   meta)

