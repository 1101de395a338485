"""Class folders whose names differ only in case or spacing (``Dog/`` and ``dog/``), or that
read as one name (``hot_dog/`` and ``hot dog/``): told of, never picked by a guess, never
merged in the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cliplab.data.image_folder import load_image_folder
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.zeroshot import zeroshot_classifier
from tests.warned import warned

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "cyan")


def class_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    """``root`` with a folder per name in ``names`` holding ``per_class`` small PNGs of its own
    colour; returns ``root``."""
    for name, colour in zip(names, COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


def test_names_alike_but_for_case_or_spacing_are_warned_about(tmp_path, recwarn, tiny_model):
    """``Dog/`` and ``dog/`` are two classes whose prompts a lowercasing tokenizer reads as
    one (their head rows were the same, cosine 1.0), and prompts collapse spaces; only names
    equal as written were told of."""
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat", "spaced  name", "spaced name"])
    data = load_image_folder(root, progress=False)
    assert data.classnames == ["Dog", "cat", "dog", "spaced  name", "spaced name"]
    err = warned(recwarn)
    assert (f"image folder {root}: 2 class name(s) name several class folders but for case or "
            "spacing ('Dog' / 'dog': Dog, dog; 'spaced  name' / 'spaced name': spaced  name, "
            "spaced name): zero-shot may not (a lowercasing tokenizer cannot) tell them apart; "
            "give them distinct names in classnames.txt") in err
    head = zeroshot_classifier(tiny_model, data.classnames, ["a photo of a {}."], progress=False)
    assert torch.allclose(head[0], head[2]) and torch.allclose(head[3], head[4])
    (root / "classnames.txt").write_text("big dog\ncat\nsmall dog\nx\ny\n", encoding="utf-8")
    load_image_folder(root, progress=False)
    assert "several class folders" not in warned(recwarn)


def test_names_the_same_as_written_keep_their_warning(tmp_path, recwarn):
    root = class_folder(tmp_path / "f", ["hot_dog", "hot dog", "Cat", "cat"])
    load_image_folder(root, progress=False)
    err = warned(recwarn).splitlines()
    assert f"image folder {root}: 1 class name(s) name several class folders ('hot dog': " \
           "hot dog, hot_dog): zero-shot cannot tell them apart; give them distinct names in " \
           "classnames.txt" in err
    assert any("but for case or spacing ('Cat' / 'cat': Cat, cat)" in line for line in err)


def test_classes_prefers_the_exact_name_and_refuses_a_guess(tmp_path):
    """``classes: [dog, cat]`` on ``Dog/``, ``dog/``, ``cat/`` selected ``Dog`` (the first
    match in any case); ``DOG`` matches both only in another case: refused, naming them."""
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat"])
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    data = load_source({**spec, "classes": ["dog", "cat"]})
    assert data.classnames == ["dog", "cat"]
    assert sorted(data.keys) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert load_source({**spec, "classes": ["Dog", "cat"]}).keys[0].startswith("Dog/")
    assert load_source({**spec, "classes": ["CAT", "dog"]}).classnames == ["cat", "dog"]
    for key in ("classes", "holdout"):
        with pytest.raises(DataError, match=rf"^data.test: {key}: 'DOG' matches 2 classes only "
                                            r"in another case \('Dog', 'dog'\); give the one "
                                            r"meant as it is written$"):
            load_source({**spec, key: ["DOG", "cat"]}, where="data.test")
    held = load_source({**spec, "holdout": ["dog"]})
    assert sorted({k.split("/")[0] for k in held.keys}) == ["Dog", "cat"]


def test_zeroshot_classes_refuse_a_guess_naming_the_key_once(tmp_path, tiny_model):
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat"])
    task = {"name": "zs", "task": "zeroshot",
            "data": {"source": "image-folder", "path": str(root)}, "classes": ["DOG", "cat"]}
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'zs'\): classes: 'DOG' matches "
                                          r"2 classes only in another case \('Dog', 'dog'\)"):
        run_suite(tiny_model, {"tasks": [task]}, TaskContext(progress=False))


def test_per_class_results_keep_every_class_when_names_repeat():
    """``hot_dog/`` and ``hot dog/`` are both "hot dog": their entries collapsed into one (999
    classes scored gave 998 entries); unique names keep their keys as before."""
    from cliplab.data.pairs import classes_with_fewer
    from cliplab.evaluate.metrics import per_class_accuracy
    from cliplab.evaluate.multilabel import multilabel_metrics

    logits = torch.eye(3)[[0, 1, 2, 0]]
    labels = torch.tensor([0, 1, 2, 2])
    names = ["hot dog", "cat", "hot dog"]
    assert per_class_accuracy(logits, labels, names) == {"hot dog": 1.0, "cat": 1.0,
                                                         "hot dog#2": 0.5}
    assert per_class_accuracy(logits, labels, ["a", "b", "c"]) == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert classes_with_fewer(labels, names, 2) == [("hot dog", 1), ("cat", 1)]
    assert classes_with_fewer(labels, names, 3) == [("hot dog", 1), ("cat", 1), ("hot dog#2", 2)]
    targets = torch.tensor([[1, 0, 1], [0, 1, 1]])
    ap = multilabel_metrics(targets.float(), targets, names)["per_class_ap"]
    assert list(ap) == ["hot dog", "cat", "hot dog#2"]


def test_eval_and_report_show_both_classes_of_one_name(tmp_path, tiny_model_dir, capsys):
    from cliplab.cli import main

    root = class_folder(tmp_path / "f", ["hot_dog", "hot dog", "cat"])
    manifest = tmp_path / "captions.csv"
    manifest.write_text("image,caption\nx.png,a hot dog\nx.png,a cat\nx.png,two cats\n",
                        encoding="utf-8")
    suite = tmp_path / "suite.yaml"
    data = f"{{source: image-folder, path: '{root}'}}"
    suite.write_text(f"tasks:\n  - {{task: zeroshot, name: zs, per_class: true, data: {data}}}\n"
                     f"  - {{task: long_tail, name: lt, data: {data},\n"
                     f"     train_data: {{source: manifest, path: '{manifest}'}}}}\n",
                     encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(suite), "--model", str(tiny_model_dir),
                 "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))["results"]
    assert list(results["zs"]["per_class_acc1"]) == ["cat", "hot dog", "hot dog#2"]
    per_class = results["lt"]["per_class"]
    assert list(per_class) == ["cat", "hot dog", "hot dog#2"]
    assert [v["frequency"] for v in per_class.values()] == [2, 1, 1]
    capsys.readouterr()
    report = tmp_path / "report"
    assert main(["report", "--out", str(report), "--no-progress", "--inputs",
                 str(out / "results.json")]) == 0
    table = (report / "report.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| per_class_acc1.")]
    assert rows == ["per_class_acc1.cat", "per_class_acc1.hot dog", "per_class_acc1.hot dog#2"]


def test_adapt_records_every_class_short_of_shots(tmp_path, tiny_model_dir):
    from cliplab.adapt.run import run_adapt

    root = class_folder(tmp_path / "f", ["hot_dog", "hot dog", "cat"], per_class=2)
    for i in (2, 3):
        Image.new("RGB", (16, 16), "blue").save(root / "cat" / f"{i}.png")
    spec = {"source": "image-folder", "path": str(root)}
    res = run_adapt({"method": "zeroshot", "model": str(tiny_model_dir), "shots": 3,
                     "compare_zeroshot": False, "data": {"train": spec, "test": spec}},
                    progress=False, write=False)
    assert res["fewer_than_shots"] == {"hot dog": 2, "hot dog#2": 2}


def test_a_name_two_classes_share_takes_the_first_with_a_warning_and_its_key_the_second(
        recwarn):
    """ImageNet's two "crane"s: ``crane`` took the first without a word and the second could
    not be named; per-class results key it ``crane#2``, which now names it (a class literally
    named so still wins)."""
    from cliplab.data.pairs import class_indices, class_keys
    names = ["crane", "cat", "crane"]
    assert class_indices(names, ["crane#2", "cat"]) == [2, 1]
    assert "names" not in warned(recwarn)
    assert class_indices(names, ["crane"], "holdout") == [0]
    assert "holdout: 'crane' names 2 classes; taken as the first ('crane#2' is the second, " \
           "as per-class results name it)" in warned(recwarn)
    # a class of its own named x#2: the second x is keyed x#3, in results and in classes:
    names = ["x", "x#2", "x"]
    assert class_keys(names) == ["x", "x#2", "x#3"]
    assert class_indices(names, ["x#2", "x#3"]) == [1, 2]
    class_indices(names, ["x"])
    assert "'x' names 2 classes; taken as the first ('x#3' is the second" in warned(recwarn)


def test_train_and_test_listing_case_alike_classes_in_two_orders_are_refused(tmp_path):
    """``classes: [Dog, dog, cat]`` on train and ``[dog, Dog, cat]`` on test passed the
    "same classes in the same order" check (names compared in lower case), and a probe scored
    33% for 100%: alike names pair two sets only one to one."""
    from cliplab.data.pairs import check_same_classes
    from cliplab.data.types import LabelledImages

    def named(*names):
        return LabelledImages(torch.zeros(len(names), 2, 2, 3, dtype=torch.uint8),
                              torch.arange(len(names)), list(names), ["a photo of a {}."])

    check_same_classes(named("Cat", "dog"), named("cat", "Dog"), "adapt")  # one to one: fine
    with pytest.raises(DataError, match=r"^adapt: train and test must have the same classes "
                                        r"in the same order; class 0 is 'Dog' in train but "
                                        r"'dog' in test \("):
        check_same_classes(named("Dog", "dog", "cat"), named("dog", "Dog", "cat"), "adapt")


def test_a_group_holding_one_name_twice_is_warned_as_one_no_tokenizer_tells_apart(
        tmp_path, recwarn):
    """``Hot_dog/``, ``hot dog/`` and ``hot_dog/``: two of them are one name as written, so
    "cannot" tell them apart, not "may not"."""
    root = class_folder(tmp_path / "f", ["Hot_dog", "hot dog", "hot_dog", "cat"])
    load_image_folder(root, progress=False)
    err = warned(recwarn)
    assert "1 class name(s) name several class folders (" in err and "cannot tell" in err
    assert "may not" not in err
