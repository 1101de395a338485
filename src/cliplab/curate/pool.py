"""The pool being curated: items as records that remember where their image lives.

A record is ``{"key", "caption", "location", "meta"}`` (JSON). ``location`` is the source's own
(``{"file": path}`` (+ ``manifest``, ``line``), ``{"tar", "offset", "size", "name"}``) or, for an
in-memory source, ``{"stored": "cache/images/N.png"}`` relative to the run's work folder, where
reading the pool wrote it. Images are decoded again whenever a step that looks at them maps a
chunk (`needs_images`; each image file once per chunk, however many rows name it), so no step
holds the pool's pixels in memory, and the kept pool is written from the original bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cliplab.curate.steps.base import PoolBatch
from cliplab.data.images import fit_to_model
from cliplab.data.collection import (PIL_ERRORS, Item, open_rgb, read_range, skip_message,
                                     skip_reason)
from cliplab.errors import DataError
from cliplab.models.preprocess import PreprocessConfig
from cliplab.output_folder import atomic_path

Record = dict[str, Any]


def describe_location(location: dict) -> str:
    """Where an item's image is, for a reason: ``manifest.csv line 4 (images/x.png)``,
    ``a.tar member k.jpg``, a file path, or ``memory``."""
    if "manifest" in location:
        return f"{location['manifest']} {location['line']} ({location.get('file', '')})"
    if "tar" in location:
        name = location.get("name")  # none for a tar as a whole (e.g. a truncated one)
        return f"{location['tar']} member {name}" if name else str(location["tar"])
    if "file" in location:
        return str(location["file"])
    return "memory"


class SourceChanged(DataError):
    """An item's image, readable when the pool was read, can no longer be read by a later
    step or the writers: its file or shard changed (or went) since."""


def image_bytes(location: dict, work: Path, key: str | None = None) -> tuple[bytes, str]:
    """The original encoded bytes of an item's image and its extension (``jpg``, ``png``...);
    `SourceChanged` (naming ``key``) when they can no longer be read."""
    try:
        if "stored" in location:
            path = work / location["stored"]
            return path.read_bytes(), "png"
        if "tar" in location:
            data = read_range(location["tar"], int(location["offset"]), int(location["size"]))
            return data, Path(location.get("name") or "x.bin").suffix.lstrip(".").lower()
        path = Path(location["file"])
        return path.read_bytes(), path.suffix.lstrip(".").lower()
    except OSError as err:
        raise source_changed(location, work, key, err) from None


def open_image(location: dict, work: Path, key: str | None = None) -> Image.Image:
    """The item's image, decoded as RGB (`SourceChanged`, naming ``key``, if it cannot be)."""
    where = location.get("file") or (f"{location['tar']}:{location.get('name')}"
                                     if "tar" in location else str(work / location["stored"]))
    data = image_bytes(location, work, key)[0]
    try:
        return open_rgb(data, where)
    except PIL_ERRORS as err:
        raise source_changed(location, work, key, err) from None


def source_changed(location: dict, work: Path, key: str | None,
                   err: BaseException) -> SourceChanged:
    """The one-line error of an image read at ``read`` that a later read fails on."""
    item = f"item {key}: " if key is not None else ""
    where = work / location["stored"] if "stored" in location else describe_location(location)
    said = err.strerror if isinstance(err, OSError) and err.filename and err.strerror \
        else skip_message(err)  # the path is said already
    return SourceChanged(f"{item}its image at {where} can no longer be "
                         f"read ({said}): the source changed since the pool was "
                         f"read; put it back as it was, or delete {work} to start over")


def source_files(location: dict) -> list[str]:
    """The source files an item was read from: its image file or shard, and its manifest
    (none for an in-memory source's image, which lives in the run's own cache)."""
    return [str(location[k]) for k in ("manifest", "tar", "file") if k in location]


def stamp_sources(records: list[Record]) -> dict[str, list[int]]:
    """``{file: stamp}`` of every source file ``records`` were read from, what a resumed run
    checks the source by: one ``stat`` each, no reading (`file_stamp`)."""
    files = {f for record in records for f in source_files(record["location"])}
    return {f: file_stamp(f) for f in sorted(files)}


def file_stamp(file: str) -> list[int]:
    """Size and modification time of ``file`` (what make and rsync tell a change by):
    `cliplab.models.folder.files_stamp`'s idea without the change time or inode, which a
    rename, a ``chmod``, a ``cp -p`` restore of the same bytes or a network file system's
    remount alter with nothing read changed."""
    stat = os.stat(file)
    return [stat.st_size, stat.st_mtime_ns]


def changed_source(stamps: dict[str, list[int]]) -> str | None:
    """The first file of ``stamps`` that is gone or was rewritten or replaced since
    (``"FILE is gone"`` / ``"FILE was rewritten or replaced"``), or None."""
    for file, stamp in stamps.items():
        try:
            now = file_stamp(file)
        except OSError:
            return f"{file} is gone"
        if now != stamp:
            return f"{file} was rewritten or replaced"
    return None


def read_item(item: Item, number: int, work: Path,
              readable: set[tuple] | None = None) -> tuple[Record | None, str | None]:
    """``(record, None)`` for a usable item, ``(None, reason)`` for one dropped at ``read``: an
    unreadable image or an empty caption, named by file (and manifest line). ``readable``:
    the images (`image_source`) already decoded for an earlier item, not decoded again (a
    caption manifest names each image once per caption); it gains this item's."""
    where = describe_location(item.location)
    stored = "stored" in item.location  # in memory: read, to be written as a PNG below
    source = None if stored or readable is None else image_source(item.location)
    if source is None or source not in readable:
        try:
            image = item.read()
        except PIL_ERRORS as err:
            what = skip_reason(err).replace("_", " ")
            return None, f"{what} at {where}: {skip_message(err)}"
        if source is not None:
            readable.add(source)
    if not item.caption or not item.caption.strip():
        return None, f"empty caption at {where}"
    location = dict(item.location)
    if stored:  # in-memory source: keep a PNG for later steps and the output
        rel = f"cache/images/{number:09d}.png"
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(work / rel) as tmp:
            image.save(tmp, format="PNG")
        location = {"stored": rel}
    return {"key": item.key, "caption": item.caption, "location": location,
            "meta": item.meta}, None


def image_source(location: dict) -> tuple:
    """What identifies an item's image bytes (a file, a tar member's byte range, a stored
    PNG), whichever row of a manifest names it."""
    if "stored" in location:
        return ("stored", location["stored"])
    if "tar" in location:
        return ("tar", location["tar"], int(location["offset"]), int(location["size"]))
    return ("file", location["file"])


def needs_images(step: Any) -> bool:
    """Whether ``step`` (as configured) looks at the pool's pixels in ``map``: its own
    ``needs_images``; a step that does not say is given them."""
    return bool(getattr(step, "needs_images", True))


def image_input(step: Any) -> PreprocessConfig | None:
    """The input of the model a step's ``map`` only embeds the images with (its
    ``image_input``): image files larger are given fitted to it as they are decoded
    (`fit_to_model`, as eval and index read files), so a chunk of photos costs that per image,
    not the photos' own sizes. None (steps that look at the pixels: sizes, hashes): whole."""
    return getattr(step, "image_input", None)


def load_batch(records: list[Record], work: Path, images: bool = True,
               fit: PreprocessConfig | None = None) -> PoolBatch:
    """The `PoolBatch` of ``records``: with ``images``, each decoded from where it lives (an
    image several rows name decoded once and shared: steps only read them; an image file
    fitted to ``fit`` when given, `image_input`); without, none (``images`` is None) for a
    step that does not look at them."""
    decoded: dict[tuple, Image.Image] = {}

    def image(location: dict, key: str) -> Image.Image:
        source = image_source(location)
        if source not in decoded:
            decoded[source] = open_image(location, work, key)
            if fit is not None and "stored" not in location:  # files; in-memory sets as they are
                decoded[source] = fit_to_model(decoded[source], fit)
        return decoded[source]

    return PoolBatch(keys=[r["key"] for r in records], captions=[r["caption"] for r in records],
                     images=[image(r["location"], r["key"]) for r in records]
                     if images else None,
                     meta=[r["meta"] for r in records])


# rows whose images a step that looks at whole images (sizes, pixel hashes) is given at once:
# a chunk of phone photos held whole needed GBs (36 MB each)
WHOLE_IMAGE_ROWS = 8


def map_chunk(step: Any, records: list[Record], work: Path) -> dict[str, np.ndarray]:
    """``step.map`` of one chunk: its images as the step needs them (none, fitted to its
    model's input, or whole); whole images are mapped ``WHOLE_IMAGE_ROWS`` rows at a time
    and the columns joined (``map`` is per item: the same columns as at once)."""
    fit, images = image_input(step), needs_images(step)
    if not images or fit is not None or len(records) <= WHOLE_IMAGE_ROWS:
        return step.map(load_batch(records, work, images, fit))
    parts = [step.map(load_batch(records[i:i + WHOLE_IMAGE_ROWS], work))
             for i in range(0, len(records), WHOLE_IMAGE_ROWS)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

