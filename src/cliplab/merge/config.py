"""`cliplab merge`'s config: which models, how, and what the methods need."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from cliplab.config import Section, refuse_unused
from cliplab.merge.methods import MERGE_METHODS
from cliplab.models.device import Device
from cliplab.models.spec import ModelField

NEEDS_BASE = ("model-stock", "task-arithmetic", "ties")
SCALED = ("task-arithmetic", "ties")  # the methods that take ``scale``


class MergeConfig(Section):
    """``models``: the model, checkpoint or run folders to merge (or ``--models``); ``base``:
    the pretrained model they were fine-tuned from (model-stock, task-arithmetic, ties);
    ``heldout``: one eval task (the `cliplab eval` suite schema) scoring every candidate by
    ``metric``."""

    method: str
    models: list[ModelField] = Field(min_length=1)
    base: ModelField | None = None
    out: str
    weights: list[Annotated[float, Field(ge=0)]] | None = None  # uniform: one per model (normalised)
    scale: float | list[float] = 1.0  # task-arithmetic: λ, or one per model; ties: λ
    density: float = Field(0.2, gt=0, le=1)  # ties: fraction of each task vector kept
    heldout: dict[str, Any] | None = None
    metric: str = "acc1"
    require_origin: bool = False
    device: Device = "auto"  # where the held-out task scores (the weights merge on the CPU)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r}; choose one of: "
                             f"{', '.join(MERGE_METHODS)}")
        return value

    @model_validator(mode="after")
    def _what_the_method_needs(self) -> "MergeConfig":
        n = len(self.models)
        if self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"method {self.method!r} needs the pretrained model: base "
                             "(or --base P)")
        if self.method in ("model-stock", "uniform", "greedy") and n < 2:
            why = "its ratio toward the base comes from the angle between fine-tunes" \
                if self.method == "model-stock" else "one model merged alone is a copy of it"
            raise ValueError(f"{self.method} needs at least 2 fine-tuned models ({why})")
        if self.method == "greedy" and self.heldout is None:
            raise ValueError("the greedy soup needs held-out data to score with: set heldout "
                             "to an eval task on validation data, not the test set you report "
                             "(the soup is chosen on it), e.g. {task: zeroshot, data: {source: "
                             "fashion-mnist, split: test, offset: 5000}} when you report the "
                             "first 5000 test images")
        if isinstance(self.scale, list) and (self.method != "task-arithmetic"
                                             or len(self.scale) != n):
            raise ValueError(f"a list of scales is for task-arithmetic, one per model ({n}), "
                             f"got {self.scale}")
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"weights: one per model ({n}), got {self.weights}")
        unused = [f"{key}={value}" for key, value, methods in (
            ("weights", self.weights, ("uniform",)), ("scale", self.scale, SCALED),
            ("density", self.density, ("ties",)))
            if value != type(self).model_fields[key].default and self.method not in methods]
        if unused:  # set for another method: it would be ignored without a word
            raise ValueError(f"{', '.join(unused)} does not apply to {self.method!r} (weights: "
                             "uniform; scale: task-arithmetic, ties; density: ties)")
        if self.heldout is None:
            refuse_unused(self, ["metric", "device"], "without heldout (nothing is scored, and "
                          "the weights merge on the CPU)")
        return self
