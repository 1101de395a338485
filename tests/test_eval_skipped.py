"""`cliplab eval` tells which samples its tasks' data skipped: one stderr line per task and a
``skipped`` record in that task's results (absent when nothing was skipped)."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.data.shards import write_shards
from cliplab.data.sources import load_source
from cliplab.data.types import SkipReport
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def bad_data(tmp_path):
    """An image folder (6 good PNGs, a corrupt PNG, a truncated JPEG), a labelled CSV (4 good
    rows, a missing file) and a caption CSV (3 good rows, a corrupt image, a missing file, an
    empty caption)."""
    folder = tmp_path / "pets"
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            _png(folder / cls / f"{i}.png", seed=10 * c + i)
    (folder / "cat" / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    jpeg = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(jpeg, format="JPEG")
    (folder / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\npets/cat/0.png,cat\npets/dog/0.png,dog\n"
                      "pets/cat/gone.png,cat\npets/cat/1.png,cat\npets/dog/1.png,dog\n")
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\npets/cat/0.png,a cat\npets/cat/corrupt.png,noise\n"
                        "pets/dog/0.png,a dog\npets/dog/gone.png,gone\npets/dog/1.png,\" \"\n"
                        "pets/cat/2.png,another cat\n")
    return folder, labels, captions


def test_eval_prints_and_records_skipped_samples(model_dir, bad_data, tmp_path, capsys):
    folder, labels, captions = bad_data
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks:\n"
        f"  - {{name: zs, task: zeroshot, data: {{source: image-folder, path: '{folder}'}}}}\n"
        f"  - {{name: probe, task: linear_probe, l2: 0.01, features: embeddings,\n"
        f"      train: {{source: image-folder, path: '{folder}'}},\n"
        f"      test: {{source: manifest, path: '{labels}'}}}}\n"
        f"  - {{name: ret, task: retrieval, ks: [1], data: {{source: manifest, "
        f"path: '{captions}'}}}}\n"
        "  - {name: clean, task: zeroshot, data: {source: digits, split: test}}\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--config", str(suite), "--out", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "skipped" in line] == [
        f"zs: skipped 2 of 8 samples (unreadable_image=2) in {folder}",
        f"probe: skipped 3 of 13 samples (missing_file=1, unreadable_image=2) in "
        f"{folder}, {labels}",
        f"ret: skipped 3 of 6 samples (empty_caption=1, missing_file=1, unreadable_image=1) "
        f"in {captions}",
    ]
    results = json.loads((out / "results.json").read_text())["results"]
    unreadable = [str(folder / "cat" / "corrupt.png"), str(folder / "dog" / "truncated.jpg")]
    assert results["zs"]["skipped"] == {"total": 2, "counts": {"unreadable_image": 2},
                                        "keys": {"unreadable_image": unreadable}}
    assert results["probe"]["skipped"] == {
        "total": 3, "counts": {"unreadable_image": 2, "missing_file": 1},
        "keys": {"unreadable_image": unreadable,
                 "missing_file": ["labels.csv:line 4: pets/cat/gone.png"]}}
    assert results["ret"]["skipped"] == {
        "total": 3, "counts": {"unreadable_image": 1, "missing_file": 1, "empty_caption": 1},
        "keys": {"unreadable_image": ["captions.csv:line 3: pets/cat/corrupt.png"],
                 "missing_file": ["captions.csv:line 5: pets/dog/gone.png"],
                 "empty_caption": ["captions.csv:line 6: pets/dog/1.png"]}}
    assert "skipped" not in results["clean"] and "acc1" in results["zs"]


def test_repeated_evaluations_print_once_and_record_each_time(model_dir, bad_data, capsys):
    from cliplab.models.resolve import load_model

    folder, _, _ = bad_data
    model = load_model(str(model_dir))
    suite = [{"name": "zs", "task": "zeroshot",
              "data": {"source": "image-folder", "path": str(folder)}}]
    context = TaskContext(progress=False)
    first = run_suite(model, suite, context)
    again = run_suite(model, suite, context.for_new_weights())  # as pretraining's evals do
    assert first["zs"]["skipped"]["total"] == again["zs"]["skipped"]["total"] == 2
    err = capsys.readouterr().err
    assert err.count("zs: skipped 2 of 8 samples") == 1


def test_a_truncated_shard_counts_lost_samples_not_the_shard_as_one(model_dir, tmp_path, capsys):
    """Eval over a cut-off shard: 'of N samples' is kept + lost samples (the shard is no sample)."""
    from cliplab.models.resolve import load_model

    digits = load_source({"source": "digits", "split": "test"}).subset(torch.arange(12))
    shards = tmp_path / "shards"
    write_shards(digits, shards, samples_per_shard=6, image_format="png", progress=False)
    first = shards / "00000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    spec = {"source": "shards", "path": str(shards), "progress": False}
    data = load_source(spec)
    # the cut leaves 4 of 00000.tar's 6 samples whole (the fourth without its .txt: its
    # captions are in its .json): 4 + 6 kept; the 2 after the cut count as cut_off
    # (index.json gives the shard's count)
    assert len(data) == 10
    assert data.skipped.counts == {"truncated_shard": 1, "cut_off": 2}
    context = TaskContext(progress=False)
    results = run_suite(load_model(str(model_dir)),
                        [{"name": "zs", "task": "zeroshot", "data": spec}], context)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "skipped" in line] == [
        f"zs: skipped 2 of 12 samples (cut_off=2), and 1 shard(s) read only "
        f"in part (truncated_shard=1) in {shards}"]
    assert results["zs"]["skipped"] == {
        "total": 2, "shards_read_in_part": 1,
        "counts": {"truncated_shard": 1, "cut_off": 2},
        "keys": {"truncated_shard": ["00000.tar:4 of 6 samples (the file ends early)"],
                 "cut_off": ["00000.tar:sample 5 of 6", "00000.tar:sample 6 of 6"]}}


def _in_memory(name: str, start: int, n: int, skips: list[tuple[str, str]]):
    """``n`` digits (test images from ``start``) as an in-memory set named ``name`` whose
    loading skipped ``skips`` ((reason, key) pairs)."""
    report = SkipReport()
    for reason, key in skips:
        report.add(reason, key)
    data = load_digits("test").subset(torch.arange(start, start + n))
    return dataclasses.replace(data, name=name, skipped=report)


def _probe_skips(model, train, test, capsys) -> tuple[list[str], dict | None]:
    """The skip lines on stderr and the ``skipped`` record of a linear probe on the sets."""
    results = run_suite(model, [{"name": "probe", "task": "linear_probe", "train": train,
                                 "test": test, "features": "embeddings", "l2": 0.01}],
                        TaskContext(progress=False))
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    return lines, results["probe"].get("skipped")


def test_two_in_memory_sets_each_count_and_are_named(tiny_model, capsys):
    """In-memory train and test sets are two sets (keyed by identity): both their skips are
    told, 1 + 2 of (20 + 1) + (10 + 2) samples, the line naming each by its ``name``."""
    train = _in_memory("tr", 0, 20, [("unreadable_image", "tr/a.png")])
    test = _in_memory("te", 20, 10, [("missing_file", "te/b.png"), ("missing_file", "te/c.png")])
    lines, skipped = _probe_skips(tiny_model, train, test, capsys)
    assert lines == ["probe: skipped 3 of 33 samples (missing_file=2, unreadable_image=1) in "
                     "tr, te"]
    assert skipped == {"total": 3, "counts": {"unreadable_image": 1, "missing_file": 2},
                       "keys": {"unreadable_image": ["tr/a.png"],
                                "missing_file": ["te/b.png", "te/c.png"]}}


def test_two_sets_skipping_for_one_reason_add_up(tiny_model, capsys):
    """Train and test both lost ``missing_file`` samples (1 and 2): the task's count is 3 and
    its keys are all three, train's first."""
    train = _in_memory("tr", 0, 20, [("missing_file", "tr/a.png")])
    test = _in_memory("te", 20, 10, [("missing_file", "te/b.png"), ("missing_file", "te/c.png")])
    lines, skipped = _probe_skips(tiny_model, train, test, capsys)
    assert lines == ["probe: skipped 3 of 33 samples (missing_file=3) in tr, te"]
    assert skipped == {"total": 3, "counts": {"missing_file": 3},
                       "keys": {"missing_file": ["tr/a.png", "te/b.png", "te/c.png"]}}


def test_only_the_sets_that_skipped_are_named(tiny_model, capsys):
    """Test skipped nothing: the line names train only, though test's 10 samples count in
    'of N' (1 lost of 20 + 1 + 10)."""
    train = _in_memory("tr", 0, 20, [("missing_file", "tr/a.png")])
    lines, skipped = _probe_skips(tiny_model, train, _in_memory("te", 20, 10, []), capsys)
    assert lines == ["probe: skipped 1 of 31 samples (missing_file=1) in tr"]
    assert skipped["counts"] == {"missing_file": 1}


def test_train_and_test_of_one_spec_count_its_skips_once(tiny_model, bad_data, capsys):
    """A probe trained and tested on one folder spec lost its 2 unreadable images once (as
    the zeroshot task on it says), not 4 of 16 samples in the folder twice."""
    folder, _, _ = bad_data
    spec = {"source": "image-folder", "path": str(folder)}
    lines, skipped = _probe_skips(tiny_model, spec, spec, capsys)
    assert lines == [f"probe: skipped 2 of 8 samples (unreadable_image=2) in {folder}"]
    assert skipped["total"] == 2 and skipped["counts"] == {"unreadable_image": 2}
    assert len(skipped["keys"]["unreadable_image"]) == 2


def test_no_progress_means_no_bar_while_reading(tiny_model, bad_data, capsys):
    """With ``progress=False`` reading an image folder draws no bar: the skip line is all
    that reaches stderr."""
    folder, _, _ = bad_data
    run_suite(tiny_model, [{"name": "zs", "task": "zeroshot",
                            "data": {"source": "image-folder", "path": str(folder)}}],
              TaskContext(progress=False))
    assert capsys.readouterr().err == (f"zs: skipped 2 of 8 samples (unreadable_image=2) in "
                                       f"{folder}\n")
