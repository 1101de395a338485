"""The kinds of dataset every cliplab stage speaks: labelled images and image-text pairs (and
multi-label images, for multi-label evaluation).

Images are uint8 tensors laid out ``[N, H, W, C]`` (C is 1 or 3) so that small sets live in
memory and batches are preprocessed on whole tensors; large sets stream through the same
per-sample shape (``[H, W, C]`` uint8) from manifests or shards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from cliplab.errors import InputError


@dataclass
class SkipReport:
    """Samples a loader skipped, counted by reason, with the keys (path, line) of each."""

    counts: Counter = field(default_factory=Counter)
    keys: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str) -> None:
        """Record that the sample named ``key`` was skipped for ``reason``."""
        self.counts[reason] += 1
        self.keys.setdefault(reason, []).append(key)

    @classmethod
    def merged(cls, reports: list["SkipReport"]) -> "SkipReport":
        """One report of ``reports``, each (reason, key) once: a sample read in several epochs,
        or by several ranks' reports, is one skipped sample."""
        merged, seen = cls(), set()
        for report in reports:
            for reason, keys in report.keys.items():
                for key in keys:
                    if (reason, key) not in seen:
                        seen.add((reason, key))
                        merged.add(reason, key)
        return merged

    @property
    def total(self) -> int:
        """Every count: lost samples and shards read only in part (nonzero: something lost)."""
        return sum(self.counts.values())

    @property
    def lost_samples(self) -> int:
        """The samples skipped one by one: those of a shard read only in part among them
        (``cut_off``) where its folder's ``index.json`` gives its count, else not known."""
        return sum(self._samples_and_shards()[0].values())

    def _samples_and_shards(self) -> tuple[dict[str, int], dict[str, int]]:
        """Counts by reason of lost samples, and of shards read only in part (``*_shard``:
        each stands for an unknown number of samples)."""
        shards = {r: n for r, n in self.counts.items() if r.endswith("_shard")}
        return {r: n for r, n in self.counts.items() if r not in shards}, shards

    def summary(self) -> str:
        """One line such as ``skipped 3 samples: missing_file=2, empty_caption=1``; shards that
        could not be read to their end are told apart, with where each stopped (the samples
        they lost are counted as ``cut_off`` where their count is known)."""
        samples, shards = self._samples_and_shards()
        lost = sum(samples.values())
        text = f"skipped {lost} sample{'s' * (lost != 1)}"
        if samples:
            text += ": " + counts_text(samples)
        if shards:
            where = "; ".join(key for reason in sorted(shards) for key in self.keys.get(reason, []))
            text += f"; {sum(shards.values())} shard(s) read only in part ({where})"
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "SkipReport":
        """The report `to_dict` wrote (one listing only some keys keeps its whole counts)."""
        report = cls()
        for reason, keys in data.get("keys", {}).items():
            for key in keys:
                report.add(reason, key)
        if data.get("keys_not_listed"):
            report.counts = Counter({reason: int(n) for reason, n in data["counts"].items()})
        return report

    def to_dict(self, keys_per_reason: int | None = None) -> dict:
        """``total``: lost samples, as `line` and `summary` count them; ``shards_read_in_part``
        when some shard could not be read to its end. ``keys_per_reason``: list at most that many
        keys of each reason (where all are kept elsewhere), the others counted in
        ``keys_not_listed``."""
        shards = sum(self._samples_and_shards()[1].values())
        keys = self.keys if keys_per_reason is None else \
            {reason: listed[:keys_per_reason] for reason, listed in self.keys.items()}
        not_listed = sum(self.counts.values()) - sum(len(listed) for listed in keys.values())
        return {"total": self.lost_samples, **({"shards_read_in_part": shards} if shards else {}),
                "counts": dict(self.counts), "keys": keys,
                **({"keys_not_listed": not_listed} if not_listed else {})}

    def line(self, label: str, kept: int, where: str) -> str:
        """One line telling a user what was lost: ``zs: skipped 2 of 30 samples
        (missing_file=1, unreadable_image=1) in DATA`` (``kept``: the samples read); shards
        read only in part are told apart, as in `summary`."""
        samples, shards = self._samples_and_shards()
        lost = sum(samples.values())
        text = f"{label}: skipped {lost} of {kept + lost} samples"
        if samples:
            text += f" ({counts_text(samples)})"
        if shards:
            text += f", and {sum(shards.values())} shard(s) read only in part " \
                    f"({counts_text(shards)})"
        return text + f" in {where}"


def counts_text(counts: dict[str, int]) -> str:
    """``empty_caption=1, missing_file=2``: counts by reason, in reason order."""
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
        given = (f"{str(images.dtype).removeprefix('torch.')} of shape {list(images.shape)}"
                 if isinstance(images, (torch.Tensor, np.ndarray)) else type(images).__name__)
        raise InputError(f"images must be a uint8 tensor (or NumPy array) [N, H, W, C], not "
                         f"{given}")


def _as_tensor(value: object, labels: bool = False) -> object:
    """A NumPy array (or a list of labels) as a tensor; anything else as it is."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if labels and isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value)  # floats stay floats, to be refused
        except (TypeError, ValueError, RuntimeError):
            raise InputError("labels must be whole class indices (a list, NumPy array or "
                             "int64 tensor [N])") from None
    return value


def _check_labels(labels: object) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise InputError("labels must be whole class indices (a list, NumPy array or int64 "
                         f"tensor [N]), not {type(labels).__name__}"
                         + (f" of shape {list(labels.shape)}, {labels.dtype}"
                            if isinstance(labels, torch.Tensor) else ""))


def _check_keys(keys: list[str] | None, n: int) -> None:
    if keys is not None and len(keys) != n:
        raise InputError(f"{n} images but {len(keys)} keys")


def source_keys(data: "LabelledImages | ImageTextPairs") -> list[str]:
    """Each sample's source item, as its loader named it (a manifest's ``m.csv:line 4:
    images/x.png``, an image folder's ``cat/001.jpg``, a shard's ``00002.tar:000000020``),
    else ``NAME:i``, its position in the set (the source's own index where it skipped
    nothing, as a source generated in memory)."""
    if data.keys is not None:
        return list(data.keys)
    return [f"{data.name}:{i}" for i in range(len(data.images))]


@dataclass
class LabelledImages:
    """Images with integer labels, the class names and the prompt templates of the set.

    ``descriptions`` (optional, one per class) are short phrases such as "a sneaker, a sports
    shoe" that fill the templates instead of the bare class names (class descriptions as
    prompts); results are still reported under ``classnames``.
    """

    images: torch.Tensor  # uint8 [N, H, W, C]
    labels: torch.Tensor  # int64 [N]
    classnames: list[str]
    templates: list[str]
    name: str = "dataset"
    skipped: SkipReport = field(default_factory=SkipReport)
    descriptions: list[str] | None = None
    keys: list[str] | None = None  # each image's source item: see `source_keys`

    def __post_init__(self) -> None:
        self.images = _as_tensor(self.images)
        self.labels = _as_tensor(self.labels, labels=True)
        _check_images(self.images)
        _check_labels(self.labels)
        self.labels = self.labels.long()
        # "{c}" is where CLIP_benchmark's template files put the class, as "{}" is
        self.templates = [t.replace("{c}", "{}") if isinstance(t, str) else t
                          for t in ([self.templates] if isinstance(self.templates, str)
                                    else list(self.templates or []))]
        if len(self.images) != len(self.labels):
            raise InputError(f"{len(self.images)} images but {len(self.labels)} labels")
        _check_keys(self.keys, len(self.labels))
        outside = self.labels[(self.labels < 0) | (self.labels >= len(self.classnames))]
        if len(outside):  # such a label would score as wrong everywhere, without a word
            raise InputError(f"label {int(outside[0])} is no class index: {len(self.classnames)} "
                             f"classes, so labels run 0 to {len(self.classnames) - 1}")
        if not self.templates:  # no prompt: no zero-shot head, no captions as pairs
            raise InputError("no templates: give one prompt at least, e.g. ['a photo of a {}.']")
        if self.descriptions is not None and len(self.descriptions) != len(self.classnames):
            raise InputError(f"{len(self.descriptions)} descriptions for "
                             f"{len(self.classnames)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def prompt_names(self) -> list[str]:
        """What fills each class's templates: its description if given, else its name."""
        return self.descriptions or self.classnames

    def subset(self, index: torch.Tensor) -> "LabelledImages":
        """The samples at ``index`` (a bool mask or integer index), same classes and templates
        (and the record of what loading the set skipped), each keeping its source key."""
        every = source_keys(self)
        keys = [every[i] for i in torch.arange(len(every))[index].tolist()]
        return LabelledImages(self.images[index], self.labels[index], self.classnames,
                              self.templates, self.name, skipped=self.skipped,
                              descriptions=self.descriptions, keys=keys)


@dataclass
class ImageTextPairs:
    """Images each with one or more captions; ``groups`` marks captions that are interchangeable.

    ``captions[i]`` lists the captions of image ``i`` (any of them is a positive for it).
    ``groups[i]`` is an optional integer id: images sharing a group share their captions' meaning
    (e.g. the class of a classification set turned into pairs), so the contrastive loss treats
    their texts as positives too instead of false negatives (as it does a caption that several
    images' lists share: it describes each of them).
    ``partners[i]`` is an optional index of image ``i``'s hard-negative image (e.g. its
    counterfactual twin; -1: none), which ``train.hard_negatives.images: partners`` puts in the
    same batch. ``keys[i]`` optionally names image ``i``'s source item (see `source_keys`).
    """

    images: torch.Tensor  # uint8 [N, H, W, C]
    captions: list[list[str]]
    groups: torch.Tensor | None = None  # int64 [N]
    name: str = "pairs"
    skipped: SkipReport = field(default_factory=SkipReport)
    partners: torch.Tensor | None = None  # int64 [N], -1: none
    keys: list[str] | None = None

    def __post_init__(self) -> None:
        self.images = _as_tensor(self.images)
        _check_images(self.images)
        if len(self.images) != len(self.captions):
            raise InputError(f"{len(self.images)} images but {len(self.captions)} caption lists")
        # an image without one would be trained on its neighbour's caption (`CaptionTable`)
        bare = next((i for i, captions in enumerate(self.captions) if not len(captions)), None)
        if bare is not None:
            raise InputError(f"image {bare} has no caption: every image needs one or more")
        _check_keys(self.keys, len(self.captions))
        if self.partners is not None:
            n = len(self.captions)
            if self.partners.shape != (n,) or self.partners.dtype != torch.int64 \
                    or bool(((self.partners < -1) | (self.partners >= n)).any()) \
                    or bool((self.partners == torch.arange(n)).any()):
                raise InputError(f"partners must be int64 [{n}] of other images' indices or -1")

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class MultiLabelImages:
    """Images with a multi-hot ``targets`` matrix ``[N, C]`` (bool), class names and templates."""

    images: torch.Tensor  # uint8 [N, H, W, C]
    targets: torch.Tensor  # bool [N, num_classes]
    classnames: list[str]
    templates: list[str]
    name: str = "multilabel"
    skipped: SkipReport = field(default_factory=SkipReport)

    def __post_init__(self) -> None:
        self.images = _as_tensor(self.images)
        self.targets = _as_tensor(self.targets)
        _check_images(self.images)
        if not isinstance(self.targets, torch.Tensor) \
                or self.targets.shape != (len(self.images), len(self.classnames)):
            given = list(self.targets.shape) if isinstance(self.targets, torch.Tensor) \
                else type(self.targets).__name__
            raise InputError(f"targets must be [{len(self.images)}, {len(self.classnames)}] "
                             f"(a tensor or NumPy array), got {given}")
        self.targets = self.targets.bool()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def prompt_names(self) -> list[str]:
        return self.classnames
