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
    ``backbone``: pooled tower output before the projection ``[N, H]``; ``layers``: class and
    mean patch tokens of the last few blocks (linear probes), when asked for."""

    embeddings: torch.Tensor
    backbone: torch.Tensor
    layers: torch.Tensor | None = None

    def get(self, name: str) -> torch.Tensor:
        """The features named ``embeddings``, ``backbone`` or ``layers``."""
        value = getattr(self, name, None) if name in PROBE_FEATURES else None
        if value is None:
            raise ValueError(f"no {name!r} features (choose one of {PROBE_FEATURES}; "
                             "'layers' needs probe_layers > 0)")
        return value


PROBE_FEATURES = ("embeddings", "backbone", "layers")


@torch.no_grad()
def encode_images(model: DualEncoder, images: torch.Tensor, batch_size: int = 500,
                  progress: bool = True, desc: str = "encode images",
                  probe_layers: int = 0) -> ImageFeatures:
    """Encode uint8 images ``[N, H, W, C]`` with ``model`` in eval mode; with
    ``probe_layers > 0`` also the multi-layer probe features of that many blocks."""
    was_training = model.training
    model.eval()
    emb, back, layers = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress,
                  leave=False):
        pixels = model.preprocess(images[i:i + batch_size]).to(model.device)
        if probe_layers:
            b, lay = model.image_backbone_and_layers(pixels, probe_layers)
            layers.append(lay.float().cpu())
        else:
            b = model.image_backbone(pixels)
        emb.append(F.normalize(model.project_image(b).float(), dim=-1).cpu())
        back.append(b.float().cpu())
    model.train(was_training)
    if not emb:
        return ImageFeatures(torch.empty(0, model.embed_dim), torch.empty(0, 0))
    return ImageFeatures(torch.cat(emb), torch.cat(back), torch.cat(layers) if layers else None)
