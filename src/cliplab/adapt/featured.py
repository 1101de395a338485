"""A `cliplab adapt` training set of all its images (``shots: 0``) for a method that reads it
only through its image features (its ``trains_on_features``): listed, then decoded and encoded
a batch at a time by the eval suite's streaming (`TaskContext.stream_listed`,
`cliplab.evaluate.streamed`), its features kept (N x dim) and its pixels never held. It holds
the samples the whole load would (1x1 placeholder images) and carries their features through
the validation split and ``train_size``'s subset (`FeaturedImages.subset`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cliplab.data.listed import ListedImages
from cliplab.data.sources import as_labelled
from cliplab.data.types import LabelledImages
from cliplab.errors import DataError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import DEFAULT_PROBE_LAYERS, ImageFeatures
from cliplab.evaluate.tasks import TaskContext
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import image_tower_fingerprint


@dataclass(eq=False, kw_only=True)  # keyword-only: required after the base's defaults
class FeaturedImages(LabelledImages):
    """Samples whose images are 1x1 placeholders and whose ``features`` (one row each, with
    the extra probe ``tag``, `FeatureCache.probe_tag`) came from the image tower ``tower``
    (`image_tower_fingerprint`); ``subset`` keeps each sample's row."""

    features: ImageFeatures
    tag: str = "plain"
    tower: str = ""

    def subset(self, index: torch.Tensor) -> FeaturedImages:
        part = super().subset(index)
        feats = self.features
        rows = ImageFeatures(feats.embeddings[index], feats.backbone[index],
                             None if feats.probe is None else feats.probe[index],
                             feats.probe_kind)
        return FeaturedImages(**_fields(part), features=rows, tag=self.tag, tower=self.tower)

    def features_for(self, model: DualEncoder, probe: str | None, desc: str) -> ImageFeatures:
        """The carried features, when they are ``model``'s image tower's with ``probe``'s (a
        `DataError` naming ``desc`` otherwise: they cannot be computed again, no pixel is
        held)."""
        if FeatureCache.probe_tag(probe, DEFAULT_PROBE_LAYERS) not in ("plain", self.tag):
            raise DataError(f"{desc}: {probe} features were not computed when data.train was "
                            f"streamed (it was streamed {self.tag}); report this")
        if image_tower_fingerprint(model) != self.tower:
            raise DataError(f"{desc}: data.train was streamed for another model (or weights), "
                            "and its pixels are not held; report this")
        return self.features


def _fields(data: LabelledImages) -> dict:
    """``data``'s `LabelledImages` fields by name."""
    return {f.name: getattr(data, f.name) for f in dataclasses.fields(LabelledImages)}


def streamed_training(model: DualEncoder, spec: dict, listed: ListedImages,
                      cache: FeatureCache, probe: str | None = None,
                      progress: bool = True) -> LabelledImages:
    """``data.train`` (``spec``, listed as ``listed`` for ``model``'s input) streamed: its
    images encoded a batch at a time with ``probe``'s features, which are cached in ``cache``
    and carried by the returned `FeaturedImages`. Where streaming would not give the whole
    load's samples (a class with no readable file, images of mixed sizes the whole load
    would square together), the set is loaded whole instead, as `load_source` loads it."""
    context = TaskContext(cache=cache, progress=progress, hold=False)
    try:
        context.stream_listed(spec, listed, model, probe)
        data = context.load(spec, "data.train", model, "encode train")
        streamed = context.streamed_set(spec)
        if streamed is None:  # read whole, as the whole load reads it
            return as_labelled(data, "data.train")
        return FeaturedImages(**_fields(streamed.data), features=streamed.features,
                              tag=streamed.tag, tower=streamed.tower)
    finally:  # its placeholders must reach no other reader
        context.drop_streamed()
