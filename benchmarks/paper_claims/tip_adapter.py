"""Claim 3, Tip-Adapter: the training-free cache beats zero-shot, and Tip-Adapter-F (keys
fine-tuned) beats Tip-Adapter, both with the paper's augmentation: each key is the mean
embedding of 10 augmented views of its shot, and Tip-Adapter-F trains on augmented views.

Base: the competent base (`common`), all ten classes, 16 shots per class from the training
pool. (alpha, beta) of both are searched over the paper's grid on a validation split of the
validation pool (50 images per class with ``--quick``, 200 without), never on the test set.
Tip-Adapter-F: the paper's AdamW lr 0.001, 20 epochs.

Reproduced when (rule fixed in advance, `adapt_runs.beats`): Tip-Adapter beats zero-shot and
Tip-Adapter-F beats Tip-Adapter (mean gap > 2 x pooled std over the seeds).
"""

from __future__ import annotations

from cliplab.adapt.run import run_adapt
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models.resolve import load_model

from paper_claims.adapt_runs import adapt_config, beats, one_thread, verdict
from paper_claims.common import ClaimContext, entry, mean_std

CLAIM = "Tip-Adapter > zero-shot without training; Tip-Adapter-F > Tip-Adapter (augmented keys)"
PAPER = "Zhang et al. 2022 (Tip-Adapter)"
BASE = "competent base (LiT on Fashion-MNIST), all 10 classes, 16 shots"
PAPER_NUMBERS = "ImageNet 16-shot RN50: zero-shot 60.3, Tip-Adapter 62.0, Tip-Adapter-F 65.5"
OPTIONS = {"search": True, "augment_views": 10}


def run(ctx: ClaimContext) -> dict:
    model, cache = load_model(ctx.base), FeatureCache()
    acc: dict[str, list[float]] = {"zero-shot": [], "Tip-Adapter": [], "Tip-Adapter-F": []}
    chosen = []
    with one_thread():
        for seed in ctx.seeds:
            for method, arm in (("tip-adapter", "Tip-Adapter"), ("tip-adapter-f", "Tip-Adapter-F")):
                res = run_adapt(adapt_config(ctx, method, 16, seed, OPTIONS, validate=True),
                                model=model, progress=False, cache=cache, write=False)
                acc[arm].append(res["test"]["acc1"])
                chosen.append(f"{method} seed {seed}: alpha {res['options']['alpha']:.2f}, "
                              f"beta {res['options']['beta']:.2f}")
            acc["zero-shot"].append(res["zeroshot"]["acc1"])
    numbers = {arm: mean_std(v) for arm, v in acc.items()}
    zs, tip, tip_f = (numbers[k] for k in acc)
    ok = beats(tip, zs) and beats(tip_f, tip)
    note = "; ".join([verdict("Tip-Adapter", tip, "zero-shot", zs),
                      verdict("Tip-Adapter-F", tip_f, "Tip-Adapter", tip)])
    result = entry(CLAIM, PAPER, ok, ctx.seeds, numbers, BASE, PAPER_NUMBERS, note)
    result["chosen_on_validation"] = chosen
    return result
