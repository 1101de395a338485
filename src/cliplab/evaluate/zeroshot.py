"""Zero-shot classification: a text classifier from class names and prompt templates."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from cliplab.errors import InputError
from cliplab.evaluate.metrics import classification_metrics, restrict_classes
from cliplab.evaluate.prompt_length import warn_cut_prompts
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.precision import autocast


@torch.no_grad()
def zeroshot_classifier(model: DualEncoder, classnames: Sequence[str],
                        templates: Sequence[str], text_cache: TextFeatureCache | None = None,
                        precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """``[C, D]`` unit vectors: per class, the normalised mean of its prompts' embeddings
    (CLIP's prompt ensembling). ``{}`` (or ``{c}``, as CLIP_benchmark's template files write
    it) is where the class goes; a template without it is used as the prompt itself, beside
    others that have it (templates none of which names the class are refused: every class
    would get the same prompts). With ``text_cache``, prompts already embedded (by an earlier
    task) are not encoded again. One class name or template may be given as a string (not one
    per character). ``progress``: a bar over the prompt batches (with ``text_cache``) when
    the prompts fill more than one batch (1000 classes x 80 templates take minutes)."""
    from cliplab.data.sources import formats_once

    classnames = [classnames] if isinstance(classnames, str) else list(classnames)
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not classnames or not templates:
        raise InputError(f"zeroshot_classifier needs at least one class name and one template "
                         f"(got {len(classnames)} and {len(templates)})")
    templates = [t.replace("{c}", "{}") for t in templates]
    bad = next((t for t in templates if "{}" in t and not formats_once(t)), None)
    if bad is not None:
        raise InputError(f"zeroshot_classifier: template {bad!r} has another format field or a "
                         "second '{}'; give one '{}' where the class goes (other braces doubled)")
    if len(classnames) > 1 and not any("{}" in t for t in templates):
        raise InputError(f"zeroshot_classifier: no template has a '{{}}' where the class goes "
                         f"(e.g. {templates[0]!r}): every class would get the same prompts")
    prompts = [t.format(c) if "{}" in t else t for c in classnames for t in templates]
    if precision not in ("fp32", "bf16"):
        raise InputError(f"zeroshot_classifier: precision must be fp32 or bf16, not "
                         f"{precision!r}")
    warn_cut_prompts(model, classnames, prompts)
    if text_cache is not None:
        many = progress and len(prompts) > text_cache.batch_size
        emb = text_cache.embeddings(model, prompts, progress=many, precision=precision,
                                    desc=f"text head: encode {len(prompts)} prompts")
    else:  # fp32: as the model is (any object with encode_texts will do)
        with autocast(precision, model.device.type) if precision == "bf16" else nullcontext():
            emb = model.encode_texts(prompts).float().cpu()
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def zeroshot_logits(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, C]`` of unit image embeddings against the classifier."""
    return image_embeddings @ classifier.t()


def zeroshot_metrics(image_embeddings: torch.Tensor, labels: torch.Tensor,
                     classifier: torch.Tensor, classes: Sequence[int] | None = None) -> dict:
    """acc1/acc5/mean per-class recall; with ``classes``, only those classes compete and only
    images of those classes are scored (e.g. classes held out from training).
    ``image_embeddings [N, D]``, ``labels [N]`` (class indices) and ``classifier [C, D]`` may be
    tensors, NumPy arrays or lists; anything else is one `InputError` naming the argument."""
    image_embeddings = _matrix(image_embeddings, "image_embeddings", "[N, D] (one row per image)")
    classifier = _matrix(classifier, "classifier", "[C, D] (one row per class, from "
                         "zeroshot_classifier)")
    n, n_classes = len(image_embeddings), len(classifier)
    if image_embeddings.shape[1] != classifier.shape[1]:
        raise InputError(f"zeroshot_metrics: image_embeddings have {image_embeddings.shape[1]} "
                         f"dimensions, the classifier {classifier.shape[1]}; embed the images "
                         "and the class prompts with the same model")
    labels = _labels(labels, n, n_classes)
    logits = zeroshot_logits(image_embeddings, classifier)
    if classes is not None:
        chosen = _classes(classes, n_classes)
        if not torch.isin(labels, torch.as_tensor(chosen)).any():
            raise InputError(f"zeroshot_metrics: no image has a label among classes={chosen}; "
                             "give classes that occur in labels")
        logits, labels = restrict_classes(logits, labels, chosen)
    return classification_metrics(logits, labels)


def _as_tensor(value, name: str) -> torch.Tensor:
    """``value`` (a tensor, NumPy array or nested list of numbers) as a CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"zeroshot_metrics: {name} must be a tensor, NumPy array or list of "
                         f"numbers, not {type(value).__name__}") from None


def _matrix(value, name: str, want: str) -> torch.Tensor:
    """``value`` as a float32 ``[rows, D]`` tensor with at least one row (whole numbers too:
    ``[[1, 0], [0, 1]]`` is a matrix of numbers, not of booleans or complex ones)."""
    tensor = _as_tensor(value, name)
    real = tensor.dtype != torch.bool and not tensor.is_complex()
    if tensor.dim() != 2 or not real or not len(tensor):
        raise InputError(f"zeroshot_metrics: {name} is {_described(tensor)}, expected real "
                         f"numbers {want} with at least one row")
    return tensor.float()


def _labels(value, n: int, n_classes: int) -> torch.Tensor:
    """``value`` as int64 class indices ``[n]`` in ``0 .. n_classes-1`` (whole floats too)."""
    labels = _as_tensor(value, "labels")
    whole = not labels.is_floating_point() or bool((labels == labels.round()).all())
    if labels.dim() != 1 or len(labels) != n or labels.dtype == torch.bool or not whole:
        raise InputError(f"zeroshot_metrics: labels is {_described(labels)}, expected {n} integer "
                         "class indices (one per row of image_embeddings)")
    labels = labels.long()
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise InputError(f"zeroshot_metrics: label {int(bad[0])} is out of range: the classifier "
                         f"has {n_classes} classes, so labels must be 0..{n_classes - 1}")
    return labels


def _classes(classes: Sequence[int], n_classes: int) -> list[int]:
    """``classes`` as distinct class indices of the classifier."""
    given = [classes] if isinstance(classes, (str, int)) else list(classes)
    if not given or any(isinstance(c, (str, bool)) or not isinstance(c, (int, np.integer))
                        or not 0 <= c < n_classes for c in given) or len(set(given)) < len(given):
        raise InputError(f"zeroshot_metrics: classes={given!r}; expected distinct class indices "
                         f"0..{n_classes - 1} of the classifier (for names: "
                         "[classnames.index(name) for name in names])")
    return [int(c) for c in given]


def _described(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} of shape {list(tensor.shape)}"
