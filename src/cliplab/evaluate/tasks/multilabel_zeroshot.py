"""Task ``multilabel_zeroshot``: mean average precision of the zero-shot head (or of
``context.classifier``) on a multi-label set."""

from __future__ import annotations

from typing import Literal

from cliplab.data.multilabel import MultiLabelImages
from cliplab.errors import ConfigError
from cliplab.evaluate.multilabel import multilabel_metrics
from cliplab.evaluate.tasks.base import DataSpec, TaskContext, TaskSpecBase, task_error
from cliplab.models.dual_encoder import DualEncoder


NOT_MULTILABEL = ("data must be multi-label (shapes with multilabel: true, or "
                  "multilabel-manifest)")


class Spec(TaskSpecBase):
    task: Literal["multilabel_zeroshot"]
    data: DataSpec

    def check(self, context: TaskContext) -> None:
        if not isinstance(context.load(self.data), MultiLabelImages):
            raise ConfigError(NOT_MULTILABEL)  # before any task of the suite runs


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    data = context.load(spec.data)
    if not isinstance(data, MultiLabelImages):
        raise task_error(spec, NOT_MULTILABEL)
    scores, _ = context.class_logits(model, data, spec.data, f"encode {spec.name or spec.task}")
    try:
        metrics = multilabel_metrics(scores, data.targets, data.classnames)
    except ValueError as err:
        raise task_error(spec, str(err)) from None
    return {**metrics, "n": len(data.targets), **context.scored_by(data)}
