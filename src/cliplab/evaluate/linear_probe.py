"""Linear probe: multinomial logistic regression on frozen features, fitted with full-batch
L-BFGS in torch (seconds for tens of thousands of samples), with the L2 strength chosen on a
validation split of the training features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cliplab.evaluate.metrics import classification_metrics

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature with the training set's mean and std."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 200, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[D, C]`` and bias ``[C]`` minimising mean cross-entropy + ``l2/2 * |W|^2``."""
    x, y = x.to(dtype), y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def choose_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: Sequence[float],
              val_fraction: float = 0.2, seed: int = 0) -> float:
    """The L2 strength of ``grid`` with the best accuracy on a random validation split."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(y) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    scores = []
    for l2 in grid:
        w, b = fit_logistic(x[train], y[train], num_classes, l2)
        scores.append(((x[val] @ w + b).argmax(1) == y[val]).float().mean().item())
    return grid[max(range(len(grid)), key=lambda i: (scores[i], grid[i]))]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, l2: float | None = None,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> dict:
    """Fit on (train_x, train_y) and report acc1/acc5/mean per-class recall on the test set.

    Features are standardised first. With ``l2=None`` the strength is chosen from ``l2_grid`` on
    a 20% validation split, then the probe is refitted on all training features.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = standardize(train_x.float(), test_x.float())
    if l2 is None:
        l2 = choose_l2(train_x, train_y, num_classes, l2_grid) if len(l2_grid) > 1 else l2_grid[0]
    w, b = fit_logistic(train_x, train_y, num_classes, l2)
    metrics = classification_metrics(test_x @ w + b, test_y)
    metrics["l2"] = l2
    return metrics
