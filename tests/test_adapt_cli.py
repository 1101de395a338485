"""`cliplab adapt` end to end on a tiny model and the digits, its files and its one-line errors
(the papers' qualitative results are in test_adapt_papers.py)."""

import json
import re
import pytest
import torch

from cliplab.adapt import load_adapter
from cliplab.adapt.finetune import load_finetuned
from cliplab.adapt.run import few_shot_split
from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.few_shot import sample_k_shot
from cliplab.evaluate.features import encode_images
from cliplab.models import build_model
from cliplab.models.folder import model_fingerprint
from cliplab.models.resolve import load_model
from tests.image_folders import pets_folder
from tests.stamped import assert_stamped, now
from tests.warned import warned


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "model"
    build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                embed_dim=16, context_length=48).save(folder)
    return folder


def test_adapt_cli_writes_adapter_and_results(model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: clip-adapter\ndata:\n  train: {source: digits, split: train}\n"
                   "  test: {source: digits, split: test}\nshots: 2\nseed: 3\n"
                   "options: {epochs: 2}\n")
    out = tmp_path / "run"
    started = now()
    code = main(["adapt", "--config", str(cfg), "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "options.n_ctx=2", "options.init=", "method=coop"])
    finished = now()
    assert code == 0  # the key=value override beats the file
    assert "coop" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert_stamped(results, started, finished)  # which cliplab adapted it, and when
    assert results["method"] == "coop" and results["train_size"] == 20
    assert results["options"]["n_ctx_used"] == 2  # the override reached the method
    assert set(results["test"]) == {"acc1", "acc5", "mean_per_class_recall", "n"}
    assert "zeroshot" in results
    assert {p.name for p in out.iterdir()} >= {"adapter.safetensors", "adapter.json",
                                               "config.yaml", "results.json"}
    meta = json.loads((out / "adapter.json").read_text())  # what the adapter learned from
    assert_stamped(meta, started, finished)
    assert (meta["shots"], meta["seed"], meta["train_size"]) == (2, 3, 20)
    model = load_model(model_dir)
    assert results["model_folder"] == str(model_dir.resolve())  # the base, by folder and weights
    assert results["fingerprint"] == meta["fingerprint"] == model_fingerprint(model)
    # the saved adapter reproduces the reported accuracy
    test = load_digits("test")
    acc = (load_adapter(out, model).logits(test.images).argmax(1) == test.labels).float().mean()
    assert acc.item() == pytest.approx(results["test"]["acc1"])


def test_few_shot_split_is_disjoint_and_seeded():
    data = load_digits("train")
    train, val = few_shot_split(data, 4, 2, seed=7)
    assert len(train) == 40 and len(val) == 20
    assert torch.bincount(train.labels).tolist() == [4] * 10
    again, _ = few_shot_split(data, 4, 2, seed=7)
    assert torch.equal(again.images, train.images)
    other, _ = few_shot_split(data, 4, 2, seed=8)
    assert not torch.equal(other.images, train.images)
    train_rows = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in val.images)
    # all samples (shots=0) with a validation split: validation first, training the rest
    rest, val = few_shot_split(data, 0, 3, seed=7)
    assert torch.bincount(val.labels).tolist() == [3] * 10 and len(rest) == len(data) - 30
    rest_rows = {bytes(x.numpy()) for x in rest.images}
    assert not any(bytes(x.numpy()) in rest_rows for x in val.images)


def test_data_val_of_the_training_data_passes_over_the_shots(recwarn):
    """data.val: data.train's spec drew validation images among the training shots (18 of
    160 at 16 shots); now it is drawn as val_shots from data.train are, apart from them. A
    data.val reading the same files under other options, or all of a shots=0 training set,
    is told."""
    from cliplab.adapt import get_method
    from cliplab.adapt.run import checked_config, draw_sets

    spec = {"source": "digits", "split": "train"}
    cfg = {"method": "tip-adapter", "model": "tiny-clip", "shots": 16, "val_shots": 16,
           "seed": 1, "data": {"train": spec, "test": {"source": "digits", "split": "test"},
                               "val": dict(spec)}, "options": {"search": True}}

    def drawn(config):
        checked, options = checked_config(config)
        return draw_sets(checked, get_method("tip-adapter"), options, False, None)

    train, val, _, _ = drawn(cfg)
    want_train, want_val = few_shot_split(load_digits("train"), 16, 16, seed=1)
    assert torch.equal(train.images, want_train.images)
    assert torch.equal(val.images, want_val.images) and len(val) == 160
    # val_shots=0: all of it but the shots
    _, rest, _, _ = drawn({**cfg, "val_shots": 0})
    assert len(rest) == len(load_digits("train")) - 160
    assert warned(recwarn) == ""
    drawn({**cfg, "data": {**cfg["data"], "val": {**spec, "shift": "noise:0.1"}}})
    assert warned(recwarn) == (
        "adapt: data.val reads the same data as data.train (digits train): its validation "
        "draw may hold training shots; leave data.val out to draw val_shots apart from the "
        "shots, or give it other images\n")
    drawn({**cfg, "shots": 0})
    assert "every validation image is a training image" in warned(recwarn)


def test_a_train_size_above_the_drawn_set_is_told(model_dir, recwarn):
    """train_size above the images drawn did nothing, without a word (the shipped configs'
    6000 on digits' 1257); now one line says all of them are used."""
    from cliplab.adapt.run import run_adapt

    cfg = {"method": "zeroshot", "shots": 4, "seed": 1, "compare_zeroshot": False,
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"}}}
    res = run_adapt({**cfg, "train_size": 1000}, model=load_model(model_dir), progress=False,
                    write=False)
    assert res["train_size"] == 40
    assert warned(recwarn) == ("adapt: train_size=1000 is more than the 40 training images "
                               "drawn, so all 40 are used\n")
    run_adapt({**cfg, "train_size": 40}, model=load_model(model_dir), progress=False,
              write=False)
    assert warned(recwarn) == ""


ORACLE = ("adapt: data.val is data.test, so what is chosen on validation is chosen on the "
          "reported test set and its numbers are optimistic; give data.val other images\n")


def test_a_separate_validation_set_is_what_the_search_sees(model_dir, recwarn):
    """``data.val``: the search's validation split comes from that set (``val_shots`` per
    class of it), never from the shots' pool."""
    from cliplab.adapt.run import run_adapt

    cfg = {"method": "tip-adapter", "shots": 2, "val_shots": 3, "seed": 1,
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"},
                    "val": {"source": "digits", "split": "test"}},
           "options": {"search": True, "search_steps": [3, 2]}}
    res = run_adapt(cfg, model=load_model(model_dir), progress=False, write=False)
    assert res["train_size"] == 20 and res["val_size"] == 30
    test = load_digits("test")
    val = test.subset(sample_k_shot(test.labels, 3, 2))  # val_shots per class, seed + 1
    adapter = res["adapter"]
    # the chosen pair's recorded validation accuracy is its accuracy on those 30 test images
    acc = (adapter.logits(val.images).argmax(1) == val.labels).float().mean().item()
    assert adapter.options["val_acc1"] == pytest.approx(acc)
    # all of data.val with val_shots 0
    res = run_adapt({**cfg, "val_shots": 0}, model=load_model(model_dir), progress=False,
                    write=False)
    assert res["val_size"] == len(test)
    # a method that chooses nothing on it is told so (with shots=0 the split also cost training)
    for method, options, told in (
            ("tip-adapter", {}, " (val_shots=3) go unused\n"),
            ("linear-probe", {}, " (val_shots=3) go unused\n")):
        warned(recwarn)
        run_adapt({**cfg, "method": method, "options": options, "data": {
            k: v for k, v in cfg["data"].items() if k != "val"}},
            model=load_model(model_dir), progress=False, write=False)
        assert warned(recwarn) == (f"adapt: {method} chooses nothing on a validation split "
                                   f"with these options, so its 30 images{told}")
    res = run_adapt({**cfg, "method": "linear-probe", "options": {}, "shots": 0},
                    model=load_model(model_dir), progress=False, write=False)
    assert warned(recwarn) == ORACLE + (
        "adapt: linear-probe chooses nothing on a validation split with these "
        f"options, so its {res['val_size']} images (data.val) go unused\n")
    res = run_adapt({**cfg, "method": "linear-probe", "options": {}, "shots": 0, "data": {
        k: v for k, v in cfg["data"].items() if k != "val"}},
        model=load_model(model_dir), progress=False, write=False)
    assert warned(recwarn) == (
        "adapt: linear-probe chooses nothing on a validation split with these "
        "options, so its 30 images (val_shots=3) go unused, and are not trained on either; "
        "set val_shots=0\n") and res["train_size"] == len(load_digits("train")) - 30
    run_adapt(cfg, model=load_model(model_dir), progress=False, write=False)  # it searches
    assert warned(recwarn) == ORACLE  # data.val here is data.test's spec
    # linear-probe's l2: auto chooses on the split (it was told "chooses nothing" and chose
    # on 20% of the training shots)
    res = run_adapt({**cfg, "method": "linear-probe", "options": {"l2": "auto"}},
                    model=load_model(model_dir), progress=False, write=False)
    assert warned(recwarn) == ORACLE and res["options"]["l2_chosen_on"] == (
        "validation, which is data.test (the reported set, so its numbers are optimistic)")
    assert 0 <= res["options"]["val_acc1"] <= 1
    with pytest.raises(DataError, match="adapt: data.train and data.val must have the same "
                       "classes in the same order; class 0 is 'zero' in data.train but "
                       "'t-shirt' in data.val"):
        run_adapt({**cfg, "data": {**cfg["data"], "val": {"source": "fashion-mnist",
                                                          "limit": 5}}},
                  model=load_model(model_dir), progress=False, write=False)




@pytest.mark.parametrize("args, fragment", [
    (["--method", "coop", "--model", "tiny-clip"], "data is required"),
    (["--method", "coop", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "options.nctx=3"], "unknown key options.nctx (valid: "),
    (["--method", "coop", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "shots=-1"], "shots: expected greater than or equal to 0"),
    (["--method", "coop", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "shots=many"], "shots: expected a valid integer"),
    (["--model", "tiny-clip", "data.train={source: digits}", "data.test={source: digits}"],
     "method is required"),
    (["--method", "coop", "--model", "tiny-clip", "train={source: digits}"],
     "renamed key 'train': use 'data.train"),
    # a pretrain recipe: its train: (Trainer settings) is no old adapt config's data spec
    (["--method", "coop", "--config", "configs/pretrain/tiny-shapes.yaml"],
     "configs/pretrain/tiny-shapes.yaml is a config for `cliplab pretrain`, not for `cliplab "
     "adapt` (its keys eval, train are not adapt's)"),
    (["--method", "lora", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "lora={rank: 4}"], "renamed key 'lora': use 'options'"),
    (["--method", "finetune", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "options.train.lrr=1"], "options.train: unknown key lrr"),
    (["--method", "coop", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "data.train_size=5"],
     "data: renamed key 'train_size': use 'train_size (at the top level)'"),
    (["--method", "tip-adapter", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "options.alpha=nan"],
     "options.alpha: expected a finite number, got 'nan'"),
    (["--method", "linear-probe", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "shots=4", "train_size=3"],
     "train_size=3 leaves no training image of 7 class(es)"),
    # --method (or method=) replacing the file's: its options belong to the file's method
    (["--method", "coop", "--config", "configs/adapt/tip-adapter.yaml"],
     "unknown key options.search (valid: batch_size, class_specific, epochs, init, lr, n_ctx, "
     "names, optimizer, warmup, weight_decay) (search: an option of tip-adapter, "
     "tip-adapter-f) (the config's options are for its method 'tip-adapter', replaced by "
     "'coop')"),
    (["--config", "configs/adapt/tip-adapter.yaml", "method=coop"],
     "for its method 'tip-adapter', replaced by 'coop'"),
])
def test_adapt_cli_bad_input_is_one_line(args, fragment, tmp_path, capsys):
    assert main(["adapt", *args, "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplab: error:") and fragment in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written before the input is known good



@pytest.mark.parametrize("model, message", [
    ("./no-such-model", "./no-such-model does not exist (no such file or folder, and no "
     "preset of that name)"),
    ("tiny-clp", "unknown model 'tiny-clp': give a preset"),
])
def test_a_missing_model_is_said_before_any_data_is_decoded(model, message, tmp_path, capsys,
                                                            monkeypatch):
    """A misspelt --model was found only after both datasets were decoded."""
    def decode(*args, **kwargs):
        raise AssertionError("data decoded before the model was checked")

    monkeypatch.setattr("cliplab.adapt.run.load_source", decode)
    monkeypatch.chdir(tmp_path)
    assert main(["adapt", "--method", "zeroshot", "--model", model, "--no-progress",
                 "data.train={source: digits}", "data.test={source: digits}",
                 "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplab: error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_adapt_cli_reads_data_section_like_other_stages(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["adapt", "--method", "zeroshot", "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=1"]) == 0
    assert json.loads((out / "results.json").read_text())["test_size"] == 540


def test_adapt_no_progress_quiets_the_shards_read_bar(model_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["data", "shard", "--source", "digits", "data.split=test", "--out", str(shards),
                 "--no-progress"]) == 0
    capsys.readouterr()
    data = [f"data.{name}={{source: shards, path: {shards}}}" for name in ("train", "test")]
    args = ["adapt", "--method", "zeroshot", "--model", str(model_dir), "shots=1", *data]
    assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "read shards" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    assert "read shards" in capsys.readouterr().err


def test_adapt_cli_runs_a_weight_method(model_dir, tmp_path, capsys):
    """`--method finetune` goes through the same command and config shape: a model folder,
    its test score next to the zero-shot head's, and results."""
    out = tmp_path / "ft"
    assert main(["adapt", "--method", "finetune", "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=0", "train_size=64",
                 "options.train.steps=2", "options.train.batch_size=32",
                 "options.train.augment=false"]) == 0
    printed = capsys.readouterr().out
    assert "zeroshot" in printed and "finetune test" in printed and str(out) in printed
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 64 and results["test_size"] == 540
    model_folder = out / "checkpoints" / "step-2" / "model"
    assert results["model_dir"] == str(model_folder)
    assert (model_folder / "config.json").is_file()
    # the reported score is the saved model and head's
    model, head = load_finetuned(model_folder)
    test = load_digits("test")
    logits = head(encode_images(model, test.images, progress=False).embeddings)
    acc = (logits.argmax(1) == test.labels).float().mean().item()
    assert acc == pytest.approx(results["test"]["acc1"])


def test_adapt_tells_what_loading_its_sets_skipped(model_dir, tmp_path, capsys):
    pets = pets_folder(tmp_path / "pets", per_class=3, broken_in="dog")
    out = tmp_path / "run"
    assert main(["adapt", "--method", "zeroshot", "--model", str(model_dir), "--out", str(out),
                 "--no-progress", f"data.train={{source: image-folder, path: {pets}}}",
                 "data.test={source: image-folder, path: " + str(pets) + ", progress: false}",
                 f"data.val={{source: image-folder, path: {pets}}}", "val_shots=0",
                 "shots=0"]) == 0
    err = capsys.readouterr().err.splitlines()
    line = "skipped 1 of 7 samples (unreadable_image=1) in " + str(pets)
    # (a set drawn from with shots or val_shots is decoded as drawn: test_listed_draw.py; a
    # test folder is streamed when scored, its skips told then: test_adapt_streamed.py)
    assert [e for e in err if "skipped" in e] == [f"data.train: {line}", f"data.val: {line}",
                                                  f"data.test: {line}"]
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"]["test"] == {"total": 1, "counts": {"unreadable_image": 1},
                                          "keys": {"unreadable_image": [str(pets / "dog" /
                                                                            "bad.png")]}}


def test_adapt_refuses_a_class_left_without_training_images_and_tells_short_ones(
        model_dir, tmp_path, capsys):
    """shots=0 with val_shots drew every image of a 3-per-class set into validation, and the
    method trained on nothing (the run 'succeeded' at chance); classes short of ``shots`` are
    told instead of printed as 'N per class'."""
    pets = pets_folder(tmp_path / "pets", per_class=3, broken_in="dog")
    data = [f"data.train={{source: image-folder, path: {pets}}}",
            f"data.test={{source: image-folder, path: {pets}}}", "--no-progress",
            "--model", str(model_dir)]
    assert main(["adapt", "--method", "linear-probe", *data, "shots=0", "val_shots=3",
                 "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "data.train leaves no training image of 2 class(es) (cat, dog) after val_shots" in err
    assert not (tmp_path / "empty").exists()
    assert main(["adapt", "--method", "linear-probe", *data, "shots=5",
                 "--out", str(tmp_path / "short")]) == 0
    told = capsys.readouterr()
    assert ("cliplab: warning: adapt: 2 class(es) have fewer than shots=5 training images and "
            "train on "
            "what they have (cat=3, dog=3)") in told.err
    # and recorded: results.json said 5 per class of every class
    results = json.loads((tmp_path / "short" / "results.json").read_text())
    assert results["shots"] == 5 and results["fewer_than_shots"] == {"cat": 3, "dog": 3}
    assert "(5 per class, seed 1; fewer in 2 class(es): cat 3, dog 3)" in told.out
    # val_shots capped at what a class has was silent (from the training set or data.val)
    for val in ([], [f"data.val={{source: image-folder, path: {pets}}}"]):
        assert main(["adapt", "--method", "linear-probe", *data, *val, "shots=1", "val_shots=4",
                     "--out", str(tmp_path / f"val{len(val)}")]) == 0
        # the shot of each class is not drawn for validation (data.val: data.train's spec)
        assert ("cliplab: warning: adapt: 2 class(es) have fewer than val_shots=4 validation "
                "images and validate on what they have (cat=2, dog=2)"
                ) in capsys.readouterr().err



def test_eval_of_a_fine_tuned_folder_scores_its_own_classes_with_its_head(model_dir, tmp_path,
                                                                          capsys):
    """`cliplab eval` of a finetune's model folder gives adapt's test accuracy (its
    head.safetensors scores the digits), the text head for data of other classes, and
    `--head text` the text head everywhere."""
    out = tmp_path / "ft"
    assert main(["adapt", "--method", "finetune", "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=0", "train_size=128",
                 "options.train.steps=6", "options.train.batch_size=64",
                 "options.train.lr=0.01", "options.train.augment=false"]) == 0
    adapted = json.loads((out / "results.json").read_text())
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n"
                     "  - {task: zeroshot, name: digits, data: {source: digits, split: test}}\n"
                     "  - {task: zeroshot, name: shapes,\n"
                     "     data: {source: shapes, attribute: color, n: 60, image_size: 32}}\n")
    folder = out / "checkpoints" / "step-6" / "model"
    capsys.readouterr()
    runs = {}
    for head in ("auto", "text"):
        assert main(["eval", "--config", str(suite), "--model", str(out), "--no-progress",
                     "--head", head]) == 0
        printed = capsys.readouterr()
        runs[head] = json.loads(printed.out)
        assert ("fine-tuned head" in printed.err) == (head == "auto")
    auto, text = runs["auto"]["results"], runs["text"]["results"]
    assert runs["auto"]["head"] == str(folder / "head.safetensors")
    assert auto["digits"]["classifier"] == str(folder / "head.safetensors")
    assert auto["digits"]["acc1"] == pytest.approx(adapted["test"]["acc1"])
    assert auto["digits"]["acc1"] != pytest.approx(text["digits"]["acc1"])  # the head mattered
    assert "classifier" not in auto["shapes"] and auto["shapes"] == text["shapes"]
    assert runs["text"]["head"] is None and "classifier" not in text["digits"]


def test_eval_tells_of_a_fine_tuned_head_only_when_a_task_used_it(model_dir, tmp_path, capsys):
    """A retrieval-only suite on a finetune's folder was told its tasks "are scored by that
    fine-tuned head"; the line names the tasks the head scored, and is not printed without."""
    out = tmp_path / "ft"
    assert main(["adapt", "--method", "finetune", "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=0", "train_size=64",
                 "options.train.steps=2", "options.train.batch_size=32"]) == 0
    head = out / "checkpoints" / "step-2" / "model" / "head.safetensors"
    suites = {"ret": "  - {name: ret, task: retrieval, data: {source: shapes, n: 12, "
                     "image_size: 32}}\n",
              "both": "  - {name: ret, task: retrieval, data: {source: shapes, n: 12, "
                      "image_size: 32}}\n"
                      "  - {name: digits, task: zeroshot, data: {source: digits, split: test}}\n"}
    told = {}
    for name, tasks in suites.items():
        suite = tmp_path / f"{name}.yaml"
        suite.write_text("tasks:\n" + tasks, encoding="utf-8")
        capsys.readouterr()
        assert main(["eval", "--config", str(suite), "--model", str(out), "--no-progress"]) == 0
        told[name] = capsys.readouterr().err
    assert "fine-tuned head" not in told["ret"]
    assert (f"eval: digits scored by the fine-tuned head {head} (over its classes; each says "
            "so under 'classifier'); --head text scores the text head") in told["both"]


def test_run_and_checkpoint_folders_load_like_their_model_folders(model_dir, tmp_path):
    """load_lora, load_finetuned and saved_head_classifier take the run folder (its newest
    checkpoint) or a checkpoint folder, as every model argument does."""
    from cliplab.adapt.finetune import load_finetuned
    from cliplab.adapt.head import saved_head_classifier
    from cliplab.adapt.lora import load_lora
    from cliplab.errors import ModelError

    data = ["data.train={source: digits, split: train}", "data.test={source: digits, "
            "split: test}", "shots=0", "train_size=32", "options.train.steps=1",
            "options.train.batch_size=32", "compare_zeroshot=false", "--no-progress"]
    ft, lora = tmp_path / "ft", tmp_path / "lora"
    assert main(["adapt", "--method", "finetune", "--model", str(model_dir), "--out", str(ft),
                 *data]) == 0
    assert main(["adapt", "--method", "lora", "--model", str(model_dir), "--out", str(lora),
                 *data, "options.rank=2"]) == 0
    for run in (ft, lora):  # compare_zeroshot=false: no zero-shot score computed or written
        assert "zeroshot" not in json.loads((run / "results.json").read_text())
    step = ft / "checkpoints" / "step-1"
    for folder in (ft, step):
        _, head = load_finetuned(folder)
        assert torch.equal(head.weight, load_finetuned(step / "model")[1].weight)
        assert saved_head_classifier(folder).label == str(step / "model" / "head.safetensors")
    adapter = lora / "checkpoints" / "step-1" / "adapter"
    for folder in (lora, adapter.parent):
        assert load_lora(folder)[2] is not None
    with pytest.raises(ModelError, match="not a LoRA adapter folder.*nor a checkpoint or run"):
        load_lora(ft)


def test_adapt_out_is_never_an_input(model_dir, tmp_path, capsys):
    """--out the model folder itself turned it into a run folder (a later --model of it loaded
    the fine-tune); --out inside an image folder would become one of its classes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    pets = pets_folder(tmp_path / "pets", 2, "cat")
    for out, data, words in ((model, "digits", f"is the input {model}"),
                             (pets / "adapted", f"image-folder, path: {pets}",
                              f"lies inside the input {pets}")):
        assert main(["adapt", "--method", "zeroshot", "--model", str(model), "--out", str(out),
                     f"data.train={{source: {data}}}", f"data.test={{source: {data}}}",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cliplab: error: --out") and words in err and "\n" not in err
    assert sorted(p.name for p in model.iterdir()) == before
    assert not (pets / "adapted").exists()


def test_adapt_and_quickstart_never_write_over_a_users_config_yaml(model_dir, tmp_path, capsys):
    """A folder holding a file of the user's (a recipe named config.yaml) is no place for a new
    run: refused on one line before any work, the file left as it was; once the user's file
    is gone the same command runs."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my notes\nshots: 3\n")
    adapt = ["adapt", "--method", "zeroshot", "--model", str(model_dir), "--out", str(out),
             "--no-progress", "data.train={source: digits, split: train}",
             "data.test={source: digits, split: test}", "shots=1"]
    for argv in (adapt, ["quickstart", "--out", str(out), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"cliplab: error: --out {out} holds config.yaml, which no cliplab run in "
                       "this folder wrote; a new run needs a new or empty folder (its files are "
                       "left as they are): choose another --out")
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
        assert (out / "config.yaml").read_text() == "# my notes\nshots: 3\n"
    (out / "config.yaml").unlink()
    assert main(adapt) == 0
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_a_batch_larger_than_the_training_images_names_the_adapt_key(method, model_dir,
                                                                      tmp_path, capsys):
    """The Trainer's check named `train.batch_size`, a key adapt configs do not have."""
    out = tmp_path / "ft"
    assert main(["adapt", "--method", method, "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=0", "train_size=64",
                 "options.train.batch_size=128"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cliplab: error: options.train.batch_size: a batch of 128 is larger than the 64 "
        "training images (shots x classes, or train_size); lower options.train.batch_size or "
        "train on more images")
    assert not out.exists()  # the run folder it made is removed, as for any refused start


def test_a_batch_of_exactly_the_training_images_is_accepted():
    from cliplab.adapt.training import check_batch_fits_images

    check_batch_fits_images(64, 64)  # one full batch: the Trainer drops nothing
    with pytest.raises(ConfigError, match="a batch of 65 is larger than the 64 training images"):
        check_batch_fits_images(65, 64)


def test_a_separate_validation_set_takes_nothing_from_the_training_images(model_dir):
    """With data.val, val_shots draws from data.val: shots=0 trains on every image of
    data.train."""
    from cliplab.adapt.run import run_adapt

    cfg = {"method": "zeroshot", "shots": 0, "val_shots": 2, "seed": 1,
           "compare_zeroshot": False,
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"},
                    "val": {"source": "digits", "split": "test"}}}
    res = run_adapt(cfg, model=load_model(model_dir), progress=False, write=False)
    assert res["train_size"] == len(load_digits("train")) and res["val_size"] == 20


def test_a_class_without_training_images_is_not_blamed_on_val_shots_from_data_val(
        model_dir, tmp_path, capsys):
    """val_shots drawing from data.val takes nothing from data.train: a class data.train has
    no image of is told as that, not as val_shots' doing."""
    pets = pets_folder(tmp_path / "pets", per_class=2, broken_in="dog")
    for png in (pets / "dog").glob("[0-9].png"):
        png.unlink()  # dog: only its unreadable file
    val = pets_folder(tmp_path / "val", per_class=2, broken_in="cat")
    assert main(["adapt", "--method", "linear-probe", "--model", str(model_dir),
                 "--no-progress", f"data.train={{source: image-folder, path: {pets}}}",
                 f"data.test={{source: image-folder, path: {val}}}",
                 f"data.val={{source: image-folder, path: {val}}}", "shots=0", "val_shots=1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data.train leaves no training image of 1 class(es) (dog); give images of every " \
        "class" in err
    assert "val_shots" not in err
    assert not (tmp_path / "o").exists()


def test_a_seed_gives_the_same_learned_weights_whatever_ran_before(model_dir, tmp_path):
    """Randomly initialised weights (LoRA's) come from ``seed``, not from the global RNG state
    earlier work left."""
    from safetensors.torch import load_file

    args = ["adapt", "--method", "lora", "--model", str(model_dir), "--no-progress",
            "data.train={source: digits, split: train}", "data.test={source: digits, "
            "split: test}", "shots=0", "train_size=32", "seed=1", "options.rank=2",
            "options.train.steps=1", "options.train.batch_size=32", "compare_zeroshot=false"]
    tensors = []
    for name in ("a", "b"):
        torch.manual_seed(123 if name == "a" else 321)
        torch.rand(5)
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        adapter = tmp_path / name / "checkpoints" / "step-1" / "adapter"
        tensors.append(load_file(next(adapter.glob("*.safetensors"))))
    assert tensors[0].keys() == tensors[1].keys() and tensors[0]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_config_yaml_records_the_methods_resolved_options(model_dir, tmp_path):
    """config.yaml holds every option the method ran with, defaults included, so the run can
    be read (and repeated) without knowing this version's defaults."""
    import yaml

    from cliplab.adapt.clip_adapter import Options

    out = tmp_path / "run"
    assert main(["adapt", "--method", "clip-adapter", "--model", str(model_dir), "--out",
                 str(out), "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=1", "options.epochs=1",
                 "compare_zeroshot=false"]) == 0
    options = yaml.safe_load((out / "config.yaml").read_text())["options"]
    assert options["epochs"] == 1
    assert options["lr"] == Options().lr and options["batch_size"] == Options().batch_size


def test_cache_dir_keeps_the_image_features_there(model_dir, tmp_path):
    cache = tmp_path / "cache"
    assert main(["adapt", "--method", "zeroshot", "--model", str(model_dir), "--out",
                 str(tmp_path / "run"), "--no-progress", "--cache-dir", str(cache),
                 "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=1",
                 "compare_zeroshot=false"]) == 0
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))


@pytest.mark.parametrize("option", ["options.alpha=-1", "options.beta=-0.5"])
def test_tip_adapter_refuses_a_negative_cache_weight_or_sharpness(option, tmp_path, capsys):
    """A negative alpha (it inverts the cache's vote) was accepted and run."""
    assert main(["adapt", "--method", "tip-adapter", "--model", "tiny-clip", "--no-progress",
                 "--out", str(tmp_path / "ta"), "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=1", option]) == 2
    key, _, value = option.partition("=")
    assert capsys.readouterr().err.strip() == (
        f"cliplab: error: the command line: {key}: expected greater than or equal to 0, "
        f"got {value}")
    assert not (tmp_path / "ta").exists()


@pytest.mark.parametrize("method, options, refused", [
    ("coop", {"n_ctx": 8}, "n_ctx has no effect unless init is ''"),
    ("cocoop", {"init": "a photo of", "n_ctx": 2}, "n_ctx has no effect unless init is ''"),
    ("linear-probe", {"l2_grid": [1, 2]}, "l2_grid has no effect unless l2 is auto"),
    ("lora", {"objective": "contrastive", "train_head": False},
     "train_head has no effect with objective 'contrastive'"),
    ("lora", {"train": {"multi_positive": False}},
     "train.multi_positive has no effect with a classification head"),
    ("tip-adapter", {"search_steps": [3, 3], "search_scale": [1, 1]},
     "search_scale and search_steps have no effect unless search is true"),
    ("tip-adapter", {"search": True, "beta": 2}, "beta has no effect with search: true"),
    ("tip-adapter-f", {"augment_views": 0, "augment": {"hflip": True}},
     "augment has no effect unless augment_views is above 0"),
    ("finetune", {"train": {"loss": "siglip", "loss_tile": 2}},
     "loss and loss_tile have no effect with a classification head"),
    ("wise-ft", {"train": {"hard_negatives": True}},
     "hard_negatives has no effect with a classification head"),
    ("finetune", {"train": {"eval_every": 5}}, "eval_every has no effect in adapt"),
    ("lora", {"train": {"fsdp": True}}, "fsdp has no effect in adapt"),
    ("finetune", {"train": {"dist_timeout_s": 60}}, "dist_timeout_s has no effect in adapt"),
])
def test_an_option_that_would_change_nothing_is_refused(method, options, refused):
    """Each of these was accepted, recorded in config.yaml and results.json, and did nothing:
    two runs with different values wrote the same weights."""
    from cliplab.adapt import get_method
    from cliplab.adapt.base import method_options

    with pytest.raises(ConfigError, match=f"^adapt method {method!r}: options[.a-z]*: {refused}"):
        method_options(get_method(method).Options, options, method)


@pytest.mark.parametrize("method, options", [
    ("coop", {"init": "", "n_ctx": 8}), ("linear-probe", {"l2": "auto", "l2_grid": [1, 2]}),
    ("tip-adapter", {"search": True, "search_steps": [3, 3]}),
    ("tip-adapter-f", {"search": True, "alpha": 2}),  # F trains with alpha, then searches
    ("lora", {"objective": "contrastive", "train": {"loss": "siglip"}})])
def test_the_same_options_where_they_apply_are_taken(method, options):
    from cliplab.adapt import get_method
    from cliplab.adapt.base import method_options

    method_options(get_method(method).Options, options, method)


def test_every_methods_full_options_load_again():
    """config.yaml records every option with its default: it must validate again."""
    from cliplab.adapt import ADAPT_METHODS, get_method
    from cliplab.adapt.base import method_options

    for method in ADAPT_METHODS:
        options = get_method(method).Options
        method_options(options, options().to_dict(), method)


def test_a_pretrain_recipe_given_to_run_adapt_is_named(tmp_path):
    """From Python there is no other command to name: the recipe's own shape is told."""
    import yaml

    from cliplab.adapt.run import run_adapt

    recipe = yaml.safe_load(open("configs/pretrain/tiny-shapes.yaml"))
    with pytest.raises(ConfigError, match=r"this is a pretrain recipe \(train: Trainer settings, "
                       r"no data.test\); cliplab adapt reads an adapt config"):
        run_adapt({**recipe, "method": "coop"}, write=False)


def test_a_preset_with_options_is_recorded_with_them(tmp_path):
    """"tiny-clip" alone named another model than tiny-clip with embed_dim 64: results.json,
    adapter.json and load_adapter's hint name the options too."""
    from cliplab.adapt import load_adapter
    from cliplab.adapt.run import run_adapt
    from cliplab.errors import ModelError

    model = {"name": "tiny-clip", "options": {"embed_dim": 64, "seed": 7}}
    cfg = {"method": "zeroshot", "model": model, "compare_zeroshot": False,
           "data": {"train": {"source": "digits", "split": "test"},
                    "test": {"source": "digits", "split": "test"}}, "shots": 2,
           "out": str(tmp_path / "a")}
    res = run_adapt(cfg, progress=False)
    assert res["model"] == "tiny-clip" and res["model_options"] == model["options"]
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text(encoding="utf-8"))
    assert meta["model_options"] == model["options"]
    with pytest.raises(ModelError, match=r"load it with the model it was fitted on \(tiny-clip "
                       r"with options \{'embed_dim': 64, 'seed': 7\}\)$"):
        load_adapter(tmp_path / "a", load_model("tiny-clip"))
    assert load_adapter(tmp_path / "a", load_model(model)).method == "zeroshot"


@pytest.mark.parametrize("command", ["adapt", "pretrain"])
def test_an_error_found_when_the_data_loads_names_the_config_file(command, model_dir, tmp_path,
                                                                  capsys):
    """An unknown class in ``holdout:`` is found only when the data loads, after the config's
    own check: adapt and pretrain named its key (``data.train``) but not the file holding it."""
    data = "data:\n  train: {source: digits, holdout: [cow]}\n"
    if command == "adapt":
        text = f"method: linear-probe\n{data}  test: {{source: digits}}\n"
        model = ["--model", str(model_dir)]
    else:
        text = f"model: {{name: {model_dir}}}\n{data}train: {{steps: 1, batch_size: 4}}\n"
        model = []
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(text, encoding="utf-8")
    assert main([command, "--config", str(cfg), *model, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"cliplab: error: {cfg}: data.train: unknown class 'cow'; classes are: "
                     "zero, one, two, three, four, five, six, seven, eight, nine"]
    assert not (tmp_path / "o").exists()
    assert main([command, "--config", str(cfg), *model, "--out", str(tmp_path / "o"),
                 "--no-progress", "seed=1" if command == "adapt" else "train.seed=1"]) == 2
    assert capsys.readouterr().err.startswith(f"cliplab: error: {cfg} + command line: "
                                              "data.train: unknown class 'cow'")


def test_a_bad_option_from_the_command_line_is_not_blamed_on_the_files_options(tmp_path,
                                                                               capsys):
    """A config of another method with no options said '(the config's options are for its
    method 'coop', replaced by ...)' of a value the command line gave."""
    cfg = tmp_path / "coop.yaml"
    cfg.write_text("method: coop\ndata:\n  train: {source: digits}\n  test: {source: digits}\n"
                   "options: {}\n", encoding="utf-8")
    args = ["adapt", "--config", str(cfg), "--method", "tip-adapter", "--model", "tiny-clip",
            "--out", str(tmp_path / "o")]
    assert main([*args, "options.augment.foo=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown augment option 'foo'" in err and "replaced by" not in err
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("options: {}", "options: {n_ctx: 8}"),
                   encoding="utf-8")
    assert main(args) == 2
    assert "(the config's options are for its method 'coop', replaced by 'tip-adapter')" in \
        capsys.readouterr().err


@pytest.mark.parametrize("method, options, said", [
    # the few-shot loop never looked at its loss: NaN keys saved, class 0 reported as accuracy
    ("tip-adapter-f", ["options.lr=10", "options.epochs=5"],
     r"tip-adapter-f: the loss or the learned weights became NaN or infinite at step [1-9]\d* "
     r"\(options.lr 10\), so nothing was saved; lower options.lr$"),
    # the Trainer's message named pretrain's keys (train.lr), which adapt refuses
    ("finetune", ["options.train.steps=1", "options.train.batch_size=8", "options.train.lr=1e3",
                  "options.train.weight_decay=1e36", "options.train.warmup=0"],
     r"at step 1 \(options.train.lr 1000\).*Lower options.train.lr or "
     r"options.train.weight_decay, lengthen options.train.warmup$"),
])
def test_an_adapt_run_that_diverges_stops_in_one_line_naming_its_options(method, options, said,
                                                                         model_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert main(["adapt", "--method", method, "--model", str(model_dir), "--out", str(out),
                 "--no-progress", "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=4", *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(said, err[0]), err
    assert not out.exists()


@pytest.mark.parametrize("method, options, said", [
    # the grid walked from 0.1 down into negative values: alpha -99.9 saved, which
    # options.alpha refuses
    ("tip-adapter", {"search": True, "search_scale": [-5, 3]},
     r"options.search_scale.0: expected greater than 0.1, got -5$"),
    ("linear-probe", {"l2": "auto", "l2_grid": []},  # was max() of an empty sequence
     r"options.l2_grid: expected at least 1 value, got none$"),
    ("linear-probe", {"l2": "auto", "l2_grid": [-1]},  # was an overflow inside L-BFGS
     r"options.l2_grid.0: expected greater than 0, got -1$"),
])
def test_a_search_grid_outside_its_options_range_is_refused(method, options, said):
    from cliplab.adapt import get_method
    from cliplab.adapt.base import method_options

    with pytest.raises(ConfigError, match=f"^adapt method {method!r}: {said}"):
        method_options(get_method(method).Options, options, method)


def test_a_few_shot_warmup_longer_than_the_run_is_warned_of(recwarn):
    """The loop shortened it without a word, where the Trainer warns."""
    from cliplab.adapt.training import train_steps

    weight = torch.nn.Parameter(torch.zeros(2))
    train_steps([weight], lambda idx: (weight - 1).pow(2).sum(), n=8, epochs=2, batch_size=4,
                lr=0.1, warmup=10, progress=False, desc="coop")
    assert warned(recwarn).startswith("coop: options.warmup=10 steps is longer than the run "
                                      "(4 steps")


def test_data_val_of_other_shapes_scenes_or_other_rows_is_no_overlap(recwarn):
    """Another shapes seed draws other scenes, another offset other rows: these were warned
    as "the same data as data.train" (source and split alone were compared)."""
    from cliplab.adapt.config import AdaptConfig
    from cliplab.adapt.run import warn_validation_overlap
    from cliplab.config import validate
    from tests.warned import warned

    def overlap(train: dict, val: dict) -> str:
        cfg = validate(AdaptConfig, {"method": "linear-probe", "shots": 4, "data": {
            "train": train, "test": {"source": "shapes", "seed": 2}, "val": val}})
        warned(recwarn)
        warn_validation_overlap(cfg, False)
        return warned(recwarn)

    assert overlap({"source": "shapes", "seed": 0}, {"source": "shapes", "seed": 1}) == ""
    assert overlap({"source": "fashion-mnist", "limit": 50000},
                   {"source": "fashion-mnist", "offset": 50000}) == ""
    assert "data.val reads the same data as data.train (shapes)" in overlap(
        {"source": "shapes", "seed": 0}, {"source": "shapes", "seed": 0, "image_size": 48})


def test_written_folders_are_recorded_absolute_from_a_relative_out(model_dir, tmp_path,
                                                                   monkeypatch):
    """results.json's model_dir, adapter_dir, merged_dir, finetuned and best_dir load from any
    folder (as pretrain's model_dir): a relative --out recorded them relative to where the run
    started."""
    monkeypatch.chdir(tmp_path)
    data = ["data.train={source: digits, split: train}", "data.test={source: digits, "
            "split: test}", "shots=0", "train_size=32", "compare_zeroshot=false", "--no-progress"]
    train = ["options.train.steps=1", "options.train.batch_size=32"]
    runs = {"ft": ["finetune", *train],
            "lo": ["lora", *train, "options.rank=2", "options.merge=true"],
            "wi": ["wise-ft", *train, "options.alphas=[0,1]", "options.save_best=true"],
            "wi2": ["wise-ft", "options.alphas=[0,1]", "options.finetuned=ft"]}
    keys = {"model_dir", "adapter_dir", "merged_dir", "finetuned", "best_dir"}
    for out, (method, *options) in runs.items():
        assert main(["adapt", "--method", method, "--model", str(model_dir), "--out", out,
                     *data, *options]) == 0
        results = json.loads((tmp_path / out / "results.json").read_text(encoding="utf-8"))
        recorded = {key: results[key] for key in keys & set(results)}
        assert len(recorded) == {"ft": 1, "lo": 2, "wi": 2, "wi2": 1}[out], recorded
        for key, path in recorded.items():
            assert path == str((tmp_path / path).resolve()), (out, key, path)
            assert path.startswith(str(tmp_path / ("ft" if out == "wi2" else out))), path
