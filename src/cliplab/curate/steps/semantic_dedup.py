"""Step ``semantic_dedup``: SemDeDup on the image embeddings of any cliplab model.

``map`` embeds each batch's images (column ``embedding``, unit float32 rows); ``decide`` runs
`cliplab.curate.semdedup.semantic_duplicates` over every item that reached the step: k-means into
``n_clusters`` clusters, then within each cluster an item whose cosine similarity to an already
kept member (``compare: kept``, default) or to any member visited before it (``compare:
earlier``, SemDeDup's reference code) exceeds ``1 - eps`` is dropped. ``keep: first`` (default)
keeps the first of a group of near duplicates in pool order; ``keep: farthest`` the one farthest
from its cluster's centroid (SemDeDup's choice).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from cliplab.curate.semdedup import semantic_duplicates
from cliplab.curate.steps.base import (Decision, PoolBatch, PoolItems, StepContext,
                                       StepSpecBase, told_apart)
from cliplab.errors import warn
from cliplab.models.embed import embed_images
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.spec import ModelField


class Spec(StepSpecBase):
    step: Literal["semantic_dedup"]
    model: ModelField
    eps: float = Field(0.05, gt=0, le=1)          # drop above cosine 1 - eps (see compare)
    n_clusters: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # auto: about sqrt(items)
    keep: Literal["first", "farthest"] = "first"
    compare: Literal["kept", "earlier"] = "kept"  # earlier: SemDeDup's code (drops more)
    seed: int | None = None                      # k-means seed (default: the run's seed)
    batch_size: int = Field(64, ge=1, le=4096)   # images embedded at once
    kmeans_iterations: int = Field(10, ge=1)

    def packages(self) -> dict[str, str]:
        return {"faiss": "its k-means"}


class SemanticDedup:
    """Drops semantic near duplicates (see the module docstring)."""

    Spec = Spec
    needs_images = True  # map embeds the images

    @property
    def image_input(self) -> PreprocessConfig | None:
        """``map`` only embeds the images: files come fitted to the model's input."""
        return getattr(self.model, "preprocess_config", None)

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = None
        self.seed = spec.seed if spec.seed is not None else 0

    def prepare(self, context: StepContext) -> None:
        from cliplab.models.resolve import load_model

        self.model = load_model(self.spec.model, context.device)
        self.seed = self.spec.seed if self.spec.seed is not None else context.seed

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        return {"embedding": embed_images(self.model, batch.images, self.spec.batch_size)}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        spec = self.spec
        n = len(columns["embedding"])
        if spec.n_clusters != "auto" and spec.n_clusters >= n > 1:
            # as many clusters as items puts each alone: no pair is ever compared
            warn(f"semantic_dedup: n_clusters {spec.n_clusters} is not below the pool's "
                 f"{n} items, so each item is a cluster of its own and no duplicate can "
                 "be found; use fewer (or 'auto', about the square root of the items)")
        found = semantic_duplicates(columns["embedding"], spec.n_clusters, spec.eps, self.seed,
                                    spec.keep, spec.kmeans_iterations, compare=spec.compare)
        reasons = [None if kept else "near duplicate of {} (cosine {} above {})".format(
                       items.keys[dup], *told_apart(sim, found.threshold))
                   for kept, dup, sim in zip(found.keep.tolist(), found.duplicate_of.tolist(),
                                             found.similarity.tolist())]
        clusters = [[items.keys[i] for i in group] for group in found.clusters()]
        return Decision(keep=found.keep, reasons=reasons, scores=found.similarity,
                        threshold=found.threshold,
                        report={"clusters": clusters, "n_clusters": found.n_clusters,
                                "eps": spec.eps, "keep_rule": spec.keep, "compare": spec.compare,
                                "score": ("a dropped item: cosine to the item it was "
                                          "dropped for (with compare: earlier, maybe dropped "
                                          "itself); a kept one: to the most similar other kept "
                                          "item of the cluster (-1: none)")})
