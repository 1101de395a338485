"""A one-off evaluation holds one task's sets at a time: a suite over many large sets needed
their sum in memory (every set was read before the first task ran, and kept to the end). Tasks
are still checked against their data before any encodes: on image folders and manifests as
listed, without decoding."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

import cliplab.evaluate.tasks.base as base
from cliplab.cli import main
from cliplab.errors import DataError
from cliplab.evaluate.suite import TASKS, run_suite
from cliplab.evaluate.tasks import TaskContext
from tests.image_folders import counting_decodes


def _folder(root, seed, per_class=3):
    g = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def _zs(path, **extra):
    return {"task": "zeroshot", "data": {"source": "image-folder", "path": str(path),
                                         "progress": False}, **extra}


@pytest.fixture
def decodes(monkeypatch):
    return counting_decodes(monkeypatch)


@pytest.fixture
def held_at_run(monkeypatch):
    """The image folders held by the context as each task runs."""
    seen = []
    task = TASKS["zeroshot"]
    original = task.run

    def recording(model, spec, context):
        specs = [json.loads(k.split("@")[0]) for k in context.datasets]
        seen.append(sorted(spec.get("path", spec["source"]) for spec in specs))
        return original(model, spec, context)

    monkeypatch.setitem(TASKS, "zeroshot", dataclasses.replace(task, run=recording))
    return seen


def test_a_one_off_suite_holds_each_set_from_its_first_task_to_its_last(
        tmp_path, tiny_model, decodes, held_at_run):
    a, b, c = (_folder(tmp_path / n, seed) for seed, n in enumerate("abc"))
    suite = {"tasks": [_zs(a, name="a1"), _zs(b, name="b"), _zs(a, name="a2"), _zs(c, name="c")]}
    got = run_suite(tiny_model, suite)
    assert held_at_run == [[str(a)], [str(a), str(b)], [str(a)], [str(c)]]
    assert len(decodes) == 18  # each file once: a held for a2, not read again
    # the same numbers as a context holding everything
    want = run_suite(tiny_model, suite, TaskContext(progress=False))
    assert got == want


def test_tasks_are_checked_on_the_listed_sets_before_any_decodes(tmp_path, tiny_model, decodes):
    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)
    suite = {"tasks": [_zs(a), _zs(b, classes=["cat", "horse"])]}
    with pytest.raises(Exception, match=r"tasks\[1\].*horse"):
        run_suite(tiny_model, suite)
    assert decodes == []


def test_a_set_found_unreadable_at_its_turn_names_its_task(tmp_path, tiny_model):
    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)
    for file in b.rglob("*.png"):
        file.write_bytes(b"broken")
    suite = {"tasks": [_zs(a), _zs(b, name="broken")]}
    with pytest.raises(DataError, match=r"tasks\[1\] \(name 'broken'\): .*no readable image"):
        run_suite(tiny_model, suite)


def test_a_large_set_read_whole_is_read_again_at_its_turn_not_held(tmp_path, tiny_model,
                                                                    monkeypatch, held_at_run):
    digits = {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}
    a = _folder(tmp_path / "a", 0)
    suite = {"tasks": [_zs(a), digits]}
    loads = []
    original = base.load_source

    def counted(spec, *args, **kwargs):
        loads.append(spec["source"])
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(base, "load_source", counted)
    monkeypatch.setattr(base, "HOLD_BYTES", 10_000)  # digits' 540 8x8 images: 34 560 bytes
    got = run_suite(tiny_model, suite)
    assert loads == ["image-folder", "digits", "image-folder", "digits"]
    assert [len(keys) for keys in held_at_run] == [1, 1]  # the folder while it ran, not digits
    monkeypatch.setattr(base, "HOLD_BYTES", 10**9)  # small: held from its check, read once
    loads.clear()
    assert run_suite(tiny_model, suite) == got
    assert loads == ["image-folder", "digits", "image-folder"]


def test_eval_cli_reads_each_set_once_and_holds_it_only_for_its_tasks(
        tmp_path, tiny_model_dir, decodes, held_at_run):
    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"tasks": [_zs(a), _zs(b)]}))
    out = tmp_path / "out"
    assert main(["eval", "--config", str(suite), "--model", str(tiny_model_dir), "--out",
                 str(out), "--no-progress"]) == 0
    assert held_at_run == [[str(a)], [str(b)]] and len(decodes) == 12
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["zeroshot-0"]["n"] == results["zeroshot-1"]["n"] == 6


def test_eval_cli_reads_a_large_set_once_for_its_check_and_once_for_its_task(
        tmp_path, tiny_model_dir, monkeypatch):
    a = _folder(tmp_path / "a", 0)
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"tasks": [
        _zs(a), {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}]}))
    loads = []
    original = base.load_source
    monkeypatch.setattr(base, "load_source",
                        lambda spec, *a, **k: loads.append(spec["source"]) or original(spec, *a, **k))
    monkeypatch.setattr(base, "HOLD_BYTES", 10_000)
    assert main(["eval", "--config", str(suite), "--model", str(tiny_model_dir),
                 "--no-progress"]) == 0
    assert loads == ["image-folder", "digits", "image-folder", "digits"]

