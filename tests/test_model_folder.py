"""Model folders: cliplab.json, the pretrained-origin record and weight fingerprints."""

import json

import pytest
import torch

from cliplab.errors import ModelError
from cliplab.models import DualEncoder
from cliplab.models.folder import (check_same_origin, model_fingerprint, read_meta,
                                   read_origin, require_origin, weights_fingerprint,
                                   write_origin)

T = torch.tensor


def test_weights_fingerprint_ignores_names_but_not_values():
    a = {"x": T([1.0, 2.0]), "y": T([[3.0]])}
    renamed = {"layers.y": T([[3.0]]), "layers.x": T([1.0, 2.0])}
    assert weights_fingerprint(a) == weights_fingerprint(renamed)
    assert weights_fingerprint(a) != weights_fingerprint({"x": T([1.0, 2.5]), "y": T([[3.0]])})
    assert weights_fingerprint(a) != weights_fingerprint({"x": T([1.0, 2.0]).half(),
                                                          "y": T([[3.0]]).half()})


def test_model_fingerprint_survives_a_save_and_sees_one_changed_weight(tmp_path, tiny_model):
    tiny_model.save(tmp_path / "m")
    again = DualEncoder.load(tmp_path / "m")
    assert model_fingerprint(again) == model_fingerprint(tiny_model)
    with torch.no_grad():
        again.model.logit_scale.add_(1e-3)
    assert model_fingerprint(again) != model_fingerprint(tiny_model)


def test_origin_on_a_plain_hf_folder_keeps_it_loadable(tmp_path, tiny_model):
    tiny_model.model.save_pretrained(tmp_path / "hf")
    tiny_model.tokenizer.save_pretrained(tmp_path / "hf")
    assert read_origin(tmp_path / "hf") is None and read_meta(tmp_path / "hf") == {}
    with pytest.raises(ModelError, match="hf records no pretrained origin"):
        require_origin(tmp_path / "hf")
    record = write_origin(tmp_path / "hf", "some/base", "abc123", adapter="lora")
    assert record == {"path": "some/base", "fingerprint": "abc123"}
    assert read_origin(tmp_path / "hf") == require_origin(tmp_path / "hf") == record
    assert json.loads((tmp_path / "hf" / "cliplab.json").read_text()) == {
        "base": record, "adapter": "lora"}
    again = DualEncoder.load(tmp_path / "hf")  # a cliplab.json with only the origin record
    assert again.preprocess_config.image_size == tiny_model.preprocess_config.image_size


def test_a_base_given_as_a_relative_path_is_recorded_absolute(tmp_path, tiny_model,
                                                              monkeypatch):
    """`cliplab adapt --model ft1` (a folder in the working folder) recorded "ft1", so the
    adapter could not find its base from anywhere else."""
    tiny_model.save(tmp_path / "ft1")
    folder = tiny_model.save(tmp_path / "adapted")
    monkeypatch.chdir(tmp_path)
    record = write_origin(folder, "ft1", model_fingerprint(tiny_model))
    assert record["path"] == str((tmp_path / "ft1").resolve())


def test_origin_is_added_to_a_saved_models_settings_not_over_them(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    before = read_meta(folder)
    write_origin(folder, tmp_path / "base", model_fingerprint(tiny_model))
    after = read_meta(folder)
    assert {k: v for k, v in after.items() if k != "base"} == before
    assert after["base"]["path"] == str(tmp_path / "base")
    check_same_origin(folder, tiny_model, "the tiny model")  # same weights: no error
    other = DualEncoder.load(folder)
    with torch.no_grad():
        other.model.logit_scale.add_(1.0)
    with pytest.raises(ModelError, match="was adapted from .*base.*but other has fingerprint"):
        check_same_origin(folder, other, "other")


def test_bad_cliplab_json_is_named(tmp_path):
    (tmp_path / "cliplab.json").write_text("{\"base\": ")
    with pytest.raises(ModelError, match=r"cliplab.json: not valid JSON .* line 1"):
        read_origin(tmp_path)
    for base in ("P", {"path": "x"}, {"path": "x", "fingerprint": 3}):  # no fingerprint string
        (tmp_path / "cliplab.json").write_text(json.dumps({"base": base}))
        with pytest.raises(ModelError, match=r"cliplab.json: 'base' must be \{path: \.\.\., "
                                             r"fingerprint: \.\.\.\}$"):
            read_origin(tmp_path)


def test_saving_weights_that_do_not_fit_is_refused_before_writing(tmp_path):
    """save(state_dict=...) of another model's weights wrote a folder that only failed when
    loaded; it is refused first, and nothing is written."""
    import pytest
    import torch

    from cliplab.errors import ModelError
    from cliplab.models import build_model

    small = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    state = dict(small.model.state_dict())
    with pytest.raises(ModelError, match="1 key.s. missing .e.g. logit_scale"):
        small.save(tmp_path / "a", state_dict={k: v for k, v in state.items()
                                               if k != "logit_scale"})
    bad = {**state, "text_projection.weight": torch.zeros(3, 3)}
    with pytest.raises(ModelError, match=r"text_projection.weight is \(3, 3\)"):
        small.save(tmp_path / "b", state_dict=bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    small.save(tmp_path / "c", state_dict=state)  # its own weights: fine


def test_a_siglip_model_card_names_its_own_context_length(tmp_path):
    """SigLIP pools at the last position: the card says to pad to the model's context length
    (77 here), not the pipeline's 64 (the pipeline ignores tokenizer_kwargs: the card's snippet
    embeds the labels with the processor; tests/test_hf_interop.py runs it)."""
    from cliplab.models import build_model
    from cliplab.models.hf_files import model_card

    card = model_card("siglip", "model", 77)
    assert "padded to this model's context length, 77 tokens" in card
    assert 'padding="max_length", max_length=77, truncation=True' in card
    assert "max_length" not in model_card("siglip", "model", 64)  # the pipeline's own length
    saved = build_model("tiny-siglip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        context_length=40).save(tmp_path / "m")
    readme = (saved / "README.md").read_text()
    assert "context length, 40 tokens" in readme and "max_length=40," in readme
    assert "max_length" not in model_card("clip", "model", 77)
