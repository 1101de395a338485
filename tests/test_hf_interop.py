"""Folders cliplab saves open in transformers' own tools: AutoProcessor and the
zero-shot-image-classification pipeline give cliplab's probabilities.

Images are at the model's size, where both only rescale and normalise, so probabilities agree
to float precision; resized images agree to PIL's uint8 rounding (~1/255), which
tests/test_model_files_preprocessor.py checks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, pipeline

from cliplab.models import DualEncoder, build_model
from tests.warned import warned

LABELS = ["red circle", "blue square", "three green triangles"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis template
TINY = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2)


def _cliplab_probabilities(model: DualEncoder, image: np.ndarray) -> torch.Tensor:
    """Zero-shot probabilities as the pipeline defines them: softmax over the labels of
    logit_scale * cos for CLIP, a sigmoid per label (with the bias) for SigLIP."""
    with torch.no_grad():
        img = model.encode_image(model.preprocess(torch.from_numpy(image)[None]))
        txt = model.encode_texts([TEMPLATE.format(label) for label in LABELS])
        logits = model.logit_scale.exp() * img @ txt.T
        if model.kind == "siglip":
            return torch.sigmoid(logits + model.logit_bias)[0]
        return logits.softmax(-1)[0]


@pytest.mark.parametrize("preset, context_length", [("tiny-clip", None), ("tiny-siglip", None),
                                                    ("tiny-siglip", 16)])
def test_pipeline_probabilities_equal_cliplabs(preset, context_length, tmp_path):
    """A SigLIP of another context length than 64 cannot run in the pipeline (it pads SigLIP
    labels to 64 tokens, whatever tokenizer_kwargs say): its card's snippet scores it instead."""
    options = {**TINY, **({"context_length": context_length} if context_length else {})}
    folder = build_model(preset, **options).save(tmp_path / preset)
    model = DualEncoder.load(folder)
    processor = AutoProcessor.from_pretrained(folder)
    card = (folder / "README.md").read_text()
    if context_length:
        snippet = card.split("```python\n")[-1].split("```")[0]
        assert f"max_length={context_length}" in snippet
        image = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)
        scope = {"labels": LABELS, "image": Image.fromarray(image)}
        exec(snippet.replace("THIS_FOLDER", str(folder)), scope)
        torch.testing.assert_close(scope["probs"][0], _cliplab_probabilities(model, image),
                                   rtol=1e-4, atol=1e-6)
        return
    assert "max_length" not in card  # the pipeline pads to this model's length
    classify = pipeline("zero-shot-image-classification", model=str(folder))
    rng = np.random.RandomState(0)
    for _ in range(2):
        image = rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)
        pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, model.preprocess(torch.from_numpy(image)[None]))
        scores = {r["label"]: r["score"]
                  for r in classify(Image.fromarray(image), candidate_labels=LABELS)}
        expected = _cliplab_probabilities(model, image)
        found = torch.tensor([scores[label] for label in LABELS])
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6)
    if preset == "tiny-clip":  # the softmax's spread shows the test compares something
        assert expected.max() - expected.min() > 0.01


def test_saved_processor_config_is_cliplabs_preprocessing(tmp_path):
    model = build_model("tiny-clip", **TINY)
    model.preprocess_config.mean = (0.1, 0.2, 0.3)
    folder = model.save(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(folder).image_processor
    assert processor.crop_size == {"height": 16, "width": 16}
    assert processor.size == {"shortest_edge": 16}
    assert list(processor.image_mean) == [0.1, 0.2, 0.3]
    assert DualEncoder.load(folder).preprocess_config.mean == (0.1, 0.2, 0.3)


def test_lit_folder_card_warns_that_plain_transformers_differs(tmp_path):
    lit = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    card = (lit.save(tmp_path / "lit") / "README.md").read_text()
    assert "plain transformers does not reproduce this model" in card and "mean" in card
    # the card's own snippet gives cliplab's text embeddings
    snippet = card.split("```python\n")[1].split("```")[0]
    texts = ["a photo of a cat", "two dogs playing in the snow on a sunny day"]
    scope = {"texts": texts}
    exec(snippet.replace("THIS_FOLDER", str(tmp_path / "lit")), scope)
    torch.testing.assert_close(F.normalize(scope["text_embeds"], dim=-1),
                               lit.encode_texts(texts).float(), rtol=0, atol=1e-5)
    clip_card = (build_model("tiny-clip", **TINY).save(tmp_path / "clip") / "README.md")
    assert "does not reproduce" not in clip_card.read_text()
    assert 'pipeline("zero-shot-image-classification"' in clip_card.read_text()
    # a dual encoder pooling as its text model does (a plain transformers one, loaded and
    # saved) is reproduced there: its card warned all the same and gave a mean-pool recipe
    lit.text_pooling = "model"
    card = (lit.save(tmp_path / "pooled") / "README.md").read_text()
    assert "does not reproduce" not in card and "mean of the text tower" not in card


def test_a_lit_folder_resaved_by_transformers_keeps_its_preprocessing_and_warns(tmp_path,
                                                                                recwarn):
    """transformers' processor.save_pretrained writes processor_config.json (the image
    processor nested in it) and no cliplab.json: the normalisation is still read, and the
    lost text pooling is told, not silently replaced."""
    from transformers import AutoModel

    lit = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    lit.preprocess_config.mean = (0.1, 0.2, 0.3)
    folder = lit.save(tmp_path / "lit")
    resaved = tmp_path / "resaved"
    AutoModel.from_pretrained(folder).save_pretrained(resaved)
    AutoProcessor.from_pretrained(folder).save_pretrained(resaved)
    assert not (resaved / "preprocessor_config.json").exists()  # what the fallback is for
    warned(recwarn)
    again = DualEncoder.load(resaved)
    assert again.preprocess_config.mean == (0.1, 0.2, 0.3)
    assert again.text_pooling == "model"
    assert "has no cliplab.json" in warned(recwarn)
    DualEncoder.load(folder)  # cliplab's own folder: no warning
    assert warned(recwarn) == ""


def test_a_saved_tiny_clip_opens_in_the_single_tower_classes(tmp_path):
    """transformers' CLIPTextModelWithProjection / CLIPVisionModelWithProjection read the
    towers' own projection_dim: a saved tiny-clip (embed_dim 16) loads in both, and their
    embeds are cliplab's before normalising."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16, context_length=32)
    folder = model.save(tmp_path / "m")
    pixels = torch.rand(2, 3, 16, 16)
    vision = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    text = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    tokens = model.tokenizer(["a red square", "a cat"], padding="max_length", max_length=32,
                             truncation=True, return_tensors="pt")
    with torch.no_grad():
        clip = model.model
        image_want = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        text_want = clip.text_projection(clip.text_model(**tokens).pooler_output)
        assert torch.allclose(vision(pixel_values=pixels).image_embeds, image_want, atol=1e-6)
        assert torch.allclose(text(**tokens).text_embeds, text_want, atol=1e-6)


def test_a_processor_file_that_disagrees_with_cliplab_json_is_warned_of(tmp_path):
    """cliplab read cliplab.json's preprocessing and never looked at the processor file
    transformers reads: re-saving a processor into the folder gave two models whose image
    embeddings were 0.2 apart, without a word."""
    import warnings

    folder = build_model("tiny-clip", **TINY).save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DualEncoder.load(folder)  # a folder cliplab wrote agrees with itself
    file = folder / "preprocessor_config.json"
    raw = json.loads(file.read_text())
    file.write_text(json.dumps({**raw, "image_std": [0.25, 0.5, 0.5]}))
    with pytest.warns(UserWarning, match=r"preprocessor_config.json has std \[0.25, 0.5, 0.5\], "
                                         r"cliplab.json \[0.5, 0.5, 0.5\]: cliplab uses "
                                         r"cliplab.json's preprocessing"):
        loaded = DualEncoder.load(folder)
    assert loaded.preprocess_config.std == (0.5, 0.5, 0.5)  # what the model was trained with
    file.write_text(json.dumps({**raw, "do_pad": True}))
    with pytest.warns(UserWarning, match=r"do_pad = true: cliplab's preprocessing cannot do "
                                         r"this .*saving the model with cliplab writes"):
        DualEncoder.load(folder)
