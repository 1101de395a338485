"""The one way a config names a model: ``model: NAME`` or ``model: {name: NAME, options: {...}}``.

``NAME`` is a preset (``tiny-clip``), a model folder, a checkpoint folder, a run folder (its
newest checkpoint) or a Hugging Face Hub id; ``options`` configure a preset (and are refused for
anything else). `cliplab.models.resolve.load_model` turns a spec into a `DualEncoder`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, field_validator

from cliplab.config import Section
from cliplab.errors import ModelError


class ModelSpec(Section):
    """Which model to load, and a preset's options."""

    renamed = {"preset": "name", "path": "name"}
    name: str
    options: dict[str, Any] = {}

    @field_validator("options")
    @classmethod
    def _preset_takes_options(cls, options: dict[str, Any], info) -> dict[str, Any]:
        """A misspelt preset option fails with the config's other errors, before any work."""
        if options and info.data.get("name"):
            from cliplab.models.presets import PRESETS, check_preset_options

            if info.data["name"] in PRESETS:
                try:
                    check_preset_options(info.data["name"], options)
                except ModelError as err:
                    raise ValueError(str(err)) from None
        return options

    def __str__(self) -> str:
        return self.name


def _from_string(value: Any) -> Any:
    if isinstance(value, ModelSpec):
        return value
    if hasattr(value, "__fspath__"):
        value = str(value)
    return {"name": value} if isinstance(value, str) else value


# the field type of every `model:` key in every stage's schema
ModelField = Annotated[ModelSpec, BeforeValidator(_from_string)]


def model_spec(value: Any) -> ModelSpec:
    """A `ModelSpec` from a string, path, mapping or spec (config errors named)."""
    from cliplab.config import validate

    return validate(ModelSpec, _from_string(value), "model")
