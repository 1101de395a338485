"""Compositional probing (ARO / VL-CheckList style): does the model prefer an image's true
caption over hard negatives made from the same words?

Negative types, exact on `shapes` relation scenes ("a red circle left of a blue square"):
- ``attribute_swap``: the two objects' colours exchanged ("a blue circle left of a red square");
- ``relation_swap``: the two objects exchanged around the relation ("a blue square left of a red
  circle");
- ``word_shuffle``: the caption's words in a random order.
A tie between caption and negative counts one half, so a bag-of-words text encoder — which cannot
tell these apart — scores exactly chance (0.5).
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch

from cliplab.data.caption_negatives import (NEGATIVE_TYPES, attribute_swap, relation_swap,
                                            shuffle_words)
from cliplab.data.shapes import Scene, object_phrase, relation_of
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.precision import autocast

__all__ = ["NEGATIVE_TYPES", "compositional", "preference_accuracy", "relation_negatives",
           "shuffle_words"]


def relation_negatives(scene: Scene, rng: random.Random) -> tuple[str, dict[str, str]]:
    """The caption of a two-object relation scene and one negative of each type (made by the
    generators hard-negative training uses, `cliplab.data.caption_negatives`)."""
    a, b = scene.objects
    rel = relation_of(a, b, scene.image_size)
    if rel is None:
        raise ValueError("the two objects of this scene are not clearly placed")
    true = f"{object_phrase(a)} {rel} {object_phrase(b)}"
    return true, {"attribute_swap": attribute_swap(true), "relation_swap": relation_swap(true),
                  "word_shuffle": shuffle_words(true, rng)}


def preference_accuracy(image_emb: torch.Tensor, true_emb: torch.Tensor,
                        negative_emb: torch.Tensor) -> float:
    """Fraction of images whose true caption scores above the negative (ties count 1/2)."""
    s_true = (image_emb * true_emb).sum(-1)
    s_neg = (image_emb * negative_emb).sum(-1)
    return ((s_true > s_neg).float() + 0.5 * (s_true == s_neg).float()).mean().item()


def compositional(model: DualEncoder, images: torch.Tensor, scenes: list[Scene], seed: int = 0,
                  progress: bool = True, image_emb: torch.Tensor | None = None,
                  precision: str = "fp32", texts: TextFeatureCache | None = None) -> dict:
    """Accuracy of the true caption over each negative type, on relation scenes; captions
    encoded at ``precision`` (``fp32`` or ``bf16``), as the images were: in fp32 through
    ``texts`` when given (each distinct caption once, shared with other tasks), else by the
    model."""
    rng = random.Random(seed)
    keep = [i for i, s in enumerate(scenes) if s.kind == "relation"]
    if not keep:
        raise ValueError("the compositional task needs `shapes` relation scenes")
    if image_emb is None:
        image_emb = encode_images(model, images[keep], progress=progress).embeddings
    else:
        image_emb = image_emb[keep]
    built = [relation_negatives(scenes[i], rng) for i in keep]
    captions = [[t for t, _ in built]] + [[negs[kind] for _, negs in built]
                                          for kind in NEGATIVE_TYPES]
    true_emb, *negatives = _embedded(model, captions, precision, texts)
    out = {f"{kind}_acc": preference_accuracy(image_emb, true_emb, neg_emb)
           for kind, neg_emb in zip(NEGATIVE_TYPES, negatives)}
    out["n"] = len(keep)
    return out


def _embedded(model: DualEncoder, groups: list[list[str]], precision: str,
              texts: TextFeatureCache | None) -> list[torch.Tensor]:
    """Unit float32 CPU embeddings of each group of captions, beside the image features."""
    # bf16 text embeddings move with the batch a caption is padded in (by ~1e-3), enough to
    # change which of a near-tie wins: bf16 keeps the model's batches, as before the cache
    if texts is not None and precision == "fp32":
        flat = texts.embeddings(model, [t for group in groups for t in group],
                                precision=precision, desc="encode captions")
        return list(flat.split([len(group) for group in groups]))
    # encode_texts answers on the model's device
    with autocast(precision, model.device.type) if precision != "fp32" else nullcontext():
        return [model.encode_texts(group).float().cpu() for group in groups]
