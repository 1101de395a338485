"""scikit-learn's bundled 8x8 handwritten digits (1797 images, offline)."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt

from cliplab.data.types import LabelledImages
from cliplab.errors import DataError

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}.",
             "a blurry photo of the digit {}."]


def load_digits(split: Literal["all", "train", "test"] = "all",
                test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3, seed: NonNegativeInt = 0,
                image_size: PositiveInt | None = None) -> LabelledImages:
    """Digits as 8x8 grayscale uint8 images; ``train``/``test`` is a fixed stratified split.
    ``image_size``: upsampled (bilinear) to that side, e.g. 28 to batch them with
    Fashion-MNIST images in one training set."""
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("all", "train", "test"):  # a Python call (a data spec is checked first)
        raise DataError(f"digits split must be 'all', 'train' or 'test', not {split!r}")
    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        from sklearn.model_selection import train_test_split

        idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                               random_state=seed, stratify=labels)
        idx = {"train": idx_train, "test": idx_test}[split]
        images, labels = images[np.sort(idx)], labels[np.sort(idx)]
    pixels = torch.from_numpy(images).unsqueeze(-1)
    if image_size is not None and image_size != pixels.shape[1]:
        x = F.interpolate(pixels.permute(0, 3, 1, 2).float(), size=(image_size, image_size),
                          mode="bilinear", align_corners=False)
        pixels = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    suffix = "" if image_size is None else f"-{image_size}px"
    return LabelledImages(pixels, torch.from_numpy(labels), list(CLASSNAMES), list(TEMPLATES),
                          name=f"digits-{split}{suffix}")
