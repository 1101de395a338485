"""Classification metrics with CLIP_benchmark's keys: acc1, acc5, mean_per_class_recall."""

from __future__ import annotations

import torch

from cliplab.data.pairs import class_keys


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits (k capped at #classes);
    tied logits rank the lower class first, as ``argmax`` (per-class recall's) does — torch's
    ``topk`` picks among ties by its own rule, so one results file contradicted itself."""
    k = min(k, logits.shape[1])
    top = logits.argmax(dim=1, keepdim=True) if k == 1 else \
        torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor,
                          classes: torch.Tensor | None = None) -> float:
    """Recall averaged over classes present in ``labels`` (so rare classes weigh as much)."""
    classes = labels.unique() if classes is None else classes
    recalls = [(pred[labels == c] == c).float().mean() for c in classes if (labels == c).any()]
    if not recalls:  # no recall is defined (an empty set, or none of ``classes``)
        raise ValueError("mean per-class recall needs samples of a class; there are none")
    return torch.stack(recalls).mean().item()


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                       classnames: list[str]) -> dict[str, float]:
    """Top-1 accuracy (recall) of each class that has test samples, by its `class_keys` key."""
    pred = logits.argmax(1)
    return {name: (pred[labels == c] == c).float().mean().item()
            for c, name in enumerate(class_keys(classnames)) if (labels == c).any()}


def restrict_classes(logits: torch.Tensor, labels: torch.Tensor, classes: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Only ``classes`` compete and only their samples count: logits ``[M, len(classes)]``
    and labels relabelled to positions within ``classes``."""
    classes_t = torch.as_tensor(list(classes))
    keep = torch.isin(labels, classes_t)
    labels = (labels[keep][:, None] == classes_t[None, :]).float().argmax(dim=1)
    return logits[keep][:, classes_t], labels


# what a task's results count (what its numbers are over), not scores to rank by
COUNT_KEYS = ("n", "n_images", "n_texts", "n_train", "n_test")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall of ``logits [N, C]`` against integer ``labels``
    (acc5 is top-min(5, C): 1.0 when fewer than 5 classes compete, under the same key)."""
    pred = logits.argmax(dim=1)
    return {"acc1": topk_accuracy(logits, labels, 1), "acc5": topk_accuracy(logits, labels, 5),
            "mean_per_class_recall": mean_per_class_recall(pred, labels)}
