"""Numeric precision of evaluation forward passes: float32, or bfloat16 autocast."""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(precision: str, device_type: str = "cpu"):
    """An autocast context for ``precision`` (``fp32``: plain float32, autocast disabled)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
