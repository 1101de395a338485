"""Keeping the best-scored pairs: a top fraction (``keep_top``) or everything at or above a
``threshold``; shared by the score filters (``clip_score``, ``dfn``)."""

from __future__ import annotations

import math

import numpy as np

from cliplab.curate.steps.base import Decision


def check_keep_options(keep_top: float | None, threshold: float | None) -> None:
    """Exactly one of ``keep_top`` (a fraction in (0, 1]) and ``threshold``; ``ValueError``
    otherwise (raised inside a Spec's validator it becomes a `ConfigError` with the key path)."""
    if (keep_top is None) == (threshold is None):
        raise ValueError("give exactly one of keep_top (a fraction of the pool) and threshold "
                         "(a score)")
    if keep_top is not None and not 0 < keep_top <= 1:
        raise ValueError(f"keep_top must be a fraction in (0, 1], not {keep_top}")


def keep_by_score(scores: np.ndarray, keep_top: float | None, threshold: float | None,
                  label: str, report: dict | None = None) -> Decision:
    """The `Decision` keeping the ``ceil(keep_top * n)`` highest scores (ties: the earlier item
    in pool order first; the lowest kept score is the effective threshold) or every score
    ``>= threshold``; a dropped item's reason reads ``"<label> 0.121 below threshold 0.250
    (keep_top 0.3)"``. NaN scores are dropped."""
    check_keep_options(keep_top, threshold)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    valid = ~np.isnan(scores)
    if keep_top is not None:
        keep = np.zeros(n, dtype=bool)
        count = math.ceil(keep_top * n - 1e-9)
        order = np.lexsort((np.arange(n), -np.where(valid, scores, -np.inf)))
        keep[order[:count]] = True
        keep &= valid
        cut = float(scores[keep].min()) if keep.any() else math.inf
        suffix = f" (keep_top {keep_top})"
    else:
        cut, suffix = float(threshold), ""
        keep = valid & (scores >= cut)
    reasons: list[str | None] = [
        None if kept else f"{label} is not a number" if np.isnan(s) else
        f"{label} {s:.3f} below threshold {cut:.3f}{suffix}" if s < cut else
        f"{label} {s:.3f} ties the threshold {cut:.3f} but the top {keep_top} is full"
        for s, kept in zip(scores, keep)]
    return Decision(keep, reasons, scores=scores.astype(np.float32),
                    threshold=None if math.isinf(cut) else cut, report=report or {})
