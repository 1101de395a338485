"""Adaptation: few-shot heads, caches and prompt learning on a frozen dual encoder, and LoRA,
full fine-tuning and WiSE-FT, which change its weights — one protocol, one registry.

Every method is a module registered in ``ADAPT_METHODS`` under its CLI name, exposing:

- ``Options`` — a `cliplab.config.Section`: the method's ``options:`` (unknown keys and wrong
  types are one-line errors naming the key);
- ``fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
  ctx: AdaptContext) -> Adapter`` — learn from the (k-shot) training set; ``ctx`` carries the
  shared feature cache, an optional validation split, the seed, the progress flag and the run
  folder (where methods that train weights write their checkpoints);
- ``NEEDS_PYTORCH_MODEL`` (optional) — why the method needs the PyTorch model (gradients
  through a tower, weights that change): set, an ONNX export given as the model is refused
  before any work (`cliplab.adapt.base.require_pytorch_model`); unset, the method reads only
  image and text features, which an export gives as well;
- ``check_first(model, options, validation: bool)`` (optional) — refuse, before any image is
  decoded, what ``fit`` would refuse of these options on this model (``validation``: a
  validation split will be given);
- ``uses_validation(options) -> bool`` (optional) — whether the method chooses anything on
  the validation split with these options (unset: never; a split drawn anyway is told);
- ``scoring_probe(options) -> str | None`` (optional) — the extra image features (``tokens``,
  ``layers``) its adapter scores with, computed with the zero-shot comparison's (so a streamed
  test set is decoded once);
- ``trains_on_features(options) -> bool`` (optional) — whether ``fit`` reads the training
  images (and a validation split drawn from them) only through their image features (with
  ``scoring_probe``'s): with ``shots: 0`` the training set is then streamed, its pixels never
  held (`cliplab.adapt.featured`); unset: never (it is decoded whole);
- ``SCORED_WHOLE`` (optional) — set when its adapter's ``score`` scores each set with many
  models (WiSE-FT's α sweep): its test sets are decoded whole once and held, not streamed
  (`cliplab.adapt.scored`) once per model.

An `Adapter` gives ``logits(images_or_features) -> [N, C]``, ``score(sets, cache)`` (metrics on
the test sets), ``save(folder)`` and ``summary()`` (extra results). Few-shot adapters write
``adapter.safetensors`` + ``adapter.json`` and load back with ``load_adapter(folder, model)``;
finetune writes a model folder, lora a peft adapter folder (`cliplab.adapt.lora.load_lora`).
`cliplab.adapt.run.run_adapt` is the one loop around every method. Adding a method is one
module and one line below.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cliplab.errors import ConfigError, ModelError, warn

if TYPE_CHECKING:
    from cliplab.adapt.base import AdaptContext, Adapter
    from cliplab.models.dual_encoder import DualEncoder

# name -> module, imported on first use (peft, behind lora, is heavy)
ADAPT_METHODS: dict[str, str] = {
    "zeroshot": "cliplab.adapt.zeroshot",
    "linear-probe": "cliplab.adapt.linear_probe",
    "tip-adapter": "cliplab.adapt.tip_adapter",
    "tip-adapter-f": "cliplab.adapt.tip_adapter_f",
    "clip-adapter": "cliplab.adapt.clip_adapter",
    "coop": "cliplab.adapt.coop",
    "cocoop": "cliplab.adapt.cocoop",
    "finetune": "cliplab.adapt.finetune",
    "lora": "cliplab.adapt.lora",
    "wise-ft": "cliplab.adapt.wise_ft",
}

__all__ = ["ADAPT_METHODS", "AdaptContext", "Adapter", "get_method", "load_adapter"]

# torch and transformers load on first use of these, so the CLI's parser (which lists
# ADAPT_METHODS) starts in a fraction of a second: `cliplab --help` needs no model code
_FROM_BASE = ("AdaptContext", "Adapter", "read_adapter")


def __dir__() -> list[str]:
    """The module's names with those imported on first use (``dir()`` and completion show them)."""
    return sorted({*globals(), *__all__, *_FROM_BASE})


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("cliplab.adapt.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_method(name: str) -> ModuleType:
    """The module of the method called ``name``, or a one-line error listing the choices."""
    if name not in ADAPT_METHODS:
        raise ConfigError(f"unknown adapt method {name!r}; choose one of: "
                          f"{', '.join(ADAPT_METHODS)}")
    return importlib.import_module(ADAPT_METHODS[name])


def load_adapter(folder: str | Path, model: DualEncoder) -> Adapter:
    """A few-shot adapter saved by ``Adapter.save`` (``adapter.json`` + ``adapter.safetensors``),
    on the model it was trained with (another model is refused: its features are not the
    ones the adapter learned on)."""
    from cliplab.adapt.base import read_adapter
    from cliplab.models.folder import model_fingerprint

    meta, tensors = read_adapter(folder)
    recorded = meta.get("fingerprint")
    if recorded is None:  # saved before 2026-12-03: nothing to check the weights against
        warn(f"{folder} records no weights fingerprint (an adapter saved by an older "
             "cliplab): the model given is not checked against the one it was fitted on"
             + (f" ({meta['model']})" if meta.get("model") else "") + "; on other weights "
             "its scores mean nothing")
    elif recorded != model_fingerprint(model):
        raise ModelError(f"{folder} was fitted on other weights than the model given (weights "
                         f"fingerprint {recorded}); load it with the model it was fitted on"
                         + (f" ({meta['model']}" + (f" with options {meta['model_options']}"
                                                  if meta.get("model_options") else "") + ")"
                            if meta.get("model") else ""))
    name = meta.get("method")
    module = get_method(name) if name in ADAPT_METHODS else None
    adapter_class = getattr(module, "ADAPTER", None)
    if adapter_class is None:
        raise ModelError(f"{folder}: adapter method {name!r} is not a few-shot method cliplab "
                         "loads from adapter.json (methods that train weights write model "
                         "folders: open those with DualEncoder.load or lora.load_lora)")
    adapter = adapter_class.from_state(model, meta["classnames"], meta["options"], tensors)
    adapter.method = name  # one class can serve several methods (tip-adapter, -f)
    return adapter
