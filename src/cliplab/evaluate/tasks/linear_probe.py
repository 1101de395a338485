"""Task ``linear_probe``: logistic regression on frozen image features of ``train``, scored on
``test``; ``l2`` fixed, or chosen on a validation split when omitted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cliplab.data.pairs import check_same_classes
from cliplab.data.types import LabelledImages
from cliplab.evaluate.linear_probe import linear_probe
from cliplab.evaluate.tasks.base import DataSpec, ProbeKind, TaskContext, TaskSpecBase
from cliplab.evaluate.features import EXTRA_PROBES
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["linear_probe"]
    train: DataSpec
    test: DataSpec
    l2: float | None = Field(None, gt=0)  # omitted: chosen on a validation split
    features: ProbeKind = "tokens"
    layers: int = 4

    def probes(self):
        if self.features not in EXTRA_PROBES:
            return []
        return [(self.train, self.features, self.layers), (self.test, self.features, self.layers)]


def probe_sets(spec, context: TaskContext) -> tuple[LabelledImages, LabelledImages]:
    """The train and test sets of a probe-style spec, checked to have the same classes."""
    name = spec.name or spec.task
    train = context.labelled(spec.train, f"task {name!r} train")
    test = context.labelled(spec.test, f"task {name!r} test")
    check_same_classes(train, test, f"task {name!r}")
    return train, test


def probe_features(model: DualEncoder, spec, context: TaskContext,
                   sets: tuple[LabelledImages, LabelledImages] | None = None):
    """(train features, train labels, test features, test labels) of a probe-style spec
    (``sets``: its `probe_sets`, when the caller has them already)."""
    name = spec.name or spec.task
    train, test = sets or probe_sets(spec, context)
    extra = spec.features if spec.features in EXTRA_PROBES else None
    tr = context.image_features(model, train.images, spec.train, f"encode {name} train",
                                probe=extra, layers=spec.layers).get(spec.features)
    te = context.image_features(model, test.images, spec.test, f"encode {name} test",
                                probe=extra, layers=spec.layers).get(spec.features)
    return tr, train.labels, te, test.labels


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    return linear_probe(*probe_features(model, spec, context), l2=spec.l2)
