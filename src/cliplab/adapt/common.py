"""What the fine-tuning methods share: config sections, data loading, head accuracy."""

from __future__ import annotations

import torch

from cliplab.config import check_keys
from cliplab.data.sources import as_labelled, load_source
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.metrics import classification_metrics
from cliplab.models.dual_encoder import DualEncoder

DATA_KEYS = {"train", "test", "shifted", "train_size", "seed"}


def section(cfg: dict, name: str, known: set[str]) -> dict:
    """``cfg[name]`` as a dict (empty if absent), with unknown keys rejected."""
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    check_keys(value, known, f"section {name!r}")
    return value


def subsample(data: LabelledImages, size: int | None, seed: int = 0) -> LabelledImages:
    """``size`` samples drawn at random (seeded) without replacement; all of them if None."""
    if size is None or size >= len(data):
        return data
    if size < 1:
        raise ConfigError(f"data.train_size must be positive, not {size}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:int(size)]
    return data.subset(keep.sort().values)


def load_split(data_cfg: dict, split: str) -> LabelledImages:
    """The labelled set of ``data.<split>`` (train is subsampled to ``data.train_size``)."""
    spec = data_cfg.get(split)
    if not isinstance(spec, dict):
        raise ConfigError(f"the config needs data.{split}, e.g. "
                          "{source: fashion-mnist, split: " + ("train" if split == "train"
                                                               else "test") + "}")
    data = as_labelled(load_source(spec), f"data.{split}")
    if split == "train":
        data = subsample(data, data_cfg.get("train_size"), int(data_cfg.get("seed", 0)))
    if len(data) == 0:
        raise ConfigError(f"data.{split} holds no images")
    return data


def check_same_classes(a: LabelledImages, b: LabelledImages, where: str) -> None:
    if [c.lower() for c in a.classnames] != [c.lower() for c in b.classnames]:
        raise ConfigError(f"{where}: the classes differ ({a.classnames} vs {b.classnames})")


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
