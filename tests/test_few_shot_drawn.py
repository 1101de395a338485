"""The ``few_shot`` task in a one-off evaluation draws its shots from the listed training
folder: it decodes the files its draws take (at most the largest k per class per seed), not the
whole set, and scores as the whole-set path does."""

from __future__ import annotations

import pytest

from cliplab.cli import main
from cliplab.errors import DataError
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext
from tests.image_folders import counting_decodes
from tests.test_listed_draw import CLASSES, _folder


def _task(train, test, **extra):
    return {"name": "fs", "task": "few_shot", "shots": [1, 3], "seeds": [0, 1],
            "train": {"source": "image-folder", "path": str(train), "progress": False},
            "test": {"source": "image-folder", "path": str(test), "progress": False}, **extra}


@pytest.fixture
def folders(tmp_path):
    train = _folder(tmp_path / "train", per_class=(9, 12, 10, 11))
    test = _folder(tmp_path / "test", per_class=(3, 3, 3, 3))
    return train, test


@pytest.mark.parametrize("features", ["embeddings", "tokens"])
def test_draws_decode_only_the_largest_shots_and_score_as_the_whole_set(
        folders, tiny_model, monkeypatch, features):
    train, test = folders
    suite = {"tasks": [_task(train, test, features=features)]}
    decodes = counting_decodes(monkeypatch)
    got = run_suite(tiny_model, suite)
    from_train = [f for f in decodes if "/train/" in f]
    # per seed the largest k (3) per class, its 1-shot the first of them: not the 42 files
    assert len(from_train) == 3 * len(CLASSES) * 2
    # a context that holds its sets decodes the whole folder and samples it (`sample_k_shot`)
    decodes.clear()
    want = run_suite(tiny_model, suite, TaskContext(progress=False))
    assert len([f for f in decodes if "/train/" in f]) == 42
    assert got.keys() == want.keys() and set(got["fs"]) == {
        f"{m}_{k}shot" for m in ("ncm", "linear_probe") for k in (1, 3)} | {"n"}
    assert got["fs"]["n"] == want["fs"]["n"] == 12  # the test images, 3 per class
    for key, value in {k: v for k, v in want["fs"].items() if k != "n"}.items():
        assert got["fs"][key]["acc1_per_seed"] == pytest.approx(value["acc1_per_seed"], abs=1e-6)


def test_an_unreadable_drawn_file_is_passed_over_and_told_with_what_was_read(
        folders, tiny_model, capsys):
    train, test = folders
    (train / "ant" / "0.png").write_bytes(b"not a png")  # ant: 8 readable of 9 listed
    got = run_suite(tiny_model, {"tasks": [_task(train, test, shots=[8], seeds=[0])]})
    assert got["fs"]["skipped"]["counts"] == {"unreadable_image": 1}
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("fs: skipped"))
    assert line.startswith(f"fs: skipped 1 of 54 samples (unreadable_image=1) in {train};")  # with test
    assert line.endswith("; 33 of its 42 listed files were decoded for the draw, the others "
                         "not read")  # 8 per class and the broken one


def test_a_class_short_of_readable_files_for_the_largest_k_is_an_error(folders, tiny_model):
    """ant lists 9 files (enough for 9 shots by the check on the listing); one does not
    decode, so a 9-shot result would not be 9-shot. Found while the task runs, the error names
    the task as the checks before the run do."""
    train, test = folders
    (train / "ant" / "4.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^tasks\[0\] \(name 'fs'\): shots 9 needs 9 readable "
                                        r"train images of every class; these have fewer: "
                                        r"ant \(8\)$"):
        run_suite(tiny_model, {"tasks": [_task(train, test, shots=[9], seeds=[0])]})


def test_eval_cli_draws_from_a_large_folder(folders, tiny_model_dir, tmp_path, monkeypatch):
    train, test = folders
    (tmp_path / "suite.yaml").write_text(
        "tasks:\n" + "".join(f"  - {line}\n" for line in (
            f"{{name: fs, task: few_shot, shots: [2], seeds: [0], methods: [ncm], "
            f"train: {{source: image-folder, path: {train}}}, "
            f"test: {{source: image-folder, path: {test}}}}}",)))
    decodes = counting_decodes(monkeypatch)
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(tmp_path / "suite.yaml"),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert len([f for f in decodes if "/train/" in f]) == 2 * len(CLASSES)


def test_a_captioned_train_set_is_refused_as_before(tmp_path, tiny_model):
    """Listed, a caption manifest is still no classification set: one line, no traceback."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), "red").save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("image,caption\n0.png,a red thing\n1.png,a red one\n")
    task = {"task": "few_shot", "shots": [1], "seeds": [0],
            "train": {"source": "manifest", "path": str(tmp_path / "m.csv")},
            "test": {"source": "digits", "split": "test"}}
    with pytest.raises(Exception, match=r"^tasks\[0\]: train needs labelled images "
                                        r"\(a classification source\), not image-text pairs; "
                                        r"a manifest with a caption column is read as pairs, "
                                        r"and as classes when label_col: COLUMN names its "
                                        r"label column$"):
        run_suite(tiny_model, {"tasks": [task]})


def test_a_manifest_of_captions_and_labels_is_said_to_need_its_label_col(tmp_path, tiny_model):
    """A manifest with both a caption and a label column reads as pairs: a zero-shot task on
    it said only that it needs labelled images, not how to read its labels."""
    from PIL import Image

    rows = ["image,caption,label"]
    for i, colour in enumerate(["red", "blue", "red", "blue"]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colour} thing,{colour}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = {"source": "manifest", "path": str(tmp_path / "m.csv")}
    with pytest.raises(Exception, match=r"label_col: COLUMN names its label column$"):
        run_suite(tiny_model, {"tasks": [{"task": "zeroshot", "data": data}]})
    results = run_suite(tiny_model, {"tasks": [{"task": "zeroshot",
                                                "data": {**data, "label_col": "label"}}]})
    assert results["zeroshot-0"]["n"] == 4
