"""Eval task specs and data that cannot give a meaningful number are refused with one line
naming the task, before any work: mismatched classes, doubled names, empty or unknown
classes, empty data, out-of-range values, more shots than a class has."""

import pytest
import torch

from cliplab.data.pairs import check_same_classes
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.suite import run_suite, run_task, suite_spec
from cliplab.evaluate.tasks import TaskContext

DIGITS = {"source": "digits", "split": "test"}


def labelled(classnames: list[str], n_per_class: int = 2) -> LabelledImages:
    labels = torch.arange(len(classnames)).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (len(labels), 16, 16, 3), dtype=torch.uint8)
    return LabelledImages(images, labels, classnames, ["a photo of a {}."], "toy")


def run(model, *tasks):
    return run_suite(model, {"tasks": list(tasks)}, TaskContext(progress=False))


# 1. train and test must have the same classes


def test_check_same_classes_names_the_first_difference():
    check_same_classes(labelled(["Cat", "dog"]), labelled(["cat", "DOG"]), "here")  # any case
    with pytest.raises(DataError, match=r"^here: train and test must have the same classes in "
                                        r"the same order; class 1 is 'dog' in train but 'cow'"):
        check_same_classes(labelled(["cat", "dog"]), labelled(["cat", "cow"]), "here")
    with pytest.raises(DataError, match="train has 2 classes, test has 3"):
        check_same_classes(labelled(["cat", "dog"]), labelled(["cat", "dog", "cow"]), "here")


def test_check_same_classes_names_the_classes_only_one_side_has():
    """999 against 1000 classes: the first names of both sides are the same, so the message
    names the missing and extra classes, with how many there are."""
    train = [f"n{i:04d}" for i in range(12)]
    test = train[:3] + ["Empty class"] + train[3:] + ["x1", "x2", "x3", "x4"]
    with pytest.raises(DataError, match=r"train has 12 classes, test has 17; 5 only in test: "
                                        r"Empty class, x1, x2, \.\.\. \(5 in all\)$"):
        check_same_classes(labelled(train), labelled(test), "here")
    with pytest.raises(DataError, match=r"1 only in train: n0011; 2 only in test: a, b$"):
        check_same_classes(labelled(train), labelled(train[:-1] + ["a", "b"]), "here")


@pytest.mark.parametrize("task", ["linear_probe", "few_shot"])
def test_probe_tasks_refuse_train_and_test_with_different_classes(tiny_model, task):
    spec = {"name": "p", "task": task, "features": "embeddings", "l2": 0.01,
            "train": labelled([f"c{i}" for i in range(10)]), "test": DIGITS}
    if task == "few_shot":
        spec.update(shots=[1], seeds=[0], methods=["ncm", "linear_probe"])
    message = (r"train and test must have the same classes in the same order; class 0 is "
               r"'c0' in train but 'zero' in test")
    with pytest.raises(DataError, match=r"^tasks\[0\] \(name 'p'\): " + message):
        run(tiny_model, spec)
    with pytest.raises(DataError, match=r"^task 'p': " + message):  # one task: named by name
        run_task(tiny_model, spec, TaskContext(progress=False))


@pytest.mark.parametrize("task", ["linear_probe", "few_shot"])
def test_a_probe_the_model_cannot_serve_is_refused_before_its_leakage_is_warned_of(
        tiny_model, task, monkeypatch, recwarn):
    """An ONNX export with a `features: tokens` probe on its own train set: the leakage
    warning came first, then the error that stopped the run; now the error alone."""
    from tests.warned import warned

    monkeypatch.setattr(tiny_model, "probe_features", ("embeddings", "backbone"),
                        raising=False)  # what an ONNX export gives
    spec = {"name": "p", "task": task, "features": "tokens", "train": DIGITS, "test": DIGITS}
    if task == "few_shot":
        spec.update(shots=[1], seeds=[0])
    warned(recwarn)
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'p'\): features: tokens needs "
                       r"the hidden states of a PyTorch model"):
        run(tiny_model, spec)
    assert warned(recwarn) == ""


@pytest.mark.parametrize("task", ["linear_probe", "few_shot"])
def test_probe_tasks_warn_when_test_images_are_train_images(tiny_model, task, recwarn):
    """digits' split defaults to `all`: a probe trained on it was scored on its own training
    images (acc1 0.80 against 0.74 on a disjoint split) without a word."""
    from tests.warned import warned

    spec = {"name": "p", "task": task, "features": "embeddings", "l2": 0.01,
            "train": {"source": "digits"}, "test": DIGITS}
    if task == "few_shot":
        spec.update(shots=[1], seeds=[0], methods=["ncm", "linear_probe"])
    warned(recwarn)
    run(tiny_model, spec)
    assert ("p: 540 of 540 test images are also train images (equal pixels): it is scored on "
            "images it learned from") in warned(recwarn)
    run(tiny_model, {**spec, "train": {"source": "digits", "split": "train"}})
    assert "test images are also train images" not in warned(recwarn)
    run(tiny_model, {**spec, "train": {**DIGITS, "image_size": 8}})  # one set: no hashing
    assert "p: train and test are the same images: it is scored on images it learned" in \
        warned(recwarn)


def _shade_folder(root, shades: range):
    """Class folders ``red`` and ``blue`` of 8x8 squares, one per shade (a distinct image)."""
    from PIL import Image

    for name, colour in (("red", lambda v: (v, 0, 0)), ("blue", lambda v: (0, 0, v))):
        (root / name).mkdir(parents=True)
        for v in shades:
            Image.new("RGB", (8, 8), colour(v)).save(root / name / f"{v}.png")
    return str(root)


def test_probe_on_image_folders_warns_of_shared_pixels_only(tiny_model, tmp_path, recwarn):
    """`cliplab eval` lists image folders before decoding them (each image a placeholder):
    every probe over two disjoint folders warned "80 of 80 test images are also train
    images" and, counted as warned, never compared the decoded pixels."""
    from tests.warned import warned

    train = _shade_folder(tmp_path / "train", range(100, 140))
    test = _shade_folder(tmp_path / "test", range(200, 220))
    copy = _shade_folder(tmp_path / "copy", range(100, 120))  # train's first 20 shades
    spec = {"name": "p", "task": "linear_probe", "features": "embeddings", "l2": 0.01,
            "train": {"source": "image-folder", "path": train}}
    warned(recwarn)
    run_suite(tiny_model, {"tasks": [{**spec, "test": {"source": "image-folder", "path": test}}]},
              TaskContext(progress=False, hold=False))  # as `cliplab eval` runs a suite
    assert "test images are also train images" not in warned(recwarn)
    run_suite(tiny_model, {"tasks": [{**spec, "test": {"source": "image-folder", "path": copy}}]},
              TaskContext(progress=False, hold=False))
    assert "p: 40 of 40 test images are also train images (equal pixels)" in warned(recwarn)
    # shards of the copy, losslessly (decoded when listed) against the listed copy: compared
    # as placeholders, of another shape, they were told apart, and the leak never checked again
    from cliplab.cli import main

    assert main(["data", "shard", "--source", copy, "--out", str(tmp_path / "sh"), "--format",
                 "png", "--no-progress"]) == 0
    run_suite(tiny_model, {"tasks": [{**spec, "train": {"source": "shards",
                                                        "path": str(tmp_path / "sh")},
                                      "test": {"source": "image-folder", "path": copy}}]},
              TaskContext(progress=False, hold=False))
    assert "p: 40 of 40 test images are also train images (equal pixels)" in warned(recwarn)


# 2. task names are unique


def test_suite_refuses_two_tasks_of_one_name():
    with pytest.raises(ConfigError, match=r"^suite.yaml: tasks\[1\] \(name 'zs'\): the name "
                                          r"'zs' is already used by tasks\[0\]; names must be "
                                          r"unique$"):
        suite_spec([{"name": "zs", "task": "zeroshot", "data": DIGITS},
                    {"name": "zs", "task": "zeroshot", "data": DIGITS, "per_class": True}],
                   "suite.yaml")


def test_a_third_task_of_one_name_is_told_the_first_holds_it():
    with pytest.raises(ConfigError) as caught:
        suite_spec([{"name": "zs", "task": "zeroshot", "data": DIGITS}] * 3, "suite.yaml")
    assert "tasks[2] (name 'zs'): the name 'zs' is already used by tasks[0]" in str(caught.value)


def test_suite_refuses_a_name_that_an_unnamed_task_is_reported_under():
    # an unnamed task's results go under '<task>-<index>'
    with pytest.raises(ConfigError, match=r"tasks\[1\]: its results name 'zeroshot-1' is "
                                          r"already used by tasks\[0\]; give it a `name:`"):
        suite_spec([{"name": "zeroshot-1", "task": "zeroshot", "data": DIGITS},
                    {"task": "zeroshot", "data": DIGITS}], "suite.yaml")
    # two unnamed tasks of one type do not collide: their keys are zeroshot-0, zeroshot-1
    suite = suite_spec([{"task": "zeroshot", "data": DIGITS}, {"task": "zeroshot", "data": DIGITS}])
    assert suite.task_names() == ["zeroshot-0", "zeroshot-1"]


# 3. one-line errors instead of tracebacks


def test_zeroshot_refuses_empty_classes():
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(name 'zs'\).classes: expected at "
                                          r"least 1 value, got none$"):
        suite_spec([{"name": "zs", "task": "zeroshot", "data": DIGITS, "classes": []}])


@pytest.mark.parametrize("classes", [[12], [-1], ["zero", 10]])
def test_zeroshot_refuses_a_class_index_out_of_range(tiny_model, classes):
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'zs'\): classes: no class "
                                          r"has index -?1[02]? "
                                          r"\(indices run 0 to 9\); classes are: zero, one,"):
        run(tiny_model, {"name": "zs", "task": "zeroshot", "data": DIGITS, "classes": classes})


def test_zeroshot_unknown_class_name_names_the_task(tiny_model):
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'zs'\): classes: unknown class "
                                          r"'twelve'; "
                                          r"classes are: zero, one"):
        run(tiny_model, {"name": "zs", "task": "zeroshot", "data": DIGITS,
                         "classes": ["one", "twelve"]})



def test_zeroshot_with_classes_still_works(tiny_model):
    """``classes`` by name and by index: only classes 1 and 2 compete and only their images
    count; acc1 and mean per-class recall as computed by hand from the model's embeddings and
    its text head (as in test_eval_cli_matches_hand_computed_zeroshot)."""
    from cliplab.data.digits import load_digits
    from cliplab.evaluate.features import encode_images
    from cliplab.evaluate.zeroshot import zeroshot_classifier

    out = run(tiny_model, {"name": "zs", "task": "zeroshot", "data": DIGITS,
                           "classes": ["one", 2]})
    test = load_digits("test")
    feats = encode_images(tiny_model.eval(), test.images, progress=False)
    logits = feats.embeddings @ zeroshot_classifier(tiny_model, test.prompt_names,
                                                    test.templates).T
    keep = (test.labels == 1) | (test.labels == 2)
    pred = torch.tensor([1, 2])[logits[keep][:, [1, 2]].argmax(1)]
    right = pred == test.labels[keep]
    assert out["zs"]["acc1"] == pytest.approx(right.float().mean().item(), abs=1e-6)
    recall = [right[test.labels[keep] == c].float().mean().item() for c in (1, 2)]
    assert out["zs"]["mean_per_class_recall"] == pytest.approx(sum(recall) / 2, abs=1e-6)
    assert out["zs"]["acc5"] == 1.0  # two classes compete


def test_few_shot_refuses_zero_shots():
    with pytest.raises(ConfigError, match=r"tasks\[0\].shots.0: .*greater than 0"):
        suite_spec([{"task": "few_shot", "train": DIGITS, "test": DIGITS, "shots": [0]}])


def test_empty_data_is_one_line_naming_the_task(tiny_model):
    empty = labelled(["zero", "one"], n_per_class=0)  # as a source with `limit: 0` gives
    with pytest.raises(DataError, match=r"^tasks\[0\] \(name 'x'\): data holds no images$"):
        run(tiny_model, {"name": "x", "task": "zeroshot", "data": empty})
    with pytest.raises(DataError, match=r"^tasks\[1\]: test holds no images$"):
        run(tiny_model, {"name": "y", "task": "zeroshot", "data": DIGITS},
            {"task": "few_shot", "train": DIGITS, "test": empty})
    with pytest.raises(DataError, match=r"^task 'x': data holds no images$"):
        run_task(tiny_model, {"name": "x", "task": "zeroshot", "data": empty})
    suite = suite_spec([{"name": "x", "task": "zeroshot", "data": empty}])
    with pytest.raises(DataError, match=r"^suite.yaml: tasks\[0\] \(name 'x'\): data holds no "
                                        r"images$"):
        TaskContext(progress=False).preload(suite.tasks, "suite.yaml: tasks")


# 4. values out of range


@pytest.mark.parametrize("task, key, message", [
    ({"task": "linear_probe", "train": DIGITS, "test": DIGITS, "l2": -1}, "l2",
     "greater than 0"),
    ({"task": "linear_probe", "train": DIGITS, "test": DIGITS, "l2": 0}, "l2",
     "greater than 0"),
    ({"task": "few_shot", "train": DIGITS, "test": DIGITS, "l2": -1}, "l2", "greater than 0"),
    ({"task": "few_shot", "train": DIGITS, "test": DIGITS, "seeds": []}, "seeds",
     "expected at least 1 value, got none"),
    ({"task": "few_shot", "train": DIGITS, "test": DIGITS, "methods": []}, "methods",
     "expected at least 1 value, got none"),
    ({"task": "retrieval", "data": DIGITS, "ks": [0]}, r"ks.0", "greater than 0"),
    ({"task": "retrieval", "data": DIGITS, "ks": []}, "ks",
     "expected at least 1 value, got none"),
])
def test_task_values_out_of_range_are_refused(task, key, message):
    with pytest.raises(ConfigError, match=rf"^suite.yaml: tasks\[0\].{key}: .*{message}"):
        suite_spec([task], "suite.yaml")


def test_few_shot_refuses_more_shots_than_a_class_has(tiny_model):
    train = labelled(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"], n_per_class=3)
    train.labels[0] = 1  # 'zero' keeps 2 images, 'one' gets 4
    with pytest.raises(DataError, match=r"^tasks\[0\] \(name 'fs'\): shots 3 needs 3 train "
                                        r"images of every "
                                        r"class; these have fewer: zero \(2\)$"):
        run(tiny_model, {"name": "fs", "task": "few_shot", "train": train, "test": DIGITS,
                         "shots": [1, 3], "seeds": [0], "methods": ["ncm"]})
    out = run(tiny_model, {"name": "fs", "task": "few_shot", "train": train, "test": DIGITS,
                           "shots": [2], "seeds": [0], "methods": ["ncm"]})
    assert set(out["fs"]) == {"ncm_2shot", "n"}  # and the test images it is over


# 8. a task that would fail when reached fails with the suite's checks, before any task runs


@pytest.mark.parametrize("task, message", [
    ({"name": "c", "task": "compositional", "data": {"source": "shapes", "n": 20,
                                                       "attribute": "color"}},
     "tasks[1] (name 'c').data: unknown option(s) 'attribute' for the compositional task's "
     "shapes scenes (valid: n, seed, kinds, image_size, colors, shapes, counterfactuals)"),
    ({"name": "c", "task": "compositional", "data": {"source": "shapes", "kinds": ["single"]}},
     "tasks[1] (name 'c').data: kinds ['single'] has no relation scenes, the only ones its "
     "negatives are made for; leave kinds out or include relation"),
    ({"name": "ml", "task": "multilabel_zeroshot", "data": DIGITS},
     "tasks[1] (name 'ml'): data must be multi-label (shapes with multilabel: true, or "
     "multilabel-manifest)"),
])
def test_a_task_that_cannot_run_fails_before_the_first_task(tiny_model, monkeypatch, task,
                                                            message):
    from cliplab.evaluate.tasks import TASKS, Task

    ran = []
    monkeypatch.setitem(TASKS, "zeroshot", Task(TASKS["zeroshot"].spec,
                                                lambda *args: ran.append(args) or {}))
    with pytest.raises(ConfigError) as err:
        run(tiny_model, {"name": "zs", "task": "zeroshot", "data": DIGITS}, task)
    assert str(err.value).endswith(message) and ran == []


def test_check_same_classes_refuses_the_same_classes_in_another_order():
    with pytest.raises(DataError, match=r"^here: train and test must have the same classes in "
                                        r"the same order; class 0 is 'cat' in train but 'dog' "
                                        r"in test \(train: cat, dog; test: dog, cat\)$"):
        check_same_classes(labelled(["cat", "dog"]), labelled(["dog", "cat"]), "here")


def test_classes_with_fewer_counts_a_class_with_no_sample():
    from cliplab.data.pairs import classes_with_fewer

    labels = torch.tensor([0, 0])
    assert classes_with_fewer(labels, ["a", "b"], 1) == [("b", 0)]
    assert classes_with_fewer(labels, ["a", "b"], 3) == [("a", 2), ("b", 0)]


@pytest.mark.parametrize("task, refused", [
    ({"task": "linear_probe", "layers": 2}, "layers has no effect unless features is layers"),
    ({"task": "few_shot", "features": "tokens", "layers": 3},
     "layers has no effect unless features is layers"),
    ({"task": "few_shot", "methods": ["ncm"], "l2": 0.1},
     "l2 has no effect unless methods include linear_probe")])
def test_a_task_key_that_would_change_nothing_is_refused(task, refused):
    """Two suites differing only in such a key wrote byte-identical results."""
    data = labelled(["a", "b"])
    with pytest.raises(ConfigError, match=rf"tasks\[0\].*: {refused}; drop it"):
        suite_spec([{**task, "train": data, "test": data}], "suite")
    # where they apply they are taken
    for taken in ({"task": "linear_probe", "layers": 2, "features": "layers"},
                  {"task": "few_shot", "features": "layers", "layers": 3},
                  {"task": "few_shot", "methods": ["linear_probe"], "l2": 0.1}):
        suite_spec([{**taken, "train": data, "test": data}], "suite")
