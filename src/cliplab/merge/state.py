"""State-dict helpers shared by the merge operations: which tensors are merged, and copying
the rest unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cliplab.errors import InputError, ModelError, kind_of

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


def check_state(state: Any, caller: str, what: str) -> None:
    """``state`` (the argument ``what`` of ``caller``) is one state dict (``{name: tensor}``); a
    model folder, path or model object given instead is one `InputError` saying how to get it."""
    if not _is_state(state):
        raise InputError(f"{caller}: {what} is {kind_of(state)}, not a state dict "
                         f"({{name: tensor}}); {_how_to_get_states(state)}")


def check_states(states: Any, caller: str, what: str = "states") -> None:
    """``states`` is a list of state dicts; else one `InputError` as `check_state`'s."""
    if isinstance(states, (Mapping, str, bytes)) or hasattr(states, "__fspath__"):
        raise InputError(f"{caller} takes a list of state dicts ({{name: tensor}}) as {what}, "
                         f"not {kind_of(states)}; {_how_to_get_states(states)}")
    for i, state in enumerate(states):
        check_state(state, caller, f"{what}[{i}]")


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _how_to_get_states(given: Any) -> str:
    """How to turn ``given`` (a path, one state dict, a module) into state dicts."""
    if isinstance(given, (str, bytes)) or hasattr(given, "__fspath__"):
        return ("load each model folder's weights with "
                "cliplab.merge.checkpoints.load_ingredient(path).state, or merge folders with "
                "`cliplab merge` / cliplab.merge.run.run_merge")
    if _is_state(given):
        return "wrap one state dict in a list: [state_a, state_b, ...]"
    if hasattr(given, "state_dict"):
        return "pass model.model.state_dict() of a DualEncoder (or module.state_dict())"
    return "give {name: tensor} mappings of one architecture"


def non_finite(state: StateDict) -> tuple[str, int, int] | None:
    """``(first tensor name, its non-finite values, all non-finite values)`` of ``state``'s
    float tensors holding NaN or infinite values, or None when every one is finite."""
    first, total = None, 0
    for key, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad and first is None:
                first = (key, bad)
            total += bad
    return None if first is None else (*first, total)
