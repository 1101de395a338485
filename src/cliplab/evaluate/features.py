"""Image embeddings of a dataset, computed in batches under no_grad with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cliplab.models.dual_encoder import DualEncoder


@dataclass
class ImageFeatures:
    """``embeddings``: unit-length projected features ``[N, D]`` (zero-shot, retrieval);
    ``backbone``: pooled tower output before the projection ``[N, H]`` (linear probes)."""

    embeddings: torch.Tensor
    backbone: torch.Tensor


@torch.no_grad()
def encode_images(model: DualEncoder, images: torch.Tensor, batch_size: int = 500,
                  progress: bool = True, desc: str = "encode images") -> ImageFeatures:
    """Encode uint8 images ``[N, H, W, C]`` with ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    emb, back = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress,
                  leave=False):
        pixels = model.preprocess(images[i:i + batch_size]).to(model.device)
        if model.kind == "siglip":
            e = model.encode_image(pixels, normalize=False)
            b = model.image_backbone(pixels)
        else:
            b = model.image_backbone(pixels)
            e = model.project_image(b)
        emb.append(F.normalize(e.float(), dim=-1).cpu())
        back.append(b.float().cpu())
    model.train(was_training)
    if not emb:
        return ImageFeatures(torch.empty(0, model.embed_dim), torch.empty(0, 0))
    return ImageFeatures(torch.cat(emb), torch.cat(back))
