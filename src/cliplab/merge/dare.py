"""DARE (Yu et al. 2024, "Language Models are Super Mario"): Drop And REscale each task vector
— every entry dropped independently with probability p, the kept ones multiplied by 1/(1−p) so
the vector's expectation is unchanged — then merged as task arithmetic does
(``base + Σ λ_i δ̂_i``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.errors import ConfigError
from cliplab.merge.state import StateDict, check_same_keys, check_state, check_states
from cliplab.merge.task_arithmetic import apply_task_vector, combine_task_vectors, task_vector

Vector = dict[str, torch.Tensor]


def check_drop_rate(drop_rate: float) -> float:
    """``drop_rate`` as a float, refused outside [0, 1) (1 drops everything and divides by 0)."""
    if not 0 <= drop_rate < 1:
        raise ConfigError(f"drop_rate (DARE: probability of dropping each task-vector entry) "
                          f"must be in [0, 1), not {drop_rate}")
    return float(drop_rate)


def drop_and_rescale(vector: Vector, drop_rate: float, generator: torch.Generator,
                     rescale: bool = True) -> Vector:
    """``vector`` with each entry zeroed with probability ``drop_rate`` and the kept ones divided
    by ``1 − drop_rate`` (``rescale`` false: kept as they are, the ablation DARE improves on).
    One mask per tensor, drawn from ``generator`` in sorted key order, so a seed fixes them."""
    p = check_drop_rate(drop_rate)
    out = {}
    for key in sorted(vector):
        v = vector[key]
        keep = torch.rand(v.shape, generator=generator) >= p  # p = 0 keeps every entry
        kept = v / (1 - p) if rescale else v
        out[key] = torch.where(keep, kept, torch.zeros_like(v))
    return out


def dare_merge(base: StateDict, finetuned: Sequence[StateDict], drop_rate: float = 0.9,
               scale: float | Sequence[float] = 1.0, seed: int = 0,
               names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``base + Σ λ_i · drop_and_rescale(finetuned_i − base)``: ``scale`` one λ or one per
    model; the masks of model 0's tensors are drawn first, then model 1's, ... from one
    generator seeded with ``seed``. Non-float tensors are the base's (they must be equal)."""
    check_state(base, "dare_merge", "base")
    check_states(finetuned, "dare_merge", "finetuned")
    if not finetuned:
        raise ConfigError("DARE needs at least one fine-tuned model")
    p = check_drop_rate(drop_rate)
    check_same_keys([base, *finetuned],
                    ["base", *(names or [f"model {i}" for i in range(len(finetuned))])])
    generator = torch.Generator().manual_seed(seed)
    vectors = [drop_and_rescale(task_vector(f, base), p, generator) for f in finetuned]
    return apply_task_vector(base, combine_task_vectors(vectors, scale))
