"""Claim 1, CoOp: learned prompt context at 16 shots is far better than hand-written prompts;
at 1 shot it gains little.

Base: the competent base (`common`), all ten Fashion-MNIST classes. Hand prompts: the dataset's
template ensemble filled with the class descriptions (the zero-shot head `run_adapt` reports).
CoOp: a unified context initialised from "a photo of" in front of the same descriptions (so
before training it is one of the hand prompts), the paper's SGD, batch 32, 50 epochs at 16
shots and 20 at 1 shot (the paper's 200 and 50 would take the full run over an hour on two
cores; 50 already moves the context far from the hand prompt). The learning rate is chosen per seed from
LRS (the paper's 0.002 first) by 16-shot accuracy on the validation pool, never on the test
set: the paper's 0.002 was set for CLIP's logit scale of 100, and this base's is ~14, so the
same rate barely moves the context (measured with --quick on a stand-in base: 16-shot
63.6% = the hand prompts).

Reproduced when (rule fixed in advance, `adapt_runs.beats`): CoOp 16-shot beats the hand
prompts, and CoOp 16-shot beats CoOp 1-shot (mean gap > 2 x pooled std over the seeds).
"""

from __future__ import annotations

from cliplab.adapt.run import run_adapt
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models.resolve import load_model

from paper_claims.adapt_runs import adapt_config, beats, one_thread, verdict
from paper_claims.common import ClaimContext, entry, mean_std

CLAIM = "CoOp: 16-shot learned prompts ≫ hand prompts; 1 shot gains little"
PAPER = "Zhou et al. 2022 (CoOp)"
BASE = "competent base (LiT on Fashion-MNIST), all 10 classes"
LRS = (0.002, 0.02, 0.2)
EPOCHS = {1: 20, 16: 50}
PAPER_NUMBERS = ("ImageNet RN50: hand prompts 58.2, CoOp 1-shot 57.2, 16-shot 63.0; "
                 "11-set average ≈ +15 points at 16 shots")


def options(shots: int, lr: float) -> dict:
    return {"init": "a photo of", "names": "prompt", "epochs": EPOCHS[shots], "lr": lr}


def chosen_lr(ctx: ClaimContext, seed: int, model, cache) -> float:
    """The rate of LRS with the best 16-shot accuracy on the validation pool (ties: the
    first)."""
    val = {lr: run_adapt(adapt_config(ctx, "coop", 16, seed, options(16, lr),
                                      score_on_validation=True),
                         model=model, progress=False, cache=cache, write=False)["test"]["acc1"]
           for lr in LRS}
    return max(LRS, key=lambda lr: val[lr])


def run(ctx: ClaimContext) -> dict:
    model, cache = load_model(ctx.base), FeatureCache()
    acc: dict[str, list[float]] = {"hand prompts": [], "coop 1-shot": [], "coop 16-shot": []}
    chosen = {}
    with one_thread():
        for seed in ctx.seeds:
            chosen[seed] = lr = chosen_lr(ctx, seed, model, cache)
            for shots in (1, 16):
                res = run_adapt(adapt_config(ctx, "coop", shots, seed, options(shots, lr)),
                                model=model, progress=False, cache=cache, write=False)
                acc[f"coop {shots}-shot"].append(res["test"]["acc1"])
            acc["hand prompts"].append(res["zeroshot"]["acc1"])
    numbers = {arm: mean_std(v) for arm, v in acc.items()}
    hand, one, sixteen = (numbers[k] for k in acc)
    ok = beats(sixteen, hand) and beats(sixteen, one)
    note = "; ".join([verdict("16-shot", sixteen, "hand prompts", hand),
                      verdict("16-shot", sixteen, "1-shot", one),
                      verdict("1-shot", one, "hand prompts", hand)])
    result = entry(CLAIM, PAPER, ok, ctx.seeds, numbers, BASE, PAPER_NUMBERS, note)
    result["lr_chosen_on_validation"] = chosen
    return result
