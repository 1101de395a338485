"""Few-shot classification on frozen features: k examples per class, several seeds,
nearest-class-mean and linear-probe classifiers, reported as mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cliplab.evaluate.linear_probe import linear_probe
from cliplab.evaluate.metrics import classification_metrics

METHODS = ("ncm", "linear_probe")


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``k`` random samples of every class (all of a class with fewer)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values


def nearest_class_mean(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                       test_y: torch.Tensor) -> dict:
    """Classify by cosine similarity to the mean of each class's unit-length features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    means = torch.zeros(num_classes, train_x.shape[1])
    means.index_add_(0, train_y, train_x)
    logits = test_x @ F.normalize(means, dim=-1).t()
    absent = torch.bincount(train_y, minlength=num_classes) == 0
    logits[:, absent] = -torch.inf
    return classification_metrics(logits, test_y)


def few_shot(train_x: torch.Tensor | None, train_y: torch.Tensor | None, test_x: torch.Tensor,
             test_y: torch.Tensor, shots: Sequence[int] = (1, 2, 4, 8, 16),
             seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = METHODS,
             l2: float = 1e-3, draw: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
             | None = None) -> dict:
    """``{"<method>_<k>shot": {"acc1_mean", "acc1_std", "acc1_per_seed"}}`` for every k.
    The k-shot training features and labels of a seed are `sample_k_shot`'s picks of
    ``train_x``/``train_y``, or ``draw(k, seed)`` when given (features of drawn samples)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown few-shot method(s) {unknown}; choose from {METHODS}")
    if draw is None and (train_x is None or train_y is None):
        raise ValueError("few_shot needs train_x and train_y to draw shots from, or draw")
    out = {}
    for k in shots:
        per_method: dict[str, list[float]] = {m: [] for m in methods}
        for seed in seeds:
            if draw is not None:
                x, y = draw(k, seed)
            else:
                idx = sample_k_shot(train_y, k, seed)
                x, y = train_x[idx], train_y[idx]
            if "ncm" in methods:
                per_method["ncm"].append(nearest_class_mean(x, y, test_x, test_y)["acc1"])
            if "linear_probe" in methods:
                per_method["linear_probe"].append(linear_probe(x, y, test_x, test_y, l2=l2)["acc1"])
        for method, accs in per_method.items():
            t = torch.tensor(accs)
            out[f"{method}_{k}shot"] = {
                "acc1_mean": t.mean().item(),
                "acc1_std": t.std(unbiased=False).item(),
                "acc1_per_seed": accs}
    return out
