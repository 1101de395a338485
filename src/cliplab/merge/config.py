"""`cliplab merge`'s config: which models, how, and what the methods need."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from cliplab.config import OutFolder, Section, refuse_unused
from cliplab.merge.methods import MERGE_METHODS, method_keys, methods_reading, methods_with
from cliplab.models.device import Device
from cliplab.models.spec import ModelField



class MergeConfig(Section):
    """``models``: the model, checkpoint or run folders to merge (or ``--models``); ``base``:
    the pretrained model they were fine-tuned from (model-stock and the task-vector methods);
    ``heldout``: one eval task (the `cliplab eval` suite schema) scoring every candidate by
    ``metric``."""

    method: str
    models: list[ModelField] = Field(min_length=1)
    base: ModelField | None = None
    out: OutFolder
    weights: list[Annotated[float, Field(ge=0)]] | None = None  # uniform: one per model (normalised)
    scale: float | list[float] = 1.0  # task-arithmetic, dare: λ, or one per model; ties: λ
    density: float = Field(0.2, gt=0, le=1)  # ties: fraction of each task vector kept
    drop_rate: float = Field(0.9, ge=0, lt=1)  # dare: probability each entry is dropped
    seed: int = Field(0, ge=0, lt=2 ** 64)  # dare: seeds the drop masks (torch takes 64 bits)
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
        method = MERGE_METHODS[self.method]
        if method.needs_base and self.base is None:
            raise ValueError(f"method {self.method!r} needs the pretrained model: base "
                             "(or --base P)")
        if n < method.min_models:
            raise ValueError(f"{self.method} needs at least {method.min_models} fine-tuned "
                             f"models ({method.why})")
        if method.needs_heldout and self.heldout is None:
            raise ValueError("the greedy soup needs held-out data to score with: set heldout "
                             "to an eval task on validation data, not the test set you report "
                             "(the soup is chosen on it), e.g. {task: zeroshot, data: {source: "
                             "fashion-mnist, split: test, offset: 5000}} when you report the "
                             "first 5000 test images")
        if isinstance(self.scale, list) and (not method.per_model_scales
                                             or len(self.scale) != n):
            takers = ", ".join(methods_with("per_model_scales"))
            raise ValueError(f"a list of scales is for {takers}, one per model ({n}), got "
                             f"{self.scale}")
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"weights: one per model ({n}), got {self.weights}")
        # another method's key at its default passes (one recipe may list every key)
        unused = [f"{key}={getattr(self, key)}" for key in method_keys()
                  if key not in method.keys
                  and getattr(self, key) != type(self).model_fields[key].default]
        if unused:  # set for another method: it would be ignored without a word
            owners = "; ".join(f"{key}: {', '.join(methods_reading(key))}"
                               for key in method_keys())
            raise ValueError(f"{', '.join(unused)} does not apply to {self.method!r} ({owners})")
        if self.heldout is None:
            refuse_unused(self, ["metric", "device"], "without heldout (nothing is scored, and "
                          "the weights merge on the CPU)")
        return self
