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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cliplab.data.images import DeferredImage, ImageStack, UnreadableImage, deferred_decoding
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
    listing's own skip report) and never drawn again."""

    def __init__(self, listed: ListedImages | LabelledImages, progress: bool = True):
        self.listed = listed if isinstance(listed, ListedImages) else ListedImages(listed, {})
        data = self.listed.data
        self.skipped = copy.deepcopy(data.skipped)  # the listing's, and what the draws find
        self.unreadable = torch.zeros(len(data), dtype=torch.bool)
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
        keys = source_keys(data)
        generator = torch.Generator().manual_seed(seed)
        out = self.unreadable if exclude is None else self.unreadable | exclude
        candidates = []
        for idx in self.by_class:
            idx = idx[~out[idx]]
            if len(idx):
                candidates.append(idx[torch.randperm(len(idx), generator=generator)].tolist())
        picked: dict[int, torch.Tensor] = {}
        wanted = sum(min(k, len(idx)) for idx in candidates)
        with tqdm(total=wanted, desc=label, unit="img", leave=False,
                  disable=not self.progress or not self.listed.deferred) as bar:
            for idx in candidates:
                got = 0
                for i in idx:
                    if got == k:
                        break
                    image = self._image(keys[i], i)
                    if image is not None:
                        picked[i], got = image, got + 1
                        bar.update()
        index = torch.tensor(sorted(picked), dtype=torch.long)
        chosen = dataclasses.replace(data.subset(index), skipped=self.skipped)
        if not self.listed.deferred or not len(index):
            return chosen, index
        images = ImageStack(len(index))
        for i in index.tolist():
            images.append(picked.pop(i))
        return dataclasses.replace(chosen, images=images.stacked(f"{data.name} draw")), index

    def _image(self, key: str, i: int) -> torch.Tensor | None:
        """Sample ``i``'s image, decoded now if deferred (None, counted, if it does not)."""
        deferred = self.listed.decoders.get(key)
        if deferred is None:
            return self.listed.data.images[i]
        self.decoded += 1
        try:
            return deferred.decode()
        except UnreadableImage:
            self.skipped.add("unreadable_image", deferred.name)
            self.unreadable[i] = True
            return None
