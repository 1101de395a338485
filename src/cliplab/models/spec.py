"""The one way a config names a model: ``model: NAME`` or ``model: {name: NAME, options: {...}}``.

``NAME`` is a preset (``tiny-clip``), a model folder, a checkpoint folder, a run folder (its
newest checkpoint) or a Hugging Face Hub id; ``options`` configure a preset (and are refused for
anything else). `cliplab.models.resolve.load_model` turns a spec into a `DualEncoder`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

from cliplab.config import Section


class ModelSpec(Section):
    """Which model to load, and a preset's options."""

    renamed = {"preset": "name", "path": "name"}
    name: str
    options: dict[str, Any] = {}

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
