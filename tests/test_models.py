"""Models: save/load round trips, plain-transformers equivalence, loading HF folders."""

import json
import re

import pytest
import torch
from transformers import (AutoTokenizer, CLIPModel, SiglipConfig, SiglipModel,
                          VisionTextDualEncoderModel)

from cliplab.config import Section, load_config
from cliplab.errors import ConfigError, ModelError
from cliplab.models import DualEncoder, build_model
from cliplab.models.dual_encoder import mean_pool
from cliplab.models.presets import minilm_path
from cliplab.models.resolve import load_model
from cliplab.models.spec import model_spec
from cliplab.models.spec import ModelField
from cliplab.models.tokenizer import byte_level_tokenizer
from tests.tiny_models import tiny_clip_config

TEXTS = ["a red circle left of a blue square", "three green triangles", "héllo wörld"]


def _images(n=3, size=20, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), generator=g, dtype=torch.uint8)


def test_tiny_clip_round_trip_in_cliplab_and_plain_transformers(tmp_path, tiny_model):
    model = tiny_model.eval()
    pixels = model.preprocess(_images())
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(**tok)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()

    again = DualEncoder.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.encode_image(again.preprocess(_images())), img)
        assert torch.equal(again.encode_text(**again.tokenize(TEXTS)), txt)

    plain = CLIPModel.from_pretrained(tmp_path / "m").eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    enc = plain_tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        p_img = plain.get_image_features(pixel_values=pixels).pooler_output
        p_txt = plain.get_text_features(**enc).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(p_img, dim=-1), img)
    torch.testing.assert_close(torch.nn.functional.normalize(p_txt, dim=-1), txt)


def test_clip_text_pools_at_eos_not_at_padding(tiny_model):
    """Padding a batch must not change a caption's embedding (EOS pooling, not argmax)."""
    model = tiny_model.eval()
    with torch.no_grad():
        alone = model.encode_text(**model.tokenize(["a dog"]))
        padded = model.encode_text(**model.tokenize(["a dog", "a much longer caption here"]))[:1]
    torch.testing.assert_close(alone, padded)


@pytest.fixture(scope="module")
def lit_model():
    return build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)


def test_lit_minilm_round_trip_and_plain_transformers(tmp_path, lit_model):
    model = lit_model.eval()
    pixels = model.preprocess(_images(size=16))
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(**tok)
    model.save(tmp_path / "lit")
    again = DualEncoder.load(tmp_path / "lit")
    assert again.text_pooling == "mean"
    with torch.no_grad():
        assert torch.equal(again.encode_image(pixels), img)
        assert torch.equal(again.encode_text(**again.tokenize(TEXTS)), txt)

    plain = VisionTextDualEncoderModel.from_pretrained(tmp_path / "lit").eval()
    with torch.no_grad():
        p_img = plain.get_image_features(pixel_values=pixels).pooler_output
        hidden = plain.text_model(**tok).last_hidden_state
        p_txt = plain.text_projection(mean_pool(hidden, tok["attention_mask"]))
    torch.testing.assert_close(torch.nn.functional.normalize(p_img, dim=-1), img)
    torch.testing.assert_close(torch.nn.functional.normalize(p_txt, dim=-1), txt)


def test_lit_minilm_text_tower_is_the_pretrained_sentence_encoder(lit_model):
    """Identity projection + mean pooling = MiniLM sentence embeddings: related words are close."""
    texts = ["a photo of a sneaker.", "a photo of an ankle boot.", "a photo of a dress."]
    emb = lit_model.encode_texts(texts)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.05
    dim = lit_model.embed_dim
    assert torch.equal(lit_model.model.text_projection.weight, torch.eye(dim))
    # exactly the sentence encoder's normalised mean-pooled output, before any training
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lit_model.model.text_model(**enc).last_hidden_state
    torch.testing.assert_close(emb, torch.nn.functional.normalize(
        mean_pool(hidden, enc["attention_mask"]), dim=-1), atol=1e-5, rtol=1e-5)


def test_tiny_siglip_starts_at_the_papers_temperature_and_bias():
    model = build_model("tiny-siglip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == -10.0


def test_any_local_hf_clip_folder_loads(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_clip_config()
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    byte_level_tokenizer(32).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16},
         "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25]}))
    model = DualEncoder.load(tmp_path / "hf")
    assert model.kind == "clip" and model.preprocess_config.image_size == 16
    assert model.preprocess_config.std == (0.25, 0.25, 0.25)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), expected)


def test_any_local_hf_siglip_folder_loads(tmp_path):
    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(vocab_size=260, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16),
                       vision_config=dict(image_size=16, patch_size=8, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2))
    hf = SiglipModel(cfg).eval()
    hf.save_pretrained(tmp_path / "sig")
    byte_level_tokenizer(16).save_pretrained(tmp_path / "sig")
    model = DualEncoder.load(tmp_path / "sig")
    assert model.kind == "siglip" and model.logit_bias is not None
    pixels = torch.randn(2, 3, 16, 16)
    ids = model.tokenize(["a cat", "a dog"])["input_ids"]
    assert ids.shape[1] == 16  # SigLIP was trained on max-length padding
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False),
                                   hf.get_image_features(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(model.encode_text(ids, normalize=False),
                                   hf.get_text_features(input_ids=ids).pooler_output)


def test_bad_model_names_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown preset 'nope'.*tiny-clip"):
        build_model("nope")
    with pytest.raises(ModelError, match="unknown model 'nope'.*tiny-clip"):
        load_model("nope")
    # a misspelt preset with options is named as unknown (not as "options only for presets")
    with pytest.raises(ModelError, match="unknown model 'tiny-clp'.*did you mean 'tiny-clip'"):
        load_model({"name": "tiny-clp", "options": {"width": 32}})
    with pytest.raises(ModelError, match=f"^{tmp_path / 'gone'} does not exist \\(no such file or "
                                        "folder, and no preset of that name\\)$"):
        load_model(str(tmp_path / "gone"))
    with pytest.raises(ModelError, match="no config.json"):
        DualEncoder.load(tmp_path)
    with pytest.raises(ModelError, match=r"^unknown option\(s\) 'depth', 'widht' for preset "
                       r"'tiny-clip' \(valid: image_size, patch_size, width, layers, heads, "):
        build_model("tiny-clip", depth=3, widht=64, heads=2)
    with pytest.raises(ModelError, match=r"^unknown option\(s\) 'embed_dim' for preset "
                       r"'lit-minilm' \(valid: .*\bwidth\b"):
        build_model("lit-minilm", embed_dim=64)
    # a width the heads do not divide is named before transformers' own check sees it
    with pytest.raises(ModelError, match=r"^option width of preset 'tiny-clip' \(7\) must be a "
                       r"multiple of heads \(4\)"):
        build_model("tiny-clip", width=7)
    with pytest.raises(ModelError, match="unknown activation 'gelu2'.*quick_gelu"):
        build_model("tiny-clip", activation="gelu2")
    # patches that do not tile the image: transformers drops the last rows and columns
    for preset in ("tiny-clip", "tiny-siglip", "lit-minilm"):
        with pytest.raises(ModelError, match=r"^image_size 32 is not a multiple of patch_size 7: "
                           r"the patches would leave out the last 4 rows and columns"):
            build_model(preset, image_size=32, patch_size=7)


def test_tiny_clip_activation_reaches_both_towers_and_survives_a_save(tmp_path):
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16, activation="gelu")
    model.save(tmp_path / "m")
    config = CLIPModel.from_pretrained(tmp_path / "m").config
    assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"
    x = torch.linspace(-3, 3, 7)
    mlp = model.vision_tower.encoder.layers[0].mlp
    torch.testing.assert_close(mlp.activation_fn(x), torch.nn.functional.gelu(x))


def test_freeze_tower_leaves_last_layers_trainable():
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=3, heads=2,
                        embed_dim=16)
    model.freeze_tower("text", except_last=1)
    layers = model.text_tower.encoder.layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in model.text_tower.embeddings.parameters())
    assert all(p.requires_grad for p in layers[2].parameters())
    assert all(p.requires_grad for p in model.text_tower.final_layer_norm.parameters())
    assert not model.tower_is_frozen("text")
    model.freeze_tower("image")
    assert model.tower_is_frozen("image")
    # the projections into the shared space are no part of a tower: LiT learns them (README)
    assert all(p.requires_grad for p in model.model.visual_projection.parameters())
    assert all(p.requires_grad for p in model.model.text_projection.parameters())


def test_freeze_tower_except_last_frees_what_follows_the_blocks_of_each_kind():
    """OpenCLIP's lock unlocks the last block with what follows it: SigLIP's attention-pooling
    head and final norm, lit-minilm's ViT final norm; never the embeddings."""
    siglip = build_model("tiny-siglip", image_size=16, patch_size=8, width=32, layers=2, heads=2)
    siglip.freeze_tower("image", except_last=1)
    tower = siglip.vision_tower
    assert all(p.requires_grad for m in (tower.post_layernorm, tower.head) for p in m.parameters())
    assert not any(p.requires_grad for p in tower.embeddings.parameters())
    assert not any(p.requires_grad for p in tower.encoder.layers[0].parameters())


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = byte_level_tokenizer(48)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    assert tok("A Red CIRCLE")["input_ids"] == tok("a red circle")["input_ids"]  # lower-cased
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]


def test_probe_features_come_from_the_last_blocks():
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=3, heads=2,
                        embed_dim=16).eval()
    pixels = model.preprocess(_images(n=2, size=16))
    with torch.no_grad():
        pooled, feats = model.image_backbone_and_probe(pixels, "layers", layers=2)
        _, tokens = model.image_backbone_and_probe(pixels, "tokens")
        states = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        # image_backbone runs the last block at the class token only: equal up to rounding
        torch.testing.assert_close(pooled, model.image_backbone(pixels))
    assert feats.shape == (2, 2 * 2 * 32)
    last = states[-1]
    torch.testing.assert_close(feats[:, -64:-32], last[:, 0])
    torch.testing.assert_close(feats[:, -32:], last[:, 1:].mean(1))
    torch.testing.assert_close(tokens, last.flatten(1))  # class token + 4 patches, flattened
    assert tokens.shape == (2, 5 * 32)


def test_inference_helpers_switch_off_dropout_and_restore_the_mode(lit_model):
    """MiniLM has dropout: embeddings must not change between calls, whatever the mode."""
    from cliplab.evaluate.features import encode_images

    lit_model.train()
    a = lit_model.encode_texts(["a photo of a bag."])
    b = lit_model.encode_texts(["a photo of a bag."])
    assert torch.equal(a, b) and lit_model.training
    encode_images(lit_model, _images(n=2, size=16), progress=False)
    assert lit_model.training and lit_model.text_tower.training
    lit_model.eval()  # and a model in eval mode stays in it
    lit_model.encode_texts(["a photo of a bag."])
    encode_images(lit_model, _images(n=2, size=16), progress=False)
    assert not lit_model.training and not lit_model.text_tower.training


def test_attention_implementation_is_switched_for_a_block_only_and_changes_no_feature():
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=2, heads=2,
                        embed_dim=16).eval()
    pixels, tok = model.preprocess(_images(size=16)), model.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(**tok)
        with model.attention_implementation("eager"):
            assert model.text_tower.encoder.layers[0].self_attn.config._attn_implementation \
                == "eager"
            torch.testing.assert_close(model.encode_image(pixels), img)
            torch.testing.assert_close(model.encode_text(**tok), txt)
    assert model.vision_tower.config._attn_implementation == "sdpa"


class _ModelOnly(Section):
    model: ModelField


def test_a_misspelt_preset_option_is_a_config_error_naming_file_and_key(tmp_path, capsys):
    """Checked with the config, before any work: the file, `model.options` and the valid ones."""
    from cliplab.cli import main

    out = tmp_path / "run"
    code = main(["pretrain", "--config", "configs/pretrain/tiny-shapes.yaml", "--out", str(out),
                 "model.options.widht=3"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "cliplab: error: configs/pretrain/tiny-shapes.yaml + command line: model: "
        "unknown option(s) 'widht' for preset 'tiny-clip' (valid: image_size, patch_size, "
        "width, layers, heads, text_width, text_layers, embed_dim, context_length, activation, "
        "seed)")
    # the file's preset options under a model.name= override naming a folder: the override
    # is named too (the check sat on model.options, which the command line did not set)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: tiny-clip, options: {width: 32}}\n")
    with pytest.raises(ConfigError, match=f"^{recipe} \\+ command line: model: options "
                       f"\\(width\\) only apply to presets \\(.*\\), not to {tmp_path}; "
                       "remove them \\(model.options=\\{\\} on a command line\\)$"):
        load_config(_ModelOnly, recipe, [f"model.name={tmp_path}"])
    # a folder or Hub id with options is refused when loading from Python too (naming it)
    with pytest.raises(ConfigError, match=f"only apply to presets .*, not to {tmp_path}; "):
        load_model({"name": str(tmp_path), "options": {"width": 32}})
    # a Hub id too (it is built as saved): refused at config time, before any download
    with pytest.raises(ConfigError, match=r"only apply to presets .*, not to org/model; "):
        load_config(_ModelOnly, recipe, ["model.name=org/model"])


def test_tiny_clip_text_tower_takes_its_own_width_and_depth():
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=2, heads=2,
                        text_width=16, text_layers=1, embed_dim=8)
    config = model.model.config
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (32, 2)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (16, 1)
    assert model.encode_texts(["a red circle"]).shape == (1, 8)


@pytest.mark.parametrize("preset, key, value", [
    ("tiny-clip", "patch_size", 0), ("tiny-clip", "width", 0), ("tiny-clip", "embed_dim", -1),
    ("tiny-clip", "layers", 0), ("tiny-siglip", "image_size", -8), ("lit-minilm", "heads", 0),
    ("tiny-clip", "context_length", 0), ("tiny-clip", "width", "wide"), ("tiny-clip", "layers", True)])
def test_a_preset_size_that_is_no_positive_integer_is_refused(preset, key, value):
    """0 patches or widths crashed deep in torch (ZeroDivisionError, negative dimensions);
    layers=0 built and trained a tower without blocks."""
    with pytest.raises(ModelError, match=rf"^option {key} of preset '{preset}' must be a "
                       rf"positive integer, not {re.escape(repr(value))}$"):
        build_model(preset, **{key: value})


@pytest.mark.parametrize("preset, options, key, width, heads", [
    ("tiny-clip", {"heads": 5}, "width", 128, 5),
    ("tiny-clip", {"width": 32, "heads": 2, "text_width": 17}, "text_width", 17, 2),
    ("tiny-siglip", {"width": 30}, "width", 30, 4),
    ("lit-minilm", {"heads": 5}, "width", 192, 5)])
def test_a_width_the_heads_do_not_divide_is_refused_in_the_models_config(preset, options, key,
                                                                          width, heads):
    """transformers' own error named no key; the config check names the model section."""
    with pytest.raises(ConfigError, match=rf"^model: option {key} of preset "
                       rf"'{preset}' \({width}\) must be a multiple of heads \({heads}\)"):
        model_spec({"name": preset, "options": options})


@pytest.mark.parametrize("options, said", [
    ({"activation": "gleu"}, r"unknown activation 'gleu'; choose from gelu, "),
    ({"image_size": 32, "patch_size": 7}, r"image_size 32 is not a multiple of patch_size 7"),
])
def test_an_activation_or_patch_size_is_refused_in_the_models_config(options, said):
    """They were checked only when the towers were built (after the data loaded), and the
    error named neither the model section nor the config."""
    with pytest.raises(ConfigError, match=rf"^model: {said}"):
        model_spec({"name": "tiny-clip", "options": options})
