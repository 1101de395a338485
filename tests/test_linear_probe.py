"""The torch L-BFGS linear probe against scikit-learn's logistic regression."""

import numpy as np
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
