"""The one task interface: a task registered once runs from a suite, from pretraining's
``eval_every`` and as merge's ``heldout``; a classifier can stand in for the zero-shot head."""

import dataclasses
import json
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.metrics import classification_metrics
from cliplab.evaluate.suite import SuiteSpec, run_suite, run_task, suite_spec
from cliplab.evaluate.tasks import (TASKS, DataSpec, LinearHead, TaskContext, TaskSpecBase,
                                    register_task)
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models import DualEncoder, build_model
from cliplab.models.dual_encoder import evaluating
from cliplab.train.pretrain import run_pretrain

TINY = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
            context_length=48)
DIGITS = {"source": "digits", "split": "test"}


class FirstCoordinateSpec(TaskSpecBase):
    """A toy task: the mean of the first embedding coordinate, times ``scale``."""

    task: Literal["first_coordinate"]
    data: DataSpec
    scale: float = 1.0


def first_coordinate(model, spec: FirstCoordinateSpec, context: TaskContext) -> dict:
    data = context.load(spec.data)
    feats = context.image_features(model, data.images, spec.data, "toy")
    return {"value": spec.scale * feats.embeddings[:, 0].mean().item(), "n": len(data.images)}


def expected(model: DualEncoder, scale: float = 1.0) -> float:
    images = load_digits("test").images
    return scale * encode_images(model, images, progress=False).embeddings[:, 0].mean().item()


@pytest.fixture(scope="module", autouse=True)
def toy_task():
    register_task(FirstCoordinateSpec, first_coordinate)  # the one line a new task needs
    yield
    TASKS.pop("first_coordinate")


def test_a_registered_task_runs_from_a_suite(tiny_model):
    out = run_suite(tiny_model, {"tasks": [
        {"name": "toy", "task": "first_coordinate", "data": DIGITS, "scale": 2},
        {"name": "zs", "task": "zeroshot", "data": DIGITS}]}, TaskContext(progress=False))
    assert out["toy"]["value"] == pytest.approx(expected(tiny_model, 2.0), abs=1e-6)
    assert out["toy"]["n"] == 540 and "acc1" in out["zs"]


def test_a_suite_is_validated_whole_before_any_task_runs(tiny_model, monkeypatch):
    ran = []
    monkeypatch.setitem(TASKS, "first_coordinate",
                        TASKS["first_coordinate"].__class__(FirstCoordinateSpec,
                                                            lambda *a: ran.append(1) or {}))
    with pytest.raises(ConfigError) as err:
        run_suite(tiny_model, {"tasks": [
            {"name": "ok", "task": "first_coordinate", "data": DIGITS},
            {"name": "zs", "task": "zeroshot", "dta": DIGITS},
            {"task": "first_coordinate", "data": DIGITS, "scale": "big"}]})
    message = str(err.value)
    assert "\n" not in message and not ran  # one line, and the first task never ran
    assert "tasks[1] (name 'zs').data is required" in message
    assert "unknown key tasks[1] (name 'zs').dta" in message
    assert "tasks[2].scale: expected a valid number" in message


class PairedSpec(TaskSpecBase):
    """A toy task with an optional second dataset (as a plugin may declare one)."""

    task: Literal["paired"]
    data: DataSpec
    extra: DataSpec | None = None


def test_an_optional_data_key_is_a_data_set_of_its_task_when_set():
    """A key typed ``DataSpec | None`` is one of the task's data sets when set (`data_keys`
    is what preloading, the emptiness check and the skip counts read) and none when left
    out."""
    given = PairedSpec(task="paired", data=DIGITS, extra={"source": "digits", "split": "train"})
    assert given.data_keys() == [("data", DIGITS), ("extra", {"source": "digits",
                                                               "split": "train"})]
    assert PairedSpec(task="paired", data=DIGITS).data_keys() == [("data", DIGITS)]


def test_spec_round_trips_through_its_dict(tiny_model):
    suite = suite_spec([{"task": "first_coordinate", "data": DIGITS, "scale": 3}])
    again = SuiteSpec.model_validate(suite.to_dict())
    assert again.tasks[0] == suite.tasks[0] and isinstance(again.tasks[0], FirstCoordinateSpec)
    assert suite.to_dict()["tasks"][0]["scale"] == 3.0


def test_a_registered_task_runs_during_pretraining(tmp_path):
    cfg = {"model": {"name": "tiny-clip", "options": TINY},
           "data": {"train": {"source": "shapes", "n": 64, "kinds": ["single"],
                              "image_size": 32}},
           "train": {"steps": 4, "batch_size": 16, "lr": 3e-3, "warmup": 1, "log_every": 1,
                     "augment": False, "eval_every": 2},
           "eval": {"tasks": [{"name": "toy", "task": "first_coordinate", "data": DIGITS}]},
           "out": str(tmp_path / "run")}
    results = run_pretrain(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines() if "eval/toy/value" in line]
    assert [r["step"] for r in logged] == [2, 4]
    final = DualEncoder.load(results["model_dir"])
    assert results["evals"]["toy"]["value"] == pytest.approx(expected(final), abs=1e-5)
    assert logged[-1]["eval/toy/value"] == results["evals"]["toy"]["value"]
    assert logged[0]["eval/toy/value"] != logged[-1]["eval/toy/value"]  # weights moved


def test_a_registered_task_scores_a_greedy_soup(tmp_path):
    from cliplab.merge.run import run_merge

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(build_model("tiny-clip", **TINY).save(tmp_path / f"m{seed}")))
    heldout = {"task": "first_coordinate", "data": DIGITS, "scale": -1}
    rec = run_merge({"method": "greedy", "models": paths, "heldout": heldout,
                     "metric": "value", "out": str(tmp_path / "soup")}, progress=False)
    for path in paths:
        assert rec["heldout"]["scores"][path] == pytest.approx(
            expected(DualEncoder.load(path), -1.0), abs=1e-5)


def test_a_classifier_stands_in_for_the_zeroshot_head(tiny_model):
    data = load_digits("test")
    head = zeroshot_classifier(tiny_model, data.prompt_names, data.templates)
    spec = {"task": "zeroshot", "data": DIGITS, "per_class": True}
    plain = run_task(tiny_model, spec, TaskContext(progress=False))
    same = run_task(tiny_model, spec, TaskContext(progress=False, classifier=LinearHead(head)))
    assert same["acc1"] == pytest.approx(plain["acc1"], abs=1e-6)
    assert same["per_class_acc1"] == pytest.approx(plain["per_class_acc1"], abs=1e-6)

    rolled = head.roll(1, dims=0)  # class c scored by class c-1's prompts
    emb = encode_images(tiny_model, data.images, progress=False).embeddings
    want = classification_metrics(emb @ rolled.T, data.labels)
    got = run_task(tiny_model, spec, TaskContext(progress=False, classifier=LinearHead(rolled)))
    assert got["acc1"] == pytest.approx(want["acc1"], abs=1e-6)
    assert got["mean_per_class_recall"] == pytest.approx(want["mean_per_class_recall"], abs=1e-6)
    # restricted to three classes: only their columns compete
    sub = run_task(tiny_model, {**spec, "classes": [1, 3, 5]},
                   TaskContext(progress=False, classifier=LinearHead(rolled)))
    keep = torch.isin(data.labels, torch.tensor([1, 3, 5]))
    pred = torch.tensor([1, 3, 5])[(emb[keep] @ rolled[[1, 3, 5]].T).argmax(1)]
    assert sub["acc1"] == pytest.approx((pred == data.labels[keep]).float().mean().item(),
                                        abs=1e-6)
    assert set(sub["per_class_acc1"]) == {data.classnames[c] for c in (1, 3, 5)}
    # a head of other classes is refused (3 rows scored 10-class data, at 15%, without a word)
    with pytest.raises(ConfigError, match="the classifier scores 3 classes, the data 10"):
        run_task(tiny_model, spec, TaskContext(progress=False, classifier=LinearHead(head[:3])))


def test_a_head_of_the_classes_in_another_order_scores_them_in_the_datas_order(tiny_model):
    """A head naming the digits from nine down (its row c is class 9 - c; a head trained on
    a manifest's class order, scored on a folder's sorted one) scores the data with its rows
    put in the data's order: here the text head, reversed and named back. It went unused,
    the text head scoring instead, without a word but a missing ``classifier``."""
    data = load_digits("test")
    text = zeroshot_classifier(tiny_model, data.prompt_names, data.templates)
    head = LinearHead(text.flip(0), data.classnames[::-1], label="reversed")
    reordered = head.in_class_order(data.classnames)
    assert reordered.classnames == data.classnames and torch.equal(reordered.weight, text)
    assert head.in_class_order(data.classnames[::-1]) is head
    got = run_task(tiny_model, {"task": "zeroshot", "data": DIGITS},
                   TaskContext(progress=False, classifier=head))
    emb = encode_images(tiny_model, data.images, progress=False).embeddings
    acc1 = ((emb @ text.T).argmax(1) == data.labels).float().mean().item()
    assert got["acc1"] == pytest.approx(acc1, abs=1e-6) and got["classifier"] == "reversed"
    flipped = ((emb @ text.flip(0).T).argmax(1) == data.labels).float().mean().item()
    assert flipped != pytest.approx(acc1, abs=1e-3)  # rows left in the head's order would show
    # other classes (one renamed) get the text head, and no classifier is named
    other = LinearHead(text.flip(0), ["ten", *data.classnames[::-1][1:]], label="other")
    assert other.in_class_order(data.classnames) is None
    got = run_task(tiny_model, {"task": "zeroshot", "data": DIGITS},
                   TaskContext(progress=False, classifier=other))
    assert got["acc1"] == pytest.approx(acc1, abs=1e-6) and "classifier" not in got


def test_class_logits_fill_the_templates_with_the_descriptions(tiny_model):
    """Without a classifier, `class_logits` (the head of long_tail and multilabel_zeroshot)
    is the zero-shot head of the set's descriptions, not of its bare class names."""
    data = load_digits("test").subset(torch.arange(40))
    data = dataclasses.replace(data, descriptions=[f"a scrawled numeral {c}"
                                                   for c in data.classnames])
    logits, _ = TaskContext(progress=False).class_logits(tiny_model, data, data, "encode")
    emb = encode_images(tiny_model, data.images, progress=False).embeddings
    described = zeroshot_classifier(tiny_model, data.descriptions, data.templates)
    torch.testing.assert_close(logits, emb @ described.T, atol=1e-5, rtol=1e-5)
    named = zeroshot_classifier(tiny_model, data.classnames, data.templates)
    assert not torch.allclose(logits, emb @ named.T, atol=1e-3)


def test_per_class_accuracy_by_hand(tiny_model):
    out = run_task(tiny_model, {"task": "zeroshot", "data": DIGITS, "per_class": True},
                   TaskContext(progress=False))
    data = load_digits("test")
    head = zeroshot_classifier(tiny_model, data.prompt_names, data.templates)
    pred = (encode_images(tiny_model, data.images, progress=False).embeddings @ head.T).argmax(1)
    for c, name in enumerate(data.classnames):
        if (data.labels == c).any():
            assert out["per_class_acc1"][name] == pytest.approx(
                (pred[data.labels == c] == c).float().mean().item(), abs=1e-6)


def test_encoded_backbone_is_the_tower_output_and_embeddings_unit_length(tiny_model):
    images = torch.randint(0, 256, (5, 16, 16, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    feats = encode_images(tiny_model, images, progress=False)
    with torch.no_grad(), evaluating(tiny_model):
        pooled = tiny_model.image_backbone(tiny_model.preprocess(images))
        projected = tiny_model.project_image(pooled)
    # the tower is 32 wide, the embedding 16: the backbone features are the tower's
    assert feats.backbone.shape == (5, 32) and feats.embeddings.shape == (5, 16)
    assert torch.allclose(feats.backbone, pooled, atol=1e-5)
    assert torch.allclose(feats.embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(feats.embeddings, F.normalize(projected, dim=-1), atol=1e-5)
    assert not torch.allclose(projected.norm(dim=1), torch.ones(5), atol=1e-2)  # not by luck


def test_class_templates_as_template_files_write_them_name_the_class(tiny_model):
    """``{c}`` (CLIP_benchmark's template files) was left in: every class got the same prompt
    and the zero-shot head was at chance, without a word, from Python (a source's templates:
    option rewrote it). A template that names no class, or names it twice, is refused."""
    from cliplab.data.types import LabelledImages
    from cliplab.errors import InputError

    names = ["cat", "dog", "car"]
    braces = zeroshot_classifier(tiny_model, names, ["a photo of a {c}.", "a {c}"])
    assert torch.equal(braces, zeroshot_classifier(tiny_model, names, ["a photo of a {}.",
                                                                       "a {}"]))
    assert not torch.equal(braces[0], braces[1])
    with pytest.raises(InputError, match="no template has a '{}' where the class goes"):
        zeroshot_classifier(tiny_model, names, ["a photo"])
    with pytest.raises(InputError, match=r"template 'a \{\} or a \{\}' has another format"):
        zeroshot_classifier(tiny_model, names, ["a {} or a {}"])
    # in memory: a set's own templates, its labels a list and its images a NumPy array
    images = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
    data = LabelledImages(images.numpy(), [0, 1, 2, 0, 1, 2], names, "a photo of a {c}.")
    assert data.templates == ["a photo of a {}."] and data.labels.dtype == torch.int64
    assert torch.equal(data.images, images)
    with pytest.raises(InputError, match=r"^labels must be whole class indices"):
        LabelledImages(images, [0.5] * 6, names, ["{}"])
    with pytest.raises(InputError, match=r"^images must be a uint8 tensor .* not list"):
        LabelledImages([images[0]], [0], names, ["{}"])
    with pytest.raises(InputError, match=r"^no templates"):
        LabelledImages(images, [0] * 6, names, None)
