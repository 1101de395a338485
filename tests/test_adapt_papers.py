"""The few-shot papers' qualitative results on a competent base, in the test suite.

The base is the shortened quickstart's LiT model (`tiny_lit_run`: pretrained on the first
12 000 Fashion-MNIST training images of seven classes; shirt, sneaker and bag held out). Its
hand-prompt zero-shot head is well above chance on all ten Fashion-MNIST classes (33.6% on the
first 1 000 test images, chance 10%), so adapting it has something to keep or lose. Shots come
from training images the base never saw. One seed and small sizes; the measurement with
seeds, spread and the papers' full settings is ``benchmarks/papers.py``, which also holds
the claims this base is too weak or too slow for here (measured on it, 1 000 test images):

- Tip-Adapter / Tip-Adapter-F ((alpha, beta) searched on 20 validation images per class):
  +2.9 / +3.2 points over zero-shot with seed 1 but +0.2 / -5.5 with seed 2 — the tiny
  tower's few-shot keys are too noisy for a one-seed test to mean anything;
- CoOp: 50 epochs of the paper's SGD leave 16-shot CoOp at the hand prompts (33.0% vs
  33.6%) and take minutes; CoCoOp's base-to-novel costs minutes of per-image text passes;
- WiSE-FT needs a fine-tune strong enough to lose robustness (minutes); its interpolation
  is tested in test_adapt_wise_ft.py.
"""

import json

import pytest
import torch

from cliplab.adapt.run import run_adapt
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models.resolve import load_model


@pytest.fixture(scope="module")
def base(tiny_lit_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model = load_model(json.loads((tiny_lit_run / "results.json").read_text())["model_dir"])
    yield model, FeatureCache()
    torch.set_num_threads(threads)  # the tests after this module run as they would alone


def adapt(base, method: str, options: dict | None = None) -> dict:
    """``method`` on 16 shots per class of training images the base never saw."""
    cfg = {"method": method, "shots": 16, "seed": 1, "options": options or {},
           "data": {"train": {"source": "fashion-mnist", "split": "train", "offset": 12000,
                              "limit": 8000},
                    "test": {"source": "fashion-mnist", "split": "test", "limit": 1000}}}
    model, cache = base
    return run_adapt(cfg, model=model, progress=False, cache=cache, write=False)


@pytest.mark.slow
def test_clip_adapter_beats_zero_shot_at_16_shots(base):
    """Gao et al. 2021: the residual adapter (the paper's ratio 0.2, reduction 4) beats the
    zero-shot head at 16 shots. Measured: 33.6% -> 44.1% (seeds 2 and 3: 40.6%, 42.8%)."""
    res = adapt(base, "clip-adapter")
    assert res["zeroshot"]["acc1"] > 0.25  # the base is competent: chance is 10%
    assert res["test"]["acc1"] > res["zeroshot"]["acc1"] + 0.05
