"""Embedding images and texts for search: unit float32 numpy rows, no gradients, eval mode."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cliplab.models.dual_encoder import DualEncoder, evaluating


@torch.no_grad()
def embed_images(model: DualEncoder, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
    """``[N, D]`` unit image embeddings of RGB PIL images of any sizes."""
    out = []
    with evaluating(model):
        for start in range(0, len(images), batch_size):
            pixels = torch.cat([model.preprocess(torch.from_numpy(np.array(im.convert("RGB")))[None])
                                for im in images[start:start + batch_size]])
            out.append(model.encode_image(pixels.to(model.device)).float().cpu())
    if not out:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def embed_texts(model: DualEncoder, texts: Sequence[str]) -> np.ndarray:
    """``[N, D]`` unit text embeddings."""
    return model.encode_texts(list(texts)).float().cpu().numpy().astype(np.float32)
