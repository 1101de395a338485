"""Tip-Adapter-F (Zhang et al., 2022): Tip-Adapter with the cache keys fine-tuned.

The keys start as Tip-Adapter's (the mean embedding of ``augment_views`` augmented views of
each shot) and are trained (values and the text classifier stay fixed) with cross-entropy on
the Tip-Adapter logits of augmented training images, as the paper: each time a shot is drawn it
is seen through one of its augmented views, picked at random; AdamW (eps 1e-4), cosine
schedule, 20 epochs. Afterwards (alpha, beta) can be searched on the validation split.
``augment_views: 0`` keys and trains on the plain embeddings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

import cliplab.adapt.tip_adapter as tip_adapter
from cliplab.adapt.base import AdaptContext, method_options
from cliplab.adapt.tip_adapter import Options as TipOptions
from cliplab.adapt.tip_adapter import (TipAdapter, augmented_embeddings, build_cache,
                                      maybe_search, resolve_scale, search_without_validation,
                                      tip_logits)
from cliplab.adapt.training import train_steps
from cliplab.adapt.zeroshot import text_head
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder


# Tip-Adapter's hooks, as ours: its search, and its keys read from features without views
uses_validation = tip_adapter.uses_validation
trains_on_features = tip_adapter.trains_on_features


def check_first(model: DualEncoder, options: Options, validation: bool) -> None:
    """Refuse ``search`` without a validation split before any image is decoded."""
    if options.search and not validation:
        raise ConfigError(search_without_validation("tip-adapter-f"))


class Options(TipOptions):
    """Tip-Adapter's options plus the keys' training (AdamW, the paper's 20 epochs)."""

    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, ge=0)
    batch_size: int = Field(256, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    searched_alone: ClassVar[bool] = False  # alpha and beta weigh the cache while it trains


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> TipAdapter:
    given = method_options(Options, options, "tip-adapter-f")
    opts = resolve_scale(given, model)
    weights = text_head(model, train, given)
    n_views = int(opts["augment_views"])
    if n_views:  # [V, N, D]: the views the keys average are the ones training sees
        views = augmented_embeddings(model, train.images, n_views, ctx.seed, opts["augment"])
        keys, values = build_cache(model, train, ctx, views=views)
        feats = F.normalize(views, dim=-1)
    else:
        keys, values = build_cache(model, train, ctx)
        feats = keys.unsqueeze(0)
    learned = torch.nn.Parameter(keys.clone())
    alpha, beta, scale = float(opts["alpha"]), float(opts["beta"]), float(opts["clip_scale"])
    pick = torch.Generator().manual_seed(ctx.seed + 1)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        view = torch.randint(len(feats), (len(idx),), generator=pick)  # one view per draw
        logits = tip_logits(feats[view, idx], weights, learned, values, alpha, beta, scale)
        return F.cross_entropy(logits, train.labels[idx])

    history = train_steps([learned], loss, feats.shape[1], int(opts["epochs"]),
                          int(opts["batch_size"]), float(opts["lr"]), "adamw",
                          float(opts["weight_decay"]), eps=1e-4, seed=ctx.seed,
                          progress=ctx.progress, desc="tip-adapter-f")
    opts["final_train_loss"] = history[-1]
    adapter = TipAdapter(model, train.classnames, opts, weights, learned.detach(), values)
    adapter.method = "tip-adapter-f"
    return maybe_search(adapter, model, ctx)


ADAPTER = TipAdapter
