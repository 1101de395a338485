"""What the few-shot claims (coop, cocoop, tip_adapter, clip_adapter) share: one `run_adapt`
config on the common splits, the decision rule, and the harmonic mean of base-to-novel.

Decision rule (fixed before any number was looked at): arm A beats arm B when the mean of A
minus the mean of B over the seeds exceeds twice their pooled standard deviation
(``sqrt((std_A² + std_B²) / 2)``); a smaller difference is a tie.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from paper_claims.common import ClaimContext, pooled_std, test_set, train_pool, validation_pool

# per-class validation images the searches see (from the validation pool only)
VAL_SHOTS = {True: 50, False: 200}


def adapt_config(ctx: ClaimContext, method: str, shots: int, seed: int,
                 options: dict | None = None, classes: list[str] | None = None,
                 validate: bool = False, score_on_validation: bool = False,
                 validation_limit: int | None = None, source: dict | None = None) -> dict:
    """A `run_adapt` config: ``shots`` per class from the training pool, scored on the test set
    (or, with ``score_on_validation``, on the validation pool, for choosing a setting), with
    ``validate`` a validation split from the validation pool for the method's own search;
    ``classes`` restricts every split to those classes; ``validation_limit`` takes only the
    first images of the validation pool (default: 2 000 with ``--quick``, all without);
    ``source``: more options of every split's source (e.g. ``{"descriptions": False}``)."""
    only = {**({"classes": classes} if classes else {}), **(source or {})}
    limit = validation_limit or (2000 if ctx.quick else None)
    val_spec = {**validation_pool(ctx, limit), **only}
    data: dict[str, Any] = {"train": {**train_pool(ctx), **only},
                            "test": val_spec if score_on_validation else {**test_set(ctx), **only}}
    cfg = {"method": method, "shots": shots, "seed": seed, "options": options or {},
           "data": data, "compare_zeroshot": not score_on_validation}
    if validate:
        data["val"] = val_spec
        cfg["val_shots"] = VAL_SHOTS[ctx.quick]
    return cfg


def arm_noise(a: dict, b: dict) -> float:
    """`pooled_std` of two ``mean_std`` dicts' per-seed values."""
    return pooled_std(a["values"], b["values"])


def beats(a: dict, b: dict) -> bool:
    """The rule: mean(a) - mean(b) > 2 x pooled std (``mean_std`` dicts, percent points)."""
    return a["mean"] - b["mean"] > 2 * arm_noise(a, b)


def verdict(a_name: str, a: dict, b_name: str, b: dict) -> str:
    """``"A > B (+gain, 2σ = x)"`` or ``"A vs B: tie/lower (...)"``, for the note."""
    gap, bar = a["mean"] - b["mean"], 2 * arm_noise(a, b)
    word = ">" if gap > bar else "tie with" if abs(gap) <= bar else "<"
    return f"{a_name} {word} {b_name} ({gap:+.1f} points, 2σ = {bar:.1f})"


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@contextlib.contextmanager
def one_thread():
    """One torch thread inside the block (the loops are small; the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
