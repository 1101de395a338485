"""Option groups several adaptation methods share (each method's ``Options`` section extends
them): which prompts make the text classifier, and how a small head is trained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cliplab.config import Section
from cliplab.data.sources import checked_templates


class PromptOptions(Section):
    """The zero-shot classifier's prompts: ``templates`` (null: the dataset's, ensembled; or a
    list such as ["a photo of {}."]) filled with the dataset's descriptions/prompt names
    (``names: prompt``) or its bare class names (``names: class``)."""

    templates: list[str] | None = None
    names: Literal["prompt", "class"] = "prompt"

    @field_validator("templates", mode="before")
    @classmethod
    def _templates_with_a_place_for_the_class(cls, value):
        # ['a {c} shape'] or ['a shape'] gave every class one prompt: chance accuracy, silently
        if value is None:
            return None
        templates, problem = checked_templates([value] if isinstance(value, str) else value)
        if problem:
            raise ValueError(problem)
        return templates


class TrainingOptions(Section):
    """Minibatch training of a few parameters on cached features (`adapt.training`)."""

    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, ge=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
