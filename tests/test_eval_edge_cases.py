"""Suites that used to fail mid-run, crash or report a number that measures nothing are
refused with one line naming the suite's task and key before any task encodes, or now work:
probe/few-shot/long-tail checks run up front, repeated or imageless zero-shot classes, a
one-image probe, ``layers`` beyond the model's blocks, retrieval ``ks`` given beyond the candidates, and
a bad ``--cache-dir`` (a corrupt file in it, or a file as it)."""

import pytest
import torch
from sklearn.preprocessing import StandardScaler

from cliplab.cli import main
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate import feature_cache as fc
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.few_shot import few_shot
from cliplab.evaluate.linear_probe import linear_probe, standardize
from cliplab.evaluate.suite import run_suite, run_task, suite_spec
from cliplab.evaluate.tasks import TaskContext
from tests.warned import warned

DIGITS = {"source": "digits", "split": "test"}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GOOD = {"name": "zs", "task": "zeroshot", "data": DIGITS}


def labelled(classnames: list[str], counts: list[int]) -> LabelledImages:
    labels = torch.arange(len(classnames)).repeat_interleave(torch.tensor(counts))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 16, 16, 3), generator=g, dtype=torch.uint8)
    return LabelledImages(images, labels, classnames, ["a photo of a {}."], "toy")


def record_encodes(monkeypatch) -> list[int]:
    """The number of images of every image encoding (the feature cache's encoder)."""
    calls: list[int] = []
    real = fc.encode_images
    monkeypatch.setattr(fc, "encode_images",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    return calls


def run(model, *tasks):
    return run_suite(model, {"tasks": list(tasks)}, TaskContext(progress=False))


# 1. every task's checks run before the first task encodes anything


def bad_second_tasks(tmp_path) -> dict:
    (tmp_path / "train.csv").write_text("image,caption\nx.png,a photo of a one\n")
    manifest = {"source": "manifest", "path": str(tmp_path / "train.csv")}
    return {
        "linear_probe": ({"name": "p", "task": "linear_probe", "features": "embeddings",
                          "l2": 0.01, "train": labelled([f"c{i}" for i in range(10)], [2] * 10),
                          "test": DIGITS},
                         DataError, "train and test must have the same classes in the same "
                                    "order; class 0 is 'c0' in train but 'zero' in test"),
        "few_shot": ({"name": "p", "task": "few_shot", "shots": [3], "seeds": [0],
                      "methods": ["ncm"], "train": labelled(NAMES, [2] + [3] * 9),
                      "test": DIGITS},
                     DataError, r"shots 3 needs 3 train images of every class; these have "
                                r"fewer: zero \(2\)$"),
        "long_tail_concepts": ({"name": "p", "task": "long_tail", "data": DIGITS,
                                "concepts": ["x"], "train_data": manifest},
                               ConfigError, "concepts: 1 concepts for 10 classes; give one per "
                                            "class$"),
        "long_tail_train_data": ({"name": "p", "task": "long_tail", "data": DIGITS,
                                  "train_data": {**manifest, "split": "x"}},
                                 ConfigError, "train_data: a manifest here takes path and "
                                              "caption_col only"),
    }


@pytest.mark.parametrize("case", ["linear_probe", "few_shot", "long_tail_concepts",
                                  "long_tail_train_data"])
def test_a_bad_second_task_fails_before_the_first_encodes(tiny_model, tmp_path, monkeypatch,
                                                          case):
    """A zero-shot task, then a bad one: the error names tasks[1] and comes before any image
    is encoded (in pretraining: before training, whose end would run the suite); in a
    pretraining or `cliplab eval` preload the error starts with where the suite is."""
    calls = record_encodes(monkeypatch)
    task, error, message = bad_second_tasks(tmp_path)[case]
    with pytest.raises(error, match=r"^tasks\[1\] \(name 'p'\): " + message):
        run(tiny_model, GOOD, task)
    assert calls == []
    suite = suite_spec([GOOD, task])
    with pytest.raises(error, match=r"^eval.tasks\[1\] \(name 'p'\): " + message):
        TaskContext(progress=False).preload(suite.tasks, "eval.tasks")
    with pytest.raises(error, match=r"^task 'p': " + message):  # one task run on its own
        run_task(tiny_model, task, TaskContext(progress=False))
    assert calls == []


# 2. and 3. zero-shot classes: each once, each with images


def test_zeroshot_refuses_a_class_given_twice(tiny_model, monkeypatch):
    calls = record_encodes(monkeypatch)
    with pytest.raises(ConfigError, match=r"^tasks\[1\] \(name 'six'\): classes name a class "
                                          r"more than once: six, 6, Six are all class 6 "
                                          r"\(six\); give each class once$"):
        run(tiny_model, GOOD, {"name": "six", "task": "zeroshot", "data": DIGITS,
                               "classes": ["six", 6, "Six"]})
    with pytest.raises(ConfigError, match=r"more than once: 1, one are all class 1 \(one\); "
                                          r"two, 2 are all class 2 \(two\);"):
        run(tiny_model, {"name": "zs", "task": "zeroshot", "data": DIGITS,
                         "classes": [1, "one", 3, "two", 2]})
    assert calls == []


def test_one_class_alone_is_refused_by_every_classification_task(tiny_model, monkeypatch):
    """Over one class every image is right, whatever the model (acc1 1.0 from an untrained
    model): a task's ``classes`` of one, or a one-class data set, is refused before encoding."""
    calls = record_encodes(monkeypatch)
    with pytest.raises(ConfigError, match=r"^tasks\[1\] \(name 'one'\): classes: six alone "
                                          r"competes with no other class: every image would "
                                          r"score as right, whatever the model; give two "
                                          r"classes at least$"):
        run(tiny_model, GOOD, {"name": "one", "task": "zeroshot", "data": DIGITS,
                               "classes": ["six"]})
    single = labelled(["circle"], [4])
    for task in ({"task": "zeroshot", "data": single},
                 {"task": "linear_probe", "train": single, "test": labelled(NAMES, [1] * 10)},
                 {"task": "few_shot", "train": single, "test": single, "shots": [1]}):
        key = "data" if task["task"] == "zeroshot" else "train"
        with pytest.raises(ConfigError, match=rf"^tasks\[0\] \(name 'one'\): {key} holds one "
                                              r"class \(circle\): a classifier over it scores "
                                              r"every image as right, whatever the model; give "
                                              r"data of two classes at least$"):
            run(tiny_model, {"name": "one", **task})
    assert calls == []
    out = run(tiny_model, {"name": "two", "task": "zeroshot", "data": labelled(NAMES[:2], [2, 2])})
    assert out["two"]["n"] == 4


def test_zeroshot_refuses_classes_none_of_which_has_images(tiny_model, monkeypatch):
    """``limit: 5``-like data holding no image of any chosen class: one line naming the
    classes, before any encoding (it was `stack expects a non-empty TensorList`); a chosen
    class without images beside ones with images is a distractor, as before."""
    calls = record_encodes(monkeypatch)
    data = labelled(NAMES, [3, 2, 0, 0, 1, 0, 0, 0, 0, 0])
    with pytest.raises(DataError, match=r"^tasks\[1\] \(name 'few'\): classes: data holds no "
                                        r"images of two, three; give data that has them"):
        run(tiny_model, GOOD, {"name": "few", "task": "zeroshot", "data": data,
                               "classes": ["two", 3]})
    assert calls == []
    for classes, scored in ((["one", "four"], 3), (["one", "two", 3], 2)):
        out = run(tiny_model, {"name": "few", "task": "zeroshot", "data": data,
                               "classes": classes})
        assert set(out["few"]) == {"acc1", "acc5", "mean_per_class_recall", "n"}
        assert out["few"]["n"] == scored  # the chosen classes' images (of 6)


# 4. a probe on one training image


def test_standardize_of_one_row_centres_like_sklearn_and_more_rows_are_unchanged():
    g = torch.Generator().manual_seed(0)
    one, test = torch.randn(1, 6, generator=g), torch.randn(4, 6, generator=g)
    got_train, got_test = standardize(one, test)
    scaler = StandardScaler().fit(one.double().numpy())  # zero variance: scale 1
    torch.testing.assert_close(got_train, torch.from_numpy(scaler.transform(one.numpy())).float())
    torch.testing.assert_close(got_test, torch.from_numpy(scaler.transform(test.numpy())).float())
    assert torch.isfinite(got_test).all() and not got_train.any()
    many = torch.randn(5, 6, generator=g)  # the sample std as before, bit for bit
    want = (test - many.mean(0)) / many.std(0).clamp_min(1e-6)
    assert torch.equal(standardize(many, test)[1], want)


def test_a_probe_on_one_image_predicts_its_class():
    """One training image (class 1): centred it is all zeros, so the weights stay zero
    and only the bias learns: every test image is called class 1. Test: 2 of 6 are."""
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(1, 8, generator=g), torch.randn(6, 8, generator=g)
    test_y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = linear_probe(train_x, torch.tensor([1]), test_x, test_y, l2=0.01)
    assert out == {"acc1": pytest.approx(2 / 6), "acc5": 1.0,
                   "mean_per_class_recall": pytest.approx(1 / 3), "l2": 0.01}
    with pytest.raises(ValueError, match="needs 2 samples or more"):
        linear_probe(train_x, torch.tensor([1]), test_x, test_y)  # nothing to validate on
    fs = few_shot(torch.randn(3, 8, generator=g), torch.tensor([1, 1, 1]), test_x, test_y,
                  shots=(1,), seeds=(0, 1), methods=("linear_probe",))
    assert fs["linear_probe_1shot"]["acc1_per_seed"] == [pytest.approx(2 / 6)] * 2


def test_a_linear_probe_task_on_one_image(tiny_model):
    one = labelled(NAMES, [0, 1] + [0] * 8)
    task = {"name": "p", "task": "linear_probe", "features": "embeddings", "train": one,
            "test": DIGITS}
    out = run(tiny_model, {**task, "l2": 0.01})["p"]
    from cliplab.data.digits import load_digits

    assert out["acc1"] == pytest.approx((load_digits("test").labels == 1).float().mean().item())
    assert (out["n_train"], out["n_test"]) == (1, len(load_digits("test")))  # what it is over
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'p'\): l2: omitted, it is chosen "
                                          r"on a validation split of train, which needs 2 "
                                          r"images or more \(train has 1\); give l2$"):
        run(tiny_model, task)


# 5. layers: 1 to the image tower's blocks


@pytest.mark.parametrize("task", ["linear_probe", "few_shot"])
def test_layers_beyond_the_blocks_are_refused(tiny_model, monkeypatch, task):
    calls = record_encodes(monkeypatch)  # tiny_model's image tower has 1 block
    probe = {"name": "p", "task": task, "features": "layers", "l2": 0.01, "train": DIGITS,
             "test": DIGITS}
    if task == "few_shot":
        probe.update(shots=[1], seeds=[0], methods=["ncm"])
        del probe["l2"]  # nearest class means take none
    for layers in (2, 7):
        with pytest.raises(ConfigError, match=rf"^tasks\[1\] \(name 'p'\): layers: {layers}, "
                                              r"but the model's image tower has 1 block; give "
                                              r"1$"):
            run(tiny_model, GOOD, {**probe, "layers": layers})
        with pytest.raises(ConfigError, match=rf"^task 'p': layers: {layers}, but"):
            run_task(tiny_model, {**probe, "layers": layers}, TaskContext(progress=False))
    for layers in (0, -1):  # `[-0:]` took every hidden state
        with pytest.raises(ConfigError, match=r"tasks\[0\] \(name 'p'\).layers: expected "
                                              rf"greater than or equal to 1, got {layers}$"):
            suite_spec([{**probe, "layers": layers}])
    assert calls == []
    run(tiny_model, {**probe, "layers": 1})
    assert calls  # one block: a valid choice
    # on other features layers is unused: refused rather than silently ignored
    with pytest.raises(ConfigError, match=r"layers has no effect unless features is layers"):
        run(tiny_model, {**probe, "name": "q", "features": "embeddings", "layers": 7})


def test_cliplab_eval_names_the_suite_file_for_layers_beyond_the_blocks(tiny_model_dir,
                                                                        tmp_path, capsys,
                                                                        monkeypatch):
    """The model is loaded after the suite's data is checked; its check still names the
    file (the context keeps where its suite came from) and comes before any encoding."""
    calls = record_encodes(monkeypatch)
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, split: test}}\n"
                     "  - {name: p, task: linear_probe, features: layers, layers: 3, l2: 0.01,\n"
                     "     train: {source: digits, split: test}, test: {source: digits, "
                     "split: test}}\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{suite}: tasks[1] (name 'p'): layers: 3, but the model's image tower has 1 block; "
        "give 1")
    assert calls == []


# 7. retrieval ks: below the candidates of each direction


def test_retrieval_refuses_a_k_given_at_or_above_the_candidates(tiny_model, monkeypatch):
    """A ``ks`` that ranks every image for a caption (or every caption for an image) is
    refused."""
    calls = record_encodes(monkeypatch)
    data = {"source": "shapes", "n": 5, "image_size": 32}
    # 5 images, 14 captions
    with pytest.raises(ConfigError, match=r"^tasks\[1\] \(name 'ret'\): ks: 10, 100 ranks all 5 "
                                          r"images a caption is ranked against in data "
                                          r"\(image_retrieval_recall@10 would be 1.0 whatever "
                                          r"the model\); give ks below 5$"):
        run(tiny_model, GOOD, {"name": "ret", "task": "retrieval", "data": data,
                               "ks": [1, 10, 100]})
    assert calls == []
    few = {"source": "shapes", "n": 2, "image_size": 32}
    with pytest.raises(ConfigError, match=r"ks: 10 ranks all 2 images"):
        run(tiny_model, {"name": "ret", "task": "retrieval", "data": few, "ks": [1, 10]})


def test_default_retrieval_ks_leave_out_the_ks_at_or_above_the_images(tiny_model, recwarn):
    """The default ks [1, 5, 10] on 5 images report recall@1 only (recall@5 and @10 would
    rank every image: 1.0 whatever the model), with one warning naming the two left out."""
    data = {"source": "shapes", "n": 5, "image_size": 32}
    out = run(tiny_model, {"name": "ret", "task": "retrieval", "data": data})["ret"]
    assert sorted(out) == ["image_retrieval_recall@1", "n_images", "n_texts",
                           "text_retrieval_recall@1"]
    assert warned(recwarn) == (
        "ret: recall@5, recall@10 not reported (either way): of the default ks [1, 5, 10], "
        "those of 5 or more rank all 5 images of data (image_retrieval_recall@5 would be 1.0 "
        "whatever the model)\n")
    six = {"source": "shapes", "n": 6, "image_size": 32}
    out = run(tiny_model, {"name": "ret", "task": "retrieval", "data": six})["ret"]
    assert [k for k in out if "@" in k] == [f"{d}_retrieval_recall@{k}" for k in (1, 5)
                                           for d in ("image", "text")]
    assert warned(recwarn).startswith("ret: recall@10 not reported (either way): ")
    # over 10 images or more, nothing is left out and nothing is said
    ten = {"source": "shapes", "n": 11, "image_size": 32}
    out = run(tiny_model, {"name": "ret", "task": "retrieval", "data": ten})["ret"]
    assert "image_retrieval_recall@10" in out and warned(recwarn) == ""
    one = {"source": "shapes", "n": 1, "image_size": 32}
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'ret'\): data holds 1 image: "
                                          r"every recall@k would be 1.0 whatever the model; "
                                          r"give data of more images$"):
        run(tiny_model, {"name": "ret", "task": "retrieval", "data": one})


def test_retrieval_accepts_ks_below_the_images_and_refuses_the_images(tiny_model):
    """With 5 images and 14 captions, recall@5 of text-to-image retrieval ranks every image
    (1.0 whatever the model, though image-to-text's is not): refused; ks of 4 runs."""
    data = {"source": "shapes", "n": 5, "image_size": 32}
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'ret'\): ks: 5 ranks all 5 "
                                          r"images .*give ks below 5$"):
        run(tiny_model, {"name": "ret", "task": "retrieval", "data": data, "ks": [1, 5]})
    out = run(tiny_model, {"name": "ret", "task": "retrieval", "data": data, "ks": [4]})
    assert set(out["ret"]) >= {"image_retrieval_recall@4", "text_retrieval_recall@4"}


# 6. --cache-dir


def test_a_corrupt_cache_file_is_deleted_and_encoded_again(tiny_model, tmp_path, capsys,
                                                           monkeypatch):
    calls = record_encodes(monkeypatch)
    images = labelled(NAMES[:2], [2, 3]).images
    first = FeatureCache(tmp_path).features(tiny_model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:40])  # truncated
    capsys.readouterr()
    cache = FeatureCache(tmp_path)
    again = cache.features(tiny_model, images, progress=False)
    assert torch.equal(again.embeddings, first.embeddings) and calls == [5, 5]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"feature cache: {file} cannot be read (")
    assert err[0].endswith("; deleting it and encoding again")
    third = FeatureCache(tmp_path).features(tiny_model, images, progress=False)  # rewritten
    assert torch.equal(third.embeddings, first.embeddings) and calls == [5, 5]
    assert capsys.readouterr().err == ""


def test_a_cache_dir_that_is_a_file_is_refused_before_any_work(tiny_model_dir, tmp_path,
                                                               capsys, monkeypatch):
    calls = record_encodes(monkeypatch)
    file = tmp_path / "features"
    file.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"^feature cache folder {file} is a file; give a "
                                          r"folder \(made if missing\)$"):
        FeatureCache(file)
    with pytest.raises(ConfigError, match=rf"^feature cache folder {file / 'sub'} is inside "
                                          rf"{file}, a file;"):
        FeatureCache(file / "sub")
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, "
                     "split: test}}\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite),
                 "--cache-dir", str(file), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"feature cache folder {file} is a file; "
                                                    "give a folder (made if missing)")
    assert calls == []


def test_pretrain_checks_its_eval_against_the_model_before_training(tmp_path, monkeypatch):
    """`layers` beyond the model's blocks in a pretrain eval suite failed at the first
    evaluation, after training, and the run folder went with it."""
    from pathlib import Path

    import yaml

    from cliplab.train import pretrain

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "pretrain" /
                             "tiny-shapes.yaml").read_text())
    recipe["eval"] = {"tasks": [{"name": "p", "task": "linear_probe", "features": "layers",
                                 "layers": 50, "l2": 0.01, "train": DIGITS, "test": DIGITS}]}
    recipe["out"] = str(tmp_path / "run")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the eval suite")

    monkeypatch.setattr(pretrain.Trainer, "fit", no_training)
    with pytest.raises(ConfigError, match=r"^the pretrain config: eval.tasks\[0\] \(name 'p'\): "
                                          r"layers: 50, but"):
        pretrain.run_pretrain(recipe, progress=False)
    assert not (tmp_path / "run").exists()
