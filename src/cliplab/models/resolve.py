"""The one resolver behind every command and config that names a model."""

from __future__ import annotations

from typing import Any

import torch

from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.presets import build_model
from cliplab.models.spec import ModelSpec, model_spec


def load_model(spec: ModelSpec | str | dict | Any, device: str | torch.device = "cpu"
               ) -> DualEncoder:
    """A `DualEncoder` from a model spec (preset, model/checkpoint/run folder, Hub id)."""
    spec = model_spec(spec)
    return build_model(spec.name, **spec.options).to(device)
