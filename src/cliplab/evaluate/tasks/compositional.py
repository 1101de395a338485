"""Task ``compositional``: true caption against attribute-swap, relation-swap and
word-shuffle negatives on `shapes` relation scenes."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import field_validator

from cliplab.data.shapes import load_shapes_with_scenes
from cliplab.evaluate.compositional import compositional
from cliplab.evaluate.tasks.base import TaskContext, TaskSpecBase, task_error
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["compositional"]
    data: dict[str, Any] = {"source": "shapes"}
    seed: int = 0

    @field_validator("data")
    @classmethod
    def _shapes_relation_scenes(cls, data: dict) -> dict:
        """Checked with the suite, before any task runs: `shapes`, the options of its scenes,
        and relation scenes among the kinds."""
        if data.get("source") != "shapes":
            raise ValueError("compositional negatives are exact only on `shapes`; use "
                             "{source: shapes, n: 500}")
        valid = list(inspect.signature(load_shapes_with_scenes).parameters)
        unknown = sorted(set(data) - {"source", *valid})
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for the "
                             f"compositional task's shapes scenes (valid: {', '.join(valid)})")
        kinds = data.get("kinds", ["relation"])
        if "relation" not in ([kinds] if isinstance(kinds, str) else list(kinds)):
            raise ValueError(f"kinds {kinds} has no relation scenes, the only ones its "
                             "negatives are made for; leave kinds out or include relation")
        return data


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    options = {k: v for k, v in spec.data.items() if k != "source"}
    options.setdefault("kinds", ["relation"])
    try:
        pairs, scenes = load_shapes_with_scenes(**options)
    except TypeError as err:
        raise task_error(spec, f"bad shapes option: {err}") from None
    feats = context.image_features(model, pairs.images, None,
                                   f"encode {spec.name or spec.task}")
    try:
        return compositional(model, pairs.images, scenes, seed=spec.seed,
                             image_emb=feats.embeddings, precision=context.precision,
                             texts=context.texts)
    except ValueError as err:
        raise task_error(spec, str(err)) from None
