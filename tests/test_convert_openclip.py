"""OpenCLIP import/export against embeddings computed by real OpenCLIP (committed fixtures,
written by scripts/make_openclip_fixtures.py in the OpenCLIP environment)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from cliplab.errors import ModelError
from cliplab.models.convert import (convert_openclip, export_openclip, is_openclip_checkpoint,
                                    load_openclip)
from cliplab.models.convert.clip_bpe import clip_bpe_tokenizer
from cliplab.models.convert.openclip_files import read_state_dict
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.presets import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
SOURCES = {"hub-gelu": FIXTURES / "hub-gelu",
           "ddp-quickgelu": FIXTURES / "ddp-quickgelu" / "epoch_3.pt"}
TOL = 1e-4


def _expected(name: str) -> tuple[dict, list[str]]:
    folder = FIXTURES / name
    return (load_file(str(folder / "expected.safetensors")),
            json.loads((folder / "captions.json").read_text()))


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out) if not isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("name", SOURCES)
def test_imported_model_matches_openclip(name):
    expected, captions = _expected(name)
    model = load_openclip(SOURCES[name])
    pixels = model.preprocess(expected["images"])
    with torch.no_grad():
        image = model.encode_image(pixels)
        text_from_ids = model.encode_text(expected["input_ids"])
        text = model.encode_texts(captions)
        hf_image = F.normalize(_features(model.model.get_image_features(pixel_values=pixels)), dim=-1)
        hf_text = F.normalize(_features(model.model.get_text_features(
            input_ids=expected["input_ids"])), dim=-1)
    for ours in (image, hf_image):
        assert (ours - expected["image_embeddings"]).abs().max() <= TOL
    for ours in (text_from_ids, text, hf_text):
        assert (ours - expected["text_embeddings"]).abs().max() <= TOL
    # the embeddings are not trivially equal: different images give different embeddings
    assert (expected["image_embeddings"][0] - expected["image_embeddings"][1]).abs().max() > 0.01


def test_activation_and_preprocessing_carried_over():
    gelu, quick = load_openclip(SOURCES["hub-gelu"]), load_openclip(SOURCES["ddp-quickgelu"])
    assert gelu.model.config.vision_config.hidden_act == "gelu"
    assert quick.model.config.text_config.hidden_act == "quick_gelu"
    pre = gelu.preprocess_config
    assert (pre.image_size, pre.resize_mode, pre.interpolation) == (32, "squash", "bicubic")
    assert pre.mean == (0.45, 0.46, 0.41)
    # no preprocessing given: OpenCLIP's defaults (OpenAI's mean/std, bicubic, shortest side)
    from cliplab.models.preprocess import CLIP_MEAN, CLIP_STD
    q = quick.preprocess_config
    assert (q.resize_mode, q.interpolation, q.mean, q.std) == ("shortest", "bicubic", CLIP_MEAN,
                                                                CLIP_STD)


def test_the_top_level_preprocess_config_wins_over_the_model_configs():
    from cliplab.models.convert.openclip_files import OpenClipCheckpoint
    from cliplab.models.convert.openclip_import import _preprocess

    ckpt = OpenClipCheckpoint(Path("w.pt"), Path("open_clip_config.json"), {},
                              {"vision_cfg": {"image_mean": [0.9] * 3},
                               "preprocess_cfg": {"resize_mode": "squash", "mean": [0.1] * 3}},
                              {"resize_mode": "longest"})
    pre = _preprocess(ckpt, 32)
    # each key: top, then the model config's preprocess_cfg, then vision_cfg's image_* keys
    assert (pre.resize_mode, pre.mean) == ("longest", (0.1, 0.1, 0.1))


def test_converted_folder_opens_in_transformers_and_cliplab(tmp_path):
    out = convert_openclip(SOURCES["hub-gelu"], tmp_path / "model")
    expected, _ = _expected("hub-gelu")
    model = DualEncoder.load(out)
    with torch.no_grad():
        image = model.encode_image(model.preprocess(expected["images"]))
    assert (image - expected["image_embeddings"]).abs().max() <= TOL
    assert type(AutoModel.from_pretrained(out)).__name__ == "CLIPModel"
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # no temporary left


@pytest.mark.parametrize("name", SOURCES)
def test_round_trip_is_bit_identical(name, tmp_path):
    src = SOURCES[name]
    original = read_state_dict(src if src.is_file() else src / "open_clip_model.safetensors")
    out = export_openclip(load_openclip(src), tmp_path / "exported")
    back = load_file(str(out / "open_clip_model.safetensors"))
    assert set(back) == set(original) - {"attn_mask"}
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"].get("quick_gelu", False) == (name == "ddp-quickgelu")
    # an export re-imports to the same embeddings, wherever the folder is moved: its config
    # names no path of the machine that wrote it
    assert config["model_cfg"]["text_cfg"].get("hf_tokenizer_name", ".") == "."
    assert str(tmp_path) not in (out / "open_clip_config.json").read_text()
    out = out.rename(tmp_path / "moved")
    expected, captions = _expected(name)
    again = load_openclip(out)
    with torch.no_grad():
        text = again.encode_texts(captions)
    assert (text - expected["text_embeddings"]).abs().max() <= TOL


def test_clip_bpe_tokenizer_gives_openclip_ids():
    tok = clip_bpe_tokenizer()
    ids = json.loads((FIXTURES / "clip_bpe_ids.json").read_text())
    assert len(ids) >= 5
    for caption, want in ids.items():
        assert tok(caption)["input_ids"] == want, caption


def test_is_openclip_checkpoint(tmp_path):
    assert is_openclip_checkpoint(SOURCES["hub-gelu"])
    assert is_openclip_checkpoint(SOURCES["ddp-quickgelu"])
    folder = build_model("tiny-clip").save(tmp_path / "hf")
    assert not is_openclip_checkpoint(folder)
    assert not is_openclip_checkpoint(tmp_path / "missing")


def _hub_copy(tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(SOURCES["hub-gelu"], dst)
    return dst


def _edit_config(folder: Path, edit) -> None:
    file = folder / "open_clip_config.json"
    data = json.loads(file.read_text())
    edit(data["model_cfg"])
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, message", [
    ("not_state_dict", "not a state dict"),
    ("truncated", "cannot read the checkpoint"),
    ("pickled_object", "holds Python objects besides tensors"),
    ("missing_key", "missing key 'visual.ln_post.bias'"),
    ("unexpected_key", "unexpected key 'visual.extra'"),
    ("shape", "'visual.conv1.weight' has shape [40, 3, 8, 8], the config implies [40, 3, 16, 16]"),
    ("timm", "vision_cfg.timm_model_name='vit_base_patch16_siglip_224' is not supported"),
    ("bad_json", "not a readable JSON file"),
])
def test_bad_checkpoints_give_one_line_naming_file_and_key(tmp_path, breakage, message):
    src = _hub_copy(tmp_path)
    weights = src / "open_clip_model.safetensors"
    state = load_file(str(weights))
    if breakage == "not_state_dict":
        weights.unlink()
        weights = src / "open_clip_pytorch_model.bin"
        torch.save([1, 2, 3], weights)
    elif breakage == "pickled_object":
        weights.unlink()
        weights = src / "open_clip_pytorch_model.bin"
        torch.save({"visual.proj": torch.zeros(2), "extra": Path("x")}, weights)
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "missing_key":
        del state["visual.ln_post.bias"]
        save_file(state, str(weights))
    elif breakage == "unexpected_key":
        state["visual.extra"] = torch.zeros(2)
        save_file(state, str(weights))
    elif breakage == "shape":
        _edit_config(src, lambda cfg: cfg["vision_cfg"].update(patch_size=16))
    elif breakage == "timm":
        _edit_config(src, lambda cfg: cfg["vision_cfg"].update(
            timm_model_name="vit_base_patch16_siglip_224"))
    elif breakage == "bad_json":
        (src / "open_clip_config.json").write_text("{not json")
    out = tmp_path / "out"
    with pytest.raises(ModelError) as err:
        convert_openclip(src, out)
    text = str(err.value)
    assert "\n" not in text and message in text
    named = src / ("open_clip_config.json" if breakage in ("timm", "bad_json") else weights.name)
    assert str(named) in text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_out_folder_not_overwritten_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        convert_openclip(SOURCES["hub-gelu"], out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ModelError, match="only a previous convert output"):
        convert_openclip(SOURCES["hub-gelu"], out, overwrite=True)  # not a model folder
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert_openclip(SOURCES["hub-gelu"], out)
    (out / "keep.txt").write_text("mine")  # a model folder holding a file of the user's: kept
    with pytest.raises(ModelError, match=r"holds other files \(e.g. keep.txt\)"):
        convert_openclip(SOURCES["hub-gelu"], out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # a previous model folder alone: replaced whole
    (out / "config.json").write_text("{}")
    convert_openclip(SOURCES["hub-gelu"], out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip"


def test_export_refuses_non_clip_towers(tmp_path):
    with pytest.raises(ModelError, match="OpenCLIP export applies to CLIP towers only"):
        export_openclip(build_model("tiny-siglip"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SOURCES)
def test_the_model_spec_takes_an_openclip_checkpoint(name):
    from cliplab.models.resolve import load_model

    expected, _ = _expected(name)
    model = load_model(str(SOURCES[name]))
    with torch.no_grad():
        image = model.encode_image(model.preprocess(expected["images"]))
    assert (image - expected["image_embeddings"]).abs().max() <= TOL


def test_a_checkpoint_holding_the_attn_mask_buffer_still_loads(tmp_path):
    """Older OpenCLIP versions saved the causal mask buffer as ``attn_mask``: it is skipped."""
    src = _hub_copy(tmp_path)
    weights = src / "open_clip_model.safetensors"
    state = load_file(str(weights))
    state["attn_mask"] = torch.full((24, 24), float("-inf")).triu(1)
    save_file(state, str(weights))
    expected, captions = _expected("hub-gelu")
    model = load_openclip(src)
    with torch.no_grad():
        text = model.encode_texts(captions)
        image = model.encode_image(model.preprocess(expected["images"]))
    assert (text - expected["text_embeddings"]).abs().max() <= TOL
    assert (image - expected["image_embeddings"]).abs().max() <= TOL


def _tiny_clip():
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=16)


@pytest.mark.parametrize("mode", ["squash", "longest"])
def test_export_keeps_the_resize_mode(tmp_path, mode):
    model = _tiny_clip()
    model.preprocess_config.resize_mode = mode
    out = export_openclip(model, tmp_path / "oc")
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["resize_mode"] == mode
    with pytest.warns(UserWarning) if mode == "longest" else contextlib.nullcontext():
        back = load_openclip(out)  # (a saved "longest" model warns that HF cannot pad)
    assert back.preprocess_config.resize_mode == mode


def test_export_writes_a_layer_norm_eps_other_than_openclips_default(tmp_path):
    model = _tiny_clip()
    for tower in (model.model.config.vision_config, model.model.config.text_config):
        tower.layer_norm_eps = 1e-6
    for module in model.model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    out = export_openclip(model, tmp_path / "oc")
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["vision_cfg"]["norm_kwargs"] == cfg["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    back = load_openclip(out)
    assert back.model.config.vision_config.layer_norm_eps == 1e-6
    assert back.model.config.text_config.layer_norm_eps == 1e-6
    default = json.loads((export_openclip(_tiny_clip(), tmp_path / "plain")
                          / "open_clip_config.json").read_text())["model_cfg"]
    assert "norm_kwargs" not in default["vision_cfg"] and "norm_kwargs" not in default["text_cfg"]


def test_a_clip_bpe_model_exports_with_openclips_default_tokenizer(tmp_path):
    """CLIP's own BPE (vocab 49408, end token 49407, the largest id) is OpenCLIP's default: the
    config names no tokenizer and no pooling (OpenCLIP's argmax pools at 49407), and no
    tokenizer files are written; it re-imports to the same text embeddings."""
    from transformers import CLIPConfig, CLIPModel

    from cliplab.models.preprocess import PreprocessConfig

    tok = clip_bpe_tokenizer(16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    model = DualEncoder(CLIPModel(config).eval(), tok, PreprocessConfig(image_size=16),
                        text_pooling="model", context_length=16).eval()
    out = export_openclip(model, tmp_path / "oc")
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert not {"hf_tokenizer_name", "pool_type", "eos_id"} & set(text_cfg)
    assert text_cfg["vocab_size"] == 49408
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    back = load_openclip(out)
    captions = ["a photo of a cat", "two dogs on a beach"]
    assert back.tokenize(captions)["input_ids"].tolist() == \
        model.tokenize(captions)["input_ids"].tolist()
    with torch.no_grad():
        assert (back.encode_texts(captions) - model.encode_texts(captions)).abs().max() <= TOL


def test_argmax_pooling_with_an_end_token_that_is_not_the_largest_id_is_refused(tmp_path):
    """hub-gelu's tokenizer ends texts with id 3 of 260: OpenCLIP's argmax pooling would pool
    at the largest id instead, which transformers' CLIP cannot do."""
    src = _hub_copy(tmp_path)

    def argmax(cfg):
        cfg["text_cfg"]["pool_type"] = "argmax"
        del cfg["text_cfg"]["eos_id"]

    _edit_config(src, argmax)
    with pytest.raises(ModelError) as err:
        convert_openclip(src, tmp_path / "out")
    assert str(err.value) == (
        f"{src / 'open_clip_config.json'}: text_cfg.pool_type='argmax' pools at the largest "
        "token id, but the tokenizer's end token (3) is not its largest (259); transformers' "
        "CLIP pools at the end token")
    assert not (tmp_path / "out").exists()


def test_a_missing_config_given_with_a_folder_is_named(tmp_path):
    """--config naming no file was told as the folder lacking open_clip_config.json (with
    "give the model config with --config", which was given); a given config is used, the
    folder's own only without one."""
    from cliplab.models.convert.openclip_files import find_openclip_files

    src = _hub_copy(tmp_path)
    with pytest.raises(ModelError, match=rf"^{tmp_path}/nope.json: no such OpenCLIP model "
                                         "config file$"):
        find_openclip_files(src, tmp_path / "nope.json")
    other = tmp_path / "other.json"
    shutil.copy(src / "open_clip_config.json", other)
    assert find_openclip_files(src, other) == (src / "open_clip_model.safetensors", other)
    weights = src / "open_clip_model.safetensors"
    assert find_openclip_files(weights, other) == (weights, other)
    (src / "open_clip_config.json").unlink()
    with pytest.raises(ModelError, match="no open_clip_config.json; give the model config"):
        find_openclip_files(src)
