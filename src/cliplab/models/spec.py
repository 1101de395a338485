"""The one way a config names a model: ``model: NAME`` or ``model: {name: NAME, options: {...}}``.

``NAME`` is a preset (``tiny-clip``), a model folder, a checkpoint folder, a run folder (its
newest checkpoint) or a Hugging Face Hub id; ``options`` configure a preset (and are refused for
anything else). `cliplab.models.resolve.load_model` turns a spec into a `DualEncoder`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from cliplab.config import Section
from cliplab.errors import ModelError


class ModelSpec(Section):
    """Which model to load, and a preset's options."""

    renamed = {"preset": "name", "path": "name"}
    name: str
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _options_fit_the_model(self) -> ModelSpec:
        """A misspelt preset option, or options for a folder or Hub id (built as saved), fail
        with the config's other errors, before any work; named at ``model``, since a change
        of either key (a ``model.name=`` override under the file's options) can cause it."""
        if self.options:
            from cliplab.models.presets import PRESETS, check_preset_options

            if self.name not in PRESETS and (Path(self.name).expanduser().exists()
                                             or is_hub_id(self.name)):
                raise ValueError(f"options ({', '.join(sorted(map(str, self.options)))}) only "
                                 f"apply to presets ({', '.join(PRESETS)}), not to {self.name}; "
                                 "remove them (model.options={} on a command line)")
            if self.name in PRESETS:  # any other name is refused when loading, with hints
                try:
                    check_preset_options(self.name, self.options)
                except ModelError as err:
                    raise ValueError(str(err)) from None
        return self

    def __str__(self) -> str:
        return self.name


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a relative path written as one (``./x/y``, ``x/y/z``, or
    ``runs/x`` where ``runs`` is a folder here: a path, even when ``x`` is missing)."""
    return (bool(HUB_ID.match(name)) and not name.startswith(".")
            and not Path(name.split("/")[0]).is_dir())


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
