"""Step ``clip_score``: true pairs outscore shuffled ones under a model trained in seconds; the
keep_top count, its tie rule, and its equivalence with a threshold on hand-built scores."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext, told_apart
from cliplab.curate.score_filter import top_fraction
from cliplab.curate.steps.clip_score import ClipScore, Spec
from cliplab.curate.steps.registry import step_spec
from cliplab.data.shapes import load_shapes
from cliplab.errors import ConfigError
from cliplab.train.config import TrainConfig
from cliplab.train.trainer import Trainer
from tests.tiny_models import small_model


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """tiny-clip trained briefly on `shapes` single-object scenes, saved as a model folder."""
    model = small_model()
    pairs = load_shapes(n=512, seed=0, kinds=("single",), image_size=32)
    config = TrainConfig.from_dict(dict(steps=200, batch_size=64, lr=3e-3, warmup=10,
                                        log_every=50, progress=False, augment=False))
    Trainer(model, config, None).fit(pairs)
    return model.save(tmp_path_factory.mktemp("clip-score") / "model")


def step_for(model, **rule) -> ClipScore:
    step = ClipScore(Spec(step="clip_score", model=str(model), batch_size=16, **rule))
    step.prepare(StepContext(work=None, progress=False))
    return step


def test_shuffled_captions_score_lower_and_are_the_ones_dropped(shapes_model):
    pool = load_shapes(n=60, seed=7, kinds=("single",), image_size=32)
    images = [Image.fromarray(im.numpy()) for im in pool.images]
    captions = [c[0] for c in pool.captions]
    shuffled = np.arange(0, 60, 4)  # every 4th pair gets the caption of the pair 2 further on
    for i in shuffled:
        captions[i] = pool.captions[(i + 2) % 60][0]
    keys = [f"shapes#{i}" for i in range(60)]
    step = step_for(shapes_model, keep_top=0.75)
    scores = np.concatenate([step.map(PoolBatch(keys[s:s + 25], captions[s:s + 25], images[s:s + 25]))
                             ["clip_score"] for s in range(0, 60, 25)])
    true = np.setdiff1d(np.arange(60), shuffled)
    assert scores[shuffled].mean() < scores[true].mean() - 0.2
    decision = step.decide(PoolItems(keys, captions), {"clip_score": scores})
    assert decision.keep.sum() == 45
    dropped = set(np.flatnonzero(~decision.keep).tolist())
    # of the 15 shuffled pairs; a choice blind to the captions drops 3.75 of them on average,
    # and 10 or more with probability 7e-5. Models of this recipe drop 10-13 across training
    # seeds: one seed's count is no finer measure than that.
    assert len(dropped & set(shuffled.tolist())) >= 10
    assert decision.reasons[int(next(iter(dropped)))].startswith("clip score ")
    assert decision.threshold == pytest.approx(scores[decision.keep].min())


def test_keep_top_keeps_round_fraction_n_with_ties_in_pool_order():
    scores = np.array([0.1, 0.5, 0.3, 0.5, 0.2, 0.5, 0.0], dtype=np.float32)
    keep, cut = top_fraction(scores, 0.3)  # round(2.1) = 2: the first two of the three 0.5s
    assert keep.tolist() == [False, True, False, True, False, False, False] and cut == 0.5
    assert top_fraction(scores, 0.5)[0].sum() == 4  # round(3.5) = 4, half up
    assert top_fraction(scores, 1.0)[0].all()
    # decimal halves round up though the float product falls just short (0.29 * 50 =
    # 14.499999999999998, 0.35 * 90 = 31.499999999999996)
    for fraction, n, count in ((0.29, 50, 15), (0.35, 90, 32), (0.58, 25, 15), (0.57, 50, 29)):
        assert top_fraction(np.arange(n, dtype=float), fraction)[0].sum() == count
        assert top_fraction(np.arange(n, dtype=float), np.float64(fraction))[0].sum() == count
    nothing, cut = top_fraction(scores, 0.01)  # round(0.07) = 0
    assert not nothing.any() and cut is None
    step = ClipScore(Spec(step="clip_score", model="tiny-clip", keep_top=0.3))
    decision = step.decide(PoolItems([str(i) for i in range(7)], [""] * 7), {"clip_score": scores})
    assert decision.reasons[5] == ("clip score 0.500 at threshold 0.500, past the cut of "
                                   "keep_top 0.3 (ties in pool order)")
    assert decision.reasons[2] == "clip score 0.300 below threshold 0.500 (keep_top 0.3)"


def test_threshold_and_keep_top_agree_on_distinct_scores():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.2, 0.6, 200).astype(np.float32)
    items = PoolItems([f"k{i}" for i in range(200)], [""] * 200)
    by_top = ClipScore(Spec(step="clip_score", model="tiny-clip", keep_top=0.3)).decide(
        items, {"clip_score": scores})
    cut = np.sort(scores)[-60]  # the 60th best score
    by_threshold = ClipScore(Spec(step="clip_score", model="tiny-clip", threshold=float(cut))).decide(
        items, {"clip_score": scores})
    assert by_top.keep.sum() == 60
    np.testing.assert_array_equal(by_top.keep, by_threshold.keep)
    assert by_top.threshold == pytest.approx(cut) and by_threshold.threshold == pytest.approx(cut)
    dropped = int(np.flatnonzero(~by_threshold.keep)[0])
    shown = re.fullmatch(r"clip score (\S+) below threshold (\S+)", by_threshold.reasons[dropped])
    assert float(shown[1]) < float(shown[2])  # never printed alike
    assert float(shown[2]) == pytest.approx(cut, abs=0.0005)


def test_exactly_one_rule():
    for rule in ({}, {"keep_top": 0.3, "threshold": 0.2}):
        with pytest.raises(ConfigError, match="exactly one of keep_top"):
            step_spec({"step": "clip_score", "model": "tiny-clip", **rule}, "c.yaml", "steps[1]")
    with pytest.raises(ConfigError, match=r"steps\[1\]\.keep_top"):
        step_spec({"step": "clip_score", "model": "tiny-clip", "keep_top": 0}, "c.yaml", "steps[1]")


def test_an_onnx_export_scores_like_its_pytorch_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from cliplab.models.onnx_export import export_onnx

    model = small_model()
    export = export_onnx(model, tmp_path / "onnx")
    pool = load_shapes(n=10, seed=3, kinds=("single",), image_size=32)
    batch = PoolBatch([str(i) for i in range(10)], [c[0] for c in pool.captions],
                      [Image.fromarray(im.numpy()) for im in pool.images])
    onnx_scores = step_for(export, keep_top=0.5).map(batch)["clip_score"]
    torch_scores = step_for(model.save(tmp_path / "torch"), keep_top=0.5).map(batch)["clip_score"]
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)


def test_top_fraction_never_keeps_a_nan_score():
    """Guards the NaN rows being removed from the cut when the fraction reaches them: all of
    [0.5, NaN, 0.3] keeps the two numbers, lowest kept 0.3."""
    keep, cut = top_fraction(np.array([0.5, np.nan, 0.3]), 1.0)
    assert keep.tolist() == [True, False, True] and cut == 0.3
    keep, cut = top_fraction(np.array([np.nan, 0.1, np.nan, 0.7]), 0.75)  # round(3) = 3 > 2
    assert keep.tolist() == [False, True, False, True] and cut == 0.1


@pytest.mark.parametrize("a, b, shown", [
    (0.121, 0.25, ("0.121", "0.250")),  # apart at three decimals: three
    (0.2499, 0.25, ("0.2499", "0.2500")),
    (0.25, 0.25, ("0.250", "0.250")),  # equal: alike
    (-0.5, -0.50001, ("-0.50000", "-0.50001")),
    (1e-20, 2e-20, ("1e-20", "2e-20")),  # beyond 17 decimals: their shortest forms
])
def test_a_reasons_two_numbers_print_apart_when_they_differ(a, b, shown):
    assert told_apart(a, b) == shown
