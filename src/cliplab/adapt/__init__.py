"""Adaptation methods: few-shot heads, caches and prompt learning on a (frozen) dual encoder.

Every method is a module registered in ``METHODS`` under its CLI name, exposing:

- ``OPTIONS: dict`` — the method's options and their defaults (a config's ``options:``
  section; unknown keys are an error);
- ``fit(model: DualEncoder, train: LabelledImages, options: dict | None, ctx: AdaptContext)
  -> Adapter`` — learn from the (k-shot) training set; ``ctx`` carries the shared feature cache,
  an optional validation split, the seed and the progress flag;
- ``ADAPTER`` — the `Adapter` class it returns, with ``from_state`` for loading.

An `Adapter` gives ``logits(images_or_features) -> [N, C]`` (uint8 images, cached
`ImageFeatures` or unit embeddings), ``save(folder)`` (``adapter.safetensors`` +
``adapter.json``) and, through ``load_adapter(folder, model)``, loads back with identical
logits. Adding a method is one module and one line below.

Methods that change the model's weights (LoRA, full fine-tuning, WiSE-FT) train with the
`Trainer` on the whole training set and write model folders; they are modules in
``WEIGHT_METHODS`` (imported on use: peft is heavy) exposing
``run(model_path, cfg, out, progress) -> dict``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from cliplab.adapt import (clip_adapter, cocoop, coop, linear_probe, tip_adapter, tip_adapter_f,
                           zeroshot_head)
from cliplab.adapt.base import AdaptContext, Adapter, read_adapter
from cliplab.errors import ConfigError, ModelError
from cliplab.models.dual_encoder import DualEncoder

METHODS: dict[str, ModuleType] = {
    "zeroshot": zeroshot_head,
    "linear-probe": linear_probe,
    "tip-adapter": tip_adapter,
    "tip-adapter-f": tip_adapter_f,
    "clip-adapter": clip_adapter,
    "coop": coop,
    "cocoop": cocoop,
}

WEIGHT_METHODS: dict[str, str] = {
    "lora": "cliplab.adapt.lora",
    "finetune": "cliplab.adapt.finetune",
    "wise-ft": "cliplab.adapt.wise_ft",
}

__all__ = ["METHODS", "WEIGHT_METHODS", "AdaptContext", "Adapter", "get_method", "load_adapter"]


def get_method(name: str) -> ModuleType:
    """The module of the method called ``name``, or a one-line error listing the choices."""
    if name not in METHODS:
        raise ConfigError(f"unknown adapt method {name!r}; choose one of: "
                          f"{', '.join([*METHODS, *WEIGHT_METHODS])}")
    return METHODS[name]


def load_adapter(folder: str | Path, model: DualEncoder) -> Adapter:
    """An adapter saved by ``Adapter.save``, on the model it was trained with."""
    meta, tensors = read_adapter(folder)
    name = meta.get("method")
    if name not in METHODS:
        raise ModelError(f"{folder}: adapter method {name!r} is not one cliplab knows "
                         f"({', '.join(METHODS)})")
    adapter = METHODS[name].ADAPTER.from_state(model, meta["classnames"], meta["options"],
                                               tensors)
    adapter.method = name  # one class can serve several methods (tip-adapter, -f)
    return adapter
