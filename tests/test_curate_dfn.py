"""The dfn step (a filtering network trained with cliplab's Trainer on trusted pairs) and the
score-keeping helper it shares with clip_score."""

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.score_filter import keep_by_score
from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.dfn import NETWORK, DataFilteringNetwork, Spec
from cliplab.curate.steps.registry import make_step, step_spec
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError
from cliplab.provenance import PROVENANCE_KEYS, __version__

# tiny-clip at 16 px (4 patches), width 32, one block: ~1 s per 10 steps on 2 free cores
TINY = {"name": "tiny-clip", "options": dict(image_size=16, patch_size=8, width=32, layers=1,
                                             heads=2, embed_dim=16, context_length=48)}
TRUSTED = {"source": "shapes", "attribute": "color", "n": 1000, "seed": 1, "image_size": 32}
TRAIN = {"steps": 60, "batch_size": 32, "lr": 1e-3, "warmup": 0.1}


def test_keep_top_keeps_the_highest_scores_ties_in_pool_order():
    scores = np.array([0.5, 0.1, 0.9, 0.5, 0.3])
    d = keep_by_score(scores, keep_top=0.5, threshold=None, label="dfn score")  # round(2.5) = 3
    assert d.keep.tolist() == [True, False, True, True, False]
    assert d.threshold == 0.5 and d.report == {"rule": "keep_top 0.5", "kept": 3}
    assert d.reasons[1] == "dfn score 0.100 below threshold 0.500 (keep_top 0.5)"
    d = keep_by_score(scores, keep_top=0.4, threshold=None, label="s")  # 2: 0.9 and the first 0.5
    assert d.keep.tolist() == [True, False, True, False, False]
    assert d.reasons[3] == ("s 0.500 at threshold 0.500, past the cut of keep_top 0.4 "
                            "(ties in pool order)")
    d = keep_by_score(scores, keep_top=0.05, threshold=None, label="s")  # round(0.25) = 0
    assert not d.keep.any() and d.threshold is None
    assert d.reasons[0] == "s 0.500: keep_top 0.05 of the pool keeps no pair"
    d = keep_by_score(np.array([np.nan, 0.2, 0.1]), keep_top=0.7, threshold=None, label="s")
    assert d.keep.tolist() == [False, True, True]  # NaN ranks last
    assert d.reasons[0] == "s is not a number"


def test_keep_top_drops_nan_even_when_the_fraction_reaches_past_the_finite_scores():
    """Guards NaN scores being cut from ``keep_top`` when ``round(f * n)`` exceeds the finite
    scores: keep_top 1.0 of [0.5, NaN, 0.25] keeps the two numbers and reports cut 0.25, not a
    NaN pair and a NaN threshold."""
    d = keep_by_score(np.array([0.5, np.nan, 0.25]), keep_top=1.0, threshold=None, label="s")
    assert d.keep.tolist() == [True, False, True]
    assert d.threshold == 0.25 and d.report["kept"] == 2
    assert d.reasons == [None, "s is not a number", None]
    d = keep_by_score(np.array([np.nan, np.nan]), keep_top=1.0, threshold=None, label="s")
    assert not d.keep.any() and d.threshold is None


def test_threshold_keeps_scores_at_or_above_it_and_drops_nan():
    d = keep_by_score(np.array([0.25, 0.2499, np.nan, 1.0]), None, 0.25, "dfn score",
                      report={"x": 1})
    assert d.keep.tolist() == [True, False, False, True]
    # three decimals printed both 0.250: as many as tell them apart
    assert d.reasons[1] == "dfn score 0.2499 below threshold 0.2500"
    assert d.reasons[2] == "dfn score is not a number"
    assert d.threshold == 0.25 and d.report == {"rule": "threshold 0.25", "kept": 2, "x": 1}


@pytest.mark.parametrize("keep_top, threshold, message", [
    (None, None, "exactly one"), (0.5, 0.2, "exactly one"), (0.0, None, "fraction"),
    (1.5, None, "fraction")])
def test_keep_options_are_checked(keep_top, threshold, message):
    with pytest.raises(ValueError, match=message):
        keep_by_score(np.zeros(3), keep_top, threshold, "s")


@pytest.fixture(scope="module")
def noisy_pool():
    """400 single-shape scenes captioned by colour ("a red shape."), 120 of them with
    captions shuffled among themselves; ``mismatched`` marks those whose caption now names
    another colour (101 of the 120)."""
    data = load_source({"source": "shapes", "attribute": "color", "n": 400, "seed": 5,
                        "image_size": 32})
    true = [f"a {data.classnames[label]} shape." for label in data.labels]
    rng = np.random.default_rng(0)
    shuffled = rng.choice(400, 120, replace=False)
    captions = list(true)
    for a, b in zip(shuffled, rng.permutation(shuffled)):
        captions[a] = true[b]
    mismatched = np.array([c != t for c, t in zip(captions, true)])
    keys = [f"scene-{i}" for i in range(400)]
    return PoolBatch(keys, captions, [Image.fromarray(im.numpy()) for im in data.images]), mismatched


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("dfn")
    step = make_step(step_spec({"step": "dfn", "model": TINY, "trusted": TRUSTED,
                                "train": TRAIN, "keep_top": 0.7}, "test"))
    step.prepare(StepContext(work=work, progress=False))
    return step, work


def test_the_filtering_network_drops_mostly_the_mismatched_pairs(trained, noisy_pool):
    """Dropping 120 of 400 pairs at random would find mismatched ones at the base rate
    101/400 = 0.25 (sd 0.04 over 120 draws). The network trained for 60 steps on 1000 clean
    trusted pairs measured precision 0.575 and recall 0.68 of the dropped pairs; the bound 0.45
    is 5 sd above chance and leaves room for other CPUs' float differences."""
    step, work = trained
    batch, mismatched = noisy_pool
    halves = [step.map(PoolBatch(batch.keys[s], batch.captions[s], batch.images[s]))
              for s in (slice(0, 150), slice(150, None))]
    columns = {"dfn_score": np.concatenate([h["dfn_score"] for h in halves])}
    decision = step.decide(PoolItems(batch.keys, batch.captions), columns)
    dropped = ~decision.keep
    assert dropped.sum() == 120
    precision = (dropped & mismatched).sum() / dropped.sum()
    recall = (dropped & mismatched).sum() / mismatched.sum()
    assert precision >= 0.45 and recall >= 0.5, (precision, recall)
    assert decision.report["files"]["dfn_model"].startswith(str(work / NETWORK))
    assert decision.report["train"]["trusted_pairs"] == 1000
    assert decision.report["train"]["step"] == 60
    assert all(r.startswith("dfn score ") and r.endswith("(keep_top 0.7)")
               for r in decision.reasons if r)


def test_a_resumed_run_reuses_the_network_and_changed_inputs_retrain_it(trained, noisy_pool,
                                                                        tmp_path):
    step, work = trained
    batch, _ = noisy_pool
    weights = sorted((work / NETWORK).rglob("*.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = DataFilteringNetwork(step.spec)
    again.prepare(StepContext(work=work, progress=False))
    assert [w.stat().st_mtime_ns for w in weights] == stamps  # not retrained
    first = PoolBatch(batch.keys[:20], batch.captions[:20], batch.images[:20])
    np.testing.assert_allclose(again.map(first)["dfn_score"], step.map(first)["dfn_score"],
                               atol=1e-6)

    small = {**TRUSTED, "n": 40}
    spec = Spec(step="dfn", model=TINY, trusted=small, train={"steps": 2, "batch_size": 8},
                threshold=0.0)
    DataFilteringNetwork(spec).prepare(StepContext(work=tmp_path, progress=False))
    assert json.loads((tmp_path / NETWORK / "results.json").read_text())["step"] == 2
    changed = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": 3})})
    DataFilteringNetwork(changed).prepare(StepContext(work=tmp_path, progress=False))
    assert json.loads((tmp_path / NETWORK / "results.json").read_text())["step"] == 3
    assert not (tmp_path / NETWORK / "checkpoints" / "step-2").exists()


def test_the_networks_results_json_is_stamped_and_its_reuse_reports_the_same_metrics(tmp_path):
    """The network's results.json is kept in the output as a record (a run folder `cliplab
    report` reads): it carries cliplab_version and created; the step's report keeps the metrics
    alone, the same whether the network was trained now or reused."""
    spec = Spec(step="dfn", model=TINY, trusted={**TRUSTED, "n": 40},
                train={"steps": 2, "batch_size": 8}, threshold=0.0)
    trained_now = DataFilteringNetwork(spec)
    trained_now.prepare(StepContext(work=tmp_path, progress=False))
    written = json.loads((tmp_path / NETWORK / "results.json").read_text(encoding="utf-8"))
    assert written["cliplab_version"] == __version__ and written["created"].endswith("Z")
    reused = DataFilteringNetwork(spec)
    reused.prepare(StepContext(work=tmp_path, progress=False))
    assert reused.train_metrics == trained_now.train_metrics
    assert not set(PROVENANCE_KEYS) & set(reused.train_metrics)
    assert reused.train_metrics == {k: v for k, v in written.items() if k not in PROVENANCE_KEYS}


def test_train_defaults_are_the_small_networks_under_the_given_keys():
    spec = Spec(step="dfn", model="tiny-clip", trusted=TRUSTED, train={"lr": 0.01}, keep_top=0.5)
    assert (spec.train.steps, spec.train.batch_size, spec.train.augment, spec.train.lr) == \
        (200, 64, False, 0.01)


@pytest.mark.parametrize("data, message", [
    ({"model": "tiny-clip", "trusted": TRUSTED}, "exactly one of keep_top"),
    ({"model": "tiny-clip", "trusted": {"n": 3}, "keep_top": 0.3}, "trusted needs 'source"),
    ({"trusted": TRUSTED, "keep_top": 0.3}, "model"),
    ({"model": "tiny-clip", "trusted": TRUSTED, "keep_top": 0.3, "train": {"stpes": 3}}, "stpes"),
])
def test_bad_specs_are_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        step_spec({"step": "dfn", **data}, "curate.yaml", "steps[1]")


def test_too_few_trusted_pairs_is_a_config_error(tmp_path):
    spec = Spec(step="dfn", model=TINY, trusted={**TRUSTED, "n": 10},
                train={"batch_size": 32}, keep_top=0.5)
    with pytest.raises(ConfigError, match="trusted holds 10 pairs, fewer than train.batch_size=32"):
        DataFilteringNetwork(spec).prepare(StepContext(work=tmp_path, progress=False))


@pytest.mark.parametrize("train, named", [
    ({"fsdp": True}, "train.fsdp has"),
    ({"eval_every": 10}, "train.eval_every has"),
    ({"fsdp": True, "eval_every": 10}, "train.fsdp and train.eval_every have"),
    ({"dist_timeout_s": 60}, "train.dist_timeout_s has"),
])
def test_train_settings_a_dfn_step_never_uses_are_refused(train, named):
    """The filter network trains in one process (no FSDP) without an evaluation callback."""
    with pytest.raises(ConfigError, match=rf"steps\[1\]: {named} no effect in a dfn step"):
        step_spec({"step": "dfn", "model": "tiny-clip", "trusted": TRUSTED, "keep_top": 0.5,
                   "train": train}, "curate.yaml", "steps[1]")


def test_a_saved_dfn_spec_loads_again():
    spec = Spec(step="dfn", model=TINY, trusted=TRUSTED, train={**TRAIN, "hard_negatives": True},
                keep_top=0.5)
    assert Spec.model_validate(spec.to_dict()) == spec


def test_the_network_trains_with_the_pipeline_seed_unless_its_train_seed_is_given(tmp_path):
    """Like balance's draws, the network follows the pipeline's ``seed``: two seeds train two
    networks (and a changed seed retrains on resume); ``train.seed`` given wins."""
    small = {**TRUSTED, "n": 40}
    spec = Spec(step="dfn", model=TINY, trusted=small, train={"steps": 2, "batch_size": 8},
                threshold=0.0)

    def network(seed: int, work, step_spec=spec):
        step = DataFilteringNetwork(step_spec)
        step.prepare(StepContext(work=work, seed=seed, progress=False))
        recorded = json.loads((work / NETWORK / "trained_on.json").read_text())["train"]["seed"]
        weights = {n: p.clone() for n, p in step.model.model.state_dict().items()}
        return recorded, weights

    seed3, weights3 = network(3, tmp_path / "a")
    seed0, weights0 = network(0, tmp_path / "b")
    assert (seed3, seed0) == (3, 0)
    assert any(not np.allclose(weights3[n], weights0[n]) for n in weights3)
    again, weights = network(0, tmp_path / "a")  # the pipeline's seed changed: retrained
    assert again == 0 and all(np.allclose(weights[n], weights0[n]) for n in weights0)
    given = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 7})})
    assert network(3, tmp_path / "c", given)[0] == 7
