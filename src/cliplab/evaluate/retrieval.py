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
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.models.dual_encoder import DualEncoder


BLOCK_SCORES = 2 ** 25  # similarities held at once by default: 128 MB of float32


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      text_rows: torch.Tensor | None = None, chunk: int | None = None) -> dict:
    """Recall@k both ways from unit embeddings; ``text_to_image[t]`` is the image of caption t.

    With ``text_rows``, ``text_emb`` holds only distinct captions and caption t's embedding is
    ``text_emb[text_rows[t]]``: similarities are computed per distinct caption and expanded, which
    gives the same numbers as the full ``[T, N]`` product without its cost. Similarities are
    computed ``chunk`` rows at a time (distinct captions against every image, then images against
    every caption; by default as many rows as keep a block near `BLOCK_SCORES` scores), so
    memory stays ``O(chunk * (N + T))``, never ``O(U * N)``.
    """
    n_images = image_emb.shape[0]
    rows = torch.arange(text_emb.shape[0]) if text_rows is None else text_rows
    n_texts = len(rows)
    chunk = chunk or max(1, BLOCK_SCORES // max(n_images, n_texts, 1))
    ks = list(ks)
    # top-k is taken separately for each k: with tied scores (duplicate captions) the first
    # column of a top-10 need not be the top-1, and recall@k must not depend on the other ks
    top_images: dict[int, list[torch.Tensor]] = {k: [] for k in ks}  # per distinct caption
    for start in range(0, text_emb.shape[0], chunk):
        block = text_emb[start:start + chunk] @ image_emb.t()  # [u, N]
        for k in ks:
            top_images[k].append(block.topk(min(k, n_images), dim=1).indices)
    hits_t2i = {k: (torch.cat(top_images[k])[rows] == text_to_image[:, None]).any(dim=1)
                for k in ks}
    hits_i2t = {k: torch.zeros(n_images, dtype=torch.bool) for k in ks}
    for start in range(0, n_images, chunk):
        # texts on the left as above, so a score is the same number both ways; contiguous
        # before the column gather, which is ~3x slower on the transposed view
        block = (text_emb @ image_emb[start:start + chunk].t()).t().contiguous()  # [n, U]
        if text_rows is not None:
            block = block[:, rows]  # [n, T]: caption t's score at column t
        own = torch.arange(start, start + len(block))[:, None]
        for k in ks:
            top_texts = block.topk(min(k, n_texts), dim=1).indices  # [n, k]
            hits_i2t[k][start:start + len(block)] = (text_to_image[top_texts] == own).any(dim=1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = hits_t2i[k].float().mean().item()
        out[f"text_retrieval_recall@{k}"] = hits_i2t[k].float().mean().item()
    return out


def retrieval(model: DualEncoder, pairs: ImageTextPairs, ks: Sequence[int] = (1, 5, 10),
              progress: bool = True, image_features: ImageFeatures | None = None,
              text_cache: TextFeatureCache | None = None, precision: str = "fp32") -> dict:
    """Embed every image (unless ``image_features`` are given) and every distinct caption of
    ``pairs`` (through ``text_cache`` when given) and report recall@k both ways."""
    images = image_features or encode_images(model, pairs.images, progress=progress,
                                             desc="encode images", precision=precision)
    texts = [c for caps in pairs.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(pairs.captions) for _ in caps],
                         dtype=torch.long)
    index: dict[str, int] = {}
    rows = torch.tensor([index.setdefault(t, len(index)) for t in texts], dtype=torch.long)
    cache = text_cache if text_cache is not None else TextFeatureCache()
    text_emb = cache.embeddings(model, list(index), progress=progress, precision=precision,
                                desc="encode captions")
    return retrieval_metrics(images.embeddings, text_emb, owner, ks, text_rows=rows)
