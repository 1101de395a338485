"""`TrainConfig`: the ``train:`` section of every stage that updates weights (pretrain, quickstart,
adapt's fine-tuning and LoRA), as one `cliplab.config.Section` schema."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, field_validator, model_validator

from cliplab.config import LENGTH_KEYS, Section, deep_merge, validate
from cliplab.models.device import Device
from cliplab.models.precision import Precision
from cliplab.models.preprocess import AugmentConfig
from cliplab.train.hard_negatives import HardNegatives

AUGMENT_KEYS = tuple(f.name for f in fields(AugmentConfig))


def _not_a_bool(value: Any) -> Any:
    # pydantic reads true/false as 1/0 for an int; for a count that is always a mistake
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _not_a_bool_number(value: Any) -> Any:
    # and as 1.0/0.0 for a float: `lr: true` trained at rate 1.0, `epochs: true` for 1 epoch
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


Integer = Annotated[int, BeforeValidator(_not_a_bool)]
PositiveInt = Annotated[Integer, Field(gt=0)]
NonNegativeInt = Annotated[Integer, Field(ge=0)]
NotABool = BeforeValidator(_not_a_bool)  # e.g. Annotated[Literal[1, 3], NotABool]
Number = Annotated[float, BeforeValidator(_not_a_bool_number)]
PositiveFloat = Annotated[Number, Field(gt=0)]
NonNegativeFloat = Annotated[Number, Field(ge=0)]


class AugmentOverrides(Section):
    """``train.augment: {KEY: value}``: overrides of the model's `AugmentConfig`, each checked
    as the model's own augmentation is (finite numbers, scale ``[low, high]`` with
    ``0 < low <= high``, a true/false flip), so a bad value fails at config load instead of
    as NaN weights or a traceback at the first step."""

    scale: tuple[PositiveFloat, PositiveFloat] = AugmentConfig.scale
    translate: NonNegativeFloat = AugmentConfig.translate  # fraction of the image size
    rotate_deg: NonNegativeFloat = AugmentConfig.rotate_deg
    hflip: StrictBool = AugmentConfig.hflip

    @field_validator("scale", mode="before")
    @classmethod
    def _two_numbers(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"expected [low, high] (two numbers, 0 < low <= high), got "
                             f"{value!r}")
        return value

    @field_validator("scale")
    @classmethod
    def _low_then_high(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"expected [low, high] with low <= high, got {list(value)}")
        return value


def checked_augment(value: Any) -> Any:
    """``train.augment`` with an overrides mapping validated by `AugmentOverrides` (only the
    keys given, values as numbers/booleans); anything else as it is, for the field's type."""
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - set(AUGMENT_KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown augment option{'s' * (len(unknown) > 1)} "
                         f"{', '.join(map(repr, unknown))} (valid: {', '.join(AUGMENT_KEYS)})")
    return AugmentOverrides.model_validate(value).model_dump(mode="json", exclude_unset=True)


class TrainConfig(Section):
    """Settings of one training run (every field is a YAML key under ``train:``)."""

    # the length, in passes over the data or in optimiser steps (one of the two; neither: 1 epoch)
    epochs: PositiveFloat | None = None
    steps: PositiveInt | None = None
    # at least 2: a contrastive loss needs a negative
    batch_size: Annotated[Integer, Field(ge=2)] = 256
    lr: NonNegativeFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.05
    warmup: NonNegativeFloat = 0.05  # fraction of the steps (< 1) or a number of steps (>= 1)
    min_lr_ratio: Annotated[Number, Field(ge=0, le=1)] = 0.0
    grad_clip: NonNegativeFloat = 1.0  # 0: no clipping
    lock_text: bool = False
    lock_image: bool = False
    # leave the last k transformer blocks of a locked tower trainable (0: fully locked)
    lock_text_except_last: NonNegativeInt = 0
    lock_image_except_last: NonNegativeInt = 0
    augment: bool | dict[str, Any] = True  # or overrides of AugmentConfig, e.g. {hflip: false}
    # a caption is a positive of every image it describes (the images of its group, and any
    # whose captions include it); False: only pairs drawing the same caption
    multi_positive: bool = True
    # NegCLIP-style hard-negative captions (attribute/relation swaps, word shuffles) in the
    # contrastive loss: true for the defaults, or {kinds: [...], seed: N} (see hard_negatives.py)
    hard_negatives: HardNegatives | None = None
    # learning-rate multipliers by parameter-name substring, e.g. {text_projection: 0.1}
    # (the longest matching substring wins; each must match some trainable parameter)
    lr_scale: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    # bf16: autocast on CPU and CUDA; auto: bf16 where the device has native bf16 units, else fp32
    precision: Precision = "fp32"
    loss: Literal["clip", "siglip"] = "clip"  # siglip: sigmoid loss; needs a logit bias
    # compute the loss in loss_tile x loss_tile blocks: same loss and gradients, memory linear
    # in the batch instead of quadratic (for global batches whose B x B logits do not fit)
    loss_tile: PositiveInt | None = None
    # GradCache: embed the batch this many pairs at a time (same update as the whole batch)
    micro_batch_size: PositiveInt | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # a fully locked tower's features are computed once per dataset (images: only without
    # augmentation); false recomputes them every step (e.g. when they do not fit in memory)
    cache_frozen_features: bool = True
    # under torchrun: shard the towers' blocks (weights, gradients, optimizer state) over the
    # ranks with FSDP2; a single process ignores it
    fsdp: bool = False
    dist_timeout_s: PositiveFloat = 600.0  # under torchrun: how long a rank waits for a peer
    eval_every: NonNegativeInt = 0  # run the evaluation callback every N steps (0: never)
    device: Device = "auto"
    seed: Integer = 0
    log_every: PositiveInt = 25
    save_every: NonNegativeInt = 0  # 0: only the final checkpoint
    keep_checkpoints: PositiveInt | None = None  # the newest N kept after each save (None: all)
    progress: bool = True

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> "TrainConfig":
        # both set, one would silently lose (e.g. a steps override on a config in epochs)
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"give the length as epochs or as steps, not both (epochs: "
                             f"{self.epochs:g}, steps: {self.steps}); set the other to null")
        if self.micro_batch_size is not None and self.micro_batch_size >= self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} is not below "
                             f"batch_size {self.batch_size}: it splits nothing (each step "
                             "would only embed twice); drop it or give a smaller one")
        for tower in ("text", "image"):  # ignored without the lock: every block trained
            if getattr(self, f"lock_{tower}_except_last") and not getattr(self, f"lock_{tower}"):
                raise ValueError(f"lock_{tower}_except_last leaves blocks of a locked tower "
                                 f"trainable; it needs lock_{tower}: true")
        return self

    @field_validator("hard_negatives", mode="before")
    @classmethod
    def _hard_negatives_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {} if value else None
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"expected true, false or a mapping such as {{kinds: "
                             f"[attribute_swap, relation_swap], seed: 1}}, got {value!r}")
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _checked_augment(cls, value: Any) -> Any:
        # a ValidationError of the overrides keeps its keys: train.augment.scale: ...
        return checked_augment(value)

    @field_validator("augment")
    @classmethod
    def _empty_augment_is_on(cls, value: bool | dict) -> bool | dict:
        return value if value != {} else True  # no overrides: the model's augmentation, on

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "the config") -> "TrainConfig":
        """``d`` (the ``train:`` section) validated; errors name ``train.<key>``."""
        return validate(_TrainSection, {"train": d or {}}, where).train



def train_over_defaults(defaults: dict, given: dict | None) -> dict:
    """A stage's default ``train:`` settings updated by the ones ``given``; a length given (epochs
    or steps) replaces the default length, so the two never meet by accident."""
    given = given or {}
    if any(given.get(key) is not None for key in LENGTH_KEYS):
        defaults = {k: v for k, v in defaults.items() if k not in LENGTH_KEYS}
    return deep_merge(defaults, given)


class _TrainSection(Section):
    """A config holding only ``train:``, so that errors of `TrainConfig.from_dict` carry the
    key path ``train.<key>`` as they do inside a stage's full schema."""

    train: TrainConfig
