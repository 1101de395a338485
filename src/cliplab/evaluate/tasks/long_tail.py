"""Task ``long_tail``: per-class zero-shot accuracy on ``data`` against how often each class
(or ``concepts``, one per class) is named in ``train_data``'s captions, with the log-linear
fit of "No 'Zero-Shot' Without Exponential Data"."""

from __future__ import annotations

from typing import Any, Literal

from cliplab.data.concepts import count_mentions
from cliplab.evaluate.long_tail import long_tail_analysis, training_captions
from cliplab.evaluate.metrics import per_class_accuracy
from cliplab.evaluate.tasks.base import DataSpec, TaskContext, TaskSpecBase, task_error
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["long_tail"]
    data: DataSpec
    train_data: dict[str, Any]
    concepts: list[str] | None = None


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    name = spec.name or spec.task
    data = context.labelled(spec.data, f"task {name!r} data")
    captions = training_captions(spec.train_data, f"task {name!r} train_data")
    concepts = spec.concepts or data.classnames
    if len(concepts) != len(data.classnames):
        raise task_error(spec, f"{len(concepts)} concepts for {len(data.classnames)} classes; "
                         "give one per class")
    logits, _ = context.class_logits(model, data, spec.data, f"encode {name}")
    acc = per_class_accuracy(logits, data.labels, data.classnames)
    counts, n_samples = count_mentions(captions, concepts)
    out = long_tail_analysis(acc, dict(zip(data.classnames, counts)))
    out["n_train_samples"] = n_samples
    return {**out, **context.scored_by(data)}
