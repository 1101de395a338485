"""Write a dataset as WebDataset tar shards in the layout img2dataset writes (see ``layout``).

Each shard holds per sample ``{key}.jpg`` (or ``.png``, lossless), ``{key}.txt`` (the first
caption) and ``{key}.json`` (all captions, group, label/class name, ``source_key``: the
sample's item in the source, see `cliplab.data.types.source_keys`); of a labelled set also
``{key}.cls``, the class index as text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cliplab.data.images import ENCODE_FORMATS, encode_image
from cliplab.data.pairs import labelled_to_pairs
from cliplab.data.shards.layout import (INDEX_FILE, INDEX_FORMAT, SHARD_PATTERN, SIZES_FILE,
                                        STATS_FILE, UNFINISHED_FILE, read_index, set_files,
                                        shard_stats_name)
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport, source_keys
from cliplab.errors import ConfigError, DataError
from cliplab.output_folder import check_out, write_json
from cliplab.provenance import stamp


def check_out_folder(out: str | os.PathLike, overwrite: bool, inputs=()) -> None:
    """Raise ``DataError`` unless shards may be written to ``out`` (touches nothing): the one
    `check_out` rule, a previous shard set being what ``overwrite`` may replace."""
    if not overwrite and (Path(out) / UNFINISHED_FILE).exists():
        raise DataError(f"--out {out} holds an unfinished `cliplab data shard` run (it stopped "
                        "before its end, or still runs); --overwrite starts it again")
    check_out(out, "shard", inputs, overwrite, _holds_a_shard_set, error=DataError)


def _holds_a_shard_set(folder: Path) -> bool:
    """Whether ``folder`` holds a shard set `--overwrite` may replace: a previous run's, by
    its ``index.json`` (a search index's has the same name: replacing it destroyed the index),
    or by ``_unfinished`` when it stopped. Another tool's tars are not cliplab's to delete
    (img2dataset's ``.parquet`` files beside them would describe shards that are gone)."""
    if not set_files(folder):
        return False
    if not (folder / INDEX_FILE).is_file():
        return (folder / UNFINISHED_FILE).is_file()
    try:
        return read_index(folder, quiet=True) is not None  # None: another tool's index.json
    except DataError:  # unreadable: not one cliplab can say it wrote
        return False


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out``, marked unfinished (`UNFINISHED_FILE`) until `ShardSink.write_index`;
    with ``overwrite``, remove the old set's files (and nothing else)."""
    check_out_folder(out, overwrite)
    if out.is_dir():
        for old in set_files(out):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED_FILE).write_text("`cliplab data shard` is writing this folder, or stopped "
                                       f"before its end; {INDEX_FILE} comes last\n",
                                       encoding="utf-8")


class ShardSink:
    """A WebDataset ``ShardWriter`` in this layout: shards named ``SHARD_PATTERN`` in ``out``, a
    stats file beside each as it closes (``count``, ``successes`` and ``stats``), and ``shards``,
    the ``{name, count, bytes}`` list the index holds; `write_index` writes the set's index and stats
    once the writer is closed. Use as a context manager."""

    def __init__(self, out: Path, samples_per_shard: int, stats: dict | None = None):
        import webdataset as wds

        self.out, self.shards, self._stats = Path(out), [], dict(stats or {})
        # ShardWriter formats the whole pattern with the shard number, and opens the result
        # through gopen, which takes a relative "name:..." for a URL: the folder as an absolute
        # path with its own "%" escaped leaves SHARD_PATTERN the only pattern
        folder = os.path.abspath(self.out).replace("%", "%%")
        self._writer = wds.ShardWriter(os.path.join(folder, SHARD_PATTERN),
                                       maxcount=samples_per_shard,
                                       maxsize=float("inf"), post=self._finished, verbose=0,
                                       encoder=False, mode=0o644,
                                       mtime=0)  # int mtime: no per-member pax header

    def _finished(self, fname: str) -> None:  # ShardWriter calls this as each shard closes
        name, count = Path(fname).name, self._writer.count
        # its size too: a tar replaced since (another count) is told apart from the one listed
        self.shards.append({"name": name, "count": count, "bytes": Path(fname).stat().st_size})
        write_json(self.out / shard_stats_name(name),
                   {"count": count, "successes": count, **self._stats})

    def write(self, sample: dict) -> None:
        self._writer.write(sample)

    @property
    def total(self) -> int:
        return sum(s["count"] for s in self.shards)

    def write_index(self, name: str, source: dict | None, skipped: SkipReport,
                    **extra) -> dict:
        """``index.json`` (format, name, source, total, shards, skipped, ``extra``) and the
        set's stats file; returns the index."""
        index = {"format": INDEX_FORMAT, "version": 1, "name": name, "source": source, **extra,
                 "total": self.total, "shards": self.shards, "skipped": skipped.to_dict()}
        write_json(self.out / STATS_FILE, {"count": self.total, "skipped": skipped.lost_samples})
        write_json(self.out / SIZES_FILE, {s["name"]: s["count"] for s in self.shards})
        write_json(self.out / INDEX_FILE, stamp(index))
        (self.out / UNFINISHED_FILE).unlink(missing_ok=True)
        return index

    def __enter__(self) -> "ShardSink":
        self._writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._writer.__exit__(*exc)


def check_writer_options(image_format: str, samples_per_shard: int) -> None:
    """A `ConfigError` for an image format or shard size the writer cannot use."""
    if image_format not in ENCODE_FORMATS:
        raise ConfigError(f"image_format must be one of {sorted(ENCODE_FORMATS)}, not {image_format!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, not {samples_per_shard!r}")


def clean_captions(captions) -> list[str]:
    """The non-empty captions of a sample, stripped (none: the sample is skipped)."""
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def shard_sample(number: int, image: torch.Tensor, captions: list[str], group: int | None,
                 source_key: str, image_format: str, quality: int,
                 partner_key: str | None = None, label: int | None = None,
                 classname: str | None = None) -> dict:
    """The ``number``-th sample of a set as the writer stores it: the image encoded
    (``image_format``), the first caption as ``txt``, the sample's metadata as ``json`` (key,
    captions, group, source key, the partner's key and the class where there are) and, of a
    labelled set, the class index as ``cls`` (webdataset's and CLIP_benchmark's member)."""
    meta = {"key": f"{number:09d}", "captions": captions, "group": group,
            "source_key": source_key}
    if partner_key is not None:
        meta["partner_key"] = partner_key
    if label is not None:
        meta["label"] = label
        meta["classname"] = classname
    sample = {"__key__": meta["key"],
              image_format: encode_image(image, image_format, quality),
              "txt": captions[0].encode("utf-8"),
              "json": json.dumps(meta).encode("utf-8")}
    if label is not None:
        sample["cls"] = str(label).encode("ascii")
    return sample


def class_fields(classnames: list[str] | None, templates: list[str] | None,
                 descriptions: list[str] | None) -> dict:
    """What the index records of a labelled set (nothing for pairs): its class names and
    templates, and its class descriptions if it has any."""
    if classnames is None:
        return {}
    classes = {"classnames": classnames, "templates": templates}
    if descriptions:
        classes["descriptions"] = descriptions
    return classes


def write_shards(data: ImageTextPairs | LabelledImages, out: str | os.PathLike,
                 samples_per_shard: int = 1000, image_format: str = "jpg", quality: int = 95,
                 overwrite: bool = False, source: dict | None = None,
                 progress: bool = True) -> dict:
    """Write ``data`` as shards under ``out``; return the index (also saved as ``index.json``).

    Labelled images are written as pairs (one caption per prompt template, the class as group);
    the index keeps their class names and templates, so `load_shards` reads them back labelled.
    Samples without a non-empty caption are skipped and counted, as are those the source skipped.
    Each sample's ``source_key`` names its item in the source (`source_keys`). (A source read
    from files is written image by image instead: `cliplab.data.shards.from_files`.)
    """
    check_writer_options(image_format, samples_per_shard)
    labelled = data if isinstance(data, LabelledImages) else None
    pairs = labelled_to_pairs(data) if labelled is not None else data
    skipped = SkipReport()
    for reason, keys in data.skipped.keys.items():
        for key in keys:
            skipped.add(reason, key)
    sources = source_keys(data)  # what each sample was in the source, whatever it skipped
    keep = []
    for i, caps in enumerate(pairs.captions):
        caps = clean_captions(caps)
        if caps:
            keep.append((i, caps))
        else:
            skipped.add("empty_caption", sources[i])
    if not keep:
        raise DataError(f"nothing to write: {pairs.name} has no sample with a caption "
                        f"({skipped.summary()})")

    # a hard-negative partner (e.g. a counterfactual twin) is kept as its sample's key
    number_of = {i: number for number, (i, _) in enumerate(keep)}
    partners = pairs.partners
    out = Path(out)
    prepare_out(out, overwrite)
    with ShardSink(out, samples_per_shard, {"image_format": image_format}) as writer:
        for number, (i, caps) in enumerate(tqdm(keep, desc=f"shard {pairs.name}", unit="img",
                                                disable=not progress)):
            group = None if pairs.groups is None else int(pairs.groups[i])
            partner = None
            if partners is not None and int(partners[i]) in number_of:
                partner = f"{number_of[int(partners[i])]:09d}"
            label = classname = None
            if labelled is not None:
                label = int(labelled.labels[i])
                classname = labelled.classnames[label]
            writer.write(shard_sample(number, pairs.images[i], caps, group, sources[i],
                                      image_format, quality, partner, label, classname))

    classes = {} if labelled is None else class_fields(labelled.classnames, labelled.templates,
                                                       labelled.descriptions)
    return writer.write_index(pairs.name, source, skipped, image_format=image_format, **classes)
