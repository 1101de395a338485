"""CLIP towers run their last block at the pooled token only: same features and gradients as
HF's full forward, less work."""

import pytest
import torch

from cliplab.models.pooled_towers import supports_pooled_forward
from tests.tiny_models import bare_siglip, small_model

CAPTIONS = ["a cat", "a much longer caption about a dog on a sofa", "x", "two red squares"]


def _hf_features(model, pixels, ids, mask):
    """What plain transformers computes: every block on every token, then pool."""
    return (model.vision_tower(pixel_values=pixels).pooler_output,
            model.text_tower(input_ids=ids, attention_mask=mask).pooler_output)


def _features_and_grads(model, forward):
    model.zero_grad(set_to_none=True)
    image, text = forward()
    # A generic linear read-out: a sum of squares of a layer norm's output is constant.
    (image @ torch.linspace(-1, 2, image.shape[1]) + text @ torch.linspace(2, -1, text.shape[1])
     ).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return image.detach(), text.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("eos_token_id", [None, 2])  # 2: HF's legacy "highest id" pooling
def test_pooled_last_block_matches_hf_features_and_gradients(checkpointing, eos_token_id):
    model = small_model(layers=3, width=64, heads=4).train()
    if eos_token_id is not None:
        model.text_tower.eos_token_id = eos_token_id
    if checkpointing:
        model.enable_gradient_checkpointing()
    pixels = torch.randn(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tok = model.tokenize(CAPTIONS)
    assert tok["attention_mask"].sum(1).unique().numel() > 1  # padded batch

    ours = _features_and_grads(model, lambda: (model.image_backbone(pixels),
                                               model.text_backbone(**tok)))
    hf = _features_and_grads(model, lambda: _hf_features(model, pixels, tok["input_ids"],
                                                         tok["attention_mask"]))
    torch.testing.assert_close(ours[0], hf[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], hf[1], atol=1e-5, rtol=1e-5)
    assert ours[2].keys() == hf[2].keys()
    largest = max(grad.abs().max().item() for grad in hf[2].values())
    for name, grad in hf[2].items():
        if name.endswith("k_proj.bias"):  # zero true gradient: softmax ignores a shift of keys
            assert ours[2][name].abs().max() < 1e-5 * largest, name
            continue
        scale = grad.abs().max().item()
        torch.testing.assert_close(ours[2][name], grad, atol=1e-4 * scale + 1e-7, rtol=1e-3,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def test_last_block_runs_at_one_token_per_sequence():
    model = small_model(layers=2).eval()
    seen = {}

    def record(tower):
        def hook(module, args):
            seen[tower] = tuple(args[0].shape)
        return hook

    for tower in ("image", "text"):
        model.tower_layers(tower)[-1].mlp.fc1.register_forward_pre_hook(record(tower))
    tok = model.tokenize(CAPTIONS)
    with torch.no_grad():
        model.encode_image(torch.randn(4, 3, 16, 16))
        model.encode_text(**tok)
    assert seen == {"image": (4, 32), "text": (4, 32)}


def test_prompt_embeddings_take_the_same_path_and_agree():
    model = small_model(layers=2).eval()
    tok = model.tokenize(CAPTIONS)
    with torch.no_grad():
        direct = model.encode_text(**tok)
        via_embeddings = model.encode_text_embeddings(model.token_embedding(tok["input_ids"]),
                                                      **tok)
    torch.testing.assert_close(via_embeddings, direct)


def test_only_clip_blocks_take_the_pooled_path():
    clip = small_model()
    assert supports_pooled_forward(clip.vision_tower) and supports_pooled_forward(clip.text_tower)
    siglip = bare_siglip(context_length=16)  # attention-pooling head reads every token
    assert not supports_pooled_forward(siglip.vision_tower)
    assert not supports_pooled_forward(siglip.text_tower)
