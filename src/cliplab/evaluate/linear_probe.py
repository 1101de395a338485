"""Linear probe: multinomial logistic regression on frozen features, fitted with full-batch
L-BFGS in torch, with the L2 strength chosen on a validation split of the training features.

The L2 search is a regularisation path: the grid is fitted from the strongest to the weakest
penalty, each fit starting from the previous solution (a warm start needs a fraction of the
iterations of a cold one), and the final fit on all training features starts from the chosen
strength's solution. With more feature dimensions than training samples the fit runs on an
orthonormal basis of the training features' row space, which gives the same optimum (an
L2-penalised solution lies in that span) at a fraction of the cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cliplab.errors import ConfigError
from cliplab.evaluate.metrics import classification_metrics

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
Weights = tuple[torch.Tensor, torch.Tensor]
SMALL_PROBLEM = 20_000_000  # samples x dims below which one thread is faster (measured)


@contextlib.contextmanager
def threads_for(numel: int):
    """One intra-op thread for small fits, whose per-op thread start-up costs more than the
    arithmetic (3x slower with two threads on a busy 2-core machine); the old count after."""
    old = torch.get_num_threads()
    if numel < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature with the training set's mean and (sample) std.

    One training row has no sample std (n - 1 = 0) and no spread to scale by: it is only
    centred (scale 1, as scikit-learn's ``StandardScaler`` treats a zero variance), so a
    one-image probe trains instead of meeting NaN features."""
    mean = train_x.mean(0)
    if len(train_x) < 2:
        return [x - mean for x in (train_x, *others)]
    std = train_x.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def row_space_basis(x: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor | None:
    """An orthonormal basis ``[D, r]`` of the span of ``x``'s rows when ``r < D`` (more
    dimensions than independent samples), else ``None`` (no saving)."""
    n, d = x.shape
    if n >= d:
        return None
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    rank = int((s > rtol * s.max()).sum()) if len(s) and s.max() > 0 else 0
    return vh[:max(rank, 1)].t().to(x.dtype)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 200, dtype: torch.dtype = torch.float32,
                 init: Weights | None = None) -> Weights:
    """Weights ``[D, C]`` and bias ``[C]`` minimising mean cross-entropy + ``l2/2 * |W|^2``,
    starting from ``init`` (a warm start) or zeros; inside a caller's ``torch.no_grad()`` or
    ``torch.inference_mode()`` too (an evaluation's usual context)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_logistic(x, y, num_classes, l2, max_iter, dtype, init)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                  max_iter: int, dtype: torch.dtype, init: Weights | None) -> Weights:
    # made under inference mode, they could not be saved for backward
    x, y = (t.clone() if t.is_inference() else t for t in (x.to(dtype), y.long()))
    # the weight is optimised as [C, D] and applied with F.linear: its gradient is then
    # ``G.T @ x``, which MKL computes ~6x faster than the ``x.T @ G`` of ``x @ w``'s backward
    # (measured: a 20000 x 3264 probe took 148 s, 0.66 s per L-BFGS evaluation)
    if init is None:
        wt = torch.zeros(num_classes, x.shape[1], dtype=dtype)
        b = torch.zeros(num_classes, dtype=dtype)
    else:
        wt = init[0].detach().t().to(dtype).clone(memory_format=torch.contiguous_format)
        b = init[1].detach().to(dtype).clone()
    wt.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([wt, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, wt, b), y) + 0.5 * l2 * (wt * wt).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if not (torch.isfinite(wt).all() and torch.isfinite(b).all()):
        raise ConfigError(f"linear probe: L-BFGS diverged at L2 strength {l2:g} (the weights "
                          "became NaN or infinite); give a smaller one (on standardized "
                          "features, 1e6 already leaves every weight near zero)")
    return wt.detach().t().contiguous().float(), b.detach().float()  # a copy, row-major


def l2_path(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: Sequence[float],
            max_iter: int = 200, fitted: Callable[[float], None] | None = None
            ) -> dict[float, Weights]:
    """Fits for every strength of ``grid``, strongest first, each warm-started from the last
    (``fitted(l2)`` is called after each, e.g. to move a progress bar)."""
    fits: dict[float, Weights] = {}
    init = None
    for l2 in sorted(grid, reverse=True):
        init = fits[l2] = fit_logistic(x, y, num_classes, l2, max_iter, init=init)
        if fitted is not None:
            fitted(l2)
    return fits


def validation_split(n: int, val_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a seeded random split of ``n`` samples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def accuracy(x: torch.Tensor, y: torch.Tensor, weights: Weights) -> float:
    w, b = weights
    return ((x @ w + b).argmax(1) == y).float().mean().item()


def choose_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: Sequence[float],
              val_fraction: float = 0.2, seed: int = 0, warm_start: bool = True,
              fitted: Callable[[float], None] | None = None) -> tuple[float, Weights]:
    """The strength of ``grid`` with the best accuracy on a random validation split (ties go
    to the stronger penalty), and its fit on the rest. ``warm_start=False`` fits every
    strength from zeros (the brute-force search, for checking the path); ``fitted``: as
    `l2_path`'s."""
    train, val = validation_split(len(y), val_fraction, seed)
    if warm_start:
        fits = l2_path(x[train], y[train], num_classes, grid, fitted=fitted)
    else:
        fits = {l2: fit_logistic(x[train], y[train], num_classes, l2) for l2 in grid}
    scores = {l2: accuracy(x[val], y[val], fits[l2]) for l2 in grid}
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return best, fits[best]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, l2: float | None = None,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 progress: bool = False) -> dict:
    """Fit on (train_x, train_y) and report acc1/acc5/mean per-class recall on the test set.

    Features are standardised first. With ``l2=None`` the strength is chosen from ``l2_grid`` on
    a ``val_fraction`` validation split, then the probe is refitted on all training features.
    ``progress``: a bar over the fits (minutes each on large feature sets).
    """
    if l2 is None and len(l2_grid) > 1 and len(train_y) < 2:
        raise ValueError(f"l2 is chosen on a validation split of the training features, which "
                         f"needs 2 samples or more (there are {len(train_y)}); give l2")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = standardize(train_x.float(), test_x.float())
    basis = row_space_basis(train_x)
    if basis is not None:
        train_x, test_x = train_x @ basis, test_x @ basis
    init = None
    searched = l2 is None and len(l2_grid) > 1
    with threads_for(train_x.numel()), tqdm(total=len(l2_grid) + 1 if searched else 1,
                                            desc="fit probe", unit="fit", leave=False,
                                            disable=not progress) as bar:
        def fitted(strength: float) -> None:
            bar.set_postfix(l2=f"{strength:g}", refresh=False)
            bar.update()

        if l2 is None:
            if searched:
                l2, init = choose_l2(train_x, train_y, num_classes, l2_grid, val_fraction,
                                     fitted=fitted)
            else:
                l2 = l2_grid[0]
        w, b = fit_logistic(train_x, train_y, num_classes, l2, init=init)
        fitted(l2)
    metrics = classification_metrics(test_x @ w + b, test_y)
    metrics["l2"] = l2
    return metrics
