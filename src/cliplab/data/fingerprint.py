"""What identifies a set's contents, hashed: its pixels (the evaluation caches' key of an image
set) and, for a training set, what is drawn with them (a checkpoint's record of its set)."""

from __future__ import annotations

import hashlib
import json

import torch

from cliplab.data.types import ImageTextPairs, LabelledImages


def images_fingerprint(images: torch.Tensor) -> str:
    """Hash of a uint8 image tensor's shape and pixels."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(memoryview(images.contiguous().numpy()))  # hashed in place: .tobytes() copied a set
    return h.hexdigest()[:16]


def image_digest(image: torch.Tensor) -> bytes:
    """A 16-byte hash of one uint8 image's pixels (which images of two sets are equal)."""
    return hashlib.blake2b(memoryview(image.contiguous().numpy()), digest_size=16).digest()


def set_fingerprint(data: ImageTextPairs | LabelledImages) -> str:
    """Hash of a set's pixels (`images_fingerprint`) and what is drawn with them: captions,
    groups and partners; labels and class names."""
    if isinstance(data, LabelledImages):
        extra = [data.labels.tolist(), data.classnames]
    else:
        extra = [data.captions, *(None if t is None else t.tolist()
                                  for t in (data.groups, data.partners))]
    h = hashlib.sha256(images_fingerprint(data.images).encode())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()[:32]
