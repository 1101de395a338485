"""A one-off evaluation streams a listed set its tasks only encode (decoded and encoded a batch
at a time, `cliplab.evaluate.streamed`): the results equal the whole-set load's, no more than a
batch of pixels is held, and a cache folder serves a second run without decoding."""

import copy
import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab.data.image_folder as image_folder
import cliplab.evaluate.streamed as streamed
import cliplab.evaluate.tasks.base as base
from cliplab.data.digits import load_digits
from cliplab.data.images import ImageStack
from cliplab.errors import CliplabError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.suite import run_suite, run_task, task_spec
from cliplab.evaluate.tasks import TASKS, TaskContext
from tests.image_folders import digits_folder

CLASSES = ["zero", "one", "two"]


@pytest.fixture()
def folders(tmp_path):
    """``test``: 30 digits (0-2) at 24 px with a corrupt file in the middle; ``train``: 30
    others, a third of them copies of test images (the probe's leakage warning)."""
    data = load_digits("test", image_size=24)
    keep = (data.labels < 3).nonzero().flatten()
    test, train = keep[:30], keep[30:60].clone()
    train[:12] = test[:12]
    digits_folder(tmp_path / "test", data.images[test], data.labels[test], CLASSES,
                  "one/015_bad.png")
    digits_folder(tmp_path / "train", data.images[train], data.labels[train], CLASSES)
    return tmp_path / "test", tmp_path / "train"


def _suite(test, train):
    folder = {"source": "image-folder", "path": str(test)}
    return [{"name": "zs", "task": "zeroshot", "per_class": True, "data": folder},
            {"name": "probe", "task": "linear_probe", "l2": 0.01, "features": "tokens",
             "train": {"source": "image-folder", "path": str(train)}, "test": folder}]


@pytest.fixture()
def record(monkeypatch, tiny_model):
    """What the run streamed (`stream_set`'s results), the largest batch of images the model
    was given, how many files were decoded and the most decoded images stacked together."""
    seen = {"streamed": [], "batch": 0, "decoded": 0, "stacked": 0}
    stream_set, preprocess, stacked = base.stream_set, tiny_model.preprocess, ImageStack.stacked
    decode_image = image_folder.decode_image

    def recording_stream(*args, **kwargs):
        out = stream_set(*args, **kwargs)
        seen["streamed"].append(out)
        return out

    def recording_preprocess(images):
        seen["batch"] = max(seen["batch"], len(images))
        return preprocess(images)

    def recording_stacked(self, where="images"):
        images = stacked(self, where)
        if images.shape[1] > 1:  # decoded pixels, not the placeholders of a listing
            seen["stacked"] = max(seen["stacked"], len(images))
        return images

    def counting_decode(*args, **kwargs):
        seen["decoded"] += 1
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(base, "stream_set", recording_stream)
    monkeypatch.setattr(tiny_model, "preprocess", recording_preprocess)
    monkeypatch.setattr(image_folder, "decode_image", counting_decode)
    monkeypatch.setattr(ImageStack, "stacked", recording_stacked)
    return seen


def _run(model, suite, context=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_suite(model, suite, context)
    return results, sorted(str(w.message) for w in caught if "train images" in str(w.message))


def test_streamed_results_equal_the_whole_sets(tiny_model, folders, record, monkeypatch):
    monkeypatch.setattr(streamed, "STREAM_BATCH", 8)  # several batches of the 30 readable
    suite = _suite(*folders)
    whole, whole_leak = _run(tiny_model, suite, TaskContext(progress=False))  # held: whole
    assert record["streamed"] == [] and record["batch"] >= 30 and record["stacked"] == 30
    record["batch"] = record["stacked"] = 0
    got, leak = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    # never more than a batch of images encoded at once: both sets streamed
    assert record["batch"] == 8 and record["stacked"] == 0
    assert len(record["streamed"]) == 2 and None not in record["streamed"]
    bad = str(folders[0] / "one" / "015_bad.png")
    assert got["zs"]["skipped"]["keys"] == {"unreadable_image": [bad]}
    assert got["zs"]["n"] == 30 and got["probe"]["n_test"] == 30
    assert got == whole
    assert leak == whole_leak and len(leak) == 1 and leak[0].startswith("probe: 12 of 30")


def test_a_cache_folder_serves_a_second_run_without_decoding(tiny_model, folders, record,
                                                              tmp_path):
    suite = _suite(*folders)

    def run():
        record["decoded"] = 0
        context = TaskContext(cache=FeatureCache(tmp_path / "cache"), progress=False, hold=False)
        return _run(tiny_model, suite, context)

    first = run()
    assert record["decoded"] == 61  # 60 images and the corrupt file
    assert run() == first and record["decoded"] == 0  # leakage and skips from the entries
    changed = folders[1] / "two" / sorted(os.listdir(folders[1] / "two"))[0]
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run() == first and record["decoded"] == 30  # the changed set's files only


def test_a_set_a_task_reads_pixels_of_is_decoded_whole(tiny_model, folders, record):
    folder = {"source": "image-folder", "path": str(folders[0])}
    suite = [{"name": "zs", "task": "zeroshot", "data": folder},
             {"name": "ret", "task": "retrieval", "ks": [1], "data": folder}]
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    assert record["streamed"] == [] and record["batch"] == 30
    assert got["zs"]["n"] == 30


def test_two_extra_probes_of_a_set_decode_it_whole(tiny_model, folders, record):
    suite = _suite(*folders)
    suite.append({**suite[1], "name": "probe2", "features": "layers", "layers": 1})
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    assert record["streamed"] == [] and got["probe2"]["n_test"] == 30


def test_a_held_context_streams_nothing(tiny_model, folders, record):
    context = TaskContext(progress=False)
    suite = _suite(*folders)
    _run(tiny_model, suite, context)
    assert record["streamed"] == [] and context.streamed == {} and context.streamable == {}
    held = [data.images for data in context.datasets.values() if hasattr(data, "images")]
    assert sorted(tuple(images.shape) for images in held) == [(30, 16, 16, 3), (30, 16, 16, 3)]


def test_a_streamed_manifest_skips_what_its_whole_load_skips(tiny_model, folders, record,
                                                             tmp_path):
    files = sorted(p.relative_to(tmp_path).as_posix() for p in folders[0].rglob("*.png"))
    rows = [f"{name},{name.split('/')[1]}" for name in files]
    rows.insert(7, "test/one/gone.png,one")  # a missing file among them
    manifest = tmp_path / "labels.csv"
    manifest.write_text("image,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    suite = [{"name": "zs", "task": "zeroshot", "per_class": True,
              "data": {"source": "manifest", "path": str(manifest)}}]
    whole, _ = _run(tiny_model, suite, TaskContext(progress=False))
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    assert len(record["streamed"]) == 1 and record["streamed"][0] is not None
    assert got == whole and got["zs"]["n"] == 30
    assert got["zs"]["skipped"]["counts"] == {"missing_file": 1, "unreadable_image": 1}


def test_pairs_given_to_a_task_that_streams_fail_as_before(tiny_model, folders, tmp_path):
    files = sorted(p.relative_to(tmp_path).as_posix() for p in folders[1].rglob("*.png"))
    manifest = tmp_path / "captions.csv"
    manifest.write_text("image,caption\n" + "".join(f"{name},a digit\n" for name in files),
                        encoding="utf-8")
    suite = [{"task": "zeroshot", "data": {"source": "manifest", "path": str(manifest)}}]
    errors = []
    for hold in (True, False):
        with pytest.raises(CliplabError) as err:
            run_suite(tiny_model, suite, TaskContext(progress=False, hold=hold))
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "\n" not in errors[1]


def test_few_shots_test_set_streams_while_its_train_set_is_drawn(tiny_model, folders, record):
    suite = [{"name": "fs", "task": "few_shot", "shots": [2], "seeds": [0], "methods": ["ncm"],
              "train": {"source": "image-folder", "path": str(folders[1])},
              "test": {"source": "image-folder", "path": str(folders[0])}}]
    whole, _ = _run(tiny_model, suite, TaskContext(progress=False))
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    assert len(record["streamed"]) == 1 and record["streamed"][0] is not None
    assert got == whole and got["fs"]["n"] == 30


class _TokensClassifier:
    """A classifier of the ``tokens`` probe features (as an adapter of tokens is)."""

    probe = "tokens"

    def logits(self, features, progress=False):
        return features.probe.flatten(1)[:, :3].float()


def test_a_classifiers_probe_is_computed_while_streaming(tiny_model, folders, record):
    suite = [{"name": "zs", "task": "zeroshot", "per_class": True,
              "data": {"source": "image-folder", "path": str(folders[0])}}]
    whole, _ = _run(tiny_model, suite, TaskContext(progress=False, classifier=_TokensClassifier()))
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False,
                                                 classifier=_TokensClassifier()))
    assert len(record["streamed"]) == 1 and record["streamed"][0].tag == "tokens"
    assert got == whole


@pytest.mark.parametrize("first_side, streams", [(20, True), (10, False)])
def test_images_of_several_sizes_are_held_as_the_whole_load_holds_them(
        tiny_model, tmp_path, record, first_side, streams):
    """The model's input is 16 px: a 20 px file is fitted to it when decoded, a smaller one is
    kept; the whole load makes each of a set of mixed sizes the model's input. A stream whose
    first image is the model's input does so too; one whose first is smaller cannot know it
    should have (its batches are encoded already): that set is loaded whole."""
    g = np.random.default_rng(0)
    for name in CLASSES:  # the first listed file: one/0.png
        (tmp_path / name).mkdir()
        for i in range(4):
            side = first_side if name == min(CLASSES) and i == 0 else (12 if i % 2 else 20)
            Image.fromarray(g.integers(0, 256, (side, side + 2 * (i % 2), 3), dtype=np.uint8)
                            ).save(tmp_path / name / f"{i}.png")
    suite = [{"name": "zs", "task": "zeroshot", "per_class": True,
              "data": {"source": "image-folder", "path": str(tmp_path)}}]
    whole, _ = _run(tiny_model, suite, TaskContext(progress=False))
    got, _ = _run(tiny_model, suite, TaskContext(progress=False, hold=False))
    assert (record["streamed"][0] is not None) == streams
    assert got == whole


def _other_weights(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return other


def test_a_run_that_fails_leaves_no_streamed_set_in_the_callers_context(
        tiny_model, folders, monkeypatch):
    """A Python user's context, reused after a run_suite that stopped midway (an error, a
    Ctrl-C), held the streamed sets: run_task then scored the first model's features with
    another model, and a few_shot drew from the 1x1 placeholder images, at chance."""
    suite = _suite(*folders)
    zs, context = suite[0], TaskContext(progress=False, hold=False)
    task = TASKS["linear_probe"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(TASKS, "linear_probe", dataclasses.replace(task, run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run_suite(tiny_model, suite, context)
    monkeypatch.setitem(TASKS, "linear_probe", task)
    assert context.streamed == {} and context.streamable == {}
    assert all(data.images.shape[1] > 1 for data in context.datasets.values())
    other = _other_weights(tiny_model)
    fresh = TaskContext(progress=False, hold=False)
    assert run_task(other, zs, context) == run_task(other, zs, fresh)
    few = {"name": "fs", "task": "few_shot", "shots": [2], "seeds": [0], "methods": ["ncm"],
           "train": suite[1]["train"], "test": zs["data"]}  # (a train set streamed above)
    assert run_task(tiny_model, few, context) == run_task(
        tiny_model, few, TaskContext(progress=False, hold=False))


def test_features_streamed_for_one_model_are_refused_to_another(tiny_model, folders):
    """A context a user streamed a set in with one model (preload, then run_task) does not
    serve that model's features to another."""
    zs = _suite(*folders)[0]
    context = TaskContext(progress=False, hold=False)
    context.preload([task_spec(zs, "zs")], model=tiny_model)
    run_task(tiny_model, zs, context)
    assert len(context.streamed) == 1
    with pytest.raises(CliplabError, match="its set was streamed for another model"):
        run_task(_other_weights(tiny_model), zs, context)


def test_the_cache_entry_of_a_listing_does_not_depend_on_what_reads_it(tiny_model, folders,
                                                                        record, tmp_path):
    """The entry was keyed by the whole spec and by whether a task compared images: a set's
    `progress:`/`templates:`, or a zeroshot-only suite after one with a probe, decoded and
    encoded it again."""
    suite = _suite(*folders)

    def run(tasks):
        record["decoded"] = 0
        context = TaskContext(cache=FeatureCache(tmp_path / "cache"), progress=False, hold=False)
        return _run(tiny_model, tasks, context)[0]

    both = run(suite)
    zs = {**suite[0], "data": {**suite[0]["data"], "progress": False,
                               "templates": ["a photo of the number {}."]}}
    alone = run([zs])
    assert record["decoded"] == 0 and alone["zs"]["n"] == both["zs"]["n"] == 30


def test_a_streamed_sets_progress_bar_is_named_by_its_task(tiny_model, folders, monkeypatch):
    """The bar named the set's folder (``encode test``), where a task's encoding was named by
    the task (``encode zs``, ``encode probe train``)."""
    names, bar = [], streamed.tqdm

    def named(*args, **kwargs):
        names.append(kwargs.get("desc"))
        return bar(*args, **kwargs)

    monkeypatch.setattr(streamed, "tqdm", named)
    _run(tiny_model, _suite(*folders), TaskContext(progress=False, hold=False))
    assert names == ["encode zs", "encode probe train"]


def test_a_part_of_a_streamed_set_is_refused_not_encoded_from_its_placeholders(tiny_model,
                                                                               folders):
    """Only a streamed set's own placeholder images map to its features: a subset of them
    (no task takes one today) would have been encoded as the 1x1 placeholders, silently."""
    zs = _suite(*folders)[0]
    context = TaskContext(progress=False, hold=False)
    context.preload([task_spec(zs, "zs")], model=tiny_model)
    run_task(tiny_model, zs, context)
    data = context.labelled(zs["data"], "data")
    assert context.image_features(tiny_model, data.images, zs["data"], "x").embeddings.shape[0] \
        == len(data.labels)
    with pytest.raises(CliplabError, match="was streamed .* a part of it is asked"):
        context.image_features(tiny_model, data.images[:5], zs["data"], "x")
