"""Learning-rate schedules as multipliers of the base rate."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 at ``1/warmup_steps`` of the rate, so no
    step is wasted at 0), then cosine decay from 1 to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine` (its state saves with checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, min_ratio))


def multiplier(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The schedule's multiplier at the scheduler's current step (every group shares it): the
    rate of parameters without an ``lr_scale`` is the base rate times this."""
    return float(scheduler.lr_lambdas[0](scheduler.last_epoch))


def warmup_warning(warmup_steps: int, total_steps: int, settings: str = "train") -> str | None:
    """A one-line warning when the warm-up outlasts the run (its rate never reaches
    ``train.lr``), else None; ``settings`` is where the keys are written (``options.train``
    in adapt)."""
    if warmup_steps <= total_steps:  # equal: the last step runs at the full rate
        return None
    peak = total_steps / warmup_steps
    return (f"train: {settings}.warmup={warmup_steps} steps is longer than the run "
            f"({total_steps} steps), so the rate never reaches {settings}.lr (it peaks at "
            f"{peak:.0%} of it); lower {settings}.warmup or give it as a fraction of the run "
            "(< 1)")
