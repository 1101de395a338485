"""Long-tail analysis: per-class zero-shot accuracy against how often each class name occurs in
the training captions, with the log-linear fit acc ≈ a + b·log10(freq) of "No 'Zero-Shot'
Without Exponential Data" (Udandarao et al. 2024). Classes never mentioned in training have no
log-frequency; they are reported apart from the fit.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import linregress

from cliplab.data.concepts import count_mentions
from cliplab.data.manifest import manifest_captions
from cliplab.data.sources import as_labelled, as_pairs, load_source
from cliplab.errors import ConfigError
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits

TASK_KEYS = {"name", "task", "data", "train_data", "concepts"}


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                       classnames: list[str]) -> dict[str, float]:
    """Top-1 accuracy (recall) of each class that has test samples."""
    pred = logits.argmax(1)
    return {name: (pred[labels == c] == c).float().mean().item()
            for c, name in enumerate(classnames) if (labels == c).any()}


def log_linear_fit(frequencies: list[float], accuracies: list[float]) -> dict:
    """Least-squares fit of ``acc = intercept + slope * log10(freq)`` (all freq > 0):
    slope, intercept, r², n_classes. Slope etc. are None when there are fewer than two
    distinct frequencies."""
    if any(f <= 0 for f in frequencies):
        raise ValueError("log-linear fit needs positive frequencies")
    n = len(frequencies)
    if len(set(frequencies)) < 2:
        return {"slope": None, "intercept": None, "r2": None, "n_classes": n}
    fit = linregress([math.log10(f) for f in frequencies], accuracies)
    r2 = fit.rvalue ** 2 if math.isfinite(fit.rvalue) else 0.0  # constant accuracies: r = nan
    return {"slope": float(fit.slope), "intercept": float(fit.intercept), "r2": float(r2),
            "n_classes": n}


def long_tail_analysis(accuracy: dict[str, float], frequency: dict[str, int]) -> dict:
    """Per class accuracy and frequency, the fit over classes seen in training, and the
    classes of frequency zero apart."""
    per_class = {c: {"acc1": accuracy[c], "frequency": int(frequency.get(c, 0))}
                 for c in accuracy}
    seen = [c for c, v in per_class.items() if v["frequency"] > 0]
    unseen = [c for c, v in per_class.items() if v["frequency"] == 0]
    fit = log_linear_fit([per_class[c]["frequency"] for c in seen],
                         [per_class[c]["acc1"] for c in seen]) if seen else \
        {"slope": None, "intercept": None, "r2": None, "n_classes": 0}
    return {"fit": fit, "per_class": per_class,
            "zero_frequency": {"classes": unseen,
                               "mean_acc1": (sum(accuracy[c] for c in unseen) / len(unseen))
                               if unseen else None}}


def training_captions(spec: dict, where: str) -> list[list[str]]:
    """The captions of every training sample a data spec names; manifests are read without
    decoding their images."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a data spec such as {{source: manifest, path: X}}")
    if spec.get("source") == "manifest":
        extra = sorted(set(spec) - {"source", "path", "caption_col"})
        if extra or "path" not in spec:
            raise ConfigError(f"{where}: a manifest here takes path and caption_col only "
                              f"(got {sorted(spec)})")
        return [[c] for c in manifest_captions(spec["path"], spec.get("caption_col"))]
    return as_pairs(load_source(spec)).captions


def run_long_tail_task(model, task: dict, name: str, cache, progress: bool = True,
                       precision: str = "fp32") -> dict:
    """The suite's ``long_tail`` task: zero-shot on ``data``, concept counts in
    ``train_data``; ``concepts`` (one per class) overrides the class names as search terms."""
    if not isinstance(task.get("data"), dict):
        raise ConfigError(f"task {name!r} needs data: a labelled source such as "
                          "{source: shapes, attribute: color, n: 800}")
    data = as_labelled(load_source(task["data"]), f"task {name!r} data")
    captions = training_captions(task.get("train_data"), f"task {name!r} train_data")
    concepts = task.get("concepts") or data.classnames
    if len(concepts) != len(data.classnames):
        raise ConfigError(f"task {name!r}: {len(concepts)} concepts for "
                          f"{len(data.classnames)} classes; give one per class")
    feats = cache.features(model, data.images, progress=progress, desc=f"encode {name}",
                           precision=precision)
    classifier = zeroshot_classifier(model, data.prompt_names, data.templates, cache.texts,
                                     precision)
    acc = per_class_accuracy(zeroshot_logits(feats.embeddings, classifier), data.labels,
                             data.classnames)
    counts, n_samples = count_mentions(captions, concepts)
    out = long_tail_analysis(acc, dict(zip(data.classnames, counts)))
    out["n_train_samples"] = n_samples
    return out
