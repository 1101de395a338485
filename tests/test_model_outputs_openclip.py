"""OpenCLIP folders in and out: an exported ``mlp_ratio`` gives back the MLP width as OpenCLIP
computes it, so any model round-trips; timm's Hub layout (with its own config.json) is an
OpenCLIP folder; a missing or unreadable tokenizer is one line naming the folder and files; a
model loaded from a checkpoint file names that file as its source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.models.convert import export_openclip, is_openclip_checkpoint, load_openclip
from cliplab.models.convert.openclip_config import openclip_config_from_clip
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import load_model
from tests.cli_output import one_line_error as _one_line
from tests.tiny_models import small_model

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
TIMM_CONFIG = {"architecture": "vit_base_patch32_clip_224", "num_classes": 20,
               "pretrained_cfg": {"tag": "openai"}}


def _clip_config(width: int, intermediate: int) -> CLIPConfig:
    tower = dict(hidden_size=width, intermediate_size=intermediate, num_attention_heads=1,
                 num_hidden_layers=1)
    return CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 16,
                                                       "patch_size": 8}, projection_dim=8)


# (60, 246) is the audit's: 246 / 60 = 4.1 and int(60 * 4.1) = 245
PAIRS = [(60, 246), (768, 3072), (1280, 5120), (36, 100), (40, 140), (1664, 8192), (1408, 6144),
         *((w, i) for w in (12, 60, 84, 100, 300, 1000) for i in range(w, 6 * w, 7))]


@pytest.mark.parametrize("width, intermediate", [(60, 246), (1664, 8192), (300, 1001)])
def test_the_exported_mlp_ratio_gives_back_the_mlp_width(width, intermediate):
    cfg = openclip_config_from_clip(_clip_config(width, intermediate), None, None)
    for tower in ("vision_cfg", "text_cfg"):
        ratio = cfg[tower]["mlp_ratio"]
        assert int(width * ratio) == intermediate  # OpenCLIP's own arithmetic
        assert int(width * json.loads(json.dumps(ratio))) == intermediate  # through the JSON


def test_the_mlp_ratio_truncates_to_the_mlp_width_for_many_sizes():
    from cliplab.models.convert.openclip_config import mlp_ratio

    for width in range(1, 1025):
        for intermediate in range(1, 8 * width + 1, 1 if width <= 128 else 13):
            ratio = mlp_ratio(width, intermediate)
            assert int(width * ratio) == intermediate, (width, intermediate, ratio)
            assert abs(ratio - intermediate / width) <= 1e-12 * intermediate / width
    for width, intermediate in PAIRS:
        assert int(width * mlp_ratio(width, intermediate)) == intermediate


def _odd_model() -> DualEncoder:
    """A CLIP whose MLPs are 246 wide over width 60 (246 / 60 is no exact float ratio)."""
    base = small_model(width=60, heads=3, embed_dim=20)
    config = base.model.config
    config = CLIPConfig(
        text_config={**config.text_config.to_dict(), "intermediate_size": 246},
        vision_config={**config.vision_config.to_dict(), "intermediate_size": 246},
        projection_dim=config.projection_dim)
    torch.manual_seed(0)
    return DualEncoder(CLIPModel(config).eval(), base.tokenizer, base.preprocess_config,
                       text_pooling="model", context_length=base.context_length)


def test_an_odd_size_model_round_trips_export_then_convert(tmp_path, capsys):
    model = _odd_model()
    src = model.save(tmp_path / "odd")
    assert main(["export", str(src), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    assert main(["convert", str(tmp_path / "oc"), "--out", str(tmp_path / "back")]) == 0
    back = DualEncoder.load(tmp_path / "back")
    assert back.model.config.vision_config.intermediate_size == 246
    assert back.model.config.text_config.intermediate_size == 246
    ours, theirs = model.model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _timm_layout(tmp_path: Path, config: dict) -> Path:
    """The hub-gelu fixture laid out as timm's Hub repos are: a config.json of timm's own."""
    folder = tmp_path / "timm-hub"
    shutil.copytree(FIXTURES / "hub-gelu", folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config", [TIMM_CONFIG, {**TIMM_CONFIG, "model_type": "timm_wrapper"}],
                         ids=["timm", "timm_wrapper"])
def test_a_timm_hub_layout_is_an_openclip_folder(tmp_path, capsys, config):
    folder = _timm_layout(tmp_path, config)
    assert is_openclip_checkpoint(folder)
    want = load_openclip(FIXTURES / "hub-gelu")
    model = load_model(str(folder))
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), want.encode_image(pixels), atol=1e-6)
        assert torch.allclose(model.encode_texts(["a cat"]), want.encode_texts(["a cat"]),
                              atol=1e-6)
    assert main(["convert", str(folder), "--out", str(tmp_path / "m")]) == 0
    assert DualEncoder.load(tmp_path / "m").model.config.model_type == "clip"


def test_an_hf_folder_with_openclip_files_beside_stays_an_hf_folder(tmp_path):
    folder = small_model().save(tmp_path / "hf")
    shutil.copy(FIXTURES / "hub-gelu" / "open_clip_config.json", folder)
    shutil.copy(FIXTURES / "hub-gelu" / "open_clip_model.safetensors", folder)
    assert not is_openclip_checkpoint(folder)
    assert load_model(str(folder)).model.config.vision_config.hidden_size == 32


def test_a_tokenizer_that_cannot_load_is_one_line(tmp_path, monkeypatch, capsys):
    from cliplab.models.convert import openclip_import

    def fail(*args, **kwargs):
        raise ImportError("TimmWrapperConfig requires the timm library\npip install timm")

    folder = _timm_layout(tmp_path, TIMM_CONFIG)
    monkeypatch.setattr(openclip_import.AutoTokenizer, "from_pretrained", fail)
    assert main(["convert", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert _one_line(capsys) == (
        f"{folder / 'open_clip_config.json'}: text_cfg.hf_tokenizer_name 'local': the tokenizer "
        f"in {folder} cannot be read (ImportError: TimmWrapperConfig requires the timm library)")
    assert not (tmp_path / "m").exists()


def test_an_openclip_export_missing_its_tokenizer_files_names_them(tmp_path, capsys):
    out = export_openclip(small_model(), tmp_path / "oc")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    assert main(["convert", str(out), "--out", str(tmp_path / "m")]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"{out / 'open_clip_config.json'}: text_cfg.hf_tokenizer_name '.' "
                           f"names the folder {out}, which holds no tokenizer files "
                           "(tokenizer.json and tokenizer_config.json")
    assert "offline" not in line
    with pytest.raises(ModelError, match="holds no tokenizer files"):
        load_model(str(out))


def test_a_model_loaded_from_a_checkpoint_file_has_that_file_as_source():
    ckpt = FIXTURES / "ddp-quickgelu" / "epoch_3.pt"
    model = load_model(str(ckpt))
    assert model.source == str(ckpt.resolve()) and Path(model.source).is_file()
    assert load_openclip(FIXTURES / "hub-gelu").source == str((FIXTURES / "hub-gelu").resolve())

