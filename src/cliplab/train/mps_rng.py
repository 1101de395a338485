"""Apple's GPU (MPS) generator, which dropout on it draws from: its state for GradCache's
replayed pass and for checkpoints, beside the CPU's and CUDA's (None without MPS)."""

from __future__ import annotations

import torch


def mps_rng_state() -> torch.Tensor | None:
    """The MPS generator's state; None where there is no MPS device."""
    return torch.mps.get_rng_state() if torch.backends.mps.is_available() else None


def set_mps_rng_state(state: torch.Tensor | None) -> None:
    """Restore a state `mps_rng_state` returned (nothing for None or without MPS)."""
    if state is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state)
