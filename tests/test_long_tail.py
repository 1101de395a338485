"""Long-tail task: concept counting, the log-linear fit, the suite task, and the demo's slope."""

import math

import pytest
import torch

from cliplab.curate.concept_frequency import ConceptFrequencies, count_concepts
from cliplab.curate.imbalance import exponential_counts, exponential_subsample
from cliplab.data.concepts import concept_pattern
from cliplab.data.shapes import shapes_classification
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.long_tail import log_linear_fit, long_tail_analysis, narrow_span_warning
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.zeroshot import zeroshot_classifier
from tests.warned import warned


@pytest.mark.parametrize("concept,text,hit", [
    ("cross", "two white Crosses", True),
    ("cross", "a red cross.", True),
    ("cross", "across the road", False),
    ("cross", "crossing", False),
    ("berry", "fresh berries", True),
    ("shirt", "a t-shirt", False),
    ("shirt", "a SHIRT and a coat", True),
    ("ankle boot", "black ankle   boots", True),
    ("ankle boot", "an ankle-high boot", False),
    ("T-shirt/top", "a t-shirt/top", True),
])
def test_concept_pattern(concept, text, hit):
    assert bool(concept_pattern(concept).search(text)) is hit


def test_count_concepts_counts_samples_once(tmp_path):
    samples = [["a red circle", "a small red circle"],  # two captions, one sample
               "two red circles left of a blue square",
               "a blue square",
               "Squares and circles",
               "a credit card"]  # "red" inside a word is no match
    table = count_concepts(samples, ["red", "circle", "square", "green"])
    assert table.as_dict() == {"red": 2, "circle": 3, "square": 3, "green": 0}
    assert table.n_samples == 5
    back = ConceptFrequencies.load_csv(table.save_csv(tmp_path / "freq.csv"))
    assert back == table
    # a two-word concept's words split over two captions of a sample: no mention
    split = count_concepts([["a photo of an ankle", "boot camp for dogs"], ["ankle boots"]],
                           ["ankle boot"])
    assert split.as_dict() == {"ankle boot": 1}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="bad.csv: not a concept frequency table"):
        ConceptFrequencies.load_csv(tmp_path / "bad.csv")


def test_log_linear_fit_by_hand():
    fit = log_linear_fit([1, 10, 100], [0.2, 0.4, 0.6])
    assert fit["slope"] == pytest.approx(0.2) and fit["intercept"] == pytest.approx(0.2)
    assert fit["r2"] == pytest.approx(1.0) and fit["n_classes"] == 3
    # x = 0,1,2,3; y = .1,.4,.4,.7: slope .9/5 = .18, intercept .4 - .18*1.5 = .13,
    # SS_res = .018, SS_tot = .18 -> r² = .9
    fit = log_linear_fit([1, 10, 100, 1000], [0.1, 0.4, 0.4, 0.7])
    assert (fit["slope"], fit["intercept"], fit["r2"]) == pytest.approx((0.18, 0.13, 0.9))
    # the slope's standard error: sqrt(SS_res / (n - 2) / Sxx) = sqrt(.018 / 2 / 5); 3 decades
    assert (fit["slope_stderr"], fit["decades"]) == pytest.approx((0.0018 ** 0.5, 3.0))
    assert narrow_span_warning("lt", fit) is None
    assert log_linear_fit([5, 5], [0.1, 0.9])["slope"] is None
    assert log_linear_fit([1, 10], [0.1, 0.9])["slope_stderr"] is None  # two points: no spread
    with pytest.raises(ValueError):
        log_linear_fit([0, 10], [0.1, 0.2])


def test_exactly_one_decade_is_wide_enough_for_no_warning():
    """Frequencies spanning exactly one decade (1 and 10) give no narrow-span warning."""
    fit = log_linear_fit([1, 10, 1, 10], [0.2, 0.5, 0.3, 0.4])
    assert fit["decades"] == 1.0
    assert narrow_span_warning("lt", fit) is None
    narrower = log_linear_fit([1, 9, 1, 9], [0.2, 0.5, 0.3, 0.4])
    assert narrow_span_warning("lt", narrower).startswith(
        "lt: the classes' training frequencies span 0.95 decade(s)")


def test_long_tail_analysis_keeps_zero_frequency_apart():
    out = long_tail_analysis({"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.3},
                             {"a": 100, "b": 10, "c": 0, "d": 0})
    assert out["fit"]["n_classes"] == 2
    assert out["fit"]["slope"] == pytest.approx(0.4)  # (0.9 - 0.5) / (2 - 1)
    assert out["zero_frequency"] == {"classes": ["c", "d"], "mean_acc1": pytest.approx(0.2)}
    assert out["per_class"]["a"] == {"acc1": 0.9, "frequency": 100}


def test_suite_long_tail_task(tmp_path, tiny_model, recwarn):
    (tmp_path / "train.csv").write_text(
        "image,caption\nx.png,a red circle\ny.png,two red squares\nz.png,a blue cross\n"
        "w.png,a green thing\n")  # images are never opened: only captions are counted
    test_spec = {"source": "shapes", "attribute": "color", "n": 64, "seed": 1, "image_size": 32,
                 "colors": ["red", "green", "blue", "white"]}
    out = run_suite(tiny_model, {"tasks": [
        {"name": "lt", "task": "long_tail", "data": test_spec,
         "train_data": {"source": "manifest", "path": str(tmp_path / "train.csv")}}]},
             TaskContext(progress=False))["lt"]
    test = shapes_classification(n=64, seed=1, attribute="color", image_size=32,
                                 colors=["red", "green", "blue", "white"])
    emb = encode_images(tiny_model, test.images, progress=False).embeddings
    pred = (emb @ zeroshot_classifier(tiny_model, test.classnames, test.templates).T).argmax(1)
    for c, name in enumerate(test.classnames):
        acc = (pred[test.labels == c] == c).float().mean().item()
        assert out["per_class"][name]["acc1"] == pytest.approx(acc)
    assert {k: v["frequency"] for k, v in out["per_class"].items()} == \
        {"red": 2, "green": 1, "blue": 1, "white": 0}
    assert out["zero_frequency"]["classes"] == ["white"]
    assert out["fit"]["n_classes"] == 3 and out["n_train_samples"] == 4
    assert out["n"] == 64  # the test images the accuracies are over
    # frequencies 2, 1, 1 span log10(2) = 0.30 decade: the slope is told to say little
    fit = out["fit"]
    assert fit["decades"] == pytest.approx(math.log10(2))
    assert warned(recwarn).splitlines() == [
        "lt: the classes' training frequencies span 0.30 decade(s), so the log-linear "
        f"slope ({fit['slope']:+.3f} ± {fit['slope_stderr']:.3f} per decade) "
        "says little; a long-tail fit needs frequencies over orders of magnitude"]
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'lt2'\): concepts: 1 concepts for "
                                          r"4 classes"):
        run_suite(tiny_model, {"tasks": [
            {"name": "lt2", "task": "long_tail", "data": test_spec, "concepts": ["x"],
             "train_data": {"source": "manifest", "path": str(tmp_path / "train.csv")}}]},
                 TaskContext(progress=False))


def test_exponential_subsample():
    assert exponential_counts(4, 80, 0.5) == [80, 40, 20, 10]
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    keep = exponential_subsample(labels, [2, 8, 4], order=[1, 0, 2])
    assert torch.bincount(labels[keep]).tolist() == [8, 2, 4]
    with pytest.raises(DataError, match="class 0 has 10 samples, fewer than the 11"):
        exponential_subsample(labels, [11])
    with pytest.raises(DataError, match="^2 counts for 3 classes in order: give one count per "
                                        "class$"):  # class 2 was dropped without a word
        exponential_subsample(labels, [5, 4], order=[0, 1, 2])


@pytest.mark.slow
def test_demo_rare_colours_are_recognised_worse(tmp_path):
    """Train tiny-clip on shapes with exponentially imbalanced colours: zero-shot accuracy
    rises with log frequency (the paper's qualitative result)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "long_tail_demo.py"
    spec = importlib.util.spec_from_file_location("long_tail_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results = demo.run_demo(str(tmp_path / "run"), progress=False)
    fit = results["evals"]["long_tail"]["fit"]
    assert fit["n_classes"] == 8
    assert fit["slope"] > 0.1 and not math.isnan(fit["r2"])
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    # a second run into the same folder is refused before any work (it mixed with the first)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(ConfigError, match="already holds a run"):
        demo.run_demo(str(tmp_path / "run"), progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
