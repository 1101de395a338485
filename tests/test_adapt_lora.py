"""LoRA via peft: target modules per model kind, parameter counts, only adapters train,
adapter round trip, merge equals unmerged, origin checks, the `run` entry point."""

import json

import pytest
import torch
from transformers import AutoModel

from cliplab.adapt.common import count_parameters, subsample
from cliplab.adapt.head import zeroshot_classifier_head
from cliplab.adapt.lora import (Options, add_lora, load_lora, lora_parameter_count,
                                merge_adapter, save_adapter, target_modules)
from cliplab.adapt.base import method_options
from cliplab.models.folder import model_fingerprint
from cliplab.adapt.run import run_adapt
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError, ModelError
from cliplab.models import DualEncoder, build_model
from cliplab.train.trainer import TrainConfig, Trainer
from tests.tiny_models import small_model



@pytest.fixture(scope="module")
def digits():
    return subsample(load_digits("train"), 128, seed=0)


def test_target_modules_of_clip_towers():
    model = small_model()
    image = target_modules(model, ["image"], "all")
    assert sorted(n.rsplit(".", 1)[1] for n in image) == sorted(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    assert all(n.startswith("vision_model.encoder.layers.0.") for n in image)
    both = target_modules(model, ["image", "text"], "attention")
    assert len(both) == 8 and not any(n.endswith(("fc1", "fc2")) for n in both)
    assert sorted(target_modules(model, ["text"], ["q_proj", "v_proj"])) == [
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_model.encoder.layers.0.self_attn.v_proj"]
    with pytest.raises(ModelError, match=r"^options.modules: query match no linear layer of the "
                                         r"image tower; its linear layers are named fc1, fc2, "
                                         r"k_proj, out_proj, q_proj, v_proj$"):
        target_modules(model, ["image"], ["query"])


def test_target_modules_of_vit_and_minilm_towers():
    model = build_model("lit-minilm", image_size=14, patch_size=7, width=24, layers=1, heads=2)
    text = target_modules(model, ["text"], "all")
    leaves = {n.split(".layer.0.", 1)[1] for n in text if ".layer.0." in n}
    assert leaves == {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"}
    assert len(text) == 6 * 6  # MiniLM-L6: six blocks; the pooler is not a target
    mlp = {n.split(".layer.0.", 1)[1] for n in target_modules(model, ["text"], "mlp")
           if ".layer.0." in n}
    assert mlp == {"intermediate.dense", "output.dense"}
    image = target_modules(model, ["image"], "all")
    assert len(image) == 6 and all(n.startswith("vision_model.") for n in image)


def test_parameter_count_matches_the_hand_count():
    model = small_model()
    total = count_parameters(model)["total"]
    add_lora(model, Options.model_validate({"rank": 4}))
    # width 32, MLP 128: q,k,v,out 4 * r(32+32); fc1, fc2 2 * r(32+128)
    expected = 4 * 4 * (32 + 32) + 2 * 4 * (32 + 128)
    assert lora_parameter_count(model) == expected == 2304
    counts = count_parameters(model)
    assert counts["trainable"] == expected and counts["total"] == total + expected


def test_lora_alpha_scales_the_update_and_merging_folds_it_in():
    """rank 4, alpha 16: a wrapped Linear computes W x + b + (16 / 4) B A x (LoRA's alpha / r
    scaling; checked with A and B set by hand, dropout off in eval mode), and merging writes
    W + 4 B A into the plain layer. options.dropout is the dropout on the LoRA branch."""
    model = small_model()
    fc1 = model.model.vision_model.encoder.layers[0].mlp.fc1  # Linear 32 -> 128
    W, b = fc1.weight.detach().clone(), fc1.bias.detach().clone()
    targets = target_modules(model, ["image"], "all")
    peft_model = add_lora(model, Options.model_validate({"rank": 4, "alpha": 16.0,
                                                          "dropout": 0.25}))
    layer = model.model.vision_model.encoder.layers[0].mlp.fc1
    assert layer.lora_dropout["default"].p == 0.25
    for name in targets:  # every target got the same options
        wrapped = model.model.get_submodule(name)
        assert wrapped.lora_dropout["default"].p == 0.25, name
        assert wrapped.r["default"] == 4 and wrapped.lora_alpha["default"] == 16.0, name

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 32, generator=g) * 0.1  # lora_A: in -> rank
    B = torch.randn(128, 4, generator=g) * 0.1  # lora_B: rank -> out (zero at init)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    model.eval()
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, x @ W.t() + b + 4.0 * (x @ A.t()) @ B.t())
    assert not torch.allclose(out, x @ W.t() + b + (x @ A.t()) @ B.t(), atol=1e-3)

    merged = merge_adapter(model, peft_model)
    plain = merged.model.vision_model.encoder.layers[0].mlp.fc1
    assert type(plain) is torch.nn.Linear
    torch.testing.assert_close(plain.weight, W + 4.0 * B @ A)
    torch.testing.assert_close(plain.bias, b)


def test_only_lora_parameters_get_gradients_and_change(digits):
    model = small_model()
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    head = zeroshot_classifier_head(model, digits)
    head.weight.requires_grad_(False)
    add_lora(model, Options.model_validate({"rank": 4}))
    pixels = model.preprocess(digits.images[:16])
    loss = torch.nn.functional.cross_entropy(head(model.encode_image(pixels, normalize=False)),
                                             digits.labels[:16])
    loss.backward()
    with_grad = [n for n, p in model.model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_A" in n for n in with_grad)  # B starts at zero, A still gets gradient
    model.zero_grad()

    Trainer(model, TrainConfig.from_dict({"steps": 3, "batch_size": 32, "lr": 1e-2,
                                          "progress": False, "lock_text": True}),
            head=head).fit(digits)
    state = model.model.state_dict()
    for name, value in base.items():  # peft keeps the original weight as base_layer
        key = name if name in state else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(state[key], value), name
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


def _trained_adapter(tmp_path, digits):
    base = small_model()
    base.save(tmp_path / "base")
    model = DualEncoder.load(tmp_path / "base")
    head = zeroshot_classifier_head(model, digits)
    peft_model = add_lora(model, Options.model_validate({"rank": 4, "towers": ["image"]}))
    Trainer(model, TrainConfig.from_dict({"steps": 4, "batch_size": 32, "lr": 1e-2,
                                          "progress": False, "lock_text": True}),
            head=head).fit(digits)
    folder = save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"),
                          model_fingerprint(base), head)
    return model, peft_model, head, folder


def test_adapter_round_trip_and_merge_give_identical_outputs(tmp_path, digits):
    model, peft_model, head, folder = _trained_adapter(tmp_path, digits)
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors",
            "cliplab.json"} <= {p.name for p in folder.iterdir()}
    pixels = model.preprocess(digits.images[:20])
    tok = model.tokenize(["a photo of the digit one.", "seven"])
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(**tok)
        plain_img = DualEncoder.load(tmp_path / "base").encode_image(pixels)
    assert not torch.allclose(img, plain_img, atol=1e-4)  # the adapter does something

    loaded, loaded_peft, loaded_head = load_lora(folder)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), img)
        assert torch.equal(loaded.encode_text(**tok), txt)
    assert torch.equal(loaded_head.weight, head.weight)

    merged = merge_adapter(loaded, loaded_peft)
    assert not any("lora_" in n for n in merged.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels), img, rtol=1e-5, atol=1e-5)
    merged.save(tmp_path / "merged")
    hf = AutoModel.from_pretrained(tmp_path / "merged")  # plain transformers opens it
    with torch.no_grad():
        feats = hf.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
    torch.testing.assert_close(torch.nn.functional.normalize(feats, dim=-1), img,
                               rtol=1e-5, atol=1e-5)


def test_adapter_refuses_a_different_base(tmp_path, digits):
    _, _, _, folder = _trained_adapter(tmp_path, digits)
    small_model(seed=5).save(tmp_path / "other")
    with pytest.raises(ModelError, match="fingerprint"):
        load_lora(folder, base=str(tmp_path / "other"))


@pytest.mark.parametrize("bad,match", [({"towers": ["audio"]}, "towers"),
                                       ({"objective": "mse"}, "objective"),
                                       ({"towers": ["text"]}, "image tower only"),
                                       ({"modules": "ffn"}, "modules"),
                                       # passed, then failed after the zero-shot encode
                                       ({"modules": []}, "options.modules: .*expected at least 1 "
                                                         "value, got none"),
                                       # peft scales by alpha / rank: every adapter a no-op
                                       ({"alpha": 0}, "options.alpha: expected greater than 0"),
                                       ({"rnak": 4}, "unknown key")])
def test_bad_lora_options(bad, match):
    with pytest.raises(ConfigError, match=match):
        method_options(Options, bad, "lora")


@pytest.mark.parametrize("objective", ["classifier", "contrastive"])
def test_run_writes_adapter_merged_model_and_counts(tmp_path, objective):
    small_model().save(tmp_path / "base")
    towers = ["image"] if objective == "classifier" else ["image", "text"]
    cfg = {"method": "lora", "model": str(tmp_path / "base"), "out": str(tmp_path / "out"),
           "data": {"train": {"source": "digits", "split": "train"},
                    "test": {"source": "digits", "split": "test"}},
           "shots": 0, "train_size": 128,
           "options": {"rank": 2, "merge": True, "objective": objective, "towers": towers,
                       "train": {"steps": 3, "batch_size": 32}}}
    res = run_adapt(cfg, progress=False)
    p = res["params"]
    assert 0 < p["lora"] < p["image_tower"] < p["total"]
    assert set(res["test"]) == {"acc1", "acc5", "mean_per_class_recall", "n"}
    assert "zeroshot" in res
    assert p["head"] == (160 if objective == "classifier" else 0)  # 10 classes x 16 dims
    adapter = json.loads((tmp_path / "out" / "results.json").read_text())["adapter_dir"]
    loaded, _, _ = load_lora(adapter)
    merged = DualEncoder.load(res["merged_dir"])
    pixels = merged.preprocess(load_digits("test").images[:8])
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels), loaded.encode_image(pixels),
                                   rtol=1e-5, atol=1e-5)


def test_a_lora_fitted_in_python_records_the_folder_its_model_came_from(tmp_path, digits):
    """`fit` from Python with no model name records the loaded model's own folder (it
    recorded the working folder, so load_lora failed); a model built in memory records no
    path, and load_lora asks for base= in one line."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.runs import RunDir

    small_model().save(tmp_path / "base")
    options = {"rank": 2, "train": {"steps": 1, "batch_size": 16}}
    ctx = AdaptContext(FeatureCache(), progress=False, run=RunDir(tmp_path / "run"))
    adapted = get_method("lora").fit(DualEncoder.load(tmp_path / "base"), digits, options, ctx)
    adapted.save(tmp_path / "run")
    loaded, _, _ = load_lora(adapted.adapter_dir)
    assert loaded.source == str((tmp_path / "base").resolve())

    ctx = AdaptContext(FeatureCache(), progress=False, run=RunDir(tmp_path / "run2"))
    adapted = get_method("lora").fit(small_model(), digits, options, ctx)
    with pytest.raises(ModelError, match="records no path of the model.*pass base="):
        load_lora(adapted.adapter_dir)
    assert load_lora(adapted.adapter_dir, base=str(tmp_path / "base"))[0] is not None


def test_a_contrastive_lora_scores_at_the_models_temperature(digits):
    """Without a head, the classes are the zero-shot prompts: logits exp(logit_scale) x cosine,
    as every other head scores."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.evaluate.feature_cache import FeatureCache

    options = {"rank": 2, "objective": "contrastive", "towers": ["image", "text"],
               "train": {"steps": 1, "batch_size": 16}}
    adapted = get_method("lora").fit(small_model(), digits, options,
                                     AdaptContext(FeatureCache(), progress=False))
    scale = adapted.model.logit_scale.detach().exp()
    assert scale.item() > 2  # the preset's temperature (1 / 0.07), far from 1
    torch.testing.assert_close(adapted.text_head.norm(dim=-1), scale.expand(10))


def test_saving_a_fitted_lora_or_finetune_to_another_folder_writes_it_there(tmp_path, digits):
    """save(B) after the run saved it: B holds the same files (it wrote nothing and returned
    the run's path); saving into the run again writes nothing twice."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.adapt.finetune import load_finetuned
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.runs import RunDir

    small_model().save(tmp_path / "base")
    train = {"train": {"steps": 1, "batch_size": 16}}
    for method, options in (("lora", {"rank": 2, "merge": True, **train}), ("finetune", train)):
        run = tmp_path / f"run-{method}"
        ctx = AdaptContext(FeatureCache(), progress=False, run=RunDir(run))
        adapted = get_method(method).fit(DualEncoder.load(tmp_path / "base"), digits, options,
                                         ctx)
        in_run = adapted.save(run)
        assert run in in_run.parents and adapted.save(run) == in_run  # not written twice
        other = adapted.save(tmp_path / f"other-{method}")
        assert other.parent == tmp_path / f"other-{method}" and other != in_run
        pixels = load_digits("test").images[:4]
        if method == "lora":
            want = DualEncoder.load(run / "merged")
            got = DualEncoder.load(tmp_path / "other-lora" / "merged")
            assert load_lora(other)[0] is not None
        else:
            want, got = load_finetuned(in_run)[0], load_finetuned(other)[0]
        with torch.no_grad():
            torch.testing.assert_close(got.encode_image(got.preprocess(pixels)),
                                       want.encode_image(want.preprocess(pixels)))


@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_fit_leaves_the_models_flags_and_mode_as_it_found_them(digits, method):
    """Both train the weights in place; neither leaves the text tower frozen nor the model
    switched to eval mode (the Trainer froze it and ended in eval)."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.evaluate.feature_cache import FeatureCache

    model = small_model().train()
    model.model.text_model.embeddings.requires_grad_(False)  # the user's own choice, kept
    before = {n: p.requires_grad for n, p in model.model.named_parameters()}
    get_method(method).fit(model, digits, {"train": {"steps": 1, "batch_size": 16}},
                           AdaptContext(FeatureCache(), progress=False))
    after = {n.replace(".base_layer", ""): p.requires_grad
             for n, p in model.model.named_parameters() if "lora_" not in n}
    assert after == before and model.training
    assert not all(before.values())


def test_adapter_config_names_the_base_absolute_for_plain_peft(tmp_path, digits, monkeypatch):
    """A base opened by a relative path: peft wrote that path into adapter_config.json, and
    plain peft could not find the base from any other folder."""
    from peft import PeftConfig

    small_model().save(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    run_adapt({"method": "lora", "model": "base", "out": "run", "compare_zeroshot": False,
               "data": {"train": {"source": "digits", "split": "train"},
                        "test": {"source": "digits", "split": "test"}}, "shots": 2,
               "options": {"rank": 2, "train": {"steps": 1, "batch_size": 16}}},
              progress=False)
    adapter = next((tmp_path / "run").rglob("adapter_config.json")).parent
    monkeypatch.chdir(tmp_path / "run")
    recorded = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    assert recorded == str((tmp_path / "base").resolve())
    assert AutoModel.from_pretrained(recorded) is not None


def test_saving_a_model_that_carries_lora_layers_says_how_to_save_it(tmp_path, digits):
    """After fit the model holds peft's layers (in place, as documented): its save wrote a
    folder of renamed weights that no loader opened; it is refused, and merging first works."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.evaluate.feature_cache import FeatureCache

    model = small_model()
    adapted = get_method("lora").fit(model, digits, {"rank": 2, "train": {"steps": 1,
                                                                         "batch_size": 16}},
                                     AdaptContext(FeatureCache(), progress=False))
    with pytest.raises(ModelError, match=r"carries LoRA adapters.*adapter\.save\(folder\).*"
                                         r"merge_adapter\(model, adapter\.peft_model\)"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    merge_adapter(model, adapted.peft_model).save(tmp_path / "m")
    pixels = model.preprocess(digits.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(DualEncoder.load(tmp_path / "m").encode_image(pixels),
                                   model.encode_image(pixels))


def test_another_methods_key_names_the_methods_that_take_it():
    """`options.rank=4` on coop was only "unknown key" (merge names the owners of its keys)."""
    from cliplab.adapt.run import checked_config

    cfg = {"method": "coop", "data": {"train": {"source": "digits"}, "test": {"source": "digits"}}}
    with pytest.raises(ConfigError, match=r"^the adapt config: unknown key options.rank "
                       r"\(valid: .*\) \(rank: an option of lora\)$"):
        checked_config({**cfg, "options": {"rank": 4}})
    with pytest.raises(ConfigError, match=r"unknown key options.rnak \(valid: [^)]*\)$"):
        checked_config({**cfg, "options": {"rnak": 4}})  # nobody's: no owners to name


def test_saving_an_adapter_of_a_run_folder_warns_of_nothing(tmp_path, digits, recwarn):
    """peft looked for the base's config.json to learn whether the vocabulary was resized:
    a base without one at its top (a run folder, a preset) warned on every save."""
    base = small_model()
    peft_model = add_lora(base, Options.model_validate({"rank": 4, "towers": ["image"]}))
    recwarn.clear()
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "run"), model_fingerprint(base))
    assert [str(w.message) for w in recwarn] == []
