"""Task ``few_shot``: k examples per class of ``train`` for every k in ``shots``, over
``seeds``, classified by nearest class mean and/or a linear probe, scored on ``test``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from cliplab.config import refuse_unused
from cliplab.data.listed import ListedImages, listed_data
from cliplab.data.pairs import classes_with_fewer, leave_out_classes
from cliplab.data.sources import as_labelled
from cliplab.data.types import LabelledImages
from cliplab.errors import DataError
from cliplab.evaluate.few_shot import few_shot, sample_k_shot
from cliplab.evaluate.features import EXTRA_PROBES
from cliplab.evaluate.tasks.base import ProbeKind, TaskContext
from cliplab.evaluate.tasks.linear_probe import ProbeSpecBase, probe_sets
from cliplab.models.dual_encoder import DualEncoder


class Spec(ProbeSpecBase):
    task: Literal["few_shot"]
    shots: list[Annotated[int, Field(gt=0)]] = Field([1, 2, 4, 8, 16], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    methods: list[Literal["ncm", "linear_probe"]] = Field(["ncm", "linear_probe"], min_length=1)
    l2: float = Field(1e-3, gt=0)
    features: ProbeKind = "embeddings"
    drawn: ClassVar[tuple[str, ...]] = ("train",)  # a one-off evaluation decodes only its draws
    encoded: ClassVar[tuple[str, ...]] = ("test",)

    @model_validator(mode="after")
    def _l2_only_for_the_probe(self) -> Spec:
        if "linear_probe" not in self.methods:
            refuse_unused(self, ["l2"], "unless methods include linear_probe")
        return self

    def check(self, context: TaskContext) -> None:
        listed = as_labelled(listed_data(context.dataset(self, "train")), "train")
        train, _ = probe_sets(self, context, listed)
        check_enough_shots(self, train.labels, train.classnames)


def run(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    if isinstance(context.dataset(spec, "train"), ListedImages):
        return _run_drawn(model, spec, context)
    name = spec.name or spec.task
    train, test = probe_sets(spec, context)  # checked by Spec.check before the suite ran
    extra = spec.features if spec.features in EXTRA_PROBES else None
    # the test set first: a train set that is the test set is then in the cache
    test_x = context.image_features(model, test.images, spec.test, f"encode {name} test",
                                    probe=extra, layers=spec.layers).get(spec.features)
    whole = context.cached_features(model, train.images, extra, spec.layers)
    if whole is None and getattr(model, "batch_dependent", False):  # an int8 export: the
        # drawn images embedded apart would give other features than the set's pass
        whole = context.image_features(model, train.images, spec.train, f"encode {name} train",
                                       probe=extra, layers=spec.layers)
    options = dict(shots=tuple(spec.shots), seeds=tuple(spec.seeds), methods=tuple(spec.methods),
                   l2=spec.l2)
    if whole is not None:  # embedded whole (by another task: a probe of the same train set)
        out = few_shot(whole.get(spec.features), train.labels, test_x, test.labels, **options)
    else:
        out = few_shot(None, None, test_x, test.labels, **options,
                       draw=_drawn_features(model, spec, context, train, extra))
    return {**out, "n": len(test.labels)}  # the test images every accuracy is over


def _drawn_features(model: DualEncoder, spec: Spec, context: TaskContext,
                    train: LabelledImages, extra: str | None
                    ) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """`few_shot`'s ``draw`` on a train set in memory: the images `sample_k_shot` picks for
    every k and seed, embedded once, not the whole set (their features were checked equal, bit
    for bit, to their rows of a whole-set pass on the CPU, fp32 and bf16)."""
    picks = {(k, seed): sample_k_shot(train.labels, k, seed)
             for k in spec.shots for seed in spec.seeds}
    index = torch.cat(list(picks.values())).unique()  # sorted
    features = context.image_features(
        model, train.images[index], None, f"encode {spec.name or spec.task} train draws",
        probe=extra, layers=spec.layers).get(spec.features)

    def draw(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = picks[(k, seed)]
        return features[torch.searchsorted(index, rows)], train.labels[rows]

    return draw


def _run_drawn(model: DualEncoder, spec: Spec, context: TaskContext) -> dict:
    """`run` on a listed training set: per seed, the largest k is drawn (decoding only the
    files drawn) and encoded; each smaller k takes its first picks, as `sample_k_shot` would
    on the decoded set. A class left with fewer than k readable files is an error, as one
    with fewer listed files is."""
    name = spec.name or spec.task
    draws = context.shot_draws(spec, "train")
    train, test = probe_sets(spec, context, draws.listed.data)
    extra = spec.features if spec.features in EXTRA_PROBES else None
    top, drawn = max(spec.shots), {}
    for seed in spec.seeds:
        sample, index = draws.draw(top, seed, label=f"draw {name} train {top}-shot seed {seed}")
        check_enough_shots(spec, sample.labels, train.classnames, "readable ")
        drawn[seed] = index, context.image_features(
            model, sample.images, None, f"encode {name} train draw", probe=extra,
            layers=spec.layers).get(spec.features)
    test_x = context.image_features(model, test.images, spec.test, f"encode {name} test",
                                    probe=extra, layers=spec.layers).get(spec.features)

    def draw(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, features = drawn[seed]
        picks = draws.indices(k, seed)  # the first of the seed's top draw: none decoded
        return features[torch.searchsorted(index, picks)], train.labels[picks]

    out = few_shot(None, None, test_x, test.labels, shots=tuple(spec.shots),
                   seeds=tuple(spec.seeds), methods=tuple(spec.methods), l2=spec.l2, draw=draw)
    return {**out, "n": len(test.labels)}


def check_enough_shots(spec: Spec, labels: torch.Tensor, classnames: list[str],
                       kind: str = "") -> None:
    """A one-line `DataError` naming the classes of ``train`` with fewer images than the
    largest of ``shots`` (sampling would take all of them, and a ``<k>shot`` result would not
    be k-shot), and for a class with none how to leave it out; ``kind`` qualifies the images
    counted (``readable``)."""
    k = max(spec.shots)
    fewer = classes_with_fewer(labels, classnames, k)
    short = [f"{name} ({n})" for name, n in fewer]
    if short:
        listed = ", ".join(short[:5]) + (f", ... ({len(short)} classes)" if len(short) > 5
                                         else "")
        # no k is drawn from a class without images; it can only be left out of both sets
        way_out = "" if all(n for _, n in fewer) else \
            f"; {leave_out_classes('train and of test')}"
        raise DataError(f"shots {k} needs {k} {kind}train images of every class; these have "
                        f"fewer: {listed}{way_out}")
