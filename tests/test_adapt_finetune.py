"""Full fine-tuning with a zero-shot-initialised head: init equals zero-shot, what trains,
learning, save/load with the recorded origin."""

import json

import pytest
import torch

from cliplab.adapt.finetune import TRAIN_DEFAULTS, finetune, image_tower_trainable, load_finetuned
from cliplab.adapt.head import ClassifierHead, zeroshot_classifier_head
from cliplab.adapt.run import run_adapt
from cliplab.adapt.training import trainer_config
from cliplab.models.folder import model_fingerprint, require_origin
from cliplab.adapt.common import head_metrics, subsample
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.train.trainer import TrainConfig, Trainer
from tests.tiny_models import small_model



@pytest.fixture(scope="module")
def digits():
    return subsample(load_digits("train"), 256, seed=0)


def test_head_init_gives_exactly_the_zero_shot_logits(digits):
    model = small_model()
    head = zeroshot_classifier_head(model, digits)
    pixels = model.preprocess(digits.images[:32])
    with torch.no_grad():
        logits = head(model.encode_image(pixels, normalize=False))
        classifier = zeroshot_classifier(model, digits.prompt_names, digits.templates)
        expected = model.logit_scale.exp() * model.encode_image(pixels) @ classifier.t()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert head.scale.item() == pytest.approx(model.logit_scale.exp().item())


def test_only_the_image_tower_and_its_projection_train():
    model = small_model()
    image_tower_trainable(model)
    names = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert len(names) == len(list(model.vision_tower.parameters())) + 1


def test_finetuning_learns_and_leaves_the_text_side_alone(tmp_path, digits):
    from cliplab.runs import RunDir

    model = small_model()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    zs = head_metrics(model, zeroshot_classifier_head(model, digits).weight, digits, progress=False)
    cfg = trainer_config(TRAIN_DEFAULTS, {"epochs": 4, "batch_size": 32, "lr": 5e-3,
                                          "augment": False, "log_every": 1},
                         lock_text=True, progress=False)
    head, trainer = finetune(model, digits, cfg, RunDir(tmp_path), "base-path")
    after = model.model.state_dict()
    for name, value in before.items():
        same = torch.equal(value, after[name])
        if name.startswith(("text_model.", "text_projection.")) or name == "logit_scale":
            assert same, name
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
    tuned = head_metrics(model, head.weight, digits, progress=False)
    assert tuned["acc1"] > zs["acc1"] + 0.2  # a random tiny model starts near chance (10%)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]

    folder = trainer.last_checkpoint / "model"
    assert require_origin(folder) == {"path": "base-path", "fingerprint": model_fingerprint(
        small_model())}
    loaded, loaded_head = load_finetuned(folder)
    for a, b in zip(loaded.model.state_dict().values(), model.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(loaded_head.weight, head.weight)
    assert loaded_head.classnames == digits.classnames


def test_finetuning_with_a_fixed_head_trains_only_the_tower(digits):
    model = small_model()
    zs_head = zeroshot_classifier_head(model, digits).weight.detach().clone()
    before = model.model.state_dict()["visual_projection.weight"].clone()
    cfg = trainer_config(TRAIN_DEFAULTS, {"steps": 2, "batch_size": 32, "lr": 5e-3,
                                          "augment": False}, lock_text=True, progress=False)
    head, _ = finetune(model, digits, cfg, None, "base-path", train_head=False)
    assert torch.equal(head.weight, zs_head)
    assert not torch.equal(model.model.state_dict()["visual_projection.weight"], before)


def test_head_round_trip(tmp_path):
    head = ClassifierHead(torch.randn(3, 5), 7.5, ["a", "b", "c"])
    head.save(tmp_path)
    again = ClassifierHead.load(tmp_path)
    assert torch.equal(again.weight, head.weight) and again.scale.item() == 7.5
    assert again.classnames == ["a", "b", "c"]
    with pytest.raises(ModelError, match="head.safetensors"):
        ClassifierHead.load(tmp_path / "nowhere")


def test_a_fine_tuned_folders_model_card_says_it_holds_a_head(tmp_path, digits):
    """The card's pipeline example scores with the text prompts; a folder with a head says
    that cliplab eval scores with the head instead (once, however often the head is saved);
    a folder without one does not mention it."""
    from cliplab.adapt.finetune import save_finetuned

    model = small_model()
    head = zeroshot_classifier_head(model, digits)
    folder = save_finetuned(model, head, tmp_path / "ft", "tiny-clip", "abc")
    head.save(folder)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.count("`head.safetensors` is a classifier over this model's image embeddings, "
                      "fine-tuned with it for 10 classes") == 1
    assert "`cliplab eval --model THIS_FOLDER` scores zero-shot tasks over those classes with " \
        "it" in card and "scores with the text prompts, another classifier." in card
    plain = model.save(tmp_path / "plain")
    assert "head.safetensors" not in (plain / "README.md").read_text(encoding="utf-8")


def test_a_fine_tuned_folder_stopped_before_its_head_is_not_left_as_a_plain_model(
        tmp_path, digits, monkeypatch):
    """lora's merged/, wise-ft's best/ and finetune's model/ were written in place: a kill after
    the model files and before head.safetensors left a folder eval scored as a plain model
    (head null, no warning). The folder appears whole, or not at all."""
    from cliplab.adapt.finetune import save_finetuned

    model = small_model()
    head = zeroshot_classifier_head(model, digits)

    def killed(self, folder):
        raise KeyboardInterrupt
    monkeypatch.setattr(ClassifierHead, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_finetuned(model, head, tmp_path / "merged", "tiny-clip", "abc")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    folder = save_finetuned(model, head, tmp_path / "merged", "tiny-clip", "abc")
    model_back, head_back = load_finetuned(folder)
    assert torch.equal(head_back.weight, head.weight.cpu())
    assert require_origin(folder)["fingerprint"] == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]

def test_a_head_scores_an_eval_task_as_its_classifier(digits):
    """TaskContext(classifier=head) takes a ClassifierHead as it is (it had no `probe`):
    the head's accuracy on its own classes, the text head on others."""
    from cliplab.evaluate.suite import run_task
    from cliplab.evaluate.tasks import LinearHead, TaskContext

    model = small_model()
    torch.manual_seed(0)
    head = ClassifierHead(torch.randn(10, model.embed_dim), 5.0, digits.classnames)
    spec = {"task": "zeroshot", "data": digits}
    got = run_task(model, spec, TaskContext(progress=False, classifier=head))
    want = run_task(model, spec, TaskContext(progress=False, classifier=LinearHead(head.weight)))
    assert got == want
    other = ClassifierHead(head.weight, 5.0, [f"c{i}" for i in range(10)])
    assert run_task(model, spec, TaskContext(progress=False, classifier=other)) == \
        run_task(model, spec, TaskContext(progress=False))
    # the same classes in another order: its rows follow the data's class order
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    shuffled = ClassifierHead(head.weight[order], 5.0, [digits.classnames[i] for i in order])
    assert run_task(model, spec, TaskContext(progress=False, classifier=shuffled)) == got


def test_labelled_data_without_a_head_is_a_clear_error(digits):
    trainer = Trainer(small_model(), TrainConfig.from_dict({"steps": 1, "batch_size": 16,
                                                            "progress": False}))
    with pytest.raises(ConfigError, match="classification head"):
        trainer.fit(digits)


def test_run_writes_a_model_folder_and_results(tmp_path):
    small_model().save(tmp_path / "base")
    cfg = {"method": "finetune", "model": str(tmp_path / "base"), "out": str(tmp_path / "out"),
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"}},
           "shots": 0, "train_size": 256, "options": {"train": {"steps": 4, "batch_size": 64}}}
    res = run_adapt(cfg, progress=False)
    assert res["train_size"] == 256 and 0 <= res["test"]["acc1"] <= 1
    assert res["params"]["trainable"] < res["params"]["total"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["model_dir"] == res["model_dir"]
    assert require_origin(res["model_dir"])["path"] == str(tmp_path / "base")
    with pytest.raises(ConfigError, match="unknown key trian"):
        run_adapt({**cfg, "trian": {}, "out": str(tmp_path / "bad")}, progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["finetune", "lora", "wise-ft"])
def test_the_runs_seed_seeds_training_unless_options_train_gives_one(method, digits, tmp_path):
    """The top-level ``seed`` was recorded but training drew from ``options.train.seed``'s
    default 0: two seeds trained the same weights."""
    from cliplab.adapt import get_method
    from cliplab.adapt.base import AdaptContext
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.runs import RunDir

    data = digits.subset(torch.arange(64))

    def trained(seed: int, train_seed: int | None = None) -> dict:
        model = small_model()
        torch.manual_seed(0)
        train = {"steps": 2, "batch_size": 16, "lr": 1e-3, "progress": False,
                 **({"seed": train_seed} if train_seed is not None else {})}
        run = RunDir(tmp_path / f"{seed}-{train_seed}")
        adapter = get_method(method).fit(model, data, {"train": train}, AdaptContext(
            cache=FeatureCache(), seed=seed, progress=False, run=run))
        tuned = adapter.finetuned if method == "wise-ft" else model  # wise-ft tunes a copy
        return {k: v.clone() for k, v in tuned.model.state_dict().items()
                if v.is_floating_point()}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(trained(1), trained(5))
    assert same(trained(1, train_seed=7), trained(5, train_seed=7))
    assert same(trained(3), trained(0, train_seed=3))


@pytest.mark.parametrize("method, lr, weight_decay", [("finetune", 1e-4, 0.1),
                                                       ("lora", 1e-3, 0.01)])
def test_results_record_the_whole_train_settings_that_ran(method, lr, weight_decay, tmp_path,
                                                         monkeypatch):
    """options.train holds only the keys given; results.json's train_settings hold what ran:
    the method's defaults, the run's seed, the model's device (a report shows none of them as
    scores)."""
    from cliplab.adapt.run import run_adapt
    from cliplab.models import precision

    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)

    cfg = {"method": method, "model": "tiny-clip", "compare_zeroshot": False, "seed": 4,
           "shots": 2, "data": {"train": {"source": "digits", "split": "test"},
                                "test": {"source": "digits", "split": "test"}},
           "options": {"train": {"steps": 1, "batch_size": 8, "precision": "auto"}},
           "out": str(tmp_path / "r")}
    res = run_adapt(cfg, progress=False)
    written = json.loads((tmp_path / "r" / "results.json").read_text())
    assert written["options"]["train"] == {"steps": 1, "batch_size": 8, "precision": "auto"}
    ran = written["train_settings"]
    assert (ran["steps"], ran["batch_size"], ran["lr"], ran["weight_decay"], ran["seed"],
            ran["device"]) == (1, 8, lr, weight_decay, 4, "cpu")
    assert ran["precision"] == "bf16"  # auto resolved as the device is: what the steps ran in
    assert res["train_settings"] == ran
    from cliplab.evaluate.report_inputs import result_sections

    assert set(result_sections(written)) == {"test", "params", "run"}


def test_a_stopped_finetune_run_is_removed_before_its_first_checkpoint_and_said_after(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM during training left config.yaml, metrics.jsonl and events, which
    refused the same --out again (adapt cannot resume): now a run stopped before its first
    checkpoint is removed as half-built (in a folder that was there, what it logged), and one
    with checkpoints is kept, saying so."""
    from cliplab.runs import RunDir, latest_checkpoint

    small_model().save(tmp_path / "base")
    cfg = {"method": "finetune", "model": str(tmp_path / "base"),
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"}},
           "shots": 0, "train_size": 64, "compare_zeroshot": False,
           "options": {"train": {"steps": 4, "batch_size": 16, "log_every": 1,
                                 "save_every": 2}}}
    real_log = RunDir.log

    def stop_at(step):  # the Trainer logs its record, then the user presses Ctrl-C
        def log(self, record):
            real_log(self, record)
            if record.get("step") == step:
                raise KeyboardInterrupt
        return log

    monkeypatch.setattr(RunDir, "log", stop_at(1))
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(KeyboardInterrupt):
            run_adapt({**cfg, "out": str(out)}, progress=False)
        if out.name == "new":
            assert not out.exists()
        else:  # the user's folder stays, with what the next run into it may keep
            assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
        assert capsys.readouterr().err == ""
    monkeypatch.setattr(RunDir, "log", stop_at(3))
    out = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt):
        run_adapt({**cfg, "out": str(out)}, progress=False)
    assert latest_checkpoint(out).name == "step-2"
    assert capsys.readouterr().err == (
        f"adapt: stopped; {out} keeps its checkpoints up to step-2 (each "
        "checkpoints/step-N/model is what the run had trained), but adapt does not resume a "
        "run, so that --out is refused: remove it or choose another\n")
    monkeypatch.setattr(RunDir, "log", real_log)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_adapt({**cfg, "out": str(out)}, progress=False)
    res = run_adapt({**cfg, "out": str(tmp_path / "empty")}, progress=False)  # accepted
    assert (tmp_path / "empty" / "results.json").is_file() and res["train_size"] == 64
