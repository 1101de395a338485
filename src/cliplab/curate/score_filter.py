"""Keeping the best-scored pairs, shared by the score filters (``clip_score``, ``dfn``): a top
fraction (``keep_top``) or every pair at or above a ``threshold``.

``keep_top: f`` keeps exactly ``round(f * n)`` of the ``n`` pairs that reach the step (rounded
half up); equal scores are ranked in pool order, so the cut is deterministic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from cliplab.curate.steps.base import Decision, told_apart


def check_keep_options(keep_top: float | None, threshold: float | None) -> None:
    """Exactly one of ``keep_top`` (a fraction in (0, 1]) and ``threshold``; ``ValueError``
    otherwise (raised inside a Spec's validator it becomes a `ConfigError` with the key path)."""
    if (keep_top is None) == (threshold is None):
        raise ValueError("give exactly one of keep_top (a fraction) and threshold (a score)")
    if keep_top is not None and not 0 < keep_top <= 1:
        raise ValueError(f"keep_top must be a fraction in (0, 1], not {keep_top}")


def top_fraction(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, float | None]:
    """``(keep mask, lowest kept score)``: the ``round(fraction * n)`` highest scores (half up),
    equal scores ranked in pool order, NaN last; the score is ``None`` when nothing is kept."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    # exact decimal arithmetic: 0.29 * 50 is 14.499999999999998 in floats, and 14.5 rounds up
    count = min(n, math.floor(Fraction(str(float(fraction))) * n + Fraction(1, 2)))
    keep = np.zeros(n, dtype=bool)
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((np.arange(n), -ranked))[:count]
    order = order[~np.isnan(scores[order])]
    if len(order) == 0:
        return keep, None
    keep[order] = True
    return keep, float(scores[order[-1]])


def keep_by_score(scores: np.ndarray, keep_top: float | None, threshold: float | None,
                  label: str, report: dict | None = None) -> Decision:
    """The `Decision` of a score filter: ``keep_top`` or ``threshold`` (exactly one) over
    ``scores``; a dropped pair's reason reads ``"<label> 0.121 below threshold 0.250 (keep_top
    0.3)"`` (more decimals where three print the two alike, `told_apart`); ``report`` gains
    ``rule`` and ``kept``."""
    check_keep_options(keep_top, threshold)
    scores = np.asarray(scores, dtype=np.float32)
    if keep_top is not None:
        keep, cut = top_fraction(scores, keep_top)
        rule: str | None = f"keep_top {keep_top:g}"
    else:
        cut, rule = float(threshold), None
        keep = scores >= cut  # NaN compares False: dropped
    reasons = [None if kept else _reason(label, score, cut, rule)
               for kept, score in zip(keep.tolist(), scores.tolist())]
    return Decision(keep=keep, reasons=reasons, scores=scores, threshold=cut,
                    report={"rule": rule or f"threshold {cut:g}", "kept": int(keep.sum()),
                            **(report or {})})


def _reason(label: str, score: float, cut: float | None, rule: str | None) -> str:
    if math.isnan(score):
        return f"{label} is not a number"
    if cut is None:
        return f"{label} {score:.3f}: {rule} of the pool keeps no pair"
    shown, cut_shown = told_apart(score, cut)
    if rule is None:
        return f"{label} {shown} below threshold {cut_shown}"
    if score < cut:
        return f"{label} {shown} below threshold {cut_shown} ({rule})"
    return (f"{label} {shown} at threshold {cut_shown}, past the cut of {rule} "
            "(ties in pool order)")
