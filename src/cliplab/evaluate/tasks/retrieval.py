"""Task ``retrieval``: image↔text recall@k both ways on an image-text (or labelled) set."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from cliplab.errors import ConfigError
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
        candidates). The default ``ks`` on a small set is capped per direction by
        `retrieval_metrics`, under the key asked for."""
        if "ks" not in self.model_fields_set:
            return
        # every image has a caption or more: the images are the fewer candidates
        n = len(context.pairs(self.data))
        over = [k for k in self.ks if k >= n]
        if over:
            raise ConfigError(f"ks: {', '.join(map(str, over))} ranks all {n} images a caption "
                              f"is ranked against in data (image_retrieval_recall@{over[0]} "
                              "would be 1.0 whatever the model); " +
                              (f"give ks below {n}" if n > 1 else "give data of more images"))


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    pairs = context.pairs(spec.data)
    feats = context.image_features(model, pairs.images, spec.data,
                                   f"encode {spec.name or spec.task}")
    out = retrieval(model, pairs, ks=tuple(spec.ks), progress=context.progress,
                    image_features=feats, text_cache=context.texts,
                    precision=context.precision)
    # the candidates each direction ranked (skipped pairs are not among them)
    return {**out, "n_images": len(pairs), "n_texts": sum(len(c) for c in pairs.captions)}
