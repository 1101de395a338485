"""Image↔text retrieval: recall@k both ways, with several captions per image.

Keys follow CLIP_benchmark: ``image_retrieval_recall@k`` (text → image: is the caption's image
among the k most similar images) and ``text_retrieval_recall@k`` (image → text: is any of the
image's captions among the k most similar captions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.data.types import ImageTextPairs
from cliplab.evaluate.features import ImageFeatures, encode_images
from cliplab.models.dual_encoder import DualEncoder


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from unit embeddings; ``text_to_image[t]`` is the image of caption t."""
    sims = text_emb @ image_emb.t()  # [T, N]
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    positives = text_to_image[None, :] == torch.arange(n_images)[:, None]  # [N, T]
    out = {}
    for k in ks:
        top_images = sims.topk(min(k, n_images), dim=1).indices  # [T, k]
        hit_t2i = (top_images == text_to_image[:, None]).any(dim=1)
        top_texts = sims.t().topk(min(k, n_texts), dim=1).indices  # [N, k]
        hit_i2t = positives.gather(1, top_texts).any(dim=1)
        out[f"image_retrieval_recall@{k}"] = hit_t2i.float().mean().item()
        out[f"text_retrieval_recall@{k}"] = hit_i2t.float().mean().item()
    return out


def retrieval(model: DualEncoder, pairs: ImageTextPairs, ks: Sequence[int] = (1, 5, 10),
              progress: bool = True, image_features: ImageFeatures | None = None) -> dict:
    """Embed every image (unless ``image_features`` are given) and every caption of ``pairs``
    and report recall@k both ways."""
    images = image_features or encode_images(model, pairs.images, progress=progress,
                                             desc="encode images")
    texts = [c for caps in pairs.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(pairs.captions) for _ in caps])
    text_emb = model.encode_texts(texts).float().cpu()
    return retrieval_metrics(images.embeddings, text_emb, owner, ks)
