"""Task ``long_tail``: per-class zero-shot accuracy on ``data`` against how often each class
(or ``concepts``, one per class) is named in ``train_data``'s captions, with the log-linear
fit of "No 'Zero-Shot' Without Exponential Data"."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from cliplab.data.concepts import count_mentions
from cliplab.data.pairs import class_keys
from cliplab.errors import ConfigError, warn
from cliplab.evaluate.long_tail import (long_tail_analysis, narrow_span_warning,
                                         training_captions)
from cliplab.evaluate.metrics import per_class_accuracy
from cliplab.evaluate.tasks.base import DataSpec, TaskContext, TaskSpecBase, data_key
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["long_tail"]
    data: DataSpec
    train_data: dict[str, Any]
    concepts: list[str] | None = None
    encoded: ClassVar[tuple[str, ...]] = ("data",)

    def check(self, context: TaskContext) -> None:
        data = context.labelled(self.data, "data")
        train_captions(self, context)  # read now: a bad train_data fails before any task
        if self.concepts and len(self.concepts) != len(data.classnames):
            raise ConfigError(f"concepts: {len(self.concepts)} concepts for "
                              f"{len(data.classnames)} classes; give one per class")


def train_captions(spec: Spec, context: TaskContext) -> list[list[str]]:
    """The captions of ``spec.train_data``, read once per context (kept with its datasets)."""
    key = f"captions:{data_key(spec.train_data)}"
    if key not in context.datasets:
        context.datasets[key] = training_captions(spec.train_data, "train_data")
    return context.datasets[key]


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    name = spec.name or spec.task
    data = context.labelled(spec.data, f"task {name!r} data")  # checked by Spec.check
    captions = train_captions(spec, context)
    concepts = spec.concepts or data.classnames
    logits, _ = context.class_logits(model, data, spec.data, f"encode {name}")
    acc = per_class_accuracy(logits, data.labels, data.classnames)
    counts, n_samples = count_mentions(captions, concepts)
    out = long_tail_analysis(acc, dict(zip(class_keys(data.classnames), counts)))
    out["n_train_samples"] = n_samples
    out["n"] = len(data.labels)  # the images the accuracies are over
    warning = narrow_span_warning(name, out["fit"])
    if warning:
        warn(warning)
    return {**out, **context.scored_by(data)}
