"""Model Stock (Jang et al. 2024): per layer, move from the average of k fine-tuned models
toward their pretrained centre by a ratio set by the angle between the fine-tuned deltas.

With ``cos θ`` the (mean pairwise) cosine between the deltas ``w_i - w_0`` of one tensor,
``t = k·cosθ / ((k−1)·cosθ + 1)`` and ``merged = t·avg(w_i) + (1−t)·w_0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from cliplab.errors import ConfigError
from cliplab.merge.state import (StateDict, check_same_keys, check_state, check_states,
                                 copied_buffer, is_mergeable)


def model_stock_ratio(cos: float, k: int) -> float:
    """``t = k·cosθ / ((k−1)·cosθ + 1)``; ``cos`` is clamped to [0, 1] first: deltas at an
    obtuse angle share no direction, so the layer falls back to the pretrained weights (t=0)
    rather than extrapolating past them."""
    cos = min(max(float(cos), 0.0), 1.0)
    return k * cos / ((k - 1) * cos + 1)


def mean_pairwise_cosine(deltas: Iterable[torch.Tensor]) -> float:
    """Mean cosine over all pairs of flattened ``deltas`` (a pair with a zero delta counts 0),
    in one pass: with ``u_i`` the unit deltas (0 for a zero one), the pairs' cosines sum to
    ``(‖Σ u_i‖² − Σ ‖u_i‖²) / 2`` (every pair, as k models give k(k−1)/2 of them, took 245 s
    at 16 ingredients)."""
    total, units, k = None, 0, 0
    for delta in deltas:  # one at a time: k deltas of a large tensor are not held together
        k += 1
        flat = delta.reshape(-1).double()
        norm = flat.norm()
        if norm == 0:
            continue
        units += 1
        total = flat / norm if total is None else total.add_(flat / norm)
    if total is None:
        return 0.0
    return float((total.dot(total) - units) / (k * (k - 1)))


def model_stock(base: StateDict, finetuned: Sequence[StateDict],
                names: Sequence[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The Model Stock merge of ``finetuned`` (k >= 2) around ``base``, and the ratio t used
    for each float tensor."""
    check_state(base, "model_stock", "base")
    check_states(finetuned, "model_stock", "finetuned")
    k = len(finetuned)
    if k < 2:
        raise ConfigError(f"Model Stock needs at least 2 fine-tuned models, got {k}")
    states = [base, *finetuned]
    check_same_keys(states, ["base", *(names or [f"model {i}" for i in range(k)])])
    out, ratios = {}, {}
    for key, w0 in base.items():
        if not is_mergeable(w0):
            out[key] = copied_buffer(states, key)
            continue
        w0f = w0.float()
        t = model_stock_ratio(mean_pairwise_cosine(s[key].float() - w0f for s in finetuned), k)
        avg = sum(s[key].float() for s in finetuned) / k
        out[key] = (t * avg + (1 - t) * w0f).to(w0.dtype)
        ratios[key] = t
    return out, ratios


def ratio_summary(ratios: dict[str, float], base: StateDict,
                  finetuned: Sequence[StateDict]) -> dict:
    """Mean, min and max of the ratios t over the tensors some fine-tune changed (a frozen
    tower's tensors sit at t=0 by construction, and would pull the mean toward it), how many
    tensors were left unchanged, and every ratio."""
    changed = [k for k in ratios if any(not torch.equal(s[k], base[k]) for s in finetuned)]
    values = [ratios[k] for k in changed] or list(ratios.values())
    return {"mean_ratio": sum(values) / len(values), "min_ratio": min(values),
            "max_ratio": max(values), "unchanged_tensors": len(ratios) - len(changed),
            "ratios": ratios}

