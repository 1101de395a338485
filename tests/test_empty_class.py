"""A class folder with no image: the zero-shot head (which learns from no image) keeps it as a
class; a method or task that learns from every class refuses it, naming a way out that works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cliplab.cli import main
from cliplab.errors import DataError
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext


def pets(root: Path) -> Path:
    """``root/cat`` and ``root/dog`` with three small PNGs each, and an empty ``root/cow``."""
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    (root / "cow").mkdir()
    return root


def adapt(model_dir: Path, folder: Path, out: Path, method: str, *extra: str) -> int:
    spec = f"{{source: image-folder, path: '{folder}'"
    return main(["adapt", "--method", method, "--model", str(model_dir), "--no-progress",
                 f"data.train={spec}{extra[0] if extra else ''}}}",
                 f"data.test={spec}{extra[0] if extra else ''}}}", *extra[1:],
                 "compare_zeroshot=false", "--out", str(out)])


@pytest.mark.parametrize("options", [["shots=0"], ["shots=2", "train_size=3"],
                                     ["shots=0", "train_size=1"]])
def test_adapt_zeroshot_keeps_an_empty_class_as_a_candidate(tmp_path, tiny_model_dir, capsys,
                                                            options):
    """``data.train leaves no training image of 1 class(es) (cow)`` stopped even the
    zero-shot head, which learns nothing from the images (and a train_size subset then blamed
    itself for the class; nor is a class the subset missed refused: the head learns from
    none)."""
    folder = pets(tmp_path / "pets")
    out = tmp_path / "zs"
    assert adapt(tiny_model_dir, folder, out, "zeroshot", "", *options) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["test_size"] == 6 and results["test"]["n"] == 6
    saved = json.loads((out / "adapter.json").read_text(encoding="utf-8"))
    assert saved["classnames"] == ["cat", "cow", "dog"]  # cow still competes, as in eval


def test_a_method_that_learns_refuses_an_empty_class_naming_a_way_out_that_works(
        tmp_path, tiny_model_dir, capsys):
    folder = pets(tmp_path / "pets")
    assert adapt(tiny_model_dir, folder, tmp_path / "lp", "linear-probe", "", "shots=0") == 2
    err = capsys.readouterr().err
    assert "data.train leaves no training image of 1 class(es) (cow); give images of every " \
           "class; a class with no image " \
           "(an empty folder, one whose images are all unreadable, or one holdout: takes out) " \
           "is left out by listing the classes to keep in classes: of data.train and of " \
           "data.test (and of data.val and data.shifted when given) alike (the sets must have " \
           "the same classes), or by removing its folder (or renaming it to start with '.': " \
           "no class); --method zeroshot learns from no image and runs with them" in err
    # val_shots did not empty it: lowering val_shots would not help, so it is not advised
    assert adapt(tiny_model_dir, folder, tmp_path / "lpv", "linear-probe", "", "shots=2",
                 "val_shots=1") == 2
    err = capsys.readouterr().err
    assert "val_shots" not in err and "is left out by listing the classes" in err
    assert not (tmp_path / "lp").exists()
    # each way out it names
    assert adapt(tiny_model_dir, folder, tmp_path / "kept", "linear-probe",
                 ", classes: [cat, dog]", "shots=0") == 0, capsys.readouterr().err
    (folder / "cow").rename(folder / ".cow")
    assert adapt(tiny_model_dir, folder, tmp_path / "hidden", "linear-probe", "",
                 "shots=2") == 0, capsys.readouterr().err


def test_few_shot_refuses_an_empty_class_naming_a_way_out_that_works(tmp_path, tiny_model):
    folder = pets(tmp_path / "pets")
    data = {"source": "image-folder", "path": str(folder)}
    task = {"name": "fs", "task": "few_shot", "shots": [1, 2], "seeds": [0],
            "methods": ["ncm"], "train": data, "test": data}
    with pytest.raises(DataError, match=r"^tasks\[0\] \(name 'fs'\): shots 2 needs 2 train "
                                        r"images of every class; these have fewer: cow \(0\); "
                                        r"a class with no image \(an empty folder, .*\) is "
                                        r"left out by listing the classes to keep in classes: "
                                        r"of train and of test alike \(the sets must have the "
                                        r"same classes\), or by removing its folder \(or "
                                        r"renaming it to start with '\.': no class\)$"):
        run_suite(tiny_model, {"tasks": [task]}, TaskContext(progress=False))
    kept = {**data, "classes": ["cat", "dog"]}
    out = run_suite(tiny_model, {"tasks": [{**task, "train": kept, "test": kept}]},
                    TaskContext(progress=False))
    assert set(out["fs"]) == {"ncm_1shot", "ncm_2shot", "n"}
