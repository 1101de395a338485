"""Merges linear in the models (the uniform soup, task arithmetic), summed as each model is
loaded: a merge of N models holds the running sum and one model, not all N (16 ingredients of
a ViT-B held ~10 GB). The sums run in the order and arithmetic of `uniform_soup` and
`combine_task_vectors` / `apply_task_vector`, so the merged weights are the same bits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.merge.methods import methods_with
from cliplab.merge.soup import soup_weights
from cliplab.merge.state import StateDict, check_same_keys, copied_buffer, is_mergeable

STREAMED = methods_with("streamed")  # the registered methods linear in the models


def skeleton(state: StateDict) -> dict[str, torch.Tensor]:
    """``state`` without its float weights' values (shape and dtype kept, on the meta device)
    and with its other tensors (integer buffers) whole: what the checks of names, shapes,
    dtypes and equal buffers read, once the weights are summed."""
    return {k: torch.empty_like(v, device="meta") if is_mergeable(v) else v
            for k, v in state.items()}


class LinearMerge:
    """``Σ c_i · state_i`` (uniform: the normalised weights) or ``base + Σ λ_i (state_i − base)``
    (task arithmetic, given ``base``), one state at a time, in float32; other tensors must be
    equal in every state (the first's is kept)."""

    def __init__(self, coefficients: Sequence[float], base: StateDict | None = None):
        self.coefficients, self.base = list(coefficients), base
        self.sum: dict[str, torch.Tensor] = {}
        self.added = 0
        # what every state is checked against: the base's skeleton, else the first state's
        self.first = skeleton(base) if base is not None else None
        self.first_name = "base" if base is not None else ""

    def add(self, state: StateDict, name: str) -> None:
        """Fold the next state (the i-th added takes the i-th coefficient)."""
        c = float(self.coefficients[self.added])
        if self.first is None:
            self.first, self.first_name = skeleton(state), name
        check_same_keys([self.first, state], [self.first_name, name])
        for key, tensor in state.items():
            if not is_mergeable(tensor):
                copied_buffer([self.first, state], key, [self.first_name, name])
                continue
            term = c * (tensor.float() - self.base[key].float() if self.base is not None
                        else tensor.float())
            if key in self.sum:
                self.sum[key] += term
            else:  # uniform_soup adds to zeros; the task vectors' sum starts at 0 + its first
                self.sum[key] = term if self.base is not None else \
                    torch.zeros(tensor.shape, dtype=torch.float32) + term
        self.added += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The merged state, in the first state's (task arithmetic: the base's) dtypes."""
        assert self.added, "add() first"
        if self.base is not None:
            return {k: (w.float() + 1.0 * self.sum[k]).to(w.dtype) if k in self.sum else w.clone()
                    for k, w in self.base.items()}
        return {k: self.sum[k].to(ref.dtype) if k in self.sum else ref.clone()
                for k, ref in self.first.items()}


def linear_merge(method: str, n: int, weights: Sequence[float] | None, scale: float | list,
                 base: StateDict | None) -> LinearMerge:
    """The `LinearMerge` of ``method`` over ``n`` models (``weights``: uniform's; ``scale``:
    task arithmetic's λ, one or one per model)."""
    if method == "uniform":
        return LinearMerge(soup_weights(weights, n))
    if method != "task-arithmetic":  # a method registered as streamed needs its sum here
        raise ValueError(f"merge method {method!r} is registered as streamed, but "
                         "linear_merge sums only uniform and task-arithmetic")
    scales = [float(scale)] * n if isinstance(scale, (int, float)) else list(scale)
    return LinearMerge(scales, base)
