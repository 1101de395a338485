"""Task ``retrieval``: image↔text recall@k both ways on an image-text (or labelled) set."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from cliplab.errors import ConfigError, warn
from cliplab.evaluate.retrieval import retrieval
from cliplab.evaluate.tasks.base import DataSpec, TaskContext, TaskSpecBase
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["retrieval"]
    data: DataSpec
    ks: list[Annotated[int, Field(gt=0)]] = Field([1, 5, 10], min_length=1)

    def check(self, context: TaskContext) -> None:
        """A ``ks`` given at or beyond the images would rank every image a hit for each
        caption: text-to-image recall 1.0 whatever the model (the images are the fewer
        candidates). The default ``ks`` on a small set leave such a k out (`run` warns);
        on a set of one image none is left."""
        # every image has a caption or more: the images are the fewer candidates
        n = len(context.pairs(self.data))
        over = [k for k in self.ks if k >= n]
        if "ks" not in self.model_fields_set:
            if len(over) == len(self.ks):
                raise ConfigError(f"data holds {n} image{'s' * (n != 1)}: every recall@k "
                                  "would be 1.0 whatever the model; give data of more images")
            return
        if over:
            raise ConfigError(f"ks: {', '.join(map(str, over))} ranks all {n} images a caption "
                              f"is ranked against in data (image_retrieval_recall@{over[0]} "
                              "would be 1.0 whatever the model); " +
                              (f"give ks below {n}" if n > 1 else "give data of more images"))


def reported_ks(spec: Spec, n_images: int) -> list[int]:
    """The ks ``spec`` reports over ``n_images`` images: given ones as they are (`Spec.check`
    refused any at or above the images); of the default ones those below, with one warning
    naming the others."""
    if "ks" in spec.model_fields_set:
        return list(spec.ks)
    over = [k for k in spec.ks if k >= n_images]
    if over:
        warn(f"{spec.name or spec.task}: recall@{', recall@'.join(map(str, over))} not "
             f"reported (either way): of the default ks {list(spec.ks)}, those of {n_images} "
             f"or more rank all {n_images} images of data (image_retrieval_recall@{over[0]} "
             "would be 1.0 whatever the model)")
    return [k for k in spec.ks if k < n_images]


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    pairs = context.pairs(spec.data)
    feats = context.image_features(model, pairs.images, spec.data,
                                   f"encode {spec.name or spec.task}")
    ks = reported_ks(spec, len(pairs))
    out = retrieval(model, pairs, ks=tuple(ks), progress=context.progress,
                    image_features=feats, text_cache=context.texts,
                    precision=context.precision)
    # the candidates each direction ranked (skipped pairs are not among them)
    return {**out, "n_images": len(pairs), "n_texts": sum(len(c) for c in pairs.captions)}
