"""Task ``few_shot``: k examples per class of ``train`` for every k in ``shots``, over
``seeds``, classified by nearest class mean and/or a linear probe, scored on ``test``."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from cliplab.config import refuse_unused
from cliplab.data.pairs import classes_with_fewer
from cliplab.errors import DataError
from cliplab.evaluate.few_shot import few_shot
from cliplab.evaluate.tasks.base import ProbeKind, TaskContext
from cliplab.evaluate.tasks.linear_probe import ProbeSpecBase, probe_features, probe_sets
from cliplab.models.dual_encoder import DualEncoder


class Spec(ProbeSpecBase):
    task: Literal["few_shot"]
    shots: list[Annotated[int, Field(gt=0)]] = Field([1, 2, 4, 8, 16], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    methods: list[Literal["ncm", "linear_probe"]] = Field(["ncm", "linear_probe"], min_length=1)
    l2: float = Field(1e-3, gt=0)
    features: ProbeKind = "embeddings"

    @model_validator(mode="after")
    def _l2_only_for_the_probe(self) -> Spec:
        if "linear_probe" not in self.methods:
            refuse_unused(self, ["l2"], "unless methods include linear_probe")
        return self

    def check(self, context: TaskContext) -> None:
        train, _ = probe_sets(self, context)
        check_enough_shots(self, train.labels, train.classnames)


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    sets = probe_sets(spec, context)  # checked by Spec.check before the suite ran
    return few_shot(*probe_features(model, spec, context, sets), shots=tuple(spec.shots),
                    seeds=tuple(spec.seeds), methods=tuple(spec.methods), l2=spec.l2)


def check_enough_shots(spec: Spec, labels: torch.Tensor, classnames: list[str]) -> None:
    """A one-line `DataError` naming the classes of ``train`` with fewer images than the
    largest of ``shots`` (sampling would take all of them, and a ``<k>shot`` result would not
    be k-shot)."""
    k = max(spec.shots)
    short = [f"{name} ({n})" for name, n in classes_with_fewer(labels, classnames, k)]
    if short:
        listed = ", ".join(short[:5]) + (f", ... ({len(short)} classes)" if len(short) > 5
                                         else "")
        raise DataError(f"shots {k} needs {k} train images of every class; these have fewer: "
                        f"{listed}")
