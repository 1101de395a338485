"""Tip-Adapter (Zhang et al., 2022): a training-free key-value cache of the few-shot set.

Keys are the unit image embeddings of the k-shot images, values their one-hot labels. A test
embedding ``f`` scores the classes by

    logits = clip_scale * f @ W.T  +  alpha * exp(-beta * (1 - f @ K.T)) @ V

where ``W`` is the zero-shot text classifier: the cache adds what the few shots know to what the
prompts know. ``alpha`` weighs the cache, ``beta`` sharpens the affinities. With ``search`` the
pair is chosen on the validation split over the paper's grid (beta in [0.1, search_scale[0]),
alpha in [0.1, search_scale[1])).

As the paper's code builds its cache, each key is the mean of the image embeddings of
``augment_views`` randomly augmented views of its shot (the model's train-time augmentation:
scale/shift/rotate jitter and flips, with ``augment`` overriding any of them, e.g.
``{hflip: false}`` for digits or text), normalised; ``augment_views: 0`` keys the plain
embeddings.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from cliplab.adapt.base import AdaptContext, Adapter, method_options
from cliplab.adapt.options import PromptOptions
from cliplab.adapt.zeroshot import text_head
from cliplab.config import refuse_unused
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.evaluate.features import ImageFeatures
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.train.config import checked_augment
from cliplab.train.embed import augment_config


class Options(PromptOptions):
    """alpha=1, beta=5.5: the paper's ImageNet setting. The paper scales the zero-shot logits
    by 100, CLIP's learned logit scale; ``clip_scale: null`` uses the model's own learned scale
    (100 for CLIP), so alpha keeps its meaning on models trained at another temperature.
    ``search``: pick (alpha, beta) on the validation split (``val_shots``) over the paper's
    grid of ``search_steps`` values up to ``search_scale`` (beta, alpha). ``augment_views``:
    keys averaged over this many augmented views of each shot (the paper's 10; 0: plain
    embeddings); ``augment``: overrides of the model's augmentation for those views (keys
    scale, translate, rotate_deg, hflip, as ``train.augment``). Templates/names: the zero-shot
    head's prompts."""

    alpha: float = Field(1.0, ge=0)  # the cache's weight: a negative one inverts it
    beta: float = Field(5.5, ge=0)
    clip_scale: float | None = Field(None, gt=0)
    search: bool = False
    # the grid runs from 0.1 up to each: a scale at or below it would search negative values
    search_scale: tuple[Annotated[float, Field(gt=0.1)], Annotated[float, Field(gt=0.1)]] = \
        (7.0, 3.0)
    search_steps: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (200, 20)
    augment_views: int = Field(10, ge=0)
    augment: dict[str, Any] = {}
    # the search replaces alpha and beta (Tip-Adapter-F trains with them first)
    searched_alone: ClassVar[bool] = True

    @field_validator("augment", mode="before")
    @classmethod
    def _checked_augment(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            shown = f"a list ({', '.join(map(str, value))})" if isinstance(value, list) \
                else repr(value)
            raise ValueError(f"expected a mapping of overrides such as {{hflip: false}}, got "
                             f"{shown}")
        return checked_augment(value)

    @model_validator(mode="after")
    def _settings_that_apply(self) -> Options:
        if not self.search:
            refuse_unused(self, ["search_scale", "search_steps"], "unless search is true")
        elif self.searched_alone:
            refuse_unused(self, ["alpha", "beta"], "with search: true (the search sets "
                          "alpha and beta)")
        if not self.augment_views:
            refuse_unused(self, ["augment"], "unless augment_views is above 0 (the keys are "
                          "then plain embeddings)")
        return self


def cache_logits(feats: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """``exp(-beta * (1 - feats @ keys.T)) @ values``: affinity-weighted votes of the cache."""
    affinity = feats @ keys.t()
    return torch.exp(-beta * (1 - affinity)) @ values


def tip_logits(feats, weights, keys, values, alpha: float, beta: float,
               clip_scale: float) -> torch.Tensor:
    """Zero-shot logits plus ``alpha`` times the cache's logits."""
    return clip_scale * feats @ weights.t() + alpha * cache_logits(feats, keys, values, beta)


def grid(scale: float, steps: int) -> list[float]:
    """The paper's search grid: ``steps`` values from 0.1 up to (not including) ``scale``."""
    return [0.1 + i * (scale - 0.1) / steps for i in range(int(steps))]


@torch.no_grad()
def search_alpha_beta(val_feats, val_labels, weights, keys, values, clip_scale: float,
                      scale: list[float], steps: list[int]) -> tuple[float, float, float]:
    """(alpha, beta, val acc1) with the best validation accuracy over the paper's grid; ties
    go to the first (smallest) pair."""
    zs = clip_scale * val_feats @ weights.t()
    affinity = val_feats @ keys.t()
    best = (-1.0, 0.0, 0.0)
    for beta in grid(scale[0], steps[0]):
        cache = torch.exp(-beta * (1 - affinity)) @ values
        for alpha in grid(scale[1], steps[1]):
            acc = ((zs + alpha * cache).argmax(1) == val_labels).float().mean().item()
            if acc > best[0]:
                best = (acc, alpha, beta)
    return best[1], best[2], best[0]


class TipAdapter(Adapter):
    """The cache (keys, one-hot values), the zero-shot classifier and (alpha, beta)."""

    method = "tip-adapter"

    def __init__(self, model, classnames, options, weights, keys, values):
        super().__init__(model, classnames, options)
        self.weights, self.keys, self.values = weights, keys, values

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        o = self.options
        return tip_logits(feats.embeddings.float(), self.weights, self.keys, self.values,
                          float(o["alpha"]), float(o["beta"]), float(o["clip_scale"]))

    def state(self):
        return {"weights": self.weights, "keys": self.keys, "values": self.values}

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        return cls(model, classnames, options, tensors["weights"], tensors["keys"],
                   tensors["values"])


def resolve_scale(opts: Options, model: DualEncoder) -> dict:
    """The options as a dict, ``clip_scale`` filled with the model's learned logit scale when
    it is not given."""
    out = opts.to_dict()
    if out["clip_scale"] is None:
        out["clip_scale"] = round(model.logit_scale.detach().float().exp().item(), 4)
    return out


@torch.no_grad()
def augmented_embeddings(model: DualEncoder, images: torch.Tensor, views: int, seed: int,
                         augment: dict | None = None, batch_size: int = 500) -> torch.Tensor:
    """Image embeddings ``[views, N, D]`` (projected, not normalised) of ``views`` randomly
    augmented copies of uint8 ``images`` (the model's train-time augmentation with the
    ``augment`` overrides, seeded)."""
    g = torch.Generator().manual_seed(seed)
    augmentation = augment_config(model, augment or {})
    out = torch.empty(views, len(images), model.embed_dim)
    with evaluating(model):
        for v in range(views):
            for i in range(0, len(images), batch_size):
                pixels = model.preprocess(images[i:i + batch_size], train=True, generator=g,
                                          augment=augmentation)
                emb = model.project_image(model.image_backbone(pixels.to(model.device)))
                out[v, i:i + batch_size] = emb.float().cpu()
    return out


def build_cache(model: DualEncoder, train: LabelledImages, ctx: AdaptContext,
                augment_views: int = 0, views: torch.Tensor | None = None,
                augment: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and one-hot values. Keys: the unit embeddings of the few-shot images, or with
    ``augment_views`` the normalised mean of that many augmented views' embeddings (under the
    ``augment`` overrides; ``views``: those embeddings ``[V, N, D]`` when already computed)."""
    if augment_views or views is not None:
        if views is None:
            views = augmented_embeddings(model, train.images, augment_views, ctx.seed, augment)
        keys = F.normalize(views.mean(0), dim=-1)
    else:
        keys = F.normalize(ctx.features(model, train, desc="encode train").embeddings.float(),
                           dim=-1)
    values = F.one_hot(train.labels, len(train.classnames)).float()
    return keys, values


def maybe_search(adapter: TipAdapter, model: DualEncoder, ctx: AdaptContext) -> TipAdapter:
    """With option ``search``, set (alpha, beta) to the best pair on the validation split."""
    o = adapter.options
    if not o["search"]:
        return adapter
    if ctx.val is None:
        raise ConfigError(search_without_validation(adapter.method))
    val = F.normalize(ctx.features(model, ctx.val, desc="encode val").embeddings.float(), dim=-1)
    alpha, beta, acc = search_alpha_beta(val, ctx.val.labels, adapter.weights, adapter.keys,
                                         adapter.values, float(o["clip_scale"]),
                                         [float(s) for s in o["search_scale"]],
                                         [int(s) for s in o["search_steps"]])
    o.update(alpha=alpha, beta=beta, val_acc1=acc)
    return adapter


def search_without_validation(method: str) -> str:
    """The error of ``search`` without a validation split."""
    return f"{method}: search=true needs a validation split (set val_shots, e.g. val_shots=16)"


def check_first(model: DualEncoder, options: Options, validation: bool) -> None:
    """Refuse ``search`` without a validation split before any image is decoded."""
    if options.search and not validation:
        raise ConfigError(search_without_validation("tip-adapter"))


def uses_validation(options: Options) -> bool:
    """The search chooses (alpha, beta) on the validation split."""
    return options.search


def trains_on_features(options: Options) -> bool:
    """Without augmented views the cache keys (and Tip-Adapter-F's training) read the plain
    embeddings only: a training set of all its images is then streamed."""
    return not options.augment_views


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> TipAdapter:
    given = method_options(Options, options, "tip-adapter")
    opts = resolve_scale(given, model)
    weights = text_head(model, train, given)
    keys, values = build_cache(model, train, ctx, int(opts["augment_views"]),
                               augment=opts["augment"])
    return maybe_search(TipAdapter(model, train.classnames, opts, weights, keys, values),
                        model, ctx)


ADAPTER = TipAdapter
