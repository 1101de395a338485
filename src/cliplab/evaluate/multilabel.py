"""Multi-label zero-shot classification scored by mean average precision (mAP).

AP of a class ranks all images by their score for it: AP = Σ_n (R_n − R_{n−1}) P_n over the
distinct score thresholds, the definition of scikit-learn's ``average_precision_score`` (tied
scores form one threshold). mAP is the mean over classes that have at least one positive image
(the macro average; CLIP_benchmark's multi-label key ``mean_average_precision``, which
averages over every class: with a class that no image has, the two differ).
"""

from __future__ import annotations

import torch

from cliplab.data.pairs import class_keys


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of every column of ``scores [N, C]`` against multi-hot ``targets [N, C]``; NaN for a
    class without positives. All classes at once, no per-class loop."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {list(scores.shape)} and targets {list(targets.shape)} must "
                         "both be [N, C]")
    s = scores.double().t()  # [C, N]
    order = s.argsort(dim=1, descending=True)
    s_sorted = s.gather(1, order)
    pos = targets.t().gather(1, order).double()
    tp = pos.cumsum(1)
    precision = tp / torch.arange(1, s.shape[1] + 1, dtype=torch.float64)
    # a tie group is one threshold: every member takes the precision at the group's last index
    ascending = (-s_sorted).contiguous()
    group_end = torch.searchsorted(ascending, ascending, right=True) - 1
    n_pos = pos.sum(1)
    ap = (pos * precision.gather(1, group_end)).sum(1) / n_pos
    return ap.where(n_pos > 0, torch.tensor(float("nan"), dtype=torch.float64)).float()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean AP over the classes with at least one positive."""
    ap = average_precision(scores, targets)
    if torch.isnan(ap).all():
        raise ValueError("no class has a positive sample; mAP is undefined")
    return ap.nanmean().item()


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, classnames: list[str]
                       ) -> dict:
    """``mean_average_precision``, per-class AP and the number of classes scored."""
    ap = average_precision(scores, targets)
    scored = ~torch.isnan(ap)
    if not scored.any():
        raise ValueError("no class has a positive sample; mAP is undefined")
    return {"mean_average_precision": ap[scored].mean().item(),
            "per_class_ap": {name: ap[i].item()
                             for i, name in enumerate(class_keys(classnames)) if scored[i]},
            "n_classes": int(scored.sum())}
