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
        """Every k at most the number of images (the candidates of text-to-image retrieval;
        each image has a caption or more): beyond it recall@k would count every image a hit,
        1.0 whatever the model (`retrieval_metrics` caps such a k, under the key asked for)."""
        n = len(context.load(self.data))
        over = [k for k in self.ks if k > n]
        if over:
            raise ConfigError(f"ks: {', '.join(map(str, over))} is more than the {n} images of "
                              f"data (recall@k would rank all of them: 1.0 whatever the model); "
                              f"give ks of at most {n}")


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    pairs = context.pairs(spec.data)
    feats = context.image_features(model, pairs.images, spec.data,
                                   f"encode {spec.name or spec.task}")
    return retrieval(model, pairs, ks=tuple(spec.ks), progress=context.progress,
                     image_features=feats, text_cache=context.texts,
                     precision=context.precision)
