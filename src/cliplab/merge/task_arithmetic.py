"""Task arithmetic (Ilharco et al. 2023): a task vector is fine-tuned minus pretrained
weights; vectors are added, negated (scale −1) and scaled, then added back to the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.errors import ConfigError
from cliplab.merge.state import (StateDict, check_same_keys, check_state, check_states,
                                 copied_buffer, is_mergeable)


def task_vector(finetuned: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """``finetuned − base`` for every float tensor (float32); other tensors carry no task (and
    must be equal: the base's are kept)."""
    check_state(finetuned, "task_vector", "finetuned")
    check_state(base, "task_vector", "base")
    names = ["base", "fine-tuned model"]
    check_same_keys([base, finetuned], names)
    for key in (k for k, w in base.items() if not is_mergeable(w)):
        copied_buffer([base, finetuned], key, names)
    return {k: finetuned[k].float() - w.float() for k, w in base.items() if is_mergeable(w)}


def combine_task_vectors(vectors: Sequence[dict[str, torch.Tensor]],
                         scales: Sequence[float] | float = 1.0) -> dict[str, torch.Tensor]:
    """``Σ λ_i τ_i``: one scale for all vectors or one per vector (−1 negates a task)."""
    check_states(vectors, "combine_task_vectors", "vectors")
    if not vectors:
        raise ConfigError("task arithmetic needs at least one task vector")
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(vectors)
    if len(scales) != len(vectors):
        raise ConfigError(f"{len(scales)} scales for {len(vectors)} task vectors")
    for i, vector in enumerate(vectors[1:], 1):
        if vector.keys() != vectors[0].keys():
            odd = sorted(vector.keys() ^ vectors[0].keys())
            raise ConfigError(f"task vectors 0 and {i} cover different tensors (e.g. {odd[0]}); "
                              "make them from models of one architecture")
    return {k: sum(float(s) * v[k] for s, v in zip(scales, vectors)) for k in vectors[0]}


def apply_task_vector(base: StateDict, vector: dict[str, torch.Tensor],
                      scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``base + scale·vector`` in the base's dtypes; tensors the vector lacks are copied (a
    vector entry the base lacks is refused: it would be dropped without a word)."""
    check_state(base, "apply_task_vector", "base")
    check_state(vector, "apply_task_vector", "vector")
    stray = sorted(vector.keys() - base.keys())
    if stray:
        raise ConfigError(f"{len(stray)} task-vector tensor(s) are not in the base (e.g. "
                          f"{stray[0]}); make the vector from this base's state dict")
    return {k: (w.float() + scale * vector[k]).to(w.dtype) if k in vector else w.clone()
            for k, w in base.items()}
