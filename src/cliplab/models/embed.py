"""Embedding PIL images and texts with any model face (`DualEncoder`, `OnnxEncoder`): unit
float32 numpy rows, no gradients, eval mode. Used by serve (index, queries) and curate (steps)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cliplab.errors import checked_batch_size
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.finite import finite_embeddings
from cliplab.models.preprocess import checked_images, convert_image, to_uint8_batch


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    return tqdm(range(0, n, checked_batch_size(batch_size)), desc=desc, unit="batch",
                disable=not progress or n == 0, leave=False)


@torch.no_grad()
def embed_images(model: DualEncoder, images, batch_size: int = 64,
                 progress: bool = False) -> np.ndarray:
    """``[N, D]`` unit image embeddings of PIL images of any sizes and modes (converted to RGB),
    or uint8 arrays/tensors ``[H, W(, C)]``; one image (or a uint8 batch ``[B, H, W(, C)]``)
    is taken as a batch. Anything else (a file path, a dataset) is one `InputError`."""
    images = checked_images(images, "embed_images")
    images = list(images) if isinstance(images, (torch.Tensor, np.ndarray)) else images
    out = []
    with evaluating(model):
        for start in _batches(len(images), batch_size, "embed images", progress):
            pixels = torch.cat([model.preprocess(_uint8(image)) for image in
                                images[start:start + batch_size]])
            out.append(finite_embeddings(
                model.encode_image(pixels.to(model.device)).float().cpu(), "image"))
    if not out:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def _uint8(image) -> torch.Tensor:
    """One image as a uint8 batch of one ``[1, H, W, C]``."""
    return to_uint8_batch(np.array(convert_image(image)) if isinstance(image, Image.Image)
                          else image)


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: Sequence[str] | str, batch_size: int = 256,
                progress: bool = False) -> np.ndarray:
    """``[N, D]`` unit text embeddings (one string: ``[1, D]``)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = [model.encode_texts(texts[start:start + batch_size], batch_size).float().cpu()
           for start in _batches(len(texts), batch_size, "embed texts", progress)]
    if not out:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)
