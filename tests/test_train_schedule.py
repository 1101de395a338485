"""The learning-rate schedule: linear warm-up, then cosine decay from the full rate down to
``train.min_lr_ratio``, against values worked out by hand.

After ``warmup`` steps the decay's progress is ``(step - warmup) / (total - warmup)``: 0 (the
full rate) at the first step after warm-up, 1 (``min_ratio``) at ``total``, and held there
beyond it. The multiplier is ``min + (1 - min) * (1 + cos(pi * progress)) / 2``.
"""

import math

import pytest
import torch

from cliplab.train.schedule import build_scheduler, warmup_cosine

# total 10 steps, 2 of warm-up, min ratio 0.1: the decay spans 8 steps, so step s is at
# progress (s - 2) / 8 and its multiplier is 0.1 + 0.45 * (1 + cos(pi * (s - 2) / 8))
HAND = {
    0: 0.5,  # warm-up: (s + 1) / 2
    1: 1.0,
    2: 1.0,  # progress 0
    3: 0.1 + 0.45 * (1 + math.cos(math.pi / 8)),  # 0.9657...
    4: 0.1 + 0.45 * (1 + math.sqrt(0.5)),  # progress 1/4: 0.8682...
    6: 0.55,  # progress 1/2: half-way between 1 and 0.1
    8: 0.1 + 0.45 * (1 - math.sqrt(0.5)),  # progress 3/4: 0.2318...
    9: 0.1 + 0.45 * (1 - math.cos(math.pi / 8)),  # the last step of a 10-step run: 0.1343...
    10: 0.1,  # progress 1: the floor
    15: 0.1,  # past the end: held at the floor
}


@pytest.mark.parametrize("step", sorted(HAND))
def test_warmup_cosine_with_a_floor_matches_hand_values(step):
    """Warm-up 2 of 10 steps, ``min_ratio`` 0.1: each step's multiplier as worked out above."""
    assert warmup_cosine(step, 10, 2, 0.1) == pytest.approx(HAND[step], abs=1e-12)


def test_warmup_cosine_without_warmup_or_floor():
    """No warm-up: step 0 runs at the full rate; min ratio 0 decays to exactly 0 at ``total``
    (step 2 of 4 is half-way: 0.5; step 1 is at cos^2(pi/8))."""
    values = [warmup_cosine(s, 4, 0) for s in range(5)]
    assert values == pytest.approx([1.0, math.cos(math.pi / 8) ** 2, 0.5,
                                    math.sin(math.pi / 8) ** 2, 0.0], abs=1e-12)


def test_build_scheduler_follows_warmup_cosine_step_by_step():
    """The LambdaLR the trainer uses sets each step's rate to base rate x multiplier."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-3)
    scheduler = build_scheduler(optimizer, 10, 2, 0.1)
    rates = []
    for _ in range(11):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [2e-3 * HAND[s] if s in HAND else None for s in range(11)]
    assert [r for r, e in zip(rates, expected) if e is not None] == pytest.approx(
        [e for e in expected if e is not None], rel=1e-12)


def test_a_warm_up_as_long_as_the_run_is_not_warned_about():
    """Guards the warning's boundary: a warm-up of exactly the run's length reaches the full
    rate at the last step ((9 + 1) / 10), so only a longer one warns."""
    from cliplab.train.schedule import warmup_warning

    assert warmup_warning(10, 10) is None
    assert warmup_warning(9, 10) is None
    assert "peaks at 91% of it" in warmup_warning(11, 10)  # 10 / 11
