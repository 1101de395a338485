"""Curation steps by name, as a config writes them: ``{step: clip_score, model: ..., keep_top: 0.3}``.

Adding a step = its module (a ``Spec`` and a `Step` class) + one ``STEPS`` line
(``"name": "module:Class"``, imported only when a config uses it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from cliplab.config import validate
from cliplab.curate.steps.base import Step, StepSpecBase
from cliplab.errors import ConfigError

STEPS: dict[str, str] = {
    "basic": "cliplab.curate.steps.basic:Basic",
    "exact_dedup": "cliplab.curate.steps.exact_dedup:ExactDedup",
    "semantic_dedup": "cliplab.curate.steps.semantic_dedup:SemanticDedup",
    "decontaminate": "cliplab.curate.steps.decontaminate:Decontaminate",
    "clip_score": "cliplab.curate.steps.clip_score:ClipScore",
    "dfn": "cliplab.curate.steps.dfn:DataFilteringNetwork",
    "balance": "cliplab.curate.steps.balance:Balance",
}


def step_class(name: str) -> type:
    """The class behind step ``name``; ``ConfigError`` naming the choices for an unknown one."""
    if name not in STEPS:
        raise ConfigError(f"unknown curation step {name!r}; choose one of: {', '.join(STEPS)}")
    module, _, cls = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def step_spec(data: Mapping[str, Any] | StepSpecBase, where: str, prefix: str = "") -> StepSpecBase:
    """A step's spec validated by its own ``Spec`` (errors name ``where`` and the key path,
    ``prefix`` being the step's own path in the config, e.g. ``steps[2]``)."""
    if isinstance(data, StepSpecBase):
        return data
    if not isinstance(data, Mapping) or "step" not in data:
        raise ConfigError(f"{where + ': ' if where else ''}{prefix or 'step'}: a step needs "
                          f"'step: NAME' (one of: {', '.join(STEPS)})")
    cls = step_class(str(data["step"]))
    return validate(cls.Spec, dict(data), where, prefix)


def make_step(spec: StepSpecBase) -> Step:
    """An instance of the step ``spec`` configures."""
    return step_class(spec.step)(spec)
