"""The one model resolver: presets, model / checkpoint / run folders and Hub ids from the
Hugging Face cache (laid out here by hand: no network)."""

import re
import shutil
import warnings
from pathlib import Path

import pytest

from cliplab.cli import main
from cliplab.errors import ConfigError, ModelError
from cliplab.models.folder import model_fingerprint
from cliplab.models.resolve import load_model, resolve_model_path
from cliplab.runs import RunDir
from tests.hub_cache import hub_cache

TINY = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
            context_length=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny-clip (seed 1) saved as a model folder."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    load_model({"name": "tiny-clip", "options": {**TINY, "seed": 1}}).save(folder)
    return folder


def _same_weights(a, b) -> bool:
    return model_fingerprint(a) == model_fingerprint(b)


def test_a_preset_with_options_and_a_model_folder(saved):
    model = load_model({"name": "tiny-clip", "options": {**TINY, "seed": 1}})
    assert model.preprocess_config.image_size == 16
    assert _same_weights(load_model(str(saved)), model)
    assert _same_weights(load_model(saved), model)  # a Path is a spec too
    assert resolve_model_path(str(saved)) == saved
    with pytest.raises(ConfigError, match="options .*only apply to presets"):
        load_model({"name": str(saved), "options": {"seed": 2}})
    with pytest.raises(ModelError, match="'tiny-clip' is a preset"):
        resolve_model_path("tiny-clip")


def test_checkpoint_and_run_folders_resolve_to_the_newest_model(saved, tmp_path):
    run = RunDir(tmp_path / "run", tensorboard=False)
    with pytest.raises(ModelError, match="run folder .* has no complete checkpoint"):
        (run.path / "checkpoints").mkdir()
        resolve_model_path(str(run.path))
    old = load_model({"name": "tiny-clip", "options": {**TINY, "seed": 2}})
    run.atomic_checkpoint(5, lambda f: old.save(f / "model"))
    run.atomic_checkpoint(12, lambda f: shutil.copytree(saved, f / "model"))
    (run.path / "checkpoints" / "step-20.tmp" / "model").mkdir(parents=True)  # unfinished
    newest = run.path / "checkpoints" / "step-12" / "model"
    assert resolve_model_path(str(run.path)) == newest
    assert resolve_model_path(str(run.path / "checkpoints" / "step-5")) == \
        run.path / "checkpoints" / "step-5" / "model"
    assert _same_weights(load_model(str(run.path)), load_model(str(saved)))
    assert _same_weights(load_model(str(run.path / "checkpoints" / "step-5")), old)
    adapters = RunDir(tmp_path / "lora", tensorboard=False)
    adapters.atomic_checkpoint(3, lambda f: (f / "adapter").mkdir())
    with pytest.raises(ModelError, match=r"step-3 holds no model/ folder \(it holds adapter\): "
                                         r"give a run whose checkpoints are whole models"):
        load_model(str(adapters.path))
    # a LoRA run: its adapter checkpoints, and the merged model when it wrote one
    (adapters.path / "checkpoints" / "step-3" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"\(it holds adapter\): a LoRA run: load it with "
                                         r"cliplab.adapt.lora.load_lora, or run it with "
                                         r"options.merge=true"):
        load_model(str(adapters.path))
    shutil.copytree(saved, adapters.path / "merged")
    with pytest.raises(ModelError, match=r"the run's merged model is .*lora/merged: give that"):
        load_model(str(adapters.path))


def test_a_wise_ft_run_folder_is_refused_naming_its_best_and_its_fine_tuned_end(saved,
                                                                                  tmp_path):
    """Its newest checkpoint is the fine-tune (α=1): `--model RUN` scored that, not the model
    at the α the run chose, without a word."""
    run = RunDir(tmp_path / "wise", tensorboard=False)
    run.atomic_checkpoint(6, lambda f: shutil.copytree(saved, f / "model"))
    shutil.copytree(saved, run.path / "best")
    run.write_json("results.json", {"method": "wise-ft", "best_alpha": 0.3,
                                    "selected_on": "validation"})
    with pytest.raises(ModelError, match=(
            rf"^{run.path} is a WiSE-FT run folder, which holds two models: give "
            rf"{run.path / 'best'} \(the model at α=0.3, chosen on validation\) or "
            rf"{run.path / 'checkpoints' / 'step-6' / 'model'} \(the fine-tuned end, α=1\)$")):
        load_model(str(run.path))
    assert resolve_model_path(str(run.path / "best")) == run.path / "best"
    assert resolve_model_path(str(run.path / "checkpoints" / "step-6")) == \
        run.path / "checkpoints" / "step-6" / "model"
    # one that swept a given fine-tune (no checkpoints of its own) names that one
    given = RunDir(tmp_path / "given", tensorboard=False)
    shutil.copytree(saved, given.path / "best")
    given.write_json("results.json", {"best_alpha": 1, "finetuned": "ft/step-9/model"})
    with pytest.raises(ModelError, match=r"\(the model at α=1\) or ft/step-9/model \(the "):
        load_model(str(given.path))
    # one without best/ (save_best is off by default) holds the fine-tuned end only
    shutil.rmtree(run.path / "best")
    with pytest.raises(ModelError, match=(
            rf"^{run.path} is a WiSE-FT run folder: its checkpoints hold the fine-tuned end "
            r"\(α=1\), not the model at α=0.3, chosen on validation \(options.save_best=true")):
        load_model(str(run.path))
    # a model folder holding a copy of itself in best/ is a model folder
    mine = tmp_path / "mine"
    shutil.copytree(saved, mine)
    shutil.copytree(saved, mine / "best")
    assert resolve_model_path(str(mine)) == mine


def test_a_run_that_never_finished_is_used_with_a_warning(saved, tmp_path, capsys):
    """A killed run's newest checkpoint (step 20 of 46) was scored, merged and reported as the
    run without a word; a finished run (results.json) is used quietly."""
    run = RunDir(tmp_path / "run", tensorboard=False)
    run.atomic_checkpoint(20, lambda f: shutil.copytree(saved, f / "model"))
    with pytest.warns(UserWarning, match=rf"^run folder {run.path} has no results.json: the "
                      r"run stopped before its end, or still runs; using its newest "
                      r"checkpoint, step-20$"):
        assert resolve_model_path(str(run.path)) == run.path / "checkpoints" / "step-20" / "model"
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--model", str(run.path), "--config", str(suite), "--no-progress"]) == 0
    assert capsys.readouterr().err.count(f"cliplab: warning: run folder {run.path} has no "
                                         "results.json") == 1  # said once (two readers)
    (run.path / "results.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_model_path(str(run.path))

def test_a_checkpoint_a_live_run_removes_while_it_is_read_is_read_from_the_newest(
        saved, tmp_path, monkeypatch):
    """A run training with train.keep_checkpoints removed the newest checkpoint an eval was
    reading; the error blamed the model ("no tokenizer ... save one there"). The run's new
    newest is read instead; a checkpoint the user named that is gone is said to be gone."""
    from cliplab.models.dual_encoder import DualEncoder

    run = RunDir(tmp_path / "run", tensorboard=False)
    (run.path / "results.json").write_text("{}", encoding="utf-8")
    old = load_model({"name": "tiny-clip", "options": {**TINY, "seed": 2}})
    run.atomic_checkpoint(5, lambda f: old.save(f / "model"))
    real_load = DualEncoder.load
    read = []

    def trainer_saves_and_prunes_during_the_read(folder, device="cpu"):
        read.append(Path(folder).parent.name)
        if len(read) == 1:  # the live run saves step-6 and removes step-5 under the reader
            run.atomic_checkpoint(6, lambda f: shutil.copytree(saved, f / "model"))
            shutil.rmtree(run.path / "checkpoints" / "step-5")
        return real_load(folder, device=device)

    monkeypatch.setattr(DualEncoder, "load", trainer_saves_and_prunes_during_the_read)
    assert _same_weights(load_model(str(run.path)), load_model(str(saved)))
    assert read[:2] == ["step-5", "step-6"]
    read.clear()
    step_6 = run.path / "checkpoints" / "step-6"

    def pruned_under_the_reader(folder, device="cpu"):
        shutil.rmtree(step_6)
        return real_load(folder, device=device)

    monkeypatch.setattr(DualEncoder, "load", pruned_under_the_reader)
    with pytest.raises(ModelError, match=r"step-6/model was removed while it was read \(a run "
                                         r"still training keeps only its newest "
                                         r"train.keep_checkpoints checkpoints\)"):
        load_model(str(step_6))


def test_a_run_stopped_before_its_first_save_is_named_a_run(tmp_path, capsys):
    """It was "not a model folder (no config.json)", as if the path were wrong. Then it gave
    pretrain's resume advice ("choose a new --out") where a model is read: export's, eval's or
    index's --out is their own output, not the run's."""
    run = RunDir(tmp_path / "run", tensorboard=False)
    run.write_config({"model": "tiny-clip"})
    run.log({"step": 1, "loss": 2.0})
    with pytest.raises(ModelError, match=rf"^run folder {run.path} has no checkpoint yet: the "
                                         r"run stopped \(or still runs\) before its first "
                                         r"save, so it holds no model to read; give a model, a "
                                         r"checkpoint or a run folder with a checkpoint$"):
        load_model(str(run.path))
    assert main(["export", str(run.path), "--format", "open_clip", "--out",
                 str(tmp_path / "e")]) == 2
    said = capsys.readouterr().err
    assert "has no checkpoint yet" in said and "resume" not in said and "--out" not in said
    assert not (tmp_path / "e").exists()
    (run.path / "results.json").write_text("{}")  # a finished run without checkpoints (an
    with pytest.raises(ModelError, match=r"is not a model folder"):  # adapter's): not "stopped"
        load_model(str(run.path))


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(saved, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, "tiny-org/tiny-clip-16", saved)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("tiny-org/tiny-clip-16") == snapshot
    assert _same_weights(load_model("tiny-org/tiny-clip-16"), load_model(str(saved)))
    with pytest.raises(ModelError, match=r"openai/clip-vit-base-patch32 does not exist \(no "
                                         r"such file or folder, and no preset of that name\) in "
                                         r"the working folder .*, and is not in the Hugging "
                                         r"Face cache .*hf download"):
        load_model("openai/clip-vit-base-patch32")
    with pytest.raises(ModelError, match=r"^no/such/model does not exist \(no such file or "
                                        r"folder, and no preset of that name\) in the working "
                                        rf"folder {re.escape(str(Path.cwd()))}$"):
        load_model("no/such/model")  # two slashes: a missing path, not a Hub id


def test_eval_cli_takes_a_hub_id_or_says_how_to_fetch_it(saved, tmp_path, monkeypatch,
                                                         capsys):
    hub_cache(tmp_path / "hub", "tiny-org/tiny-clip-16", saved)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--model", "tiny-org/tiny-clip-16", "--suite", str(suite),
                 "--no-progress"]) == 0
    assert '"acc1"' in capsys.readouterr().out
    assert main(["eval", "--model", "google/siglip-base-patch16-224", "--suite", str(suite),
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "hf download google/siglip-base-patch16-224" in lines[0]


def test_a_file_of_a_model_folder_says_to_give_its_folder(saved, tmp_path, capsys):
    weights = saved / "model.safetensors"
    for call in (load_model, resolve_model_path):
        with pytest.raises(ModelError) as err:
            call(str(weights))
        assert str(err.value) == (f"{weights} is a file, not a model folder; give the folder "
                                  f"that holds it: {saved}")
    assert main(["export", str(weights), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(f"give the folder that holds it: {saved}")
    loose = tmp_path / "epoch_1.pt"  # an OpenCLIP checkpoint without its config beside it
    loose.write_bytes(b"")
    with pytest.raises(ModelError, match=r"^.*epoch_1.pt is a file, not a model folder; an "
                                         r"OpenCLIP checkpoint file needs its model config"):
        load_model(str(loose))


def test_an_openclip_checkpoint_file_is_still_a_model_spec():
    from pathlib import Path

    ckpt = Path(__file__).parent / "fixtures" / "openclip" / "ddp-quickgelu" / "epoch_3.pt"
    assert resolve_model_path(str(ckpt)) == ckpt
    assert load_model(str(ckpt)).model.config.vision_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", " TRUE "])
def test_every_spelling_of_hf_hub_offline_keeps_cliplab_off_the_network(value, tmp_path,
                                                                        monkeypatch):
    import cliplab.models.resolve as resolve

    def no_download(*args, **kwargs):
        raise AssertionError("offline: the Hub must not be asked")

    monkeypatch.setattr(resolve, "_download", no_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ModelError, match=r"tiny-org/not-cached .*is not in the Hugging Face "
                                         r"cache .*HF_HUB_OFFLINE"):
        resolve_model_path("tiny-org/not-cached")
