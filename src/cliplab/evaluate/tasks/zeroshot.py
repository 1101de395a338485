"""Task ``zeroshot``: top-1/top-5/mean per-class recall of the zero-shot text head (or of
``context.classifier``) on a labelled set; ``classes`` restricts it to some classes (e.g.
ones held out of training); ``per_class: true`` adds each class's accuracy."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cliplab.data.pairs import class_indices
from cliplab.errors import CliplabError, ConfigError, DataError
from cliplab.evaluate.metrics import (classification_metrics, per_class_accuracy,
                                      restrict_classes)
from cliplab.evaluate.tasks.base import DataSpec, TaskContext, TaskSpecBase
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits, zeroshot_metrics
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["zeroshot"]
    data: DataSpec
    # class names (any case) or indices; omitted: every class
    classes: list[int | str] | None = Field(None, min_length=1)
    per_class: bool = False
    encoded: ClassVar[tuple[str, ...]] = ("data",)

    def check(self, context: TaskContext) -> None:
        data = context.labelled(self.data, "data")
        if self.classes is not None:
            classes = chosen_classes(self, data.classnames)
            # a class without images still competes (a distractor); with none at all there is
            # nothing to score (e.g. a `limit:` that kept none)
            if not any((data.labels == c).any() for c in classes):
                raise DataError(f"classes: data holds no images of "
                                f"{', '.join(data.classnames[c] for c in classes)}; give data "
                                "that has them")


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    name = spec.name or spec.task
    data = context.labelled(spec.data, f"task {name!r} data")
    classes = None  # checked by Spec.check before the suite ran
    if spec.classes is not None:
        classes = chosen_classes(spec, data.classnames)
    if context.classifier_for(data) is not None:
        logits, _ = context.class_logits(model, data, spec.data, f"encode {name}")
        labels, classnames = data.labels, list(data.classnames)
        if classes is not None:
            logits, labels = restrict_classes(logits, data.labels, classes)
            classnames = [data.classnames[c] for c in classes]
        out = classification_metrics(logits, labels)
    else:  # the head itself restricted, exactly as zeroshot_metrics computes it
        feats = context.image_features(model, data.images, spec.data, f"encode {name}")
        head = zeroshot_classifier(model, data.prompt_names, data.templates, context.texts,
                                   context.precision, context.progress)
        out = zeroshot_metrics(feats.embeddings, data.labels, head, classes)
        if spec.per_class:
            logits, labels = zeroshot_logits(feats.embeddings, head), data.labels
            classnames = list(data.classnames)
            if classes is not None:
                logits, labels = restrict_classes(logits, labels, classes)
                classnames = [data.classnames[c] for c in classes]
    if spec.per_class:
        out["per_class_acc1"] = per_class_accuracy(logits, labels, classnames)
    # how many images the numbers are over (with classes: only those classes' images)
    out["n"] = len(data.labels) if classes is None else \
        int(torch.isin(data.labels, torch.tensor(classes)).sum())
    return {**out, **context.scored_by(data)}


def chosen_classes(spec: Spec, classnames: list[str]) -> list[int]:
    """The indices of ``spec.classes`` (names, any case, or indices) in ``classnames``; a
    one-line error (naming the key, not the task) listing the classes for an unknown one, and
    naming the repeats of a class given twice (its images would be scored against itself
    only: a fake 100%), or for one class alone (the same)."""
    names = [c for c in spec.classes if isinstance(c, str)]
    try:
        index = dict(zip(names, class_indices(classnames, names, key=None)))
    except CliplabError as err:
        raise ConfigError(f"classes: {err}") from None
    out = [index[c] if isinstance(c, str) else int(c) for c in spec.classes]
    bad = [c for c in spec.classes if not isinstance(c, str) and not 0 <= c < len(classnames)]
    if bad:
        raise ConfigError(f"classes: no class has index {bad[0]} (indices run 0 to "
                          f"{len(classnames) - 1}); classes are: {', '.join(classnames)}")
    given: dict[int, list[str]] = {}
    for c, i in zip(spec.classes, out):
        given.setdefault(i, []).append(str(c))
    twice = [f"{', '.join(g)} are all class {i} ({classnames[i]})"
             for i, g in given.items() if len(g) > 1]
    if twice:
        raise ConfigError(f"classes name a class more than once: {'; '.join(twice)}; give each "
                          "class once")
    if len(out) < 2:  # as a one-class data set (`as_labelled`)
        raise ConfigError(f"classes: {classnames[out[0]]} alone competes with no other class: "
                          "every image would score as right, whatever the model; give two "
                          "classes at least")
    return out
