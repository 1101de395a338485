"""Samples of WebDataset tar shards as their parts (``{ext: bytes}``), and what the parts mean.

A sample is the tar members sharing a key (``000000006.png``, ``.txt``, ``.json``; extensions
lower-cased); its image is the first of ``IMAGE_EXTS`` present. Both the shard stream and the
CLIP_benchmark reader read shards through ``raw_samples``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from cliplab.data.images import IMAGE_EXTS


def raw_samples(shards: list[Path], expected: Mapping[Path, int] | None = None) -> Iterator[dict]:
    """Samples as ``{ext: bytes, "__key__", "__shard__"}``, shard after shard. A shard that
    cannot be read to its end yields one ``{"__error__": "unreadable_shard"}`` item after the
    samples before the damage; one holding fewer samples than ``expected`` says (the counts of
    its folder's ``index.json``), or without a count one that ends before its end-of-archive
    marker (cut off), yields ``{"__error__": "truncated_shard"}``."""
    from webdataset.tariterators import tarfile_samples

    from cliplab.data.shards.layout import tar_is_whole

    expected = expected or {}
    for shard in shards:
        read = 0
        try:
            for sample in tarfile_samples(iter([{"url": str(shard)}])):
                sample["__shard__"] = shard.name
                read += 1
                yield sample
        except Exception as err:  # tarfile/OSError/ValueError from a broken archive
            reason = str(err.args[0] if err.args else err).splitlines()[0]
            of = f" of {expected[shard]}" if shard in expected else ""
            yield {"__error__": "unreadable_shard", "__shard__": shard.name,
                   "__key__": f"after {read}{of} samples ({reason})"}
            continue
        if read < expected.get(shard, 0):
            yield {"__error__": "truncated_shard", "__shard__": shard.name,
                   "__key__": f"{read} of {expected[shard]} samples"}
        elif shard not in expected and not tar_is_whole(shard):
            yield {"__error__": "truncated_shard", "__shard__": shard.name,
                   "__key__": f"{read} samples, then the file ends early (no end-of-archive "
                   "marker)"}


def sample_key(raw: dict) -> str:
    """``shard:key``, how skip reports and batches name a sample."""
    return f"{raw['__shard__']}:{raw['__key__']}"


def bare_key(key: str) -> str:
    """The sample's own key (``000000006``) of a `sample_key` (``shard:key``)."""
    return key.rsplit(":", 1)[-1]


def image_part(raw: dict) -> str | None:
    """The extension of the sample's image part, None if it has none."""
    return next((ext for ext in IMAGE_EXTS if ext in raw), None)


class SampleMeta(NamedTuple):
    """What a sample's text parts say: its captions, its caption ``group`` (or None) and the
    key of its hard-negative partner in the same shard folder (``partner_key``, or None)."""

    captions: list[str]
    group: int | None
    partner_key: str | None


def sample_meta(raw: dict) -> SampleMeta:
    """Captions from the ``.json`` metadata's ``captions`` list, else the ``.txt`` lines; the
    metadata's integer ``group`` and string ``partner_key``, else None.
    ``ValueError``/``UnicodeDecodeError`` if the metadata is unreadable."""
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    caps = meta.get("captions")
    if not isinstance(caps, list):
        caps = text_lines(raw["txt"]) if "txt" in raw else []
    group, partner = meta.get("group"), meta.get("partner_key")
    return SampleMeta([c.strip() for c in caps if isinstance(c, str) and c.strip()],
                      group if isinstance(group, int) and not isinstance(group, bool) else None,
                      partner if isinstance(partner, str) else None)


def text_lines(data: bytes) -> list[str]:
    """The non-empty stripped lines of a ``.txt`` part (undecodable bytes replaced)."""
    return [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
