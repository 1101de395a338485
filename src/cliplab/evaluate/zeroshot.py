"""Zero-shot classification: a text classifier from class names and prompt templates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cliplab.errors import InputError
from cliplab.evaluate.metrics import classification_metrics, restrict_classes
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.models.dual_encoder import DualEncoder


@torch.no_grad()
def zeroshot_classifier(model: DualEncoder, classnames: Sequence[str],
                        templates: Sequence[str], text_cache: TextFeatureCache | None = None,
                        precision: str = "fp32") -> torch.Tensor:
    """``[C, D]`` unit vectors: per class, the normalised mean of its prompts' embeddings
    (CLIP's prompt ensembling). A template without ``{}`` is used as the prompt itself.
    With ``text_cache``, prompts already embedded (by an earlier task) are not encoded again.
    One class name or template may be given as a string (not one per character)."""
    classnames = [classnames] if isinstance(classnames, str) else list(classnames)
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not classnames or not templates:
        raise InputError(f"zeroshot_classifier needs at least one class name and one template "
                         f"(got {len(classnames)} and {len(templates)})")
    prompts = [t.format(c) if "{}" in t else t for c in classnames for t in templates]
    if text_cache is not None:
        emb = text_cache.embeddings(model, prompts, precision=precision, desc="encode prompts")
    else:
        emb = model.encode_texts(prompts).float().cpu()
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def zeroshot_logits(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, C]`` of unit image embeddings against the classifier."""
    return image_embeddings @ classifier.t()


def zeroshot_metrics(image_embeddings: torch.Tensor, labels: torch.Tensor,
                     classifier: torch.Tensor, classes: Sequence[int] | None = None) -> dict:
    """acc1/acc5/mean per-class recall; with ``classes``, only those classes compete and only
    images of those classes are scored (e.g. classes held out from training)."""
    logits = zeroshot_logits(image_embeddings, classifier)
    if classes is not None:
        logits, labels = restrict_classes(logits, labels, list(classes))
    return classification_metrics(logits, labels)
