"""What loading a model tells and records: the preprocessing assumed for a plain HF folder
without an image processor config, the text pooling assumed for a VisionTextDualEncoder folder
without cliplab.json, float32 text embeddings from a half-precision model, and the model a
pretraining run started from (``start_model.json``)."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, CLIPModel, ViTConfig,
                          VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

from cliplab.errors import ConfigError
from cliplab.models import DualEncoder
from cliplab.models.hf_files import write_processor_config
from cliplab.models.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from cliplab.models.resolve import load_model, model_record
from cliplab.models.tokenizer import byte_level_tokenizer
from cliplab.runs import RunDir, check_no_foreign_files, removed_if_unstarted
from cliplab.train.pretrain import run_pretrain
from tests.tiny_models import bare_siglip, small_model, tiny_clip_config
from tests.warned import warned

PRESET = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                             "layers": 1, "heads": 2, "embed_dim": 16,
                                             "context_length": 48}}
SHAPES = {"source": "shapes", "n": 64, "seed": 0, "kinds": ["single"], "image_size": 32}


def _plain_folder(folder: Path, kind: str) -> Path:
    """A folder plain transformers wrote (weights, config, tokenizer): no preprocessor config."""
    if kind == "clip":
        torch.manual_seed(0)
        CLIPModel(tiny_clip_config()).save_pretrained(folder)
        byte_level_tokenizer(32).save_pretrained(folder)
    else:
        siglip = bare_siglip(32)
        siglip.model.save_pretrained(folder)
        siglip.tokenizer.save_pretrained(folder)
    return folder


def _preprocessing_warnings(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(w.message) for w in caught if "preprocessor_config.json" in str(w.message)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_plain_folder_without_preprocessor_config_warns_what_is_assumed(tmp_path, kind):
    folder = _plain_folder(tmp_path / kind, kind)
    told = _preprocessing_warnings(lambda: load_model(str(folder)))
    assert len(told) == 1
    message = told[0]
    assert message.startswith(f"{folder} has no preprocessor_config.json")
    if kind == "clip":
        assert "CLIPImageProcessor's defaults at 16 px" in message and "'shortest'" in message
        assert str(list(CLIP_MEAN)) in message and str(list(CLIP_STD)) in message
    else:  # SigLIP's own processor (CLIP's mean/std were assumed for SigLIP folders too)
        assert "SiglipImageProcessor's defaults at 16 px" in message and "'squash'" in message
        assert "[0.5, 0.5, 0.5]" in message and "bicubic" in message
    assert "add its preprocessor_config.json to the folder" in message
    assert "\n" not in message
    # the pixels are those of transformers' processor of that kind at that size
    from PIL import Image
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 16},
                                   crop_size={"height": 16, "width": 16}) if kind == "clip" \
        else SiglipImageProcessor(size={"height": 16, "width": 16})
    image = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    want = processor(images=[Image.fromarray(image.numpy())], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(load_model(str(folder)).preprocess(image[None]), want)
    # what cliplab writes has its preprocessing, a preset needs none: neither is told anything
    saved = small_model().save(tmp_path / "saved")
    assert _preprocessing_warnings(lambda: DualEncoder.load(saved)) == []
    assert _preprocessing_warnings(lambda: load_model(PRESET)) == []
    # nor is a plain folder once it has one
    write_processor_config(folder, PreprocessConfig(image_size=16))
    assert _preprocessing_warnings(lambda: DualEncoder.load(folder)) == []


def _plain_vtde(folder: Path) -> Path:
    """A VisionTextDualEncoder folder plain transformers wrote (it never had cliplab.json)."""
    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2),
        BertConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=48), projection_dim=8)
    VisionTextDualEncoderModel(config).save_pretrained(folder)
    byte_level_tokenizer(32).save_pretrained(folder)
    write_processor_config(folder, PreprocessConfig(image_size=16))
    return folder


def test_the_vtde_warning_says_what_the_folder_lacks_and_what_is_assumed(tmp_path, recwarn):
    folder = _plain_vtde(tmp_path / "vtde")
    warned(recwarn)
    assert DualEncoder.load(folder).text_pooling == "model"
    err = "".join(line for line in warned(recwarn).splitlines(True) if "text_pooling" in line)
    assert err.startswith(f"{folder} has no cliplab.json: assuming "
                          "text_pooling 'model'")
    assert "lost" not in err  # it never had one
    assert "copy its cliplab.json back" in err and err.count("\n") == 1
    # a cliplab.json without text_pooling (e.g. only an origin record): said as it is
    (folder / "cliplab.json").write_text(json.dumps({"base": {"path": None,
                                                              "fingerprint": "0" * 32}}))
    DualEncoder.load(folder)
    err = warned(recwarn)
    assert err.startswith(f"{folder / 'cliplab.json'} sets no text_pooling: "
                          "assuming text_pooling 'model'")


def test_encode_texts_of_a_bf16_model_is_float32_as_its_images_are(tmp_path):
    folder = small_model().to(torch.bfloat16).save(tmp_path / "bf16")
    model = load_model(str(folder)).to(torch.bfloat16)
    texts = ["a red circle", "two blue squares on a green field", "x"]
    with torch.no_grad():
        old = model.encode_text(**model.tokenize(texts))  # what encode_texts returned before
    assert old.dtype == torch.bfloat16
    got = model.encode_texts(texts, batch_size=2)
    assert got.dtype == torch.float32
    # the fp32 cast of the old output, to bf16's precision; unit length in float32
    torch.testing.assert_close(got, old.float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)), rtol=0, atol=1e-6)
    fp32 = small_model()  # a float32 model's embeddings are exactly what they were
    with torch.no_grad():
        assert torch.equal(fp32.encode_texts(texts), fp32.encode_text(**fp32.tokenize(texts)))


def _recipe(model: dict, out: Path, steps: int) -> dict:
    return {"model": model, "data": {"train": SHAPES},
            "train": {"steps": steps, "batch_size": 16, "lr": 3e-3, "warmup": 1,
                      "log_every": 1, "save_every": 1, "augment": False},
            "out": str(out)}


def test_a_pretrain_run_records_its_start_model_and_a_resume_keeps_it(tmp_path):
    start = small_model(seed=3).save(tmp_path / "start")
    expected = {"model": {"name": str(start), "options": {}},
                **model_record(str(start), load_model(str(start)))}
    assert expected["model_folder"] == str(start.resolve())
    run = tmp_path / "run"
    run_pretrain(_recipe({"name": str(start)}, run, 2), progress=False)
    record = json.loads((run / "start_model.json").read_text())
    assert record == expected
    trained = load_model(str(run / "checkpoints" / "step-2" / "model"))
    assert model_record(None, trained)["fingerprint"] != record["fingerprint"]  # before training
    # the folder now holds other weights: a resumed run still records what it started from
    small_model(seed=4).save(start)
    run_pretrain(_recipe({"name": str(start)}, run, 3), resume="latest", progress=False)
    assert json.loads((run / "start_model.json").read_text()) == expected
    assert model_record(str(start), load_model(str(start)))["fingerprint"] != \
        expected["fingerprint"]


def _stopped_copy(run: Path, at: Path, step: int) -> Path:
    """``run`` as if killed after checkpoint ``step``: later checkpoints and results gone."""
    import shutil

    shutil.copytree(run, at)
    for later in (at / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (at / "results.json").unlink()
    return at


def _weights(run: Path, step: int) -> dict:
    return load_model(str(run / "checkpoints" / f"step-{step}" / "model")).model.state_dict()


def test_a_resume_that_caches_its_locked_tower_needs_the_weights_it_started_from(tmp_path,
                                                                                 capsys):
    """A locked tower's features are computed once, from the model the run loads: a resume
    after its `model:` moved on would train its next steps against another tower's features.
    A run folder that moved on is resumed from the checkpoint start_model.json recorded (the
    same weights as the uninterrupted run); a folder whose weights changed is refused."""
    base = tmp_path / "base"
    small_model(seed=3).save(base / "checkpoints" / "step-1" / "model")
    recipe = _recipe({"name": str(base)}, tmp_path / "whole", 3)
    recipe["train"]["lock_text"] = True
    with pytest.warns(UserWarning, match="no results.json"):  # base: a run still going
        run_pretrain(recipe, progress=False)
    stopped = _stopped_copy(tmp_path / "whole", tmp_path / "stopped", 2)
    small_model(seed=4).save(base / "checkpoints" / "step-2" / "model")  # base moves on
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no results.json"):
        run_pretrain({**recipe, "out": str(stopped)}, resume="latest", progress=False)
    assert "resuming with the model the run started from" in capsys.readouterr().err
    whole, resumed = _weights(tmp_path / "whole", 3), _weights(stopped, 3)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    start = small_model(seed=3).save(tmp_path / "start")
    recipe = {**recipe, "model": {"name": str(start)}, "out": str(tmp_path / "whole2")}
    run_pretrain(recipe, progress=False)
    stopped = _stopped_copy(tmp_path / "whole2", tmp_path / "stopped2", 2)
    small_model(seed=4).save(start)  # the folder's weights replaced in place
    with pytest.raises(ConfigError, match=rf"--resume: model {start} holds other weights than "
                       r"the run started from .*caches its locked text tower's features from "
                       "its start model"):
        run_pretrain({**recipe, "out": str(stopped)}, resume="latest", progress=False)
    assert not (stopped / "checkpoints" / "step-3").exists()


@pytest.mark.parametrize("train", [{"hard_negatives": {"images": "neighbours"}},
                                   {"lock_image": True}])
def test_a_resume_that_mines_neighbours_or_caches_its_image_tower_needs_its_start(train,
                                                                                  tmp_path):
    """The other inputs computed once from the start model: mined hard-negative neighbours,
    and a locked image tower's features (without augmentation): refused when the model's
    weights changed in place; untouched, the same resume goes on."""
    start = small_model(seed=3).save(tmp_path / "start")
    recipe = _recipe({"name": str(start)}, tmp_path / "whole", 3)
    recipe["train"].update(train)
    run_pretrain(recipe, progress=False)
    stopped = _stopped_copy(tmp_path / "whole", tmp_path / "stopped", 2)
    small_model(seed=4).save(start)
    what = "mines its hard-negative neighbours" if "hard_negatives" in train else \
        "caches its locked image tower's features"
    with pytest.raises(ConfigError, match=f"and the run {what} from its start model"):
        run_pretrain({**recipe, "out": str(stopped)}, resume="latest", progress=False)
    small_model(seed=3).save(start)
    run_pretrain({**recipe, "out": str(stopped)}, resume="latest", progress=False)
    whole, resumed = _weights(tmp_path / "whole", 3), _weights(stopped, 3)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_pretrain_run_from_a_preset_records_it_without_a_folder(tmp_path):
    run_pretrain(_recipe(PRESET, tmp_path / "run", 1), progress=False)
    record = json.loads((tmp_path / "run" / "start_model.json").read_text())
    assert record == {"model": PRESET, **model_record(PRESET, load_model(PRESET))}
    assert record["model_folder"] is None


def test_a_run_stopped_before_its_first_step_leaves_nothing_that_blocks_a_new_one(tmp_path):
    run = tmp_path / "run"
    RunDir(run).write_config({"out": str(run)})
    (run / "start_model.json").write_text("{}")
    check_no_foreign_files(run)  # what a run writes at its start is its own
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds notes.txt beside the config.yaml of a run of "
                                          "this folder stopped before its end"):
        check_no_foreign_files(run)
    (run / "notes.txt").unlink()
    with pytest.raises(RuntimeError), removed_if_unstarted(run, existed=False):
        raise RuntimeError("refused at its start")
    assert not run.exists()
    # stopped at its start (Ctrl-C, SIGTERM): each stopped quickstart left a folder behind
    RunDir(run).write_config({"out": str(run)})
    with pytest.raises(KeyboardInterrupt), removed_if_unstarted(run, existed=False):
        raise KeyboardInterrupt
    assert not run.exists()
