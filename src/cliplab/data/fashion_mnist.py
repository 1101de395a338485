"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` or any folder)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import NonNegativeInt

from cliplab.data.types import LabelledImages
from cliplab.errors import DataError, first_line

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FOLDER_VARIABLE = "CLIPLAB_FASHION_MNIST"  # elsewhere (macOS, Windows): a folder of the IDX files
WHERE = (f"install Debian's `dataset-fashion-mnist`, or point {FOLDER_VARIABLE} (or quickstart's "
         "--data-dir, a data spec's data_dir) to a folder holding its four IDX files")
CLASSNAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
              "Bag", "Ankle boot"]
# Names as a person would write them in a caption; the official names stay in CLASSNAMES.
PROMPT_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                "bag", "ankle boot"]
# Class descriptions used as prompts (CuPL-style): a short visual gloss per class. They tie
# classes to shared words ("top", "shoe"), which is what lets a model trained without a class
# place it near its relatives; `descriptions=False` uses the plain names instead.
DESCRIPTIONS = [
    "a t-shirt, a short-sleeved top",
    "trousers, long pants",
    "a pullover, a long-sleeved sweater",
    "a dress, a one-piece garment",
    "a coat, a long-sleeved jacket",
    "a sandal, an open shoe with straps",
    "a shirt, a top with a collar and buttons",
    "a sneaker, a sports shoe",
    "a bag, a handbag with handles",
    "an ankle boot, a shoe that covers the ankle",
]
PLAIN_PHRASES = ["a t-shirt", "a trouser", "a pullover", "a dress", "a coat", "a sandal",
                 "a shirt", "a sneaker", "a bag", "an ankle boot"]
# Templates take a phrase with its article ("a photo of {}." with "a sneaker, a sports shoe").
TEMPLATES = [
    "a photo of {}.",
    "a black and white photo of {}.",
    "a low resolution photo of {}.",
    "an image of {}.",
    "a grayscale image of {}.",
    "a product photo of {}.",
    "a picture of {}.",
    "a small photo of {}.",
]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def canonical_name(name: str) -> str:
    """The prompt name of a class given by its official name ("T-shirt/top" → "t-shirt") or
    its prompt name; anything else is returned unchanged (and rejected later by name)."""
    lower = name.lower()
    for official, prompt in zip(CLASSNAMES, PROMPT_NAMES):
        if lower in (official.lower(), prompt):
            return prompt
    return name


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # cut off, damaged, bad CRC
        raise DataError(f"cannot read IDX file {path}: truncated or corrupt gzip data "
                        f"({first_line(err)})") from None
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header of {ndim} sizes is cut off")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def default_dir() -> Path:
    """Where Fashion-MNIST is read from without a ``data_dir``: ``$CLIPLAB_FASHION_MNIST``, else
    Debian's folder."""
    return Path(os.environ.get(FOLDER_VARIABLE) or DEBIAN_DIR).expanduser()


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}; {WHERE}")


def load_fashion_mnist(split: Literal["train", "test"] = "train",
                       data_dir: str | Path | None = None, limit: NonNegativeInt | None = None,
                       descriptions: bool = True, offset: NonNegativeInt = 0) -> LabelledImages:
    """The ``train`` (60k) or ``test`` (10k) split as 28x28 grayscale uint8 images (from image
    ``offset``, at most ``limit`` of them); prompts use the class descriptions unless
    ``descriptions=False``."""
    if split not in FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    folder = Path(data_dir).expanduser() if data_dir else default_dir()
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist; {WHERE}")
    image_file, label_file = (_find(folder, stem) for stem in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{image_file} and {label_file} disagree: {images.shape} vs {labels.shape}")
    if not 0 <= offset < len(images):
        raise DataError(f"Fashion-MNIST {split}: offset {offset} is outside its {len(images)} "
                        "images")
    stop = None if limit is None else offset + limit
    images, labels = images[offset:stop], labels[offset:stop]
    return LabelledImages(torch.from_numpy(images.copy()).unsqueeze(-1),
                          torch.from_numpy(labels.astype(np.int64)), list(PROMPT_NAMES),
                          list(TEMPLATES), name=f"fashion-mnist-{split}",
                          descriptions=list(DESCRIPTIONS if descriptions else PLAIN_PHRASES))
