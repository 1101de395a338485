"""Step ``clip_score``: score each pair by the cosine similarity of its image and caption
embeddings under any cliplab model (preset, folder, run, imported checkpoint, ONNX export), then
keep a top fraction (``keep_top``: DataComp's CLIP-score filter keeps the top 0.3) or the pairs
scoring at least ``threshold`` (exactly one of the two).

How the pairs are kept (rounding, ties) is `cliplab.curate.score_filter`, shared with ``dfn``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from cliplab.curate.score_filter import check_keep_options, keep_by_score
from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase
from cliplab.models.embed import embed_images, embed_texts
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.spec import ModelField


class Spec(StepSpecBase):
    step: Literal["clip_score"]
    model: ModelField
    keep_top: float | None = Field(None, gt=0, le=1)    # fraction of pairs kept, best first
    threshold: float | None = Field(None, ge=-1, le=1)  # keep pairs scoring at least this
    batch_size: int = Field(64, ge=1, le=4096)          # pairs embedded at once

    @model_validator(mode="after")
    def _one_rule(self) -> "Spec":
        check_keep_options(self.keep_top, self.threshold)
        return self


def pair_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of unit image and text embeddings (float32 ``[n]``)."""
    return np.einsum("nd,nd->n", image_embeddings, text_embeddings).astype(np.float32)


class ClipScore:
    """Keeps the pairs whose image and caption agree best under a model."""

    Spec = Spec
    needs_images = True  # map embeds the images

    @property
    def image_input(self) -> PreprocessConfig | None:
        """``map`` only embeds the images: files come fitted to the model's input."""
        return getattr(self.model, "preprocess_config", None)

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = None

    def prepare(self, context: StepContext) -> None:
        from cliplab.models.resolve import load_model

        self.model = load_model(self.spec.model, context.device)

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        images = embed_images(self.model, batch.images, self.spec.batch_size)
        texts = embed_texts(self.model, batch.captions, self.spec.batch_size)
        return {"clip_score": pair_scores(images, texts)}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        return keep_by_score(columns["clip_score"], self.spec.keep_top, self.spec.threshold,
                             "clip score", {"score": "cosine(image, caption)"})
