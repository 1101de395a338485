"""What the methods that train weights share: data subsets, head accuracy,
parameter counts, and the check of their ``options.train`` section."""

from __future__ import annotations

from typing import Any

import torch

from cliplab.adapt.training import trainer_config
from cliplab.config import refuse_unused
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.metrics import classification_metrics
from cliplab.models.dual_encoder import DualEncoder
from cliplab.train.config import TrainConfig


def subsample(data: LabelledImages, size: int | None, seed: int = 0) -> LabelledImages:
    """``size`` samples drawn at random (seeded) without replacement; all of them if None."""
    if size is None or size >= len(data):
        return data
    if size < 1:
        raise ConfigError(f"train_size must be positive, not {size}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:int(size)]
    return data.subset(keep.sort().values)


def head_metrics(model: DualEncoder, weight: torch.Tensor, data: LabelledImages,
                 progress: bool = True, desc: str = "evaluate") -> dict:
    """acc1/acc5/mean per-class recall of ``normalize(image) @ weight.T`` (the scale of a head
    does not change its ranking)."""
    feats = encode_images(model, data.images, progress=progress, desc=desc).embeddings
    return classification_metrics(feats @ weight.detach().float().cpu().t(), data.labels)


def count_parameters(*modules: torch.nn.Module) -> dict:
    """Trainable and total parameter counts over ``modules``."""
    params = [p for m in modules for p in m.parameters()]
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


# the Trainer's settings only its contrastive loss reads (a head trains with cross-entropy)
CONTRASTIVE_ONLY = ("loss", "loss_tile", "multi_positive", "hard_negatives")


def checked_train_section(value: dict[str, Any], defaults: dict,
                          classifier: bool = True) -> dict[str, Any]:
    """``options.train`` checked against the `Trainer`'s settings before any work (a pydantic
    validator: a bad key becomes a ValueError that names it). Settings that do nothing here
    are refused: ``eval_every`` (adapt scores once, after training) and, for a
    ``classifier`` (a head on the image tower), the contrastive loss's."""
    try:
        config = trainer_config(defaults, value, where="")
    except ConfigError as err:
        raise ValueError(str(err)) from None
    refuse_unused(config, ["eval_every"], "in adapt (it scores the model once, after training)")
    refuse_unused(config, ["fsdp", "dist_timeout_s"], "in adapt (it trains in one process; "
                  "they apply under torchrun)")
    if classifier:
        refuse_contrastive_settings(config)
    return value


def refuse_contrastive_settings(config: TrainConfig, prefix: str = "") -> None:
    """A ValueError naming the contrastive loss's settings given to a head's training."""
    refuse_unused(config, CONTRASTIVE_ONLY, "with a classification head (it trains with "
                  "cross-entropy)", prefix)
