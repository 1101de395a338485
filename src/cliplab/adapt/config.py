"""The one config shape of `cliplab adapt`, whatever the method:

    method: coop                   # a name of `cliplab.adapt.ADAPT_METHODS`
    model: MODEL                   # the one model spec (preset, folder, run, Hub id)
    data: {train: SPEC, test: SPEC, shifted: SPEC, val: SPEC}   # shifted, val: optional
    shots: 16                      # per class from data.train (0: all), drawn with seed
    train_size: null               # then a random subset of this many (null: all)
    val_shots: 0                   # per class for hyper-parameter search: from data.val when
                                   # given (0: all of it), else from data.train disjoint from
                                   # the shots (0: no validation split)
    seed: 1
    options: {...}                 # the method's own `Options` section
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from cliplab.adapt import ADAPT_METHODS
from cliplab.adapt.base import DEFAULT_SEED
from cliplab.config import OutFolder, Section
from cliplab.data.sources import DataSpecField
from cliplab.models.device import Device
from cliplab.models.spec import ModelField


class AdaptData(Section):
    """Labelled data specs (``{source: NAME, ...}``, as every stage's ``data:``); ``val``: a
    separate validation set (e.g. held-out images no test is drawn from)."""

    renamed = {"train_size": "train_size (at the top level)", "seed": "seed (at the top level)"}
    train: DataSpecField
    test: DataSpecField
    shifted: DataSpecField | None = None
    val: DataSpecField | None = None


class AdaptConfig(Section):
    """`cliplab adapt`'s config; ``options`` is checked by the method's own ``Options``."""

    renamed = {"train": "data.train (a data spec; Trainer settings go to options.train)",
               "test": "data.test", "lora": "options", "finetune": "options",
               "wise_ft": "options"}
    method: str
    model: ModelField | None = None
    data: AdaptData
    shots: int = Field(16, ge=0)
    train_size: int | None = Field(None, ge=1)
    val_shots: int = Field(0, ge=0)
    seed: int = Field(DEFAULT_SEED, ge=0)
    options: dict[str, Any] = {}
    compare_zeroshot: bool = True
    cache_dir: str | None = None
    device: Device = "auto"  # where a model loaded from `model` runs (and trains by default)
    out: OutFolder | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_a_pretrain_recipe(cls, data: Any) -> Any:
        # its `train:` (Trainer settings) read as an old adapt config's renamed key
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and \
                "source" not in data["train"] and isinstance(data.get("data"), dict) and \
                "train" in data["data"] and "test" not in data["data"]:
            raise ValueError("this is a pretrain recipe (train: Trainer settings, no "
                             "data.test); cliplab adapt reads an adapt config (method, "
                             "data.train, data.test, options; see configs/adapt/)")
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in ADAPT_METHODS:
            raise ValueError(f"unknown adapt method {value!r}; choose one of: "
                             f"{', '.join(ADAPT_METHODS)}")
        return value
