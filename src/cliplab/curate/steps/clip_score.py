"""Step ``clip_score``: score each pair by the cosine similarity of its image and caption
embeddings under any cliplab model (preset, folder, run, imported checkpoint, ONNX export), then
keep a top fraction (``keep_top``: DataComp's CLIP-score filter keeps the top 0.3) or the pairs
scoring at least ``threshold`` (exactly one of the two).

``keep_top: f`` keeps exactly ``round(f * n)`` of the ``n`` pairs that reach the step (rounded
half up); pairs with equal scores are ranked in pool order, so the cut is deterministic.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase
from cliplab.models.embed import embed_images, embed_texts
from cliplab.models.spec import ModelField


class Spec(StepSpecBase):
    step: Literal["clip_score"]
    model: ModelField
    keep_top: float | None = Field(None, gt=0, le=1)    # fraction of pairs kept, best first
    threshold: float | None = Field(None, ge=-1, le=1)  # keep pairs scoring at least this
    batch_size: int = Field(64, ge=1, le=4096)          # pairs embedded at once

    @model_validator(mode="after")
    def _one_rule(self) -> "Spec":
        if (self.keep_top is None) == (self.threshold is None):
            raise ValueError("give exactly one of keep_top (a fraction) and threshold (a score)")
        return self


def pair_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of unit image and text embeddings (float32 ``[n]``)."""
    return np.einsum("nd,nd->n", image_embeddings, text_embeddings).astype(np.float32)


def top_fraction(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, float | None]:
    """``(keep mask, lowest kept score)``: the ``round(fraction * n)`` highest scores (half up),
    equal scores ranked in pool order; the score is ``None`` when nothing is kept."""
    n = len(scores)
    count = min(n, math.floor(fraction * n + 0.5))
    keep = np.zeros(n, dtype=bool)
    if count == 0:
        return keep, None
    order = np.lexsort((np.arange(n), -scores.astype(np.float64)))
    keep[order[:count]] = True
    return keep, float(scores[order[count - 1]])


class ClipScore:
    """Keeps the pairs whose image and caption agree best under a model."""

    Spec = Spec

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = None

    def prepare(self, context: StepContext) -> None:
        from cliplab.models.resolve import load_model

        self.model = load_model(self.spec.model)

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        images = embed_images(self.model, batch.images, self.spec.batch_size)
        texts = embed_texts(self.model, batch.captions, self.spec.batch_size)
        return {"clip_score": pair_scores(images, texts)}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        scores = np.asarray(columns["clip_score"], dtype=np.float32)
        spec = self.spec
        if spec.keep_top is not None:
            keep, cut = top_fraction(scores, spec.keep_top)
            rule = f"keep_top {spec.keep_top:g}"
        else:
            cut = float(spec.threshold)
            keep = scores >= cut
            rule = None
        reasons = [None if kept else _reason(float(score), cut, rule)
                   for kept, score in zip(keep.tolist(), scores.tolist())]
        return Decision(keep=keep, reasons=reasons, scores=scores, threshold=cut,
                        report={"rule": rule or f"threshold {cut:g}", "kept": int(keep.sum()),
                                "score": "cosine(image, caption)"})


def _reason(score: float, cut: float | None, rule: str | None) -> str:
    if cut is None:
        return f"clip score {score:.3f}: {rule} of the pool keeps no pair"
    if rule is None:
        return f"clip score {score:.3f} below threshold {cut:.3f}"
    if score < cut:
        return f"clip score {score:.3f} below threshold {cut:.3f} ({rule})"
    return f"clip score {score:.3f} at threshold {cut:.3f}, past the cut of {rule} (ties in pool order)"
