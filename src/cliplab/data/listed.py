"""A labelled set listed before it is decoded, and k shots per class drawn from it decoding
only what is drawn: a 16-shot draw from an ImageNet-sized folder decodes 16 images per class,
not the 1.3 million a whole-set load would hold.

The draw equals `sample_k_shot` on the whole decoded set whenever every drawn file decodes
(same generator, same order of classes and candidates). A drawn file that does not decode is
skipped, counted, and replaced by the next candidate of its class in the seeded order, so
each class still gets k readable images while it has them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cliplab.data.images import (DeferredImage, ImageStack, UnreadableImage, decoding_for,
                                  deferred_decoding)
from cliplab.data.sources import load_source
from cliplab.data.types import LabelledImages, source_keys
from cliplab.models.preprocess import PreprocessConfig


@dataclass
class ListedImages:
    """``data`` as listed: every listed sample's label, class and key; the samples whose key
    is in ``decoders`` hold a placeholder image until `draw` decodes them (those of sources
    held in memory are loaded already)."""

    data: LabelledImages
    decoders: dict[str, DeferredImage]

    def __len__(self) -> int:
        return len(self.data)

    @property
    def deferred(self) -> int:
        """How many samples are listed and not decoded."""
        return len(self.decoders)


def listed_data(data: LabelledImages | ListedImages) -> LabelledImages:
    """The labels, classes and keys of a set, listed or loaded."""
    return data.data if isinstance(data, ListedImages) else data


def list_source(spec: dict, progress: bool | None = None, where: str | None = None,
                model_input: PreprocessConfig | None = None) -> LabelledImages | ListedImages:
    """`load_source`, except that an image folder's or a manifest's files are listed, not
    decoded (`ListedImages`); any other source, or a spec with a ``shift`` (applied to the
    whole set's pixels), is loaded as `load_source` loads it."""
    if isinstance(spec, dict) and spec.get("shift") is not None:
        return load_source(spec, progress, where, model_input)
    with deferred_decoding() as decoders:
        data = load_source(spec, progress, where, model_input)
    if not decoders or not isinstance(data, LabelledImages):
        return data  # nothing was deferred (a source held in memory), or pairs: not for a draw
    return ListedImages(data, decoders)


class ShotDraws:
    """Draws of k samples per class from one listed set, decoding only what they draw. A
    drawn file that does not decode is counted once in ``skipped`` (which starts as the
    listing's own skip report), passed over by every later draw and never decoded again."""

    def __init__(self, listed: ListedImages | LabelledImages, progress: bool = True):
        self.listed = listed if isinstance(listed, ListedImages) else ListedImages(listed, {})
        data = self.listed.data
        self.skipped = copy.deepcopy(data.skipped)  # the listing's, and what the draws find
        self.unreadable = torch.zeros(len(data), dtype=torch.bool)
        self.readable = torch.zeros(len(data), dtype=torch.bool)  # decoded without error
        self.keys = source_keys(data)
        self.decoded = 0  # files decoded (readable or not)
        # each class's listed indices (ascending, classes in order, as `sample_k_shot` visits
        # them), grouped once: a mask per class per draw cost classes x samples
        counts = torch.bincount(data.labels)
        self.by_class = [idx for idx in torch.argsort(data.labels, stable=True).split(
            counts.tolist()) if len(idx)]
        self.progress = progress

    def draw(self, k: int, seed: int, exclude: torch.Tensor | None = None,
             label: str = "draw") -> tuple[LabelledImages, torch.Tensor]:
        """``k`` readable samples of every class (all of a class with fewer), seeded, as
        `sample_k_shot` draws them from the decoded set; ``exclude`` (a bool mask over the
        listed samples) keeps samples out (e.g. those another draw took). Returns the drawn
        set (with ``skipped``) and the listed indices it holds (sorted)."""
        data = self.listed.data
        picked: dict[int, torch.Tensor] = {}

        def take(i: int) -> bool:
            image = self._image(i)
            if image is not None:
                picked[i] = image
            return image is not None

        index = self._pick(k, seed, exclude, take, label)
        chosen = dataclasses.replace(data.subset(index), skipped=self.skipped)
        if not self.listed.deferred or not len(index):
            return chosen, index
        images = ImageStack(len(index))
        for i in index.tolist():
            images.append(picked.pop(i))
        # images of several sizes are made the input of the model they were decoded for
        model_input = next(iter(self.listed.decoders.values())).model_input
        with decoding_for(model_input):
            stacked = images.stacked(f"{data.name} draw")
        return dataclasses.replace(chosen, images=stacked), index

    def indices(self, k: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The listed indices `draw` would take (sorted), holding no image: a sample an earlier
        draw decoded is known readable and not decoded again (so a smaller k of a seed already
        drawn decodes nothing: its picks are the first of the larger draw's)."""
        return self._pick(k, seed, exclude,
                          lambda i: bool(self.readable[i]) or self._image(i) is not None)

    def decoded_note(self) -> str:
        """``; 48 of its 5000 listed files were decoded for the draw, the others not read``
        when the draws left listed files unread (a skip count is then of those decoded), else
        empty."""
        listed = len(self.listed)
        if not self.listed.deferred or self.decoded >= listed:
            return ""
        return (f"; {self.decoded} of its {listed} listed files were decoded for the draw, "
                "the others not read")

    def _pick(self, k: int, seed: int, exclude: torch.Tensor | None,
              take: Callable[[int], bool], label: str = "draw") -> torch.Tensor:
        """Sorted listed indices of the first ``k`` candidates of each class (in the seeded
        order of `sample_k_shot`) that ``take`` accepts, known unreadable ones passed over:
        a draw does not depend on which draws came before it, and a seed's smaller draws are
        the first picks of its larger ones."""
        generator = torch.Generator().manual_seed(seed)
        candidates = []
        for idx in self.by_class:
            if exclude is not None:
                idx = idx[~exclude[idx]]
            if len(idx):
                candidates.append(idx[torch.randperm(len(idx), generator=generator)].tolist())
        picks: list[int] = []
        wanted = sum(min(k, len(idx)) for idx in candidates)
        with tqdm(total=wanted, desc=label, unit="img", leave=False,
                  disable=not self.progress or not self.listed.deferred) as bar:
            for idx in candidates:
                got = 0
                for i in idx:
                    if got == k:
                        break
                    if not self.unreadable[i] and take(i):
                        picks.append(i)
                        got += 1
                        bar.update()
        return torch.tensor(sorted(picks), dtype=torch.long)

    def _image(self, i: int) -> torch.Tensor | None:
        """Sample ``i``'s image, decoded now if deferred (None, counted, if it does not)."""
        deferred = self.listed.decoders.get(self.keys[i])
        if deferred is None:
            return self.listed.data.images[i]
        self.decoded += 1
        try:
            image = deferred.decode()
        except UnreadableImage:
            self.skipped.add("unreadable_image", deferred.name)
            self.unreadable[i] = True
            return None
        self.readable[i] = True
        return image
