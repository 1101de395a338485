"""DualEncoder's prompt-learning hooks: text features from input embeddings equal the ones from
token ids, for CLIP, SigLIP and a BERT-style VisionTextDualEncoder (mean pooled)."""

import pytest
import torch
from transformers import (BertConfig, BertModel, ViTConfig, ViTModel, VisionTextDualEncoderConfig,
                          VisionTextDualEncoderModel)

from cliplab.models import build_model
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.tokenizer import byte_level_tokenizer
from tests.tiny_models import bare_siglip

TEXTS = ["a photo of a cat.", "a red square left of a blue circle", "x"]


def _siglip() -> DualEncoder:
    return bare_siglip(24)


def _bert_dual_encoder() -> DualEncoder:
    torch.manual_seed(0)
    tok = byte_level_tokenizer(24)
    text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=24))
    vision = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text.config,
                                                               projection_dim=16)
    model = VisionTextDualEncoderModel(config=cfg, vision_model=vision, text_model=text)
    return DualEncoder(model, tok, PreprocessConfig(image_size=16), text_pooling="mean",
                       context_length=24).eval()


def _tiny_clip() -> DualEncoder:
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=2, heads=2,
                       embed_dim=16, context_length=32)


@pytest.mark.parametrize("make", [_tiny_clip, _siglip, _bert_dual_encoder],
                         ids=["clip", "siglip", "bert-mean"])
def test_embeddings_path_equals_token_path(make):
    model = make()
    tok = model.tokenize(TEXTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        expected = model.encode_text(ids, mask)
        got = model.encode_text_embeddings(model.token_embedding(ids), ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and the embeddings are really what is read: changing one word vector changes the output
    embeds = model.token_embedding(ids).detach().clone()
    embeds[0, 1] += torch.randn(embeds.shape[-1])  # not a constant shift: LayerNorm removes those
    with torch.no_grad():
        changed = model.encode_text_embeddings(embeds, ids, mask)
    assert not torch.allclose(changed[0], expected[0], atol=1e-4)
    torch.testing.assert_close(changed[1:], expected[1:], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_input_embeddings_only_when_tower_frozen():
    model = _tiny_clip()
    model.freeze_tower("text")
    tok = model.tokenize(TEXTS[:2])
    embeds = model.token_embedding(tok["input_ids"]).detach().requires_grad_(True)
    model.encode_text_embeddings(embeds, tok["input_ids"], tok["attention_mask"]).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_tower.parameters())
