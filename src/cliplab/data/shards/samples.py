"""Samples of WebDataset tar shards as their parts (``{ext: bytes}``), and what the parts mean.

A sample is the tar members sharing a key (``000000006.png``, ``.txt``, ``.json``; extensions
lower-cased); its image is the first of ``IMAGE_EXTS`` present. Both the shard stream and the
CLIP_benchmark reader read shards through ``raw_samples``.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from cliplab.data.folder_files import SkippedFile
from cliplab.data.images import IMAGE_EXTS
from cliplab.data.shards.tar_members import (MemberGroups, compression, damage_text, member_key,
                                             tar_layout)


def raw_samples(shards: list[Path], expected: Mapping[Path, int] | None = None) -> Iterator[dict]:
    """Samples as ``{ext: bytes, "__key__", "__shard__"}``, shard after shard: the tar members
    sharing a key, grouped as webdataset groups them (a tar without a count in its folder's
    ``index.json`` whose samples' members lie apart, a ``tar`` of a folder, each sample gathered
    whole from its headers instead). A shard that cannot be read to its end
    yields every whole sample before the damage, then one ``{"__error__": "unreadable_shard"}``
    item saying where and why it stopped; one holding fewer samples than ``expected`` says (the
    counts of its folder's ``index.json``), or without a count one that ends before its
    end-of-archive marker (cut off), yields ``{"__error__": "truncated_shard"}``. Where the count
    is known, each sample the damage lost follows as a ``{"__error__": "cut_off"}`` item, so
    skip reports count them one by one. A sample whose key an earlier one of its tar has is
    ``{"__error__": "duplicate_key"}``, as the collection reader (index, curate) skips it."""
    expected = expected or {}
    for shard in shards:
        read, damage, seen = 0, None, set()
        # a shard of cliplab's (its folder's index.json counts it) keeps a sample's parts
        # together; another may not (a `tar` of a folder), and is then read by its headers
        apart = shard not in expected and tar_layout(shard).apart is not None
        samples = _regrouped_samples(shard) if apart else _tar_samples(shard)
        held = None  # the last sample: whole unless the damage came before its image
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except ShardDamage as err:
                damage = str(err)
                break
            read += 1
            if held is not None:
                yield held
            held = sample
            if sample["__key__"] in seen:  # which of the two the key means is ambiguous
                held = {"__error__": "duplicate_key", "__shard__": shard.name,
                        "__key__": sample["__key__"]}
            seen.add(sample["__key__"])
        count = expected.get(shard)
        short = count is not None and read < count  # fewer than index.json's count
        cut = count is None and not tar_layout(shard).whole  # no end-of-archive marker
        damaged = damage is not None or short or cut
        if damaged and held is not None and "__error__" not in held and image_part(held) is None:
            held, read = None, read - 1  # cut off before its image: one of the samples lost
        if held is not None:
            yield held
        if not damaged:
            continue
        of = f" of {count}" if count is not None else ""
        if damage is not None:
            reason, where = "unreadable_shard", f"after {read}{of} samples ({damage})"
        elif short:
            reason, where = "truncated_shard", f"{read}{of} samples (" + (
                "the tar ends before index.json's count)" if tar_layout(shard).whole
                else "the file ends early)")
        else:
            reason, where = "truncated_shard", f"{read} samples, then the file ends early " \
                                               "(no end-of-archive marker)"
        yield {"__error__": reason, "__shard__": shard.name, "__key__": where}
        for number in range(read + 1, (count or 0) + 1):
            yield {"__error__": "cut_off", "__shard__": shard.name,
                   "__key__": f"sample {number}{of}"}


class ShardDamage(Exception):
    """Why a shard could not be read on, in plain words (its message)."""


def _regrouped_samples(shard: Path) -> Iterator[dict]:
    """The samples of a tar whose members of one key lie apart (a ``tar`` of a folder, which
    webdataset would read as fragments), as `MemberGroups` gathers them from the headers, each
    read from its members' byte ranges; a sample the damage cut is left out, and `ShardDamage`
    follows the whole ones. A compressed tar is refused so: read out of order, it would be
    decompressed again from its start for every sample."""
    if (kind := compression(shard)) is not None:
        raise ShardDamage(f"its samples' members lie apart (a `tar` of a folder), which a "
                          f"{kind}-compressed tar cannot be read in: decompress it, or "
                          "make it again with `tar --sort=name`")
    groups, damage = MemberGroups(), None
    try:
        with tarfile.open(shard) as tar:
            groups.add_members(tar)
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = ShardDamage(damage_text(err))
    try:
        with open(shard, "rb") as f:
            end = f.seek(0, 2)
            for key, parts, _ in groups.samples:
                if any(m.offset_data + m.size > end for m in parts.values()):
                    continue  # cut by the damage
                sample = {"__key__": key, "__shard__": shard.name, "__url__": str(shard)}
                for ext, member in parts.items():
                    f.seek(member.offset_data)
                    sample[ext] = f.read(member.size)
                yield sample
    except OSError as err:
        raise ShardDamage(damage_text(err)) from None
    if damage is not None:
        raise damage


def _tar_samples(shard: Path) -> Iterator[dict]:
    """The samples of one tar in order, each yielded once its last member is read (so every
    whole sample before a damaged part comes out, but not one whose part the damage cut);
    `ShardDamage` where reading stops early.
    Members are grouped as ``webdataset.tarfile_samples`` groups them: consecutive members of
    one key (``dir/KEY.ext``), extensions lower-cased, ``__*__`` metadata files left out; a
    part the sample has already begins the next sample, of the same key."""
    current: dict | None = None
    damage: ShardDamage | None = None
    pending = None  # the key of the member being read
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                named = member_key(member.name) if member.isreg() else None
                if named is None:
                    continue
                key, ext = named
                # a part the current sample has already starts another sample of its key
                # (`raw_samples` skips it as a duplicate key)
                repeated = current is not None and key == current["__key__"] and ext in current
                if current is None or key != current["__key__"] or repeated:
                    if current is not None:
                        yield current  # whole: the next member is another sample's
                    current = {"__key__": key, "__shard__": shard.name, "__url__": str(shard)}
                pending = key
                data = tar.extractfile(member).read()
                pending = None
                tar.members = []  # a stream: keep no list of what was read
                current[ext] = data
    except ShardDamage as err:
        damage = err
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        damage = ShardDamage(damage_text(err))
        if current is not None and pending == current["__key__"]:
            current = None  # cut inside one of its parts: not whole
    if current is not None:
        yield current
    if damage is not None:
        raise damage


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


def txt_caption(data: bytes, where: str) -> str:
    """A ``.txt`` part as one caption, whole (img2dataset and webdataset write one caption per
    sample; a newline inside is part of it), stripped; a `SkippedFile` ``bad_caption`` naming
    ``where`` if it is not UTF-8 text, as a folder's ``NAME.txt`` is."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise SkippedFile("bad_caption", f"{where}: caption not UTF-8 text") from None


def sample_meta(raw: dict) -> SampleMeta:
    """Captions from the ``.json`` metadata's ``captions`` list (cliplab's shards), else the
    ``.txt`` part as one caption (`txt_caption`); the metadata's integer ``group`` and string
    ``partner_key``, else None. `SkippedFile` if the ``.txt`` is not UTF-8 text,
    ``ValueError``/``UnicodeDecodeError`` if the metadata is unreadable."""
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    caps = meta.get("captions")
    if not isinstance(caps, list):
        caps = [txt_caption(raw["txt"], sample_key(raw))] if "txt" in raw else []
    group, partner = meta.get("group"), meta.get("partner_key")
    return SampleMeta([c.strip() for c in caps if isinstance(c, str) and c.strip()],
                      group if isinstance(group, int) and not isinstance(group, bool) else None,
                      partner if isinstance(partner, str) else None)


def text_lines(data: bytes) -> list[str]:
    """The non-empty stripped lines of a ``.txt`` part (undecodable bytes replaced): a
    CLIP_benchmark retrieval set's captions of one image, one per line."""
    return [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
