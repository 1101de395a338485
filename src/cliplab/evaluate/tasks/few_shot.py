"""Task ``few_shot``: k examples per class of ``train`` for every k in ``shots``, over
``seeds``, classified by nearest class mean and/or a linear probe, scored on ``test``."""

from __future__ import annotations

from typing import Literal

from cliplab.evaluate.few_shot import few_shot
from cliplab.evaluate.features import EXTRA_PROBES
from cliplab.evaluate.tasks.base import DataSpec, ProbeKind, TaskContext, TaskSpecBase
from cliplab.evaluate.tasks.linear_probe import probe_features
from cliplab.models.dual_encoder import DualEncoder


class Spec(TaskSpecBase):
    task: Literal["few_shot"]
    train: DataSpec
    test: DataSpec
    shots: list[int] = [1, 2, 4, 8, 16]
    seeds: list[int] = [0, 1, 2]
    methods: list[Literal["ncm", "linear_probe"]] = ["ncm", "linear_probe"]
    l2: float = 1e-3
    features: ProbeKind = "embeddings"
    layers: int = 4

    def probes(self):
        if self.features not in EXTRA_PROBES:
            return []
        return [(self.train, self.features, self.layers), (self.test, self.features, self.layers)]


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    return few_shot(*probe_features(model, spec, context), shots=tuple(spec.shots),
                    seeds=tuple(spec.seeds), methods=tuple(spec.methods), l2=spec.l2)
