"""TIES merging (Yadav et al. 2023): trim each task vector to its largest-magnitude entries,
elect one sign per entry by summed mass, average only the entries that agree with it (the
disjoint mean), scale by λ and add to the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.errors import ConfigError
from cliplab.merge.state import StateDict, check_same_keys, check_state, check_states
from cliplab.merge.task_arithmetic import apply_task_vector, task_vector

Vector = dict[str, torch.Tensor]


def trim_top_fraction(vector: Vector, density: float) -> Vector:
    """Keep the ``density`` fraction of the fine-tune's changed entries with the largest
    magnitude over the whole vector (all tensors together, as the paper does); zero the rest.
    The fraction is of the entries the fine-tune changed: entries it left at the base (a
    frozen tower's) are not part of the task vector, and counting them would keep every
    change of a partial fine-tune (the paper's full fine-tunes change every entry, where the
    two readings agree). Entries tied with the smallest kept magnitude are kept too."""
    if not 0 < density <= 1:
        raise ConfigError(f"TIES density (fraction of entries kept) must be in (0, 1], "
                          f"not {density}")
    magnitudes = torch.cat([v.abs().reshape(-1) for v in vector.values()])
    n_keep = max(1, round(density * int(torch.count_nonzero(magnitudes))))
    threshold = torch.topk(magnitudes, n_keep, sorted=False).values.min()
    return {k: torch.where((v.abs() >= threshold) & (v != 0), v, torch.zeros_like(v))
            for k, v in vector.items()}


def elect_sign(vectors: Sequence[Vector]) -> Vector:
    """Per entry, the sign of the summed trimmed values; where the sum is exactly zero, the
    sign of the majority over all elected entries (the paper's tie rule)."""
    signs = {k: torch.sign(sum(v[k] for v in vectors)) for k in vectors[0]}
    majority = torch.sign(sum(s.sum() for s in signs.values()))
    majority = majority if majority != 0 else torch.tensor(1.0)
    return {k: torch.where(s == 0, majority, s) for k, s in signs.items()}


def disjoint_mean(vectors: Sequence[Vector], signs: Vector) -> Vector:
    """Per entry, the mean over the vectors whose entry is non-zero and has the elected sign
    (zero where none has)."""
    out = {}
    for k, sign in signs.items():
        stacked = torch.stack([v[k] for v in vectors])
        agree = (stacked != 0) & (torch.sign(stacked) == sign)
        out[k] = (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)
    return out


def ties_merge(base: StateDict, finetuned: Sequence[StateDict], density: float = 0.2,
               scale: float = 1.0, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``base + scale · disjoint_mean(trimmed task vectors, elected signs)``."""
    check_state(base, "ties_merge", "base")
    check_states(finetuned, "ties_merge", "finetuned")
    if not finetuned:
        raise ConfigError("TIES needs at least one fine-tuned model")
    check_same_keys([base, *finetuned],
                    ["base", *(names or [f"model {i}" for i in range(len(finetuned))])])
    trimmed = [trim_top_fraction(task_vector(f, base), density) for f in finetuned]
    return apply_task_vector(base, disjoint_mean(trimmed, elect_sign(trimmed)), scale)
