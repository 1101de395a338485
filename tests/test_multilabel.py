"""Multi-label sets and mAP: hand-computed AP, sklearn's AP, shapes labels, the suite task."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from cliplab.data.multilabel import load_multilabel_manifest
from cliplab.data.shapes import COLORS, shapes_multilabel
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.multilabel import (average_precision, mean_average_precision,
                                         multilabel_metrics)
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.zeroshot import zeroshot_classifier


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.9, 0.3], [0.8, 0.5, 0.2], [0.7, 0.5, 0.1], [0.6, 0.1, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    ap = average_precision(scores, targets)
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2
    assert ap[0].item() == pytest.approx(5 / 6)
    # class 1: 0.9 (neg), tie at 0.5 (one pos, one neg) -> P=1/3 at R=1/2; 0.1 (pos) -> P=2/4
    assert ap[1].item() == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    assert torch.isnan(ap[2])  # no positive: left out of the mean
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 5 / 12) / 2)


def test_metrics_leave_classes_without_positives_out_of_the_mean():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.3, 0.4], [0.6, 0.8, 0.7]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # a: the positive ranks first -> AP 1; b: it ranks second (0.8 > 0.3 > 0.2) -> AP 1/2;
    # c has no positive: not scored (as AP 0 the mean would be 1/2)
    m = multilabel_metrics(scores, targets, ["a", "b", "c"])
    assert m["mean_average_precision"] == pytest.approx(0.75)
    assert m["per_class_ap"] == pytest.approx({"a": 1.0, "b": 0.5})
    assert m["n_classes"] == 2


def test_average_precision_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60, 7), generator=g).float()  # many ties
    targets = torch.rand(60, 7, generator=g) < 0.3
    ours = average_precision(scores, targets).numpy()
    theirs = [average_precision_score(targets[:, c].numpy(), scores[:, c].numpy())
              for c in range(7)]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert mean_average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets.numpy(), scores.numpy(), average="macro"), abs=1e-6)


def test_shapes_multilabel_targets_are_the_colours_in_the_pixels():
    data = shapes_multilabel(n=20, seed=3, attribute="color", image_size=32)
    assert data.targets.shape == (20, len(COLORS))
    assert (data.targets.sum(1) == 2).all()  # relation scenes: two objects, two colours
    palette = torch.tensor(list(COLORS.values()), dtype=torch.uint8)
    for image, target in zip(data.images, data.targets):
        present = (image.reshape(-1, 1, 3) == palette[None]).all(-1).any(0)
        assert present.tolist() == target.tolist()
    shapes = shapes_multilabel(n=20, seed=3, attribute="shape", image_size=32)
    assert ((shapes.targets.sum(1) >= 1) & (shapes.targets.sum(1) <= 2)).all()


def test_multilabel_manifest(tmp_path):
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text(
        "image,labels\na.png,cat|dog\nb.png,dog\nc.png,\nmissing.png,cat\nc.png,cow\n")
    data = load_multilabel_manifest(tmp_path / "m.csv", classnames=["cat", "dog"],
                                    progress=False)
    assert data.targets.tolist() == [[True, True], [False, True]]
    assert data.skipped.counts == {"bad_label": 2, "missing_file": 1}
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "labels": ["owl", "cat"]}\n')
    data = load_multilabel_manifest(tmp_path / "m.jsonl", progress=False)
    assert data.classnames == ["cat", "owl"] and data.targets.tolist() == [[True, True]]
    # classes/holdout keep single-label classes: refused, and not as "image-text pairs"
    with pytest.raises(ConfigError, match="^classes needs single-label images; "
                       "'multilabel-manifest' gives multi-label images$"):
        load_source({"source": "multilabel-manifest", "path": str(tmp_path / "m.jsonl"),
                     "classes": ["cat"], "progress": False})
    # a manifest without the labels column names the option that picks it (not caption_col)
    (tmp_path / "single.csv").write_text("image,label\na.png,cat\n")
    with pytest.raises(DataError) as err:
        load_multilabel_manifest(tmp_path / "single.csv", progress=False)
    assert str(err.value) == (f"{tmp_path / 'single.csv'}:line 1: no column 'labels' (found: "
                              "image, label); fix the data spec's label_col or the header")


def test_suite_multilabel_task_matches_sklearn(tiny_model):
    spec = {"source": "shapes", "multilabel": True, "n": 40, "seed": 5, "image_size": 32}
    out = run_suite(tiny_model, {"tasks": [
        {"name": "ml", "task": "multilabel_zeroshot", "data": spec}]},
            TaskContext(progress=False))["ml"]
    data = shapes_multilabel(n=40, seed=5, image_size=32)
    emb = encode_images(tiny_model, data.images, progress=False).embeddings
    scores = emb @ zeroshot_classifier(tiny_model, data.classnames, data.templates).T
    present = data.targets.any(0)
    expected = average_precision_score(data.targets[:, present].numpy(),
                                       scores[:, present].numpy(), average="macro")
    assert out["mean_average_precision"] == pytest.approx(expected, abs=1e-5)
    assert out["n_classes"] == int(present.sum()) and out["n"] == 40  # images scored
    # a head given to the suite scores the task, and the results say which
    from cliplab.evaluate.tasks.base import LinearHead

    head = LinearHead(-zeroshot_classifier(tiny_model, data.classnames, data.templates),
                      data.classnames, label="my-head")
    scored = run_suite(tiny_model, {"tasks": [
        {"name": "ml", "task": "multilabel_zeroshot", "data": spec}]},
        TaskContext(progress=False, classifier=head))["ml"]
    assert scored["classifier"] == "my-head" and "classifier" not in out
    assert scored["mean_average_precision"] == pytest.approx(average_precision_score(
        data.targets[:, present].numpy(), -scores[:, present].numpy(), average="macro"),
        abs=1e-5)
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(name 'ml2'\): data must be multi-label"):
        run_suite(tiny_model, {"tasks": [{"name": "ml2", "task": "multilabel_zeroshot",
                                          "data": {"source": "digits"}}]},
                                              TaskContext(progress=False))


def test_a_multilabel_task_run_on_single_label_data_names_the_task(tiny_model):
    """Run directly (no suite check before it), the task refuses single-label data in one
    line naming it as the user did: its ``name``, else its task."""
    from cliplab.evaluate.suite import task_spec
    from cliplab.evaluate.tasks import multilabel_zeroshot

    for given, label in (({"name": "ml"}, "ml"), ({}, "multilabel_zeroshot")):
        spec = task_spec({"task": "multilabel_zeroshot", "data": {"source": "digits"}, **given})
        with pytest.raises(ConfigError) as err:
            multilabel_zeroshot.run(tiny_model, spec, TaskContext(progress=False))
        assert str(err.value) == (f"task '{label}': data must be multi-label (shapes with "
                                  "multilabel: true, or multilabel-manifest)")


def test_multilabel_rows_with_an_unknown_name_or_an_empty_part(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text("image,labels\na.png,cat|bird\nb.png,dog|cat\n")
    data = load_multilabel_manifest(tmp_path / "m.csv", classnames=["cat", "dog"],
                                    progress=False)
    assert data.targets.tolist() == [[True, True]]
    assert data.skipped.keys == {"bad_label": ["m.csv:line 2: a.png"]}
    # a trailing separator names no class ""
    (tmp_path / "trailing.csv").write_text("image,labels\na.png,cat|\nb.png,dog\n")
    data = load_multilabel_manifest(tmp_path / "trailing.csv", progress=False)
    assert data.classnames == ["cat", "dog"]
    assert data.targets.tolist() == [[True, False], [False, True]]
