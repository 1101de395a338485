"""What the weight-space claims (``wise_ft``, ``soups``, ``task_arithmetic``) share: full
fine-tunes of the competent base (kept on disk and reused by every claim that asks for the same
recipe), scoring weights with the zero-shot task on several sets through one feature cache,
class subsets, and the noise rule that turns two arms' numbers into above / tie / below.

Every fine-tune trains the image tower (``cliplab.adapt`` method ``finetune``) with the head
fixed at the zero-shot text classifier (``train_head: false``), as task arithmetic's fine-tunes
do: the fine-tuned model is then a plain model folder whose zero-shot accuracy *is* its
accuracy, so interpolating (WiSE-FT), averaging (soups) or adding (task vectors) its weights
needs nothing beyond ``cliplab.merge`` / ``cliplab.adapt.wise_ft.interpolate``.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cliplab.adapt import AdaptContext, get_method
from cliplab.adapt.common import subsample
from cliplab.data.pairs import class_indices
from cliplab.data.sources import as_labelled, load_source
from cliplab.data.types import LabelledImages
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.suite import run_task
from cliplab.evaluate.tasks import TaskContext
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import load_model

from paper_claims.common import ClaimContext, pooled_std, train_pool

_LOADED: dict[str, LabelledImages] = {}


def load(spec: dict) -> LabelledImages:
    """A labelled source, loaded once per process."""
    key = repr(sorted(spec.items()))
    if key not in _LOADED:
        _LOADED[key] = as_labelled(load_source(spec), str(spec))
    return _LOADED[key]


def only_classes(data: LabelledImages, names: Sequence[str]) -> LabelledImages:
    """The samples of classes ``names`` as a dataset of just those classes (labels renumbered
    0..len(names)-1 in the order given; prompts and descriptions follow)."""
    keep = class_indices(data.classnames, list(names))
    remap = torch.full((len(data.classnames),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    mask = remap[data.labels] >= 0
    desc = [data.descriptions[i] for i in keep] if data.descriptions else None
    return LabelledImages(data.images[mask], remap[data.labels[mask]],
                          [data.classnames[i] for i in keep], data.templates,
                          f"{data.name}-{'+'.join(data.classnames[i] for i in keep)}",
                          descriptions=desc)


def finetune(ctx: ClaimContext, lr: float, epochs: float, seed: int, train_size: int,
             classes: Sequence[str] | None = None, augment: bool = True,
             cache: Path | None = None, data: LabelledImages | None = None) -> Path:
    """The base fine-tuned (image tower, fixed zero-shot head) on ``train_size`` images of the
    training pool drawn with ``seed`` (of ``classes`` only, if given), AdamW at ``lr`` with
    warm-up and cosine decay, with the Trainer's augmentation unless ``augment`` is false
    (horizontal flips never: Fashion-MNIST garments have a side). ``data``: other training
    images than the pool's (their name enters the folder's name). Written once under the
    claims' shared ``finetunes/`` folder (``cache``: another folder, for fine-tunes of another
    base) and reused by every claim asking for the same recipe."""
    tag = f"lr{lr:g}-ep{epochs:g}-n{train_size}-seed{seed}" + ("" if augment else "-noaug")
    if data is not None:
        tag = f"{data.name}-{tag}"
    if classes:
        tag += "-" + "+".join(c.replace(" ", "_") for c in classes)
    folder = (cache or ctx.work.parent / "finetunes") / tag
    if (folder / "config.json").is_file():
        return folder
    if data is None:
        data = load(train_pool(ctx))
    if classes:
        data = only_classes(data, classes)
    data = subsample(data, train_size, seed)
    model = load_model(str(ctx.base))
    options = {"train_head": False,
               "train": {"lr": lr, "epochs": epochs, "seed": seed, "batch_size": 128,
                         "weight_decay": 0.1, "warmup": 0.1, "progress": False,
                         "augment": {"hflip": False} if augment else False}}
    torch.manual_seed(seed)
    adapter = get_method("finetune").fit(
        model, data, options, AdaptContext(cache=FeatureCache(), seed=seed, progress=False,
                                           model_name=str(ctx.base)))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save(tmp)
    tmp_model = tmp / "model"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_model.rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def state_of(folder: str | Path) -> dict[str, torch.Tensor]:
    """A model folder's weights as ``DualEncoder.model`` names them."""
    return {k: v.detach().clone() for k, v in DualEncoder.load(folder).model.state_dict().items()}


class Scorer:
    """Zero-shot top-1 of weights on named sets; one model to load weights into and one
    feature cache (keyed by the image tower's weights), so each (weights, set) is encoded
    once."""

    def __init__(self, template: str | Path, sets: Mapping[str, LabelledImages]):
        self.model = DualEncoder.load(template)
        self.sets = dict(sets)
        self.context = TaskContext(cache=FeatureCache(), progress=False)

    def __call__(self, state: Mapping[str, torch.Tensor],
                 names: Sequence[str] | None = None) -> dict[str, float]:
        self.model.model.load_state_dict(dict(state), strict=True)
        return {name: float(run_task(self.model, {"task": "zeroshot", "data": self.sets[name]},
                                     self.context)["acc1"])
                for name in (names or self.sets)}


def compare(a: Sequence[float], b: Sequence[float]) -> str:
    """``above`` / ``below`` when the means of ``a`` and ``b`` differ by more than twice their
    pooled std over seeds (and by more than 0.1 point: identical arms are a tie), else
    ``tie``. Values in percent points."""
    gap = statistics.fmean(a) - statistics.fmean(b)
    margin = max(2 * pooled_std(a, b), 0.1)
    return "above" if gap > margin else "below" if gap < -margin else "tie"
