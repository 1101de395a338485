"""The torch L-BFGS linear probe against scikit-learn's logistic regression."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cliplab.evaluate.linear_probe import fit_logistic, linear_probe


def blobs(n=300, d=5, c=3, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * spread
    y = torch.arange(n) % c
    return centres[y] + torch.randn(n, d, generator=g), y


def test_fit_matches_sklearn_with_the_same_penalty():
    x, y = blobs()
    C = 0.5
    l2 = 1.0 / (C * len(y))  # sklearn: C * sum CE + |W|^2 / 2  ==  N*C * (mean CE + l2/2 |W|^2)
    w, b = fit_logistic(x, y, 3, l2, max_iter=500)
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ w + b, 1).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(x.numpy()), atol=2e-4)


def test_probe_separates_blobs_and_reports_metrics():
    x, y = blobs(n=600, seed=1)
    m = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert m["acc1"] > 0.9 and m["acc5"] == 1.0 and m["l2"] in (1e-5, 1e-4, 1e-3, 1e-2)


def test_warm_started_l2_path_chooses_what_a_brute_force_search_chooses():
    from cliplab.evaluate.linear_probe import (DEFAULT_L2_GRID, accuracy, choose_l2,
                                               validation_split)

    # noisy, overlapping blobs in many dimensions: the validation accuracy depends on the L2
    x, y = blobs(n=400, d=40, c=4, seed=2, spread=0.35)
    grid = DEFAULT_L2_GRID
    train, val = validation_split(len(y), 0.2, 0)
    brute = {l2: accuracy(x[val], y[val], fit_logistic(x[train], y[train], 4, l2, max_iter=500))
             for l2 in grid}
    assert len(set(brute.values())) > 1  # the choice is not a foregone tie
    expected = max(grid, key=lambda l2: (brute[l2], l2))
    chosen, (w, b) = choose_l2(x, y, 4, grid)
    assert chosen == expected
    assert accuracy(x[val], y[val], (w, b)) == brute[expected]
    assert choose_l2(x, y, 4, grid, warm_start=False)[0] == expected


def test_warm_start_reaches_the_cold_start_optimum():
    x, y = blobs(n=300, d=10, c=3, seed=4, spread=0.5)
    cold = fit_logistic(x, y, 3, 1e-3, max_iter=500)
    warm = fit_logistic(x, y, 3, 1e-3, max_iter=500, init=fit_logistic(x, y, 3, 1e-1))

    def objective(w, b):  # in float64, to see differences float32 L-BFGS stops short of
        return (torch.nn.functional.cross_entropy((x @ w + b).double(), y)
                + 0.5e-3 * (w.double() ** 2).sum()).item()

    assert abs(objective(*warm) - objective(*cold)) < 1e-6
    torch.testing.assert_close(torch.softmax(x @ warm[0] + warm[1], 1),
                               torch.softmax(x @ cold[0] + cold[1], 1), atol=2e-3, rtol=0)


def test_row_space_basis_gives_the_full_space_optimum():
    from cliplab.evaluate.linear_probe import row_space_basis

    x, y = blobs(n=24, d=200, c=3, seed=5)  # more dimensions than samples
    q = row_space_basis(x)
    assert q.shape == (200, 24)
    torch.testing.assert_close(q.T @ q, torch.eye(24), atol=1e-5, rtol=0)
    full = fit_logistic(x, y, 3, 1e-2, max_iter=1000)
    small = fit_logistic(x @ q, y, 3, 1e-2, max_iter=1000)
    mapped = (q @ small[0], small[1])  # the basis solution as full-space weights

    def objective(w, b):
        return (torch.nn.functional.cross_entropy((x @ w + b).double(), y)
                + 0.5e-2 * (w.double() ** 2).sum()).item()

    assert objective(*mapped) == pytest.approx(objective(*full), abs=1e-6)
    test = blobs(n=60, d=200, c=3, seed=6)[0]
    assert torch.equal((test @ mapped[0] + mapped[1]).argmax(1),
                       (test @ full[0] + full[1]).argmax(1))
    torch.testing.assert_close(torch.softmax(test @ mapped[0] + mapped[1], 1),
                               torch.softmax(test @ full[0] + full[1], 1), atol=5e-3, rtol=0)
    assert row_space_basis(x[:, :10]) is None  # fewer dimensions than samples: nothing to gain


def test_a_warm_start_leaves_the_initial_weights_as_they_were():
    x, y = blobs()
    init = fit_logistic(x, y, 3, 1e-1)
    before = [t.clone() for t in init]
    fit_logistic(x, y, 3, 1e-4, init=init)
    assert all(torch.equal(a, b) for a, b in zip(init, before))


def test_probe_acc5_with_eight_overlapping_classes():
    """acc5 over 8 overlapping classes is below 1 and equals the top-5 hit rate of the probe
    refitted by hand (standardised with the training features' mean and std, the given L2),
    each test row's label counted when fewer than 5 classes score above it."""
    x, y = blobs(n=800, d=6, c=8, seed=3, spread=0.6)
    m = linear_probe(x[:600], y[:600], x[600:], y[600:], l2=1e-2)
    mean, std = x[:600].mean(0), x[:600].std(0)
    w, b = fit_logistic((x[:600] - mean) / std, y[:600], 8, 1e-2)
    logits = (x[600:] - mean) / std @ w + b
    rank = (logits > logits[torch.arange(200), y[600:]][:, None]).sum(1) + 1
    assert m["acc1"] == pytest.approx((rank == 1).float().mean().item(), abs=1e-6)
    assert m["acc5"] == pytest.approx((rank <= 5).float().mean().item(), abs=1e-6)
    assert m["acc1"] < m["acc5"] < 1.0


def test_the_probe_fits_show_progress(capsys):
    """A 30 000-image probe fitted for minutes with no sign of life: a bar counts the fits
    (the L2 path's, then the final one); progress=False keeps stderr quiet."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long()
    quiet = linear_probe(x[:90], y[:90], x[90:], y[90:])
    assert capsys.readouterr().err == ""
    shown = linear_probe(x[:90], y[:90], x[90:], y[90:], progress=True)
    err = capsys.readouterr().err
    assert "fit probe:" in err and "0/8 [" in err  # 7 strengths of the path + the final fit
    assert shown == quiet
    linear_probe(x[:90], y[:90], x[90:], y[90:], l2=0.01, progress=True)
    assert "0/1 [" in capsys.readouterr().err


def test_the_validation_split_is_disjoint_and_covers_every_row():
    """Guards the split's validation rows leaking into the fits it chooses between: the two
    parts must not overlap and together hold each row once."""
    from cliplab.evaluate.linear_probe import validation_split

    for n, fraction, n_val in ((10, 0.2, 2), (3, 0.2, 1), (7, 0.5, 3)):
        train, val = validation_split(n, fraction, seed=0)
        assert len(val) == n_val and len(train) == n - n_val
        assert not set(train.tolist()) & set(val.tolist())
        assert sorted(train.tolist() + val.tolist()) == list(range(n))


def _noisy_pairs():
    """10 noisy 2-d samples of 2 classes (standardised by hand) and 200 clean test samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2, generator=g)
    y = (x[:, 0] + 0.8 * torch.randn(10, generator=g) > 0).long()
    xt = torch.randn(200, 2, generator=g)
    return x, y, xt, (xt[:, 0] > 0).long()


def test_l2_choice_matches_a_brute_force_on_a_split_drawn_by_hand():
    """Guards the choice being scored on held-out rows: a search whose validation rows are
    also fitted prefers the weakest penalty (0.01 here, where held-out rows pick 1.0)."""
    from cliplab.evaluate.linear_probe import DEFAULT_L2_GRID, choose_l2

    x, y, _, _ = _noisy_pairs()
    x = (x - x.mean(0)) / x.std(0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    train, val = perm[2:], perm[:2]  # the documented split: a seeded permutation, 20 % held out

    def brute(fit_rows, score_rows):
        acc = {}
        for l2 in DEFAULT_L2_GRID:
            w, b = fit_logistic(x[fit_rows], y[fit_rows], 2, l2, max_iter=500)
            acc[l2] = ((x[score_rows] @ w + b).argmax(1) == y[score_rows]).float().mean().item()
        return max(DEFAULT_L2_GRID, key=lambda l2: (acc[l2], l2))

    expected = brute(train, val)
    assert expected == 1.0 and brute(perm, val) != expected  # the case tells a leak apart
    assert choose_l2(x, y, 2, DEFAULT_L2_GRID)[0] == expected


def test_automatic_l2_refits_on_all_training_rows(monkeypatch):
    """Guards the documented final refit: with ``l2=None`` the returned probe is fitted on all
    training rows at the chosen strength, not the 80 % split's fit."""
    import cliplab.evaluate.linear_probe as lp

    x, y, xt, yt = _noisy_pairs()
    calls = []
    real = lp.fit_logistic

    def spy(x, y, num_classes, l2, *args, **kwargs):
        calls.append((len(y), l2))
        return real(x, y, num_classes, l2, *args, **kwargs)

    monkeypatch.setattr(lp, "fit_logistic", spy)
    m = linear_probe(x, y, xt, yt)
    assert m["l2"] == 1.0 and calls[-1] == (10, 1.0)
    assert all(rows == 8 for rows, _ in calls[:-1])
    # and its accuracy is that of an independent fit on all ten rows
    mean, std = x.mean(0), x.std(0)
    w, b = real((x - mean) / std, y, 2, 1.0, max_iter=500)
    want = (((xt - mean) / std @ w + b).argmax(1) == yt).float().mean().item()
    assert m["acc1"] == pytest.approx(want)


def test_an_l2_strength_too_large_to_fit_is_one_error_not_nan_weights():
    """At 1e30 L-BFGS's line search overflowed: NaN weights were saved and every test image
    was scored as class 0 (an accuracy of that class's share)."""
    from cliplab.errors import ConfigError

    x, y = torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 3
    w, b = fit_logistic(x, y, 3, l2=1e6)
    assert torch.isfinite(w).all() and w.abs().max() < 1e-5  # strong, still finite
    with pytest.raises(ConfigError, match=r"^linear probe: L-BFGS diverged at L2 strength "
                                          r"1e\+30 \(the weights became NaN or infinite\)"):
        fit_logistic(x, y, 3, l2=1e30)
