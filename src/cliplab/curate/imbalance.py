"""Exponentially imbalanced subsets: class i keeps about ``largest * ratio**i`` samples, the
long-tailed class frequencies of web-scale pretraining data in miniature."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.errors import DataError


def exponential_counts(n_classes: int, largest: int, ratio: float = 0.5,
                       smallest: int = 1) -> list[int]:
    """``[largest, largest*ratio, largest*ratio², …]`` rounded, never below ``smallest``."""
    if not 0 < ratio <= 1:
        raise DataError(f"ratio must be in (0, 1], got {ratio}")
    return [max(smallest, round(largest * ratio ** i)) for i in range(n_classes)]


def exponential_subsample(labels: torch.Tensor, counts: Sequence[int],
                          order: Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
    """Sorted indices keeping ``counts[j]`` random samples of class ``order[j]`` (default class
    j); a DataError if a class has fewer samples than asked for."""
    order = list(range(len(counts))) if order is None else list(order)
    if len(order) != len(counts):  # zip would drop the classes past the shorter
        raise DataError(f"{len(counts)} counts for {len(order)} classes in order: give one "
                        "count per class")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for cls, k in zip(order, counts):
        idx = (labels == cls).nonzero().flatten()
        if len(idx) < k:
            raise DataError(f"class {cls} has {len(idx)} samples, fewer than the {k} asked for")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values
