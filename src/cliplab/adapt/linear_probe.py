"""Linear probe: logistic regression on frozen image features of the k-shot set (the harness's
L-BFGS fit), the supervised starting point of CoOp's and Tip-Adapter's comparisons."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from cliplab.adapt.base import AdaptContext, Adapter, method_options
from cliplab.config import Section, refuse_unused
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.evaluate.features import (DEFAULT_PROBE_LAYERS, EXTRA_PROBES, ImageFeatures,
                                       image_blocks)
from cliplab.evaluate.linear_probe import DEFAULT_L2_GRID, accuracy, choose_l2, fit_logistic
from cliplab.models.dual_encoder import DualEncoder


class Options(Section):
    """``features``: which frozen features the probe reads; ``l2``: the penalty, or "auto" to
    choose it from ``l2_grid`` on the run's validation split (``val_shots`` / ``data.val``), or
    without one on a random 20% of the training features, then fit on every training shot."""

    features: Literal["embeddings", "backbone", "tokens", "layers"] = "embeddings"
    l2: Annotated[float, Field(ge=0)] | Literal["auto"] = 1e-3
    l2_grid: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = \
        list(DEFAULT_L2_GRID)

    @model_validator(mode="after")
    def _grid_only_for_auto(self) -> Options:
        if self.l2 != "auto":
            refuse_unused(self, ["l2_grid"], "unless l2 is auto")
        return self


class LinearProbe(Adapter):
    """Logits = standardise(features) @ W + b."""

    method = "linear-probe"

    def __init__(self, model, classnames, options, mean, std, weight, bias):
        super().__init__(model, classnames, options)
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias
        which = options["features"]
        self.probe = which if which in EXTRA_PROBES else None

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        x = (feats.get(self.options["features"]).float() - self.mean) / self.std
        return x @ self.weight + self.bias

    def state(self):
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        return cls(model, classnames, options, tensors["mean"], tensors["std"],
                   tensors["weight"], tensors["bias"])


def scoring_probe(options: Options) -> str | None:
    """The extra image features (``tokens``, ``layers``) the fitted probe scores with."""
    return options.features if options.features in EXTRA_PROBES else None


def trains_on_features(options: Options) -> bool:
    """The probe fits (and chooses l2 on) image features only: a training set of all its
    images is streamed."""
    return True


def check_first(model: DualEncoder, options: Options, validation: bool) -> None:
    """Refuse ``layers`` features on a tower of fewer blocks than they read, before any
    image is decoded (``fit`` would only find it after)."""
    blocks = image_blocks(model) if options.features == "layers" else None
    if blocks is not None and blocks < DEFAULT_PROBE_LAYERS:
        raise ConfigError(f"options.features: layers reads the last {DEFAULT_PROBE_LAYERS} "
                          f"blocks of the image tower, but this model's has {blocks}; use "
                          "features tokens, backbone or embeddings (or the eval suite's "
                          "linear_probe task, whose layers key takes fewer)")


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> LinearProbe:
    given = method_options(Options, options, "linear-probe")
    check_first(model, given, ctx.val is not None)
    opts = given.to_dict()
    which = opts["features"]
    x = ctx.features(model, train, which if which in EXTRA_PROBES else None,
                     desc="encode train").get(which).float()
    mean, std = x.mean(0), x.std(0).nan_to_num(1.0).clamp_min(1e-6)  # std of 1 sample: nan
    x = (x - mean) / std
    num_classes = len(train.classnames)
    if opts["l2"] == "auto":
        val_x = None
        if ctx.val is not None:
            val_x = (ctx.features(model, ctx.val, which if which in EXTRA_PROBES else None,
                                  desc="encode val").get(which).float() - mean) / std
        opts.update(search_l2(x, train.labels, val_x, ctx.val.labels if ctx.val else None,
                              num_classes, opts["l2_grid"], ctx.seed, ctx.val_label))
    opts["l2"] = float(opts["l2"])
    weight, bias = fit_logistic(x, train.labels, num_classes, opts["l2"])
    return LinearProbe(model, train.classnames, opts, mean, std, weight, bias)


def search_l2(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor | None,
              val_y: torch.Tensor | None, num_classes: int, grid: list[float], seed: int,
              val_label: str = "validation") -> dict:
    """``{"l2", "l2_chosen_on", ["val_acc1"]}``: the strength of ``grid`` whose fit on all of
    ``x`` scores best on the validation features (ties: the stronger), as CoOp's linear-probe
    baseline searches C (``l2_chosen_on``: ``val_label``, what the validation split is); without
    them, chosen on a seeded 20% of ``x`` (`choose_l2`)."""
    if val_x is None or val_y is None:
        l2, _ = choose_l2(x, y, num_classes, grid, seed=seed)
        return {"l2": l2, "l2_chosen_on": "a random 20% of the training images "
                "(no validation split)"}
    # each fit from zeros, as the final one is: val_acc1 is then the chosen probe's own
    scores = {l2: accuracy(val_x, val_y, fit_logistic(x, y, num_classes, float(l2)))
              for l2 in grid}
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return {"l2": best, "l2_chosen_on": val_label, "val_acc1": scores[best]}


def uses_validation(options: Options) -> bool:
    """``l2: auto`` chooses the penalty on the validation split."""
    return options.l2 == "auto"


ADAPTER = LinearProbe
