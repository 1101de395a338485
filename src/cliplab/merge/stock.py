"""Model Stock (Jang et al. 2024): per layer, move from the average of k fine-tuned models
toward their pretrained centre by a ratio set by the angle between the fine-tuned deltas.

With ``cos θ`` the (mean pairwise) cosine between the deltas ``w_i - w_0`` of one tensor,
``t = k·cosθ / ((k−1)·cosθ + 1)`` and ``merged = t·avg(w_i) + (1−t)·w_0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F

from cliplab.errors import ConfigError
from cliplab.merge.state import StateDict, check_same_keys, copied_buffer, is_mergeable


def model_stock_ratio(cos: float, k: int) -> float:
    """``t = k·cosθ / ((k−1)·cosθ + 1)``; ``cos`` is clamped to [0, 1] first: deltas at an
    obtuse angle share no direction, so the layer falls back to the pretrained weights (t=0)
    rather than extrapolating past them."""
    cos = min(max(float(cos), 0.0), 1.0)
    return k * cos / ((k - 1) * cos + 1)


def mean_pairwise_cosine(deltas: Sequence[torch.Tensor]) -> float:
    """Mean cosine over all pairs of flattened ``deltas`` (0 when a delta is zero)."""
    flat = [d.reshape(-1).float() for d in deltas]
    cosines = [F.cosine_similarity(a, b, dim=0, eps=1e-12).item() if a.any() and b.any() else 0.0
               for a, b in combinations(flat, 2)]
    return sum(cosines) / len(cosines)


def model_stock(base: StateDict, finetuned: Sequence[StateDict],
                names: Sequence[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The Model Stock merge of ``finetuned`` (k >= 2) around ``base``, and the ratio t used
    for each float tensor."""
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
        deltas = [s[key].float() - w0f for s in finetuned]
        t = model_stock_ratio(mean_pairwise_cosine(deltas), k)
        avg = torch.stack([s[key].float() for s in finetuned]).mean(0)
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

