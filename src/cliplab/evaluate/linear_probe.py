"""Linear probe: multinomial logistic regression on frozen image features."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cliplab.evaluate.metrics import classification_metrics


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, C: float = 1.0, max_iter: int = 1000) -> dict:
    """Fit on (train_x, train_y), report acc1/acc5/mean per-class recall on the test set.

    Features are standardised with the training set's statistics first, so one ``C`` suits
    towers of any scale.
    """
    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(scaler.transform(train_x.numpy()), train_y.numpy())
    logits = clf.decision_function(scaler.transform(test_x.numpy()))
    # map sklearn's class order back to label ids (classes absent from train get -inf)
    full = np.full((len(logits), int(max(train_y.max(), test_y.max())) + 1), -np.inf)
    full[:, clf.classes_] = logits
    return classification_metrics(torch.from_numpy(full).float(), test_y)
