"""Task ``linear_probe``: logistic regression on frozen image features of ``train``, scored on
``test``; ``l2`` fixed, or chosen on a validation split when omitted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from cliplab.config import refuse_unused
from cliplab.data.pairs import check_same_classes
from cliplab.data.sources import filled_spec, same_images
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, DataError, warn
from cliplab.evaluate.linear_probe import linear_probe
from cliplab.evaluate.tasks.base import DataSpec, ProbeKind, TaskContext, TaskSpecBase
from cliplab.evaluate.features import DEFAULT_PROBE_LAYERS, EXTRA_PROBES, image_blocks
from cliplab.models.dual_encoder import DualEncoder


class ProbeSpecBase(TaskSpecBase):
    """Keys of a probe-style task: image features of ``train`` (``features``: which ones,
    ``layers``: how many blocks for ``layers``) fitted and scored on ``test``."""

    train: DataSpec
    test: DataSpec
    features: ProbeKind
    layers: int = Field(DEFAULT_PROBE_LAYERS, ge=1)
    encoded: ClassVar[tuple[str, ...]] = ("train", "test")

    @model_validator(mode="after")
    def _layers_only_for_layers(self) -> ProbeSpecBase:
        if self.features != "layers":
            refuse_unused(self, ["layers"], "unless features is layers")
        return self

    def probes(self):
        if self.features not in EXTRA_PROBES:
            return []
        return [(self.train, self.features, self.layers), (self.test, self.features, self.layers)]

    def check_model(self, model: DualEncoder) -> None:
        """``features`` must be ones the model gives (an ONNX export has no hidden states for
        ``tokens`` / ``layers``); with ``features: layers``, ``layers`` must count blocks the
        image tower has (more would silently take every hidden state, the patch embeddings
        too)."""
        given = getattr(model, "probe_features", None)
        if given is not None and self.features not in given:
            default = "" if "features" in self.model_fields_set else f" (the {self.task} default)"
            raise ConfigError(f"features: {self.features}{default} needs the hidden states of a "
                              f"PyTorch model; this one gives {' or '.join(given)} (an ONNX "
                              f"export): set features: {given[-1]}, or evaluate the model "
                              "folder it came from")
        blocks = image_blocks(model) if self.features == "layers" else None
        if blocks is not None and self.layers > blocks:
            choice = "1" if blocks == 1 else f"1 to {blocks}"
            raise ConfigError(f"layers: {self.layers}, but the model's image tower has {blocks} "
                              f"block{'s' if blocks != 1 else ''}; give {choice}")


class Spec(ProbeSpecBase):
    task: Literal["linear_probe"]
    l2: float | None = Field(None, gt=0)  # omitted: chosen on a validation split
    features: ProbeKind = "tokens"

    def check(self, context: TaskContext) -> None:
        train, _ = probe_sets(self, context)
        if self.l2 is None and len(train) < 2:
            raise ConfigError(f"l2: omitted, it is chosen on a validation split of train, which "
                              f"needs 2 images or more (train has {len(train)}); give l2")


# the share of test images found among the train images that makes a probe warn of leakage
LEAK_FRACTION = 0.1


def probe_sets(spec: ProbeSpecBase, context: TaskContext, train: LabelledImages | None = None
               ) -> tuple[LabelledImages, LabelledImages]:
    """The train (``train`` if given, e.g. as listed) and test sets of a probe-style spec,
    checked to have the same classes (a one-line error that names the keys, not the task:
    `TaskSpecBase.check`'s)."""
    # a train set given listed, or sets `TaskContext.preload` lists (their images placeholders,
    # all equal): compared by spec only, their pixels where they are decoded
    listed = train is not None or context.listing
    train = context.labelled(spec.train, "train") if train is None else train
    test = context.labelled(spec.test, "test")
    try:
        check_same_classes(train, test, "-")
    except DataError as err:  # its message without the `where` (the caller names the task)
        raise DataError(str(err).removeprefix("-: ")) from None
    _warn_of_leakage(spec, context, train, test, listed)
    return train, test


def _warn_of_leakage(spec: ProbeSpecBase, context: TaskContext, train: LabelledImages,
                     test: LabelledImages, listed: bool) -> None:
    """Warn (once per context and task) when ``test`` is ``train``'s data, or a tenth or more
    of its images equal train images pixel for pixel (``listed``: a train set not decoded,
    compared by spec only)."""
    name = spec.name or spec.task
    if f"leakage {name}" in context.reported:  # checked already: the hashes cost seconds
        return
    hint = "give train and test apart (digits and fashion-mnist: split: train and split: test)"
    if spec.train is spec.test or same_images(filled_spec(spec.train), filled_spec(spec.test)):
        context.reported.add(f"leakage {name}")
        warn(f"{name}: train and test are the same images: it is scored on images it learned "
             f"from; {hint}")
        return
    if listed:  # its pixels are compared where it is decoded
        return
    context.reported.add(f"leakage {name}")
    shared = shared_digests(*context.image_digests(spec.train, train),
                            *context.image_digests(spec.test, test))
    if shared and shared >= LEAK_FRACTION * len(test):  # a few copies: the data set's own
        warn(f"{name}: {shared} of {len(test)} test images are also train images (equal "
             f"pixels): it is scored on images it learned from; {hint}")


def shared_digests(train_shape: tuple[int, ...], train: Iterable[bytes],
                   test_shape: tuple[int, ...], test: Iterable[bytes]) -> int:
    """How many test images equal a train image, pixel for pixel, of two sets given as the
    shape of one image and each image's `image_digest` (`TaskContext.image_digests`: a
    streamed set's were taken while it was streamed)."""
    if train_shape != test_shape:
        return 0
    seen = set(train)
    return sum(digest in seen for digest in test)


def probe_features(model: DualEncoder, spec: ProbeSpecBase, context: TaskContext,
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
    train_x, train_y, test_x, test_y = probe_features(model, spec, context)
    out = linear_probe(train_x, train_y, test_x, test_y, l2=spec.l2, progress=context.progress)
    return {**out, "n_train": len(train_y), "n_test": len(test_y)}
