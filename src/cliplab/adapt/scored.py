"""The sets `cliplab adapt` scores (``data.test``, ``data.shifted``) without holding their
pixels: an image folder or a manifest is listed (its classes, labels and what listing skipped
known at once, and a set without a readable file refused: `check_readable`, so every check
runs before training) and decoded and encoded a batch at a time when it is scored, by the eval
suite's streaming (`TaskContext.stream_listed`, `cliplab.evaluate.streamed`). Its features are
cached under the listing and the image tower, so the zero-shot comparison and an adapter that
keeps the model's image tower decode it once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from cliplab.data.images import UnreadableImage
from cliplab.data.listed import ListedImages
from cliplab.data.sources import load_source
from cliplab.data.types import LabelledImages
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.suite import run_task
from cliplab.evaluate.tasks import Classifier, TaskContext
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import PreprocessConfig


@dataclass
class ListedSet:
    """A scored set given by ``spec`` and listed, not decoded (``listed``); ``where``: its key,
    named by an error its decoding finds (``data.test``: no readable image); ``read``: once it
    is scored, its readable samples (1x1 placeholder images) and what reading it skipped, as
    the whole load would hold them; ``whole``: streaming it found it must be loaded whole (a
    class with no readable file, sizes the whole load squares together), so a later scoring
    loads it whole at once."""

    spec: dict
    listed: ListedImages
    where: str = "data"
    read: LabelledImages | None = None
    whole: bool = False

    @property
    def data(self) -> LabelledImages:
        """The samples as read when scored, else as listed (labels and classes alike)."""
        return self.read if self.read is not None else self.listed.data

    @property
    def classnames(self) -> list[str]:
        return self.data.classnames

    def __len__(self) -> int:
        return len(self.data)


ScoredSet = LabelledImages | ListedSet


def check_readable(spec: dict, listed: ListedImages, where: str,
                   model_input: PreprocessConfig | None = None) -> None:
    """Refuse now, before any work, a set (``spec``, ``listed``; its key ``where``) none of
    whose files decodes, with the whole load's error (`load_source`: "no readable image in N
    files"): its files are tried in order until one decodes, one decode for a readable set."""
    if listed.deferred < len(listed):  # some samples held in memory already
        return
    for deferred in listed.decoders.values():
        try:
            deferred.decode()
            return
        except UnreadableImage:
            continue
    load_source(spec, False, where, model_input)  # raises: nothing readable


def scored_data(data: ScoredSet) -> LabelledImages:
    """The labels, classes and keys of a scored set, listed or loaded."""
    return data.data if isinstance(data, ListedSet) else data


def score_sets(model: DualEncoder, sets: Mapping[str, ScoredSet], cache: FeatureCache,
               progress: bool = False, classifier: Classifier | None = None,
               probe: str | None = None) -> dict[str, dict]:
    """``{name: metrics}`` of the eval suite's ``zeroshot`` task on each set (scored by
    ``classifier``, else the zero-shot text head); a `ListedSet` is streamed with its
    classifier's extra features (or ``probe``'s), and its ``read`` set."""
    context = TaskContext(cache=cache, progress=progress, classifier=classifier, hold=False)
    probe = getattr(classifier, "probe", None) or probe
    scores = {}
    try:
        for name, data in sets.items():
            task = {"task": "zeroshot", "name": name, "data": data}
            if isinstance(data, ListedSet):
                task["data"] = data.spec  # (one known to need it: loaded whole by the task)
            if isinstance(data, ListedSet) and not data.whole:  # an error names its key
                context.stream_listed(data.spec, data.listed, model, probe)
                context.load(data.spec, data.where, model, f"encode {name}")
                data.whole = not context.is_streamed(data.spec)
            scores[name] = run_task(model, task, context)
            if isinstance(data, ListedSet):
                data.read = _without_pixels(context.labelled(data.spec, name))
                context.release([])  # (one read whole, as it could not be streamed: dropped)
        return scores
    finally:  # its placeholder images must reach no later reader
        context.drop_streamed()


def _without_pixels(data: LabelledImages) -> LabelledImages:
    """``data`` with 1x1 images: a set that could not be streamed was read whole (e.g. of
    mixed sizes), and only its samples, not its pixels, are kept after it is scored."""
    if data.images.shape[1:3] == (1, 1):
        return data
    return dataclasses.replace(data, images=data.images[:, :1, :1].clone())
