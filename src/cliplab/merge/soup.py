"""Model soups (Wortsman et al. 2022): the uniform soup averages every ingredient; the greedy
soup adds ingredients in order of held-out score, keeping each only if the score does not drop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from tqdm.auto import tqdm

from cliplab.errors import ConfigError
from cliplab.merge.state import (StateDict, check_same_keys, check_states, copied_buffer,
                                 is_mergeable)


def uniform_soup(states: Sequence[StateDict], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of ``states``; ``weights`` are normalised to sum to 1. Float
    tensors are averaged in float32 and cast back; other tensors are copied."""
    check_states(states, "uniform_soup")
    if not states:
        raise ConfigError("a soup needs at least one model")
    coefficients = soup_weights(weights, len(states))
    check_same_keys(states, names)
    out = {}
    for key, ref in states[0].items():
        if not is_mergeable(ref):
            out[key] = copied_buffer(states, key, names)
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for c, state in zip(coefficients, states):
            acc += c * state[key].float()
        out[key] = acc.to(ref.dtype)
    return out


def soup_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Each of ``n`` states' share of a soup: ``weights`` (None: equal) normalised to sum to 1;
    a `ConfigError` unless they are n finite non-negative numbers, not all zero."""
    if weights is None:
        weights = [1.0] * n
    if (isinstance(weights, (str, Mapping)) or len(weights) != n
            or any(isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0
                   for w in weights) or sum(weights) <= 0):
        raise ConfigError(f"soup weights {list(weights)} must be {n} finite "
                          "non-negative numbers (one per state), not all zero")
    top = max(weights)  # scaled first: weights near the float limit would sum to inf
    weights = [w / top for w in weights]
    total = float(sum(weights))
    return [w / total for w in weights]


@dataclass
class GreedySoup:
    """The greedy soup's weights, which ingredients it kept (indices into the input, best
    first), every ingredient's own score, the soup's score and each step's decision."""

    state: dict[str, torch.Tensor]
    kept: list[int]
    scores: list[float]
    score: float
    steps: list[dict] = field(default_factory=list)


def greedy_soup(states: Sequence[StateDict], evaluate: Callable[[StateDict], float],
                names: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                progress: bool = False) -> GreedySoup:
    """Sort ingredients by ``evaluate`` (held-out accuracy, higher is better; ``scores`` if
    already known), start from the best, then try each next one: keep it if the uniform soup
    of the kept ones plus it scores at least as well as without it."""
    check_states(states, "greedy_soup")
    if not states:
        raise ConfigError("a greedy soup needs at least one model")
    names = list(names) if names else [f"model {i}" for i in range(len(states))]
    check_same_keys(states, names)
    if scores is None:
        scores = [float(evaluate(s)) for s in tqdm(states, desc="score ingredients",
                                                   disable=not progress, leave=False)]
    order = sorted(range(len(states)), key=lambda i: -scores[i])  # stable: ties keep input order
    kept = [order[0]]
    best_state = {k: v.clone() for k, v in states[order[0]].items()}
    best = scores[order[0]]
    steps = [{"ingredient": names[order[0]], "score": best, "kept": True}]
    for i in tqdm(order[1:], desc="greedy soup", disable=not progress, leave=False):
        candidate = uniform_soup([states[j] for j in kept + [i]])
        score = float(evaluate(candidate))
        keep = score >= best
        steps.append({"ingredient": names[i], "score": score, "kept": keep})
        if keep:
            kept.append(i)
            best, best_state = score, candidate
    return GreedySoup(best_state, kept, list(scores), best, steps)
