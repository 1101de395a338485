"""State-dict helpers shared by the merge operations: which tensors are merged, and copying
the rest unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cliplab.errors import ModelError

StateDict = Mapping[str, torch.Tensor]


def is_mergeable(tensor: torch.Tensor) -> bool:
    """Floating-point tensors are averaged/interpolated; integer and bool buffers are copied."""
    return tensor.is_floating_point()


def copied_buffer(states: Sequence[StateDict], key: str,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """The non-float tensor ``key``, which every state must hold with equal values."""
    first = states[0][key]
    for i, state in enumerate(states[1:], start=1):
        if not torch.equal(state[key], first):
            who = names[i] if names else f"state #{i}"
            raise ModelError(f"{who}: non-float tensor {key!r} differs from the first model's; "
                             "integer buffers are copied, not merged, so they must be equal")
    return first.clone()


def check_same_keys(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Every state has the first one's keys, shapes and dtypes (one-line error otherwise)."""
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        who = names[i] if names else f"state #{i}"
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            key, what = (missing[0], "lacks") if missing else (extra[0], "has an extra")
            raise ModelError(f"{who} {what} tensor {key!r} ({len(missing)} missing, "
                             f"{len(extra)} extra keys): not the same architecture")
        for key, tensor in ref.items():
            other = state[key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ModelError(f"{who}: tensor {key!r} is {tuple(other.shape)} {other.dtype}, "
                                 f"expected {tuple(tensor.shape)} {tensor.dtype}: not the same "
                                 "architecture")
