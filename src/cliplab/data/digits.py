"""scikit-learn's bundled 8x8 handwritten digits (1797 images, offline)."""

from __future__ import annotations

import numpy as np
import torch

from cliplab.data.types import LabelledImages

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}.",
             "a blurry photo of the digit {}."]


def load_digits(split: str = "all", test_fraction: float = 0.3, seed: int = 0) -> LabelledImages:
    """Digits as 8x8 grayscale uint8 images; ``train``/``test`` is a fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        from sklearn.model_selection import train_test_split

        idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                               random_state=seed, stratify=labels)
        idx = {"train": idx_train, "test": idx_test}[split]
        images, labels = images[np.sort(idx)], labels[np.sort(idx)]
    return LabelledImages(torch.from_numpy(images).unsqueeze(-1), torch.from_numpy(labels),
                          list(CLASSNAMES), list(TEMPLATES), name=f"digits-{split}")
