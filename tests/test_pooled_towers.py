"""CLIP and ViT towers run their last block at the pooled token only: same features and
gradients as HF's full forward, less work."""

import pytest
import torch

from cliplab.models import build_model
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


def test_pooled_text_ignores_masked_tokens_before_the_eos():
    """Left padding (masked tokens before the text): the pooled block must not attend to them,
    as HF's full forward does not."""
    model = small_model(layers=2).eval()
    tok = model.tokenize(CAPTIONS)
    pads = (1 - tok["attention_mask"]).sum(1)
    ids = torch.stack([row.roll(int(n)) for row, n in zip(tok["input_ids"], pads)])
    mask = torch.stack([row.roll(int(n)) for row, n in zip(tok["attention_mask"], pads)])
    assert mask[:, 0].eq(0).any()  # some rows start with padding
    with torch.no_grad():
        ours = model.text_backbone(ids, mask)
        hf = model.text_tower(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


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


# -- ViT image towers (lit-minilm) -----------------------------------------------------------

QUICKSTART_VIT = dict(image_size=28, patch_size=7, width=192, layers=4, heads=3)


def _lit(**overrides):
    """lit-minilm with the quickstart's image tower (17 tokens, width 192, 4 blocks)."""
    return build_model("lit-minilm", **{**QUICKSTART_VIT, **overrides})


def _image_grads(model, forward):
    """Pooled image features and the gradient of every parameter of a linear read-out."""
    model.zero_grad(set_to_none=True)
    image = forward()
    (image.float() @ torch.linspace(-1, 2, image.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return image.detach().float(), grads


def _assert_grads_close(ours, hf, rel, rtol):
    """Each gradient within ``rel`` of its largest entry (plus ``rtol`` of each entry)."""
    assert ours.keys() == hf.keys()
    largest = max(grad.abs().max().item() for grad in hf.values())
    for name, grad in hf.items():
        if name.endswith("k_proj.bias"):  # zero true gradient: softmax ignores a shift of keys
            assert ours[name].abs().max() < rel * largest, name
            continue
        scale = grad.abs().max().item()
        torch.testing.assert_close(ours[name], grad, atol=rel * scale + 1e-7, rtol=rtol,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vit_pooled_last_block_matches_hf_features_and_gradients(checkpointing):
    model = _lit().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
        assert all(layer.gradient_checkpointing for layer in model.tower_layers("image"))
    pixels = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = _image_grads(model, lambda: model.image_backbone(pixels))
    hf = _image_grads(model, lambda: model.vision_tower(pixel_values=pixels).pooler_output)
    assert ours[0].shape == (5, 192) and ours[0].abs().max() > 0.1  # the tanh pooler's output
    torch.testing.assert_close(ours[0], hf[0], atol=1e-5, rtol=1e-5)
    # every parameter of the image tower (embeddings ... pooler) gets its gradient, and only those
    assert set(hf[1]) == {f"model.vision_model.{n}" for n, _ in
                          model.vision_tower.named_parameters()}
    _assert_grads_close(ours[1], hf[1], rel=1e-4, rtol=1e-3)
    # the encoded features the trainer reads agree too (projection after the pooler)
    with torch.no_grad():
        hf_embedding = model.project_image(model.vision_tower(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), hf_embedding,
                                   atol=1e-5, rtol=1e-5)


def test_vit_pooled_last_block_under_bf16_autocast_is_close_to_hf():
    """As the quickstart trains: bf16 autocast on CPU with HF's eager attention."""
    model = _lit().train()
    pixels = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with model.attention_implementation("eager"), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _image_grads(model, lambda: model.image_backbone(pixels))
        hf = _image_grads(model, lambda: model.vision_tower(pixel_values=pixels).pooler_output)
    reference = _image_grads(model, lambda: model.vision_tower(pixel_values=pixels).pooler_output)
    # both bf16 runs are as close to each other as each is to fp32 (bf16 rounding, ~3 digits)
    feature_error = (hf[0] - reference[0]).abs().max().item()
    assert 0 < feature_error < 0.05
    torch.testing.assert_close(ours[0], hf[0], atol=2 * feature_error, rtol=0)
    _assert_grads_close(ours[1], hf[1], rel=0.02, rtol=0.02)  # seen: <0.007


def test_vit_last_block_runs_at_the_class_token_only():
    model = _lit().eval()
    seen = []
    model.tower_layers("image")[-1].mlp.fc1.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.encode_image(torch.randn(4, 3, 28, 28))
    assert seen == [(4, 192)]


def test_vit_towers_take_the_pooled_path_unless_sharded_or_without_pooler():
    from torch.distributed.fsdp import FSDPModule
    from transformers import ViTConfig, ViTModel

    model = _lit(width=24, layers=2, heads=2)
    assert supports_pooled_forward(model.vision_tower)
    assert not supports_pooled_forward(model.text_tower)  # BERT, mean pooled: every token
    no_pooler = ViTModel(ViTConfig(image_size=14, patch_size=7, hidden_size=24,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=48), add_pooling_layer=False)
    assert not supports_pooled_forward(no_pooler)
    # what fully_shard does to a block: its class gains the FSDPModule mixin
    last = model.tower_layers("image")[-1]
    last.__class__ = type(f"FSDP{type(last).__name__}", (FSDPModule, type(last)), {})
    assert not supports_pooled_forward(model.vision_tower)
