"""Long-tail analysis: per-class zero-shot accuracy against how often each class name occurs in
the training captions, with the log-linear fit acc ≈ a + b·log10(freq) of "No 'Zero-Shot'
Without Exponential Data" (Udandarao et al. 2024). Classes never mentioned in training have no
log-frequency; they are reported apart from the fit.
"""

from __future__ import annotations

import math

from scipy.stats import linregress

from cliplab.data.manifest import manifest_captions
from cliplab.data.sources import as_pairs, load_source
from cliplab.errors import ConfigError


def log_linear_fit(frequencies: list[float], accuracies: list[float]) -> dict:
    """Least-squares fit of ``acc = intercept + slope * log10(freq)`` (all freq > 0):
    slope (per decade), its standard error, intercept, r², n_classes, and how many decades
    the frequencies span (a slope over a fraction of one says little). The fit's keys are
    None when there are fewer than two distinct frequencies."""
    if any(f <= 0 for f in frequencies):
        raise ValueError("log-linear fit needs positive frequencies")
    n = len(frequencies)
    if len(set(frequencies)) < 2:
        return {**dict.fromkeys(FIT_KEYS), "n_classes": n}
    logs = [math.log10(f) for f in frequencies]
    fit = linregress(logs, accuracies)
    r2 = fit.rvalue ** 2 if math.isfinite(fit.rvalue) else 0.0  # constant accuracies: r = nan
    stderr = float(fit.stderr) if n > 2 and math.isfinite(fit.stderr) else None
    return {"slope": float(fit.slope), "slope_stderr": stderr, "intercept": float(fit.intercept),
            "r2": float(r2), "n_classes": n, "decades": max(logs) - min(logs)}


FIT_KEYS = ("slope", "slope_stderr", "intercept", "r2", "decades")


def narrow_span_warning(label: str, fit: dict) -> str | None:
    """A warning line when the classes' frequencies span less than one decade: the
    paper's trend is over orders of magnitude, and a slope fitted over a fraction of one is
    mostly noise (the shipped shapes suite's colours span 0.02 decade)."""
    if fit.get("decades") is None or fit["decades"] >= 1:
        return None
    # in results.json's unit (accuracy as a fraction), so the two numbers read alike
    spread = f" ± {fit['slope_stderr']:.3f}" if fit.get("slope_stderr") is not None else ""
    return (f"{label}: the classes' training frequencies span {fit['decades']:.2f} "
            f"decade(s), so the log-linear slope ({fit['slope']:+.3f}{spread} per decade) says "
            "little; a long-tail fit needs frequencies over orders of magnitude")


def long_tail_analysis(accuracy: dict[str, float], frequency: dict[str, int]) -> dict:
    """Per class accuracy and frequency, the fit over classes seen in training, and the
    classes of frequency zero apart."""
    per_class = {c: {"acc1": accuracy[c], "frequency": int(frequency.get(c, 0))}
                 for c in accuracy}
    seen = [c for c, v in per_class.items() if v["frequency"] > 0]
    unseen = [c for c, v in per_class.items() if v["frequency"] == 0]
    fit = log_linear_fit([per_class[c]["frequency"] for c in seen],
                         [per_class[c]["acc1"] for c in seen]) if seen else \
        {**dict.fromkeys(FIT_KEYS), "n_classes": 0}
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
    return as_pairs(load_source(spec), where).captions
