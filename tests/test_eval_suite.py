"""`cliplab eval`: a suite of tasks on a saved model gives the numbers the Python API gives."""

import dataclasses
import json

import pytest
import torch

from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.zeroshot import zeroshot_classifier
from tests.stamped import assert_stamped, now


def test_eval_cli_matches_hand_computed_zeroshot(tmp_path, tiny_model, capsys):
    tiny_model.save(tmp_path / "model")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks:\n"
        "  - {name: zs, task: zeroshot, data: {source: digits, split: test}}\n"
        "  - {name: zs-odd, task: zeroshot, data: {source: digits, split: test}, "
        "classes: [one, three, five]}\n"
        "  - {name: probe, task: linear_probe, train: {source: digits, split: train}, "
        "test: {source: digits, split: test}, features: backbone, l2: 0.001}\n")
    assert main(["eval", "--model", str(tmp_path / "model"), "--config", str(suite), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["precision"] == "fp32"  # the report tells fp32 and bf16 runs apart by it
    assert written["overrides"] == []
    results = written["results"]

    test = load_digits("test")
    feats = encode_images(tiny_model.eval(), test.images, progress=False)
    head = zeroshot_classifier(tiny_model, test.prompt_names, test.templates)
    logits = feats.embeddings @ head.T
    acc1 = (logits.argmax(1) == test.labels).float().mean().item()
    assert results["zs"]["acc1"] == pytest.approx(acc1, abs=1e-6)
    keep = torch.isin(test.labels, torch.tensor([1, 3, 5]))
    sub = torch.tensor([1, 3, 5])[logits[keep][:, [1, 3, 5]].argmax(1)]
    assert results["zs-odd"]["acc1"] == pytest.approx(
        (sub == test.labels[keep]).float().mean().item(), abs=1e-6)
    # even a random tiny model's backbone features separate 8x8 digits well above chance
    assert results["probe"]["acc1"] > 0.5
    assert set(results["zs"]) >= {"acc1", "acc5", "mean_per_class_recall"}


def test_suite_errors_name_the_task():
    with pytest.raises(ConfigError, match=r"tasks\[0\].task: unknown task 'captioning'"):
        run_suite(None, {"tasks": [{"task": "captioning"}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\].data is required"):
        run_suite(None, {"tasks": [{"task": "retrieval"}]})
    with pytest.raises(ConfigError, match=r"unknown key tasks\[0\] \(name 'a'\).datta \(valid: "
                                          r"classes, data, name, per_class, task\)"):
        run_suite(None, {"tasks": [{"name": "a", "task": "zeroshot", "datta": {}}]})
    with pytest.raises(ConfigError, match=r"unknown key tasks\[0\] \(name 'r'\).k \(valid: data, "
                                          r"ks, name, task\)"):
        run_suite(None, {"tasks": [{"name": "r", "task": "retrieval", "k": [1], "data": {}}]})
    with pytest.raises(ConfigError, match="tasks: needs a non-empty list"):
        run_suite(None, {"tasks": []})


def test_suite_runs_retrieval_on_shapes(tiny_model):
    """recall@k of the task for every k asked, and recall@1 / @2 as ranked by hand from the
    model's own embeddings of the same rendered scenes: the rank of each caption's image among
    the images, and of each image's best caption among all captions."""
    from cliplab.data.shapes import load_shapes

    out = run_suite(tiny_model, {"tasks": [
        {"name": "ret", "task": "retrieval", "data": {"source": "shapes", "n": 12,
                                                      "image_size": 32}, "ks": [1, 2, 11]}]},
        TaskContext(progress=False))["ret"]
    assert set(out) == {f"{way}_retrieval_recall@{k}" for way in ("image", "text")
                        for k in (1, 2, 11)} | {"n_images", "n_texts"}
    pairs = load_shapes(n=12, image_size=32)
    texts = [c for caps in pairs.captions for c in caps]
    assert (out["n_images"], out["n_texts"]) == (12, len(texts))  # the candidates ranked
    owner = torch.tensor([i for i, caps in enumerate(pairs.captions) for _ in caps])
    images = encode_images(tiny_model.eval(), pairs.images, progress=False).embeddings
    sims = tiny_model.encode_texts(texts).float() @ images.T  # [captions, 12 images]
    image_rank = (sims > sims[torch.arange(len(texts)), owner][:, None]).sum(1) + 1
    text_rank = torch.stack([(sims[:, i] > sims[owner == i, i].max()).sum() + 1
                             for i in range(12)])
    for k in (1, 2, 11):
        assert out[f"image_retrieval_recall@{k}"] == pytest.approx(
            (image_rank <= k).float().mean().item(), abs=1e-6), k
        assert out[f"text_retrieval_recall@{k}"] == pytest.approx(
            (text_rank <= k).float().mean().item(), abs=1e-6), k


def test_a_model_spec_is_loaded_like_a_model_argument(tiny_model, tmp_path):
    """run_suite / run_task take a model folder (any model spec) as the CLI does (a path
    string failed deep inside the feature cache)."""
    from cliplab.evaluate.suite import run_task

    folder = tiny_model.save(tmp_path / "m")
    task = {"task": "zeroshot", "name": "zs", "data": {"source": "digits", "split": "test"}}
    want = run_task(tiny_model, task, TaskContext(progress=False))
    assert run_task(str(folder), task, TaskContext(progress=False)) == want
    assert run_suite(folder, [task], TaskContext(progress=False)) == {"zs": want}


def test_suite_encodes_each_dataset_once(tiny_model, monkeypatch):
    from cliplab.evaluate import feature_cache as fc
    from cliplab.evaluate.feature_cache import FeatureCache

    calls = []
    real = fc.encode_images
    monkeypatch.setattr(fc, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = FeatureCache()
    run_suite(tiny_model, {"tasks": [
        {"name": "probe", "task": "linear_probe", "train": {"source": "digits", "split": "train"},
         "test": {"source": "digits", "split": "test"}, "l2": 0.01},
        {"name": "zs", "task": "zeroshot", "data": {"source": "digits", "split": "test"}},
        {"name": "zs-odd", "task": "zeroshot", "data": {"source": "digits", "split": "test"},
         "classes": [1, 3]}]}, TaskContext(cache, progress=False))
    assert len(calls) == 2  # digits train once, digits test once for all three tasks
    assert cache.hits == 2


def _spy_loads(monkeypatch) -> list:
    """The data specs `TaskContext.load` reads from their source, in order."""
    from cliplab.evaluate.tasks import base

    loads, real = [], base.load_source
    monkeypatch.setattr(base, "load_source",
                        lambda spec, *a, **k: loads.append(dict(spec)) or real(spec, *a, **k))
    return loads


def test_a_dataset_two_tasks_share_is_read_once(tiny_model, monkeypatch):
    """Two tasks on one data spec: the set is read from its source once per context (checks
    and runs included), not once per task or per use."""
    loads = _spy_loads(monkeypatch)
    run_suite(tiny_model, {"tasks": [
        {"name": "zs", "task": "zeroshot", "data": {"source": "digits", "split": "test"}},
        {"name": "zs-odd", "task": "zeroshot", "data": {"source": "digits", "split": "test"},
         "classes": [1, 3]}]}, TaskContext(progress=False))
    assert loads == [{"source": "digits", "split": "test"}]


def test_a_spec_with_its_keys_in_another_order_is_the_same_dataset(tiny_model, monkeypatch):
    """A data spec's key ignores the order of its keys: a zeroshot task on ``{split, source}``
    and a token probe on ``{source, split}`` (train and test alike) read digits test once and
    encode it once, with the tokens the probe plans for it."""
    from cliplab.evaluate import feature_cache as fc

    loads, encodes, real = _spy_loads(monkeypatch), [], fc.encode_images
    monkeypatch.setattr(fc, "encode_images",
                        lambda *a, **k: encodes.append(k.get("probe")) or real(*a, **k))
    test = {"source": "digits", "split": "test"}
    run_suite(tiny_model, {"tasks": [
        {"name": "zs", "task": "zeroshot", "data": {"split": "test", "source": "digits"}},
        {"name": "probe", "task": "linear_probe", "train": test, "test": test,
         "features": "tokens", "l2": 0.01}]}, TaskContext(progress=False))
    assert len(loads) == 1 and loads[0] == test
    assert encodes == ["tokens"]


def test_the_probe_plan_encodes_the_layers_the_probe_asks_for(monkeypatch):
    """A zeroshot task reading a set first encodes it with the probe features planned for it,
    ``layers: 2`` included (not the default 4): each set is encoded once, with 2 blocks."""
    from cliplab.evaluate import feature_cache as fc
    from cliplab.models import build_model

    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=2, heads=2,
                        embed_dim=16, context_length=32)
    calls, real = [], fc.encode_images
    monkeypatch.setattr(fc, "encode_images", lambda *a, **k: calls.append(
        (k.get("probe"), k.get("probe_layers"))) or real(*a, **k))
    test = {"source": "digits", "split": "test"}
    out = run_suite(model, {"tasks": [
        {"name": "zs", "task": "zeroshot", "data": test},
        {"name": "probe", "task": "linear_probe", "train": {"source": "digits", "split": "train"},
         "test": test, "features": "layers", "layers": 2, "l2": 0.01}]},
        TaskContext(progress=False))
    assert calls == [("layers", 2), ("layers", 2)]  # test (for zs, then the probe), train
    assert "acc1" in out["probe"]


def test_images_are_encoded_at_the_suites_precision(monkeypatch, tiny_model):
    """The suite's ``precision`` reaches the image encoder (as it reaches the captions'), and
    a bf16 run does not reuse fp32 features."""
    from cliplab.data.digits import load_digits
    from cliplab.evaluate import feature_cache as fc
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.models import precision

    asked, real = [], fc.encode_images
    monkeypatch.setattr(fc, "encode_images",
                        lambda *a, **k: asked.append(k.get("precision")) or real(*a, **k))
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    data = load_digits("test").subset(torch.arange(20))
    context = TaskContext(FeatureCache(), progress=False)  # one cache for both runs
    for level in ("bf16", "fp32"):
        run_suite(tiny_model, {"precision": level, "tasks": [
            {"task": "zeroshot", "data": data}]}, context)
    assert asked == ["bf16", "fp32"]


def test_suite_few_shot_task(tiny_model):
    out = run_suite(tiny_model, {"tasks": [
        {"name": "fs", "task": "few_shot", "train": {"source": "digits", "split": "train"},
         "test": {"source": "digits", "split": "test"}, "shots": [1, 4], "seeds": [0, 1],
         "methods": ["ncm"]}]}, TaskContext(progress=False))
    # with the number of test images every accuracy is over (digits' test split: 540)
    assert set(out["fs"]) == {"ncm_1shot", "ncm_4shot", "n"} and out["fs"]["n"] == 540
    assert len(out["fs"]["ncm_4shot"]["acc1_per_seed"]) == 2
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(name 'bad'\).methods.0: .*'knn'"):
        run_suite(tiny_model, {"tasks": [
            {"name": "bad", "task": "few_shot", "train": {"source": "digits", "split": "train"},
             "test": {"source": "digits", "split": "test"}, "methods": ["knn"]}]},
                 TaskContext(progress=False))


def test_suite_compositional_task(tiny_model):
    """The task renders `shapes` relation scenes (its data options and seed passed on) and
    scores each negative kind as computed by hand from the model's own embeddings: image ·
    caption against image · negative, ties one half."""
    import random

    from cliplab.data.shapes import load_shapes_with_scenes
    from cliplab.evaluate.compositional import relation_negatives

    out = run_suite(tiny_model, {"tasks": [
        {"name": "comp", "task": "compositional", "seed": 5,
         "data": {"source": "shapes", "n": 12, "image_size": 32}}]}, TaskContext(progress=False))
    assert out["comp"]["n"] == 12
    pairs, scenes = load_shapes_with_scenes(n=12, image_size=32, kinds=["relation"])
    image_emb = encode_images(tiny_model.eval(), pairs.images, progress=False).embeddings
    rng = random.Random(5)
    built = [relation_negatives(s, rng) for s in scenes]
    s_true = (image_emb * tiny_model.encode_texts([t for t, _ in built]).float()).sum(-1)
    for kind in ("attribute_swap", "relation_swap", "word_shuffle"):
        neg = tiny_model.encode_texts([negs[kind] for _, negs in built]).float()
        s_neg = (image_emb * neg).sum(-1)
        want = ((s_true > s_neg).float() + 0.5 * (s_true == s_neg).float()).mean().item()
        assert out["comp"][f"{kind}_acc"] == pytest.approx(want, abs=1e-6), kind
    with pytest.raises(ConfigError, match="exact only on `shapes`"):
        run_suite(tiny_model, {"tasks": [{"name": "c", "task": "compositional",
                                          "data": {"source": "digits"}}]},
                                              TaskContext(progress=False))


def test_suite_encodes_probe_features_in_the_first_pass(tiny_model, monkeypatch):
    from cliplab.evaluate import feature_cache as fc
    from cliplab.evaluate.feature_cache import FeatureCache

    calls = []
    real = fc.encode_images
    monkeypatch.setattr(fc, "encode_images",
                        lambda *a, **k: calls.append(k.get("probe")) or real(*a, **k))
    test = {"source": "digits", "split": "test"}
    out = run_suite(tiny_model, {"tasks": [
        {"name": "zs", "task": "zeroshot", "data": test},   # runs first, needs no tokens...
        {"name": "probe", "task": "linear_probe", "train": {"source": "digits", "split": "train"},
         "test": test, "features": "tokens"}]}, TaskContext(FeatureCache(), progress=False))
    assert calls == ["tokens", "tokens"]  # ...but encodes them for the probe: one pass each
    assert out["probe"]["l2"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # chosen on val


def test_suite_precision_is_checked():
    with pytest.raises(ConfigError, match="precision: expected 'fp32', 'bf16' or 'auto', "
                       "got 'fp8'"):
        run_suite(None, {"precision": "fp8", "tasks": [{"task": "zeroshot"}]})


def test_suite_precision_is_resolved_as_trainings(monkeypatch, tiny_model):
    """A suite took fp32|bf16 only, and bf16 on a CPU that emulates it (~40x slower) gave no
    word; it now reads precision as train.precision does: auto, and the warning."""
    from cliplab.evaluate import suite as suite_module
    from cliplab.models import precision

    ran = []
    monkeypatch.setitem(suite_module.TASKS, "zeroshot", dataclasses.replace(
        suite_module.TASKS["zeroshot"], run=lambda model, task, ctx: ran.append(ctx.precision)
        or {}))
    data = {"source": "digits", "split": "test"}
    monkeypatch.setattr(precision, "_WARNED", set())
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(precision, "bf16_is_native", lambda device, n=native: n)
        run_suite(tiny_model, {"precision": "auto", "tasks": [{"task": "zeroshot",
                                                                "data": data}]})
        assert ran[-1] == expected
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    with pytest.warns(UserWarning, match="bf16 is emulated and much slower"):
        run_suite(tiny_model, {"precision": "bf16", "tasks": [{"task": "zeroshot", "data": data}]})
    assert ran[-1] == "bf16"


def test_a_contexts_precision_holds_where_the_suite_says_none(monkeypatch, tiny_model):
    """`run_suite` replaced a TaskContext's bf16 by the suite's default fp32 (while `run_task`
    honoured it), and `run_task` raised on a context's auto."""
    from cliplab.evaluate import suite as suite_module
    from cliplab.evaluate.suite import run_task
    from cliplab.models import precision

    ran = []
    monkeypatch.setitem(suite_module.TASKS, "zeroshot", dataclasses.replace(
        suite_module.TASKS["zeroshot"], run=lambda model, task, ctx: ran.append(ctx.precision)
        or {}))
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    task = {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}
    run_suite(tiny_model, {"tasks": [task]}, TaskContext(progress=False, precision="bf16"))
    run_suite(tiny_model, {"tasks": [task], "precision": "fp32"},
              TaskContext(progress=False, precision="bf16"))  # the suite's own key wins
    run_suite(tiny_model, {"tasks": [task]})  # neither: fp32
    run_task(tiny_model, task, TaskContext(progress=False, precision="auto"))
    assert ran == ["bf16", "fp32", "fp32", "bf16"]


def test_retrieval_encodes_its_captions_at_the_suites_precision(monkeypatch, tiny_model):
    from cliplab.evaluate.tasks import retrieval as task
    from cliplab.models import precision

    asked, real = [], task.retrieval
    monkeypatch.setattr(task, "retrieval", lambda *a, **kw: asked.append(kw["precision"]) or
                        real(*a, **kw))
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    for level in ("bf16", "fp32"):
        run_suite(tiny_model, {"precision": level, "tasks": [
            {"task": "retrieval", "data": {"source": "shapes", "n": 12, "image_size": 32}}]},
            TaskContext(progress=False))
    assert asked == ["bf16", "fp32"]


def test_eval_out_is_a_folder_and_suite_errors_name_the_file(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits}}\n"
                     "  - {name: r, task: retrieval, dat: {source: digits}}\n")
    (tmp_path / "taken.json").write_text("{}")
    good = tmp_path / "good.yaml"  # the suite is read first: its data folders are inputs too
    good.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits}}\n")
    for out in ("taken.json", "new.json"):
        assert main(["eval", "--model", "tiny-clip", "--config", str(good),
                     "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "; choose a folder" in err
    assert main(["eval", "--model", "tiny-clip", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cliplab: error: {suite}: tasks[1] (name 'r').data is required; "
                   "unknown key tasks[1] (name 'r').dat (valid: data, ks, name, task)")


def test_a_tasks_error_says_when_the_command_line_set_its_key(tmp_path, capsys):
    """A task's errors carry its label (``tasks[0] (name 'zs')``); they are matched with the
    overrides by key path all the same."""
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits}}\n")
    assert main(["eval", "--config", str(suite), "--model", "tiny-clip", "tasks.0.name=123"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cliplab: error: {suite} + command line: tasks[0] (name 123).name: expected a valid "
        "string, got 123")
    assert main(["eval", "--config", str(suite), "--model", "tiny-clip", "precision=bf16",
                 "tasks.0.clases=1"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"cliplab: error: {suite} + command line: unknown key tasks[0] (name 'zs').clases")
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits}, k: 1}\n")
    assert main(["eval", "--config", str(suite), "--model", "tiny-clip", "precision=bf16"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"cliplab: error: {suite}: unknown key tasks[0] (name 'zs').k (valid: ")


def test_eval_cli_shows_cliplab_warnings_on_one_line(monkeypatch, tmp_path, capsys):
    """Python's form (`/path/suite.py:181: UserWarning: ...` and a source line) is for
    developers; `cliplab eval` says `cliplab: warning: ...` and records the precision run."""
    from cliplab.models import precision

    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(precision, "_WARNED", set())
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--suite", str(suite), "--model", "tiny-clip", "--no-progress",
                 "--out", str(tmp_path / "ev"), "precision=bf16"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "cliplab: warning: precision bf16 on cpu: this device has no native bf16 units, so " \
        "bf16 is emulated and much slower than fp32; use precision auto or fp32" in err
    assert not any("UserWarning" in line for line in err)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["precision"] == "bf16"
    assert main(["eval", "--suite", str(suite), "--model", "tiny-clip", "--no-progress",
                 "--out", str(tmp_path / "ev2"), "precision=auto"]) == 0
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["precision"] == "fp32"


def test_eval_results_record_the_overrides_of_their_suite(tmp_path, capsys):
    """The suite file alone said n: 64 while 32 images were scored."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: shapes, n: 64, "
                     "attribute: color, image_size: 32}}\n")
    assert main(["eval", "--model", "tiny-clip", "--config", str(suite), "--out",
                 str(tmp_path / "out"), "--no-progress", "tasks.0.data.n=32"]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["suite"] == str(suite) and written["overrides"] == ["tasks.0.data.n=32"]
    # and the whole suite that ran, which the file (edited later) may no longer say
    suite.write_text("tasks: []\n")
    (task,) = written["suite_ran"]["tasks"]
    assert task["name"] == "zs" and task["data"] == {"source": "shapes", "n": 32,
                                                     "attribute": "color", "image_size": 32}


def test_eval_results_record_the_embedding_identity_and_cliplab_version(tmp_path, capsys):
    """A model folder whose cliplab.json preprocessing changed in place keeps its weights'
    fingerprint but embeds otherwise: the results record the towers' identity (the feature
    cache's key) beside it, and the cliplab version that ran."""
    import cliplab
    from cliplab.evaluate.report_inputs import read_input
    from cliplab.models import build_model
    from cliplab.models.fingerprints import embedding_identity, image_tower_fingerprint
    from cliplab.models.resolve import load_model

    folder = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                         embed_dim=16, context_length=32).save(tmp_path / "model")
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [{name: zs, task: zeroshot, data: {source: shapes, n: 20, "
                     "attribute: color, image_size: 32}}]\n")

    def evaluate(out: str) -> dict:
        assert main(["eval", "--model", str(folder), "--config", str(suite), "--out",
                     str(tmp_path / out), "--no-progress"]) == 0
        capsys.readouterr()
        return json.loads((tmp_path / out / "results.json").read_text())

    before = evaluate("before")
    config = json.loads((folder / "cliplab.json").read_text())
    config["preprocess"]["mean"] = [0.4, 0.4, 0.4]
    (folder / "cliplab.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.4, 0.4, 0.4]  # agreeing, as a user edits both
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    started = now()
    after = evaluate("after")
    assert_stamped(after, started, now())  # also when it was scored
    model = load_model(str(folder))
    assert after["fingerprint"] == before["fingerprint"]  # the same weights
    assert after["embedding_identity"] == embedding_identity(model) != \
        before["embedding_identity"]
    image, text = after["embedding_identity"]["image"], after["embedding_identity"]["text"]
    assert image["fingerprint"] == image_tower_fingerprint(model) != \
        before["embedding_identity"]["image"]["fingerprint"]
    assert image["preprocess"]["mean"] == [0.4, 0.4, 0.4]
    assert before["embedding_identity"]["image"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert text == before["embedding_identity"]["text"]  # the text tower embeds as before
    assert after["cliplab_version"] == cliplab.__version__
    assert {"model", "model_folder", "fingerprint", "suite", "overrides", "suite_ran",
            "precision", "head", "results"} <= set(after)
    # settings, not scores: no section of a report
    source = read_input(tmp_path / "after" / "results.json")
    assert "embedding_identity" not in source.sections
    # the report names which cliplab wrote each input, and when
    assert source.provenance == f"cliplab {cliplab.__version__}, created {after['created']}"


def test_eval_results_name_the_checkpoint_and_weights_a_run_folder_resolved_to(tmp_path, capsys):
    """`--model RUN` loads the run's newest checkpoint, which moves on as the run trains: the
    results record that checkpoint's folder and its weights' fingerprint."""
    from cliplab.models import build_model
    from cliplab.models.folder import model_fingerprint

    options = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
                   context_length=32)
    run = tmp_path / "run"
    models = {}
    for step in (1, 2):
        models[step] = build_model("tiny-clip", **options)
        with torch.no_grad():  # presets build the same weights: make the steps differ
            models[step].model.logit_scale.add_(step)
        models[step].save(run / "checkpoints" / f"step-{step}" / "model")
    assert model_fingerprint(models[1]) != model_fingerprint(models[2])
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--model", str(run), "--config", str(suite), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["model"] == str(run)
    assert written["model_folder"] == str((run / "checkpoints" / "step-2" / "model").resolve())
    assert written["fingerprint"] == model_fingerprint(models[2])
    assert main(["eval", "--model", "tiny-clip", "--config", str(suite), "--out",
                 str(tmp_path / "preset"), "--no-progress"]) == 0
    preset = json.loads((tmp_path / "preset" / "results.json").read_text())
    assert preset["model_folder"] is None and len(preset["fingerprint"]) == 32
