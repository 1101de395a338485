"""`cliplab quickstart` end to end with tiny settings, and the tiny-shapes recipe."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VisionTextDualEncoderModel

from cliplab.data.fashion_mnist import default_dir
from cliplab.quickstart import format_results, quickstart_config
from cliplab.errors import ConfigError
from tests.stamped import assert_stamped, now

REPO = Path(__file__).resolve().parents[1]
FMNIST = default_dir()  # $CLIPLAB_FASHION_MNIST, else Debian's folder


def test_shipped_quickstart_yaml_equals_the_built_in_defaults():
    import yaml

    shipped = quickstart_config(yaml.safe_load((REPO / "configs/quickstart.yaml").read_text()))
    assert shipped == quickstart_config({})


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs dataset-fashion-mnist")
def test_an_unknown_held_out_class_names_its_key_and_leaves_no_run(tmp_path):
    from cliplab.quickstart import run_quickstart

    with pytest.raises(ConfigError, match=r"^the quickstart config: data\.heldout: unknown "
                                          r"class 'Sandl'; classes are: T-shirt/top, Trouser"):
        run_quickstart({"data": {"heldout": ["Coat", "Sandl"], "train_limit": 50,
                                 "test_limit": 50}, "out": str(tmp_path / "run")},
                       progress=False)
    assert not (tmp_path / "run").exists()


def test_quickstart_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="epochz"):
        quickstart_config({"train": {"epochz": 1}})
    with pytest.raises(ConfigError, match=r"unknown key data\.held \(valid: data_dir"):
        quickstart_config({"data": {"held": []}})
    with pytest.raises(ConfigError, match="model: renamed key 'preset': use 'name'"):
        quickstart_config({"model": {"preset": "lit-minilm"}})
    assert quickstart_config({}).data.heldout == ["Shirt", "Sneaker", "Bag"]
    # no held-out class failed only after training, with an IndexError
    with pytest.raises(ConfigError, match=r"data\.heldout: holds 0 classes: .*hold out two at "
                                          r"least$"):
        quickstart_config({"data": {"heldout": []}})
    with pytest.raises(ConfigError, match=r"data\.train_limit: expected greater than 0"):
        quickstart_config({"data": {"train_limit": 0}})
    # a model mapping without a name and the train mapping update the defaults
    cfg = quickstart_config({"model": {"options": {"width": 96}}, "train": {"epochs": 1}})
    assert cfg.model.name == "lit-minilm" and cfg.model.options["width"] == 96
    assert cfg.model.options["patch_size"] == 7
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 128
    # the default length is in steps; a length in epochs replaces it; both at once is an error
    # (configs/quickstart.yaml holds steps: an epochs override on it needs train.steps=null)
    assert cfg.train.steps is None
    assert quickstart_config({}).train.steps == 1360
    assert quickstart_config({"train": {"steps": 10}}).train.steps == 10
    both = {"train": {"epochs": 2, "steps": 1360}}
    with pytest.raises(ConfigError, match=r"train: give the length as epochs or as steps, not "
                                          r"both \(epochs: 2, steps: 1360\); set the other to null"):
        quickstart_config(both)
    assert quickstart_config({"train": {"epochs": 2, "steps": None}}).train.epochs == 2


@pytest.mark.parametrize("key, words", [
    ("probe_train_size", "expected greater than 0, got 0"),
    ("probe_layers", "expected greater than or equal to 1, got 0"),
])
def test_zero_probe_size_or_layers_is_an_error_naming_its_key(key, words):
    """eval.probe_train_size: 0 and eval.probe_layers: 0 are refused with their key."""
    with pytest.raises(ConfigError) as err:
        quickstart_config({"eval": {key: 0}})
    assert str(err.value) == f"the quickstart config: eval.{key}: {words}"


@pytest.fixture()
def small_fmnist(tmp_path):
    """A 3000/600 image slice of the real Fashion-MNIST (installed by scripts/setup.sh)."""
    from tests.test_data_sources import write_idx
    from cliplab.data.fashion_mnist import read_idx

    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, n in (("train", 3000), ("t10k", 600)):
        images = read_idx(FMNIST / f"{split}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FMNIST / f"{split}-labels-idx1-ubyte.gz")[:n]
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.mark.slow
def test_quickstart_end_to_end_tiny(tmp_path, small_fmnist):
    import yaml

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cliplab", "quickstart", "--out", str(out), "--data-dir",
         str(small_fmnist), "--no-progress", "train.epochs=2", "train.batch_size=128",
         "model.options={image_size: 28, patch_size: 7, width: 64, layers: 2, heads: 2}",
         "eval.probe_train_size=1500"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "zero-shot top-1, held-out classes" in result.stdout

    results = json.loads((out / "results.json").read_text())
    for key in ("zeroshot_heldout_acc1", "zeroshot_all_acc1", "linear_probe_acc1"):
        assert 0.0 <= results[key] <= 1.0
    assert results["wall_time_s"] > 0 and results["heldout_classes"] == ["shirt", "sneaker", "bag"]
    # where the time went: its parts add up to the whole (to rounding), at the rate of its steps
    parts = results["seconds"]
    assert set(parts) == {"setup", "train", "evaluate"} and min(parts.values()) > 0
    assert abs(sum(parts.values()) - results["wall_time_s"]) <= 0.2 + 1e-9  # 4 roundings
    # the rate is of the unrounded time, itself rounded to 0.1 image/s; the seconds to 0.1 s
    images = results["steps"] * 128
    assert images / (parts["train"] + 0.05) - 0.05 <= results["train_images_per_s"] \
        <= images / (parts["train"] - 0.05) + 0.05
    assert results["precision"] in ("fp32", "bf16")
    assert results["eval_precision"] == "fp32"  # the suite's default: scores, not training
    # 2 epochs on 2100 seen-class images: clearly better than chance on the trained classes
    seen = [v for k, v in results["zeroshot_per_class_acc1"].items()
            if k not in ("shirt", "sneaker", "bag")]
    assert np.mean(seen) > 0.3
    assert results["linear_probe_acc1"] > 0.5

    # only the 3 held-out classes compete in its zero-shot: each image's class is in the top 3
    assert results["zeroshot_heldout"]["acc5"] == 1.0
    assert results["evaluated_on"] == "test"
    # the 3000 training images hold 897 shirts, sneakers and bags: 2103 seen-class pairs
    assert results["train_pairs"] == 2103

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["out"] == str(out) and config["train"]["steps"] is None
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("loss" in m for m in metrics)
    # 2 epochs of 2103 pairs in full batches of 128: 2 x 16 steps (the length was in epochs)
    assert results["steps"] == metrics[-1]["step"] == 32
    model_dir = Path(results["model_dir"])
    assert model_dir.parent.parent.name == "checkpoints"
    plain = VisionTextDualEncoderModel.from_pretrained(model_dir)  # opens in plain transformers
    assert plain.config.vision_config.patch_size == 7


def test_validation_split_is_the_last_training_images_and_the_test_split_is_not_read(
        small_fmnist, tmp_path):
    from cliplab.data.fashion_mnist import load_fashion_mnist
    from cliplab.quickstart import QuickstartData, load_splits

    (small_fmnist / "t10k-images-idx3-ubyte.gz").unlink()  # reading it would fail
    train, val = load_splits(QuickstartData(data_dir=str(small_fmnist), validation=500))
    full = load_fashion_mnist("train", str(small_fmnist))
    assert len(train) == 2500 and len(val) == 500
    assert torch.equal(torch.cat([train.images, val.images]), full.images)
    assert torch.equal(val.labels, full.labels[2500:])
    with pytest.raises(ConfigError, match=r"data.validation: 3000 is not below the 3000"):
        load_splits(QuickstartData(data_dir=str(small_fmnist), validation=3000))


def test_format_results_table():
    text = format_results({"zeroshot_heldout_acc1": 0.5, "zeroshot_all_acc1": 0.25,
                           "linear_probe_acc1": 0.875, "wall_time_s": 61.2,
                           "heldout_classes": ["shirt"]})
    assert "50.0%" in text and "25.0%" in text and "87.5%" in text and "61 s" in text
    parts = {"setup": 10.4, "train": 40.0, "evaluate": 10.8}
    text = format_results({"zeroshot_heldout_acc1": 0.5, "zeroshot_all_acc1": 0.25,
                           "linear_probe_acc1": 0.875, "wall_time_s": 61.2, "seconds": parts})
    assert text.splitlines()[-1].split(None, 2)[2] == "61 s (setup 10 s, train 40 s, evaluate 11 s)"


@pytest.mark.slow
def test_tiny_shapes_recipe_learns_colours(tiny_shapes_run):
    """tiny-clip on shapes (the shipped recipe, shortened) beats chance on colour zero-shot."""
    results = json.loads((tiny_shapes_run / "results.json").read_text())
    assert results["evals"]["colour"]["acc1"] > 0.5  # 8 colours: chance is 12.5%
    assert (tiny_shapes_run / "checkpoints").is_dir()


def test_a_quickstart_refused_at_its_start_leaves_no_folder(tmp_path, small_fmnist):
    """A batch larger than the data stops before the first step: the --out folder the run
    made (its config.yaml, nothing else) is removed, as pretrain and adapt do; one that was
    there before stays."""
    from cliplab.quickstart import run_quickstart

    user = {"data": {"data_dir": str(small_fmnist), "train_limit": 100},
            "model": {"options": {"width": 32, "layers": 1, "heads": 2}}}
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.batch_size: a batch of 128 is larger"):
        run_quickstart({**user, "out": str(out)}, progress=False)
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ConfigError, match="larger than the dataset"):
        run_quickstart({**user, "out": str(mine)}, progress=False)
    assert mine.is_dir()


def test_the_quickstart_checks_its_eval_and_out_before_training(tmp_path, small_fmnist,
                                                                monkeypatch):
    """The report's probe settings and an --out inside the data folder were refused only
    after training (or not at all): now before the first step, leaving no folder."""
    from cliplab.quickstart import run_quickstart
    from cliplab.train import trainer

    monkeypatch.setattr(trainer.Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    user = {"data": {"data_dir": str(small_fmnist), "train_limit": 300, "test_limit": 100},
            "model": {"options": {"width": 32, "layers": 2, "heads": 2}}}
    with pytest.raises(ConfigError, match=r"^the quickstart config: eval\.probe_l2: expected "
                                          r"greater than 0, got -1"):
        run_quickstart({**user, "eval": {"probe_l2": -1}, "out": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match=r"^the quickstart's eval: tasks\[2\] \(name "
                                          r"'linear_probe'\): layers: 3, but the model's image "
                                          r"tower has 2 blocks"):
        run_quickstart({**user, "eval": {"probe_features": "layers", "probe_layers": 3},
                        "out": str(tmp_path / "b")}, progress=False)
    inside = small_fmnist / "run"
    with pytest.raises(ConfigError, match=f"^--out {inside} lies inside the input"):
        run_quickstart({**user, "out": str(inside)}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist"]
    assert not inside.exists()


def test_the_quickstart_trains_on_the_seen_classes_only(tmp_path, small_fmnist, monkeypatch):
    """The held-out classes' images and captions never reach training (else the transfer
    number measures nothing)."""
    from cliplab.data.fashion_mnist import load_fashion_mnist
    from cliplab.data.pairs import labelled_to_pairs
    from cliplab.quickstart import run_quickstart
    from cliplab.train import trainer

    class Stop(Exception):
        pass

    seen = []

    def fit(self, pairs):
        seen.append(pairs)
        raise Stop

    monkeypatch.setattr(trainer.Trainer, "fit", fit)
    with pytest.raises(Stop):
        run_quickstart({"data": {"data_dir": str(small_fmnist), "train_limit": 600,
                                 "test_limit": 100},
                        "model": {"options": {"width": 32, "layers": 1, "heads": 2}},
                        "train": {"batch_size": 32}, "out": str(tmp_path / "run")},
                       progress=False)
    pairs, = seen
    full = load_fashion_mnist("train", str(small_fmnist), 600)
    held = [full.classnames.index(n) for n in ("shirt", "sneaker", "bag")]
    kept = [i for i, y in enumerate(full.labels.tolist()) if y not in held]
    assert 0 < len(kept) < len(full) and len(pairs) == len(kept)
    assert torch.equal(pairs.images, full.images[kept])
    all_captions = labelled_to_pairs(full).captions
    held_captions = {c for i, y in enumerate(full.labels.tolist()) if y in held
                     for c in all_captions[i]}
    assert held_captions and not held_captions & {c for caps in pairs.captions for c in caps}


@pytest.fixture()
def stubbed_quickstart(small_fmnist, tmp_path, monkeypatch):
    """Run the quickstart on the 3000/600 slice with `Trainer.fit` stubbed (it records the
    pairs and pretends to stop at step 7) and the real eval; also records the suite that
    `run_suite` got. Returns ``run(user) -> (results, pairs, suite)``."""
    from cliplab import quickstart
    from cliplab.train import trainer

    seen = {}

    def fit(self, pairs):
        seen["pairs"], seen["progress"] = pairs, self.config.progress
        self.step, self.last_checkpoint = 7, self.run_dir.path / "checkpoints" / "step-7"

    real_run_suite = quickstart.run_suite

    def run_suite(model, suite, context=None):
        seen["suite"] = suite
        return real_run_suite(model, suite, context)

    monkeypatch.setattr(trainer.Trainer, "fit", fit)
    monkeypatch.setattr(quickstart, "run_suite", run_suite)

    def run(user):
        base = {"data": {"data_dir": str(small_fmnist), "train_limit": 600, "test_limit": 100},
                "model": {"options": {"width": 32, "layers": 1, "heads": 2}},
                "train": {"batch_size": 32}, "eval": {"probe_train_size": 200}}
        config = {**base, **user, "data": {**base["data"], **user.get("data", {})},
                  "eval": {**base["eval"], **user.get("eval", {})}}
        results = quickstart.run_quickstart(config, progress=False)
        assert seen["progress"] is False  # no training bar either with progress off
        return results, seen["pairs"], seen["suite"]

    return run


def test_quickstart_results_and_config_record_the_run_that_happened(stubbed_quickstart,
                                                                    tmp_path, monkeypatch):
    """results.json's evaluated_on, train_pairs (seen-class images only) and steps (the
    trainer's count, also when the length was given in epochs), and a default run folder's
    config.yaml naming that folder as its `out`."""
    import yaml

    monkeypatch.chdir(tmp_path)
    started = now()
    results, _, _ = stubbed_quickstart({"train": {"batch_size": 32, "epochs": 1}})
    assert_stamped(results, started, now())  # which cliplab ran it, and when
    assert results["evaluated_on"] == "test"
    # the first 600 training images: 415 of the 7 seen classes, 185 shirts, sneakers, bags
    assert results["train_pairs"] == 415
    assert results["steps"] == 7  # the stubbed trainer's; the config's steps is null
    assert results["heldout_classes"] == ["shirt", "sneaker", "bag"]
    run, = (tmp_path / "runs").iterdir()
    assert run.name.startswith("quickstart-")
    assert yaml.safe_load((run / "config.yaml").read_text())["out"] == f"runs/{run.name}"
    # recorded absolute, as every model a cliplab file names (a script reads it from anywhere)
    assert results["model_dir"] == str(run.resolve() / "checkpoints/step-7/model")
    assert json.loads((run / "results.json").read_text()) == results


def test_quickstart_eval_follows_its_data_and_eval_settings(stubbed_quickstart):
    """The held-out zero-shot scores only the held-out classes, eval.probe_l2 reaches the
    probe (not searched), data.test_limit: N evaluates N test images, and
    data.descriptions: false trains and probes on the plain class phrases."""
    from cliplab.data.fashion_mnist import PLAIN_PHRASES, TEMPLATES

    results, pairs, suite = stubbed_quickstart({"data": {"descriptions": False},
                                                "eval": {"probe_l2": 0.37}})
    zs_all, zs_held, probe = suite.tasks
    # held out: shirt, sneaker, bag = classes 6, 7, 8; only those 3 compete, so each image's
    # class is always in the top 3 and acc5 (top-min(5, C)) is 1, unlike over 10 classes
    assert zs_held.classes == [6, 7, 8] and zs_all.classes is None
    assert results["zeroshot_heldout"]["acc5"] == 1.0
    assert results["zeroshot_all"]["acc5"] < 1.0
    assert results["linear_probe"]["l2"] == 0.37 and probe.l2 == 0.37
    assert len(zs_all.data) == len(zs_held.data) == len(probe.test) == 100
    assert len(probe.train) == 200
    assert probe.train.prompt_names == zs_all.data.prompt_names == PLAIN_PHRASES
    assert {c for caps in pairs.captions for c in caps} == {
        t.format(p) for t in TEMPLATES for i, p in enumerate(PLAIN_PHRASES) if i not in (6, 7, 8)}


def test_evaluate_transfer_reports_each_task_under_its_own_key(monkeypatch):
    """The headline numbers come from their own task (the held-out one from zeroshot_heldout,
    not the all-class zero-shot), and the per-class accuracies move out of zeroshot_all."""
    from cliplab import quickstart

    fake = {"zeroshot_all": {"acc1": 0.25, "acc5": 0.75,
                             "per_class_acc1": {"shirt": 0.125, "bag": 0.5}},
            "zeroshot_heldout": {"acc1": 0.5, "acc5": 1.0},
            "linear_probe": {"acc1": 0.875, "l2": 0.003}}
    monkeypatch.setattr(quickstart, "run_suite", lambda model, suite, context: fake)
    results = quickstart.evaluate_transfer(None, None, None, [6], progress=False, suite="S")
    assert results == {"zeroshot_heldout_acc1": 0.5, "zeroshot_all_acc1": 0.25,
                       "linear_probe_acc1": 0.875,
                       "zeroshot_all": {"acc1": 0.25, "acc5": 0.75},
                       "zeroshot_heldout": {"acc1": 0.5, "acc5": 1.0},
                       "linear_probe": {"acc1": 0.875, "l2": 0.003},
                       "zeroshot_per_class_acc1": {"shirt": 0.125, "bag": 0.5}}


def test_the_probe_subset_is_the_same_seeded_pick_every_time():
    """transfer_suite's linear probe trains on a seeded random subset: built twice, it picks
    the same images (and a random pick, not the first ones)."""
    from cliplab.data.types import LabelledImages
    from cliplab.quickstart import QuickstartEval, transfer_suite

    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 2, 2, 1).clone()
    data = LabelledImages(images, torch.arange(50) % 5, list("abcde"), ["{}"])
    settings = QuickstartEval(probe_train_size=20)
    torch.manual_seed(1)
    first = transfer_suite(data, data, [4], settings).tasks[2].train
    torch.manual_seed(2)
    second = transfer_suite(data, data, [4], settings).tasks[2].train
    picked = first.images[:, 0, 0, 0].tolist()
    assert picked == second.images[:, 0, 0, 0].tolist()
    assert len(set(picked)) == 20 and picked != list(range(20))
    assert torch.equal(first.labels, torch.tensor(picked) % 5)


@pytest.mark.parametrize("section, key, value, words", [
    ("data", "heldout", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"],
     "holds 10 of the 10 classes, leaving fewer than two to train on; hold out at most 8"),
    ("data", "heldout", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag"],
     "holds 9 of the 10 classes, leaving fewer than two to train on; hold out at most 8"),
    # scored among themselves, one held-out class is always right (acc1 1.0, any model)
    ("data", "heldout", ["Shirt"], "holds 1 class: the zero-shot transfer is scored among the "
     "held-out classes, and one alone scores 1.0 whatever the model; hold out two at least"),
    ("data", "heldout", [], "holds 0 classes: the zero-shot transfer is scored among the "
     "held-out classes, and one alone scores 1.0 whatever the model; hold out two at least"),
    ("data", "validation", 0, "expected greater than 0, got 0"),
    ("data", "test_limit", 0, "expected greater than 0, got 0"),
    ("eval", "probe_l2", 0, "expected greater than 0, got 0"),
])
def test_impossible_data_and_eval_settings_are_refused_naming_their_key(section, key, value,
                                                                        words):
    """9 or 10 classes held out (fewer than two left to train on), fewer than 2 (nothing to
    tell apart), validation: 0, test_limit: 0 and probe_l2: 0 are refused with their key
    path."""
    with pytest.raises(ConfigError) as err:
        quickstart_config({section: {key: value}})
    assert str(err.value) == f"the quickstart config: {section}.{key}: {words}"


def test_a_class_held_out_twice_is_refused_before_training(stubbed_quickstart, tmp_path):
    """data.heldout naming a class twice (in another case) is refused with both spellings,
    before any data is read, and leaves no run folder."""
    with pytest.raises(ConfigError, match=r"^the quickstart config: data\.heldout: 'Shirt' and "
                                          r"'shirt' are the same class \(shirt\); give each "
                                          r"class once$"):
        stubbed_quickstart({"data": {"heldout": ["Shirt", "shirt"]},
                            "out": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_quickstart_settings_that_would_change_nothing_are_refused():
    """test_limit in validation mode (the test split is not read) and probe_layers for a
    probe of other features were accepted and did nothing."""
    with pytest.raises(ConfigError, match=r"^the quickstart config: data: test_limit has no "
                       r"effect with validation \(the test split is not read\); drop it$"):
        quickstart_config({"data": {"validation": 100, "test_limit": 5}})
    with pytest.raises(ConfigError, match=r"^the quickstart config: eval: probe_layers has no "
                       r"effect unless probe_features is layers; drop it$"):
        quickstart_config({"eval": {"probe_layers": 2}})
    assert quickstart_config({"eval": {"probe_features": "layers", "probe_layers": 2}})
    full = quickstart_config({}).to_dict()  # as results.json records it: loads again
    assert quickstart_config(full).to_dict() == full
