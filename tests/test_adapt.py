"""Adaptation methods: hand-computed Tip-Adapter logits, CLIP-Adapter ratio 0 and CoOp before
training equal zero-shot heads, gradients reach only the learned tensors, and every method's
saved adapter loads back with identical logits."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from cliplab.adapt import ADAPT_METHODS, AdaptContext, get_method, load_adapter
from cliplab.adapt import clip_adapter, cocoop, coop, tip_adapter, tip_adapter_f
from cliplab.data.digits import load_digits
from cliplab.data.pairs import select_classes
from cliplab.data.types import LabelledImages
from cliplab.errors import CliplabWarning, ConfigError, DataError, InputError, ModelError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.few_shot import sample_k_shot
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=48)


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits("train"), load_digits("test")
    return train.subset(sample_k_shot(train.labels, 2, 0)), test.subset(torch.arange(60))


@pytest.fixture(scope="module")
def ctx():
    return AdaptContext(FeatureCache(), progress=False)


# -- Tip-Adapter --------------------------------------------------------------------------------
def test_tip_adapter_logits_match_hand_computation():
    # 2-d unit features, 2 classes; keys: one shot each, values one-hot.
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.eye(2)
    weights = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # zero-shot text classifier
    f = torch.tensor([[0.6, 0.8]])
    # affinities 0.6 and 0.8; cache logits exp(-2*(1-0.6)), exp(-2*(1-0.8))
    expected_cache = torch.tensor([[math.exp(-0.8), math.exp(-0.4)]])
    torch.testing.assert_close(tip_adapter.cache_logits(f, keys, values, beta=2.0), expected_cache)
    # clip logits 10 * (1.0, 0.96); total with alpha 3
    expected = torch.tensor([[10 * 1.0 + 3 * math.exp(-0.8), 10 * 0.96 + 3 * math.exp(-0.4)]])
    torch.testing.assert_close(tip_adapter.tip_logits(f, weights, keys, values, 3.0, 2.0, 10.0),
                               expected)


def test_tip_adapter_search_finds_the_cache_when_prompts_mislead():
    # the text classifier is swapped (always wrong); the cache is right: the search must give
    # the cache enough weight to win, and val accuracy 1.
    keys = torch.eye(2)
    values = torch.eye(2)
    weights = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    val = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=-1)
    alpha, beta, acc = tip_adapter.search_alpha_beta(val, torch.tensor([0, 1]), weights, keys,
                                                     values, 1.0, [7.0, 3.0], [20, 10])
    assert acc == 1.0
    logits = tip_adapter.tip_logits(val, weights, keys, values, alpha, beta, 1.0)
    assert logits.argmax(1).tolist() == [0, 1]
    assert tip_adapter.grid(3.0, 10)[0] == pytest.approx(0.1)
    assert max(tip_adapter.grid(3.0, 10)) < 3.0


def test_tip_adapter_search_ties_go_to_the_first_pair():
    # a right text classifier: every (alpha, beta) scores 1.0, so the grid's first pair wins
    eye = torch.eye(2)
    val = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=-1)
    alpha, beta, acc = tip_adapter.search_alpha_beta(val, torch.tensor([0, 1]), eye, eye, eye,
                                                     1.0, [7.0, 3.0], [4, 5])
    assert (alpha, beta, acc) == (pytest.approx(0.1), pytest.approx(0.1), 1.0)


def test_tip_adapter_search_scores_the_zero_shot_logits_at_clip_scale():
    """Guards the search weighing the zero-shot logits by ``clip_scale`` as inference does: at
    scale 100 the misleading prompts win by 100 * (0.995 - 0.0995) = 89.6, more than any cache
    on the grid (alpha < 3, votes in (0, 1]) can overturn, so every pair scores 0 and the
    first, (0.1, 0.1), is kept; searched at scale 1 the cache would win with val acc 1."""
    keys = values = torch.eye(2)
    weights = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    val, labels = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=-1), torch.tensor([0, 1])
    alpha, beta, acc = tip_adapter.search_alpha_beta(val, labels, weights, keys, values, 100.0,
                                                     [7.0, 3.0], [20, 10])
    assert (alpha, beta, acc) == (pytest.approx(0.1), pytest.approx(0.1), 0.0)
    # the reported accuracy is the returned pair's, scored by hand at that scale
    zs = 100.0 * val @ weights.t()
    cache = torch.exp(-beta * (1 - val @ keys.t())) @ values
    assert ((zs + alpha * cache).argmax(1) == labels).float().mean().item() == acc


def test_tip_adapter_fit_keeps_the_searched_pair_and_the_models_scale(model, digits, ctx):
    train, _ = digits
    # validated on its own shots: the cache knows them, so the search leaves the grid's corner
    val_ctx = AdaptContext(ctx.cache, val=train, progress=False)
    adapter = tip_adapter.fit(model, train, {"search": True, "search_steps": [20, 10]}, val_ctx)
    o = adapter.options
    assert o["alpha"] != o["beta"] and (o["alpha"], o["beta"]) != (0.1, 0.1)
    # clip_scale omitted: the model's learned temperature, exp(logit_scale)
    assert o["clip_scale"] == pytest.approx(model.logit_scale.exp().item(), abs=1e-4)
    assert o["clip_scale"] != pytest.approx(model.logit_scale.item(), abs=0.1)
    val = F.normalize(ctx.features(model, train).embeddings.float(), dim=-1)
    want = tip_adapter.search_alpha_beta(val, train.labels, adapter.weights, adapter.keys,
                                         adapter.values, o["clip_scale"],
                                         o["search_scale"], [20, 10])
    assert (o["alpha"], o["beta"], o["val_acc1"]) == want


def test_tip_adapter_fit_reports_the_val_accuracy_its_adapter_scores(model, digits, ctx):
    """Guards the recorded ``val_acc1`` describing the returned adapter: scored by hand at the
    adapter's own clip_scale with the searched (alpha, beta), the validation shots give the
    reported accuracy (a search without the scale reports another model's accuracy)."""
    train, _ = digits
    val_ctx = AdaptContext(ctx.cache, val=train, progress=False)
    adapter = tip_adapter.fit(model, train, {"search": True, "search_steps": [20, 10],
                                             "clip_scale": 100.0}, val_ctx)
    o = adapter.options
    f = F.normalize(ctx.features(model, train).embeddings.float(), dim=-1)
    logits = (100.0 * f @ adapter.weights.t()
              + o["alpha"] * torch.exp(-o["beta"] * (1 - f @ adapter.keys.t())) @ adapter.values)
    assert (logits.argmax(1) == train.labels).float().mean().item() == o["val_acc1"]


def test_tip_adapter_f_trains_only_the_keys_and_lowers_the_loss(model, digits, ctx):
    train, _ = digits
    plain = tip_adapter.fit(model, train, {}, ctx)
    tuned = tip_adapter_f.fit(model, train, {"epochs": 30, "lr": 1e-2, "alpha": 1.0,
                                             "clip_scale": 10.0}, ctx)
    torch.testing.assert_close(tuned.values, plain.values)
    torch.testing.assert_close(tuned.weights, plain.weights)
    assert not torch.allclose(tuned.keys, plain.keys)
    feats = ctx.features(model, train)

    def loss(a):
        return F.cross_entropy(tip_adapter.tip_logits(feats.embeddings, a.weights, a.keys,
                                                      a.values, 1.0, 5.5, 10.0), train.labels)
    assert loss(tuned) < loss(plain)


# -- CLIP-Adapter -------------------------------------------------------------------------------
def test_clip_adapter_ratio_zero_is_the_zero_shot_head(model, digits, ctx):
    train, test = digits
    adapter = clip_adapter.fit(model, train, {"ratio": 0.0, "epochs": 2}, ctx)
    zs = get_method("zeroshot").fit(model, train, {}, ctx)
    torch.testing.assert_close(adapter.logits(test.images, ctx.cache),
                               zs.logits(test.images, ctx.cache))


def test_clip_adapter_residual_blend(model):
    """f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f with the bottleneck's (bias-free)
    weights set by hand, ratio 0.3; logits = scale * cos(f', class weights). Worked out:
    f = (0.8, 0.2, -0.4, 0.4): W1 f = (1.2, 0.6), W2 h = (1.2, 1.2, -1.2, 0.6) -> ReLU
    (1.2, 1.2, 0, 0.6); f' = 0.3 * that + 0.7 * f = (0.92, 0.50, -0.28, 0.46), |f'|^2 = 1.3864.
    f = (-1, 0, 0, 0): W1 f = (-1, 0) -> ReLU 0, so f' = 0.7 f."""
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # 2 classes, dim 4
    adapter = clip_adapter.ClipAdapter(model, ["a", "b"], {"ratio": 0.3, "reduction": 2},
                                       weights, torch.tensor(10.0))
    W1 = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # 4 -> 4 / 2
    W2 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, -1.0]])  # 2 -> 4
    adapter.mlp.load_state_dict({"0.weight": W1, "2.weight": W2})  # strict: no biases
    adapter.mlp.eval()
    f = torch.tensor([[0.8, 0.2, -0.4, 0.4], [-1.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        blended, logits = adapter.adapted(f), adapter.embedding_logits(f)
    torch.testing.assert_close(blended, torch.tensor([[0.92, 0.50, -0.28, 0.46],
                                                      [-0.7, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(logits, torch.tensor([[9.2 / math.sqrt(1.3864),
                                                      4.6 / math.sqrt(1.3864)],
                                                     [-10.0, 0.0]]))


def test_clip_adapter_fit_builds_the_papers_bottleneck(model, digits, ctx):
    """fit's adapter: Linear(16, 16 / reduction) - ReLU - Linear(., 16) - ReLU, no biases,
    blending with the ratio it was given."""
    train, _ = digits
    adapter = clip_adapter.fit(model, train, {"ratio": 0.3, "reduction": 4, "epochs": 1}, ctx)
    assert adapter.options["ratio"] == 0.3
    assert [tuple(p.shape) for p in adapter.mlp.parameters()] == [(4, 16), (16, 4)]
    assert [type(m) for m in adapter.mlp] == [torch.nn.Linear, torch.nn.ReLU,
                                              torch.nn.Linear, torch.nn.ReLU]


# -- CoOp / CoCoOp ------------------------------------------------------------------------------
def _coop_matches_zero_shot_prompt(model, digits, ctx):
    train, test = digits
    adapter = coop.fit(model, train, {"epochs": 1, "lr": 0.0, "init": "a photo of a"}, ctx)
    head = zeroshot_classifier(model, train.classnames, ["a photo of a {}."])
    feats = ctx.features(model, test).embeddings
    scale = model.logit_scale.exp().item()
    torch.testing.assert_close(adapter.logits(feats), scale * feats @ head.t(),
                               atol=1e-5, rtol=1e-5)
    # training scores at the same temperature as inference
    torch.testing.assert_close(adapter.train_logits(feats).detach(), scale * feats @ head.t(),
                               atol=1e-5, rtol=1e-5)
    assert adapter.options["prompts"][3] == "a photo of a three."


def test_coop_before_training_equals_zero_shot_of_its_prompt(model, digits, ctx):
    _coop_matches_zero_shot_prompt(model, digits, ctx)


def test_coop_before_training_equals_zero_shot_on_bert_tower(digits, ctx):
    """The same on a WordPiece/BERT text tower, mean pooled (the lit-minilm preset)."""
    lit = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    _coop_matches_zero_shot_prompt(lit, digits, ctx)


def test_coop_before_training_equals_zero_shot_on_siglip_without_bos(digits, ctx):
    """SigLIP's tokenizer puts no start token before the text: the context starts at 0."""
    from tokenizers import processors

    from cliplab.models.tokenizer import byte_level_tokenizer
    from tests.tiny_models import bare_siglip

    tok = byte_level_tokenizer(48)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", 3)])
    siglip = bare_siglip(48, tok)
    assert coop.leading_specials(tok) == 0
    _coop_matches_zero_shot_prompt(siglip, digits, ctx)


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_gradients_reach_only_the_context(model, digits, class_specific):
    train, _ = digits
    opts = coop.Options(class_specific=class_specific).to_dict()
    learner = coop.build_learner(model, train, opts, seed=0)
    adapter = coop.CoOp(model, train.classnames, opts, learner, torch.tensor(10.0))
    feats = F.normalize(torch.randn(8, 16), dim=-1)
    from cliplab.adapt.base import frozen
    with frozen(model):
        F.cross_entropy(adapter.train_logits(feats), train.labels[:8]).backward()
        assert all(p.grad is None for p in model.parameters())
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    slots = len(model.tokenizer("a photo of a", add_special_tokens=False)["input_ids"])
    assert learner.ctx.shape == ((10, slots, 32) if class_specific else (slots, 32))
    if class_specific:  # each class's context gets only its own prompt's gradient
        assert (learner.ctx.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.requires_grad for p in model.parameters())  # flags restored after


def test_coop_random_context_and_training_changes_prompts(model, digits, ctx):
    train, test = digits
    adapter = coop.fit(model, train, {"init": "", "n_ctx": 3, "epochs": 3, "lr": 0.1}, ctx)
    assert adapter.learner.ctx.shape == (3, 32)
    assert adapter.options["prompts"][0] == "X X X zero."
    assert adapter.learner.ids.shape[1] >= len("zero.") + 2 + 3


def test_a_random_class_specific_context_is_a_draw_per_class(model, digits):
    """CoOp's code draws each class's random context apart (``n_cls x n_ctx x dim``, std
    0.02); one draw was copied to every class. A context from words is the same for all."""
    train, _ = digits
    opts = coop.Options(init="", n_ctx=3, class_specific=True).to_dict()
    ctx = coop.build_learner(model, train, opts, seed=0).ctx.detach()
    assert ctx.shape == (10, 3, 32)
    assert torch.cdist(ctx.flatten(1), ctx.flatten(1)).triu(1)[torch.ones(10, 10).triu(1) > 0] \
        .min() > 0.1  # no two classes start alike (two draws: ~0.02 * sqrt(2 * 96) = 0.28 apart)
    assert 0.015 < ctx.std().item() < 0.025
    same = coop.build_learner(model, train, coop.Options(class_specific=True).to_dict(), 0).ctx
    assert torch.equal(same[0], same[9])
    unified = coop.build_learner(model, train, coop.Options(init="", n_ctx=3).to_dict(), 0).ctx
    assert unified.shape == (3, 32)


def test_random_context_slots_follow_the_start_token(model):
    tok = model.tokenizer
    ids, _, start, m = coop.prompt_tokens(model, ["cat"], "", 2)
    filler = tok("x", add_special_tokens=False)["input_ids"][0]
    name = tok("cat.", add_special_tokens=False)["input_ids"]
    row = ids[0].tolist()
    assert (start, m) == (1, 2) and row[0] == tok.bos_token_id
    assert row[1:3] == [filler, filler] and row[3:3 + len(name)] == name


def test_cocoop_shift_is_added_to_every_context_slot_of_its_image(model, digits):
    train, _ = digits
    opts = coop.Options(init="", n_ctx=2).to_dict()
    learner = coop.build_learner(model, train, opts, seed=0)
    c, (start, n) = len(train.classnames), (learner.start, learner.n_ctx)
    shift = torch.randn(3, learner.embeds.shape[-1], generator=torch.Generator().manual_seed(1))
    out = learner.prompt_embeddings(shift)
    assert out.shape == (3 * c,) + learner.embeds.shape[1:]
    for b in range(3):
        for k in (0, c - 1):  # image-major: row b * C + k is image b's prompt of class k
            row = out[b * c + k]
            torch.testing.assert_close(row[start:start + n], learner.ctx + shift[b])
            torch.testing.assert_close(row[:start], learner.embeds[k, :start])
            torch.testing.assert_close(row[start + n:], learner.embeds[k, start + n:])


def test_cocoop_with_zero_meta_net_equals_coop(model, digits, ctx):
    train, test = digits
    co = cocoop.fit(model, train, {"epochs": 1, "lr": 0.0}, ctx)
    with torch.no_grad():
        co.net[2].weight.zero_()
        co.net[2].bias.zero_()
    plain = coop.CoOp(model, train.classnames, co.options, co.learner, co.scale)
    feats = ctx.features(model, test).embeddings[:12]
    torch.testing.assert_close(co.logits(feats), plain.logits(feats), atol=1e-5, rtol=1e-5)


def test_cocoop_scoring_bar_follows_progress(model, digits, ctx, capsys):
    """CoCoOp's per-image prompt loop shows a bar on long sets only when asked (a run with
    --no-progress prints none)."""
    train, test = digits
    co = cocoop.fit(model, train, {"epochs": 1, "lr": 0.0, "infer_batch": 1}, ctx)
    feats = ctx.features(model, test).embeddings[:12]
    capsys.readouterr()
    quiet = co.logits(feats)
    assert "cocoop prompts" not in capsys.readouterr().err
    torch.testing.assert_close(co.logits(feats, progress=True), quiet)
    assert "cocoop prompts" in capsys.readouterr().err


def test_cocoop_scored_by_the_zeroshot_task_follows_its_progress(model, digits, ctx, capsys):
    """`score` (the zeroshot task with CoCoOp as its classifier) passes the task's progress
    flag on to the per-image prompt loop: no bar unless asked."""
    train, test = digits
    co = cocoop.fit(model, train, {"epochs": 1, "lr": 0.0, "infer_batch": 1}, ctx)
    small = test.subset(torch.arange(12))
    capsys.readouterr()
    quiet = co.score({"test": small}, FeatureCache())
    assert "cocoop prompts" not in capsys.readouterr().err
    assert co.score({"test": small}, FeatureCache(), progress=True) == quiet
    assert "cocoop prompts" in capsys.readouterr().err


@pytest.fixture
def text_passes(model, monkeypatch) -> list[int]:
    """The number of prompts of each pass through ``model``'s text tower, as they run."""
    passes, encode = [], model.encode_text_embeddings

    def spy(embeds, *args, **kwargs):
        passes.append(len(embeds))
        return encode(embeds, *args, **kwargs)

    monkeypatch.setattr(model, "encode_text_embeddings", spy)
    return passes


@pytest.fixture(scope="module")
def learned_cocoop(model, digits, ctx):
    return cocoop.fit(model, digits[0], {"epochs": 1, "lr": 0.05, "init": ""}, ctx)


def _scored(adapter, passes: list[int], **options) -> tuple[torch.Tensor, list[int]]:
    """CoCoOp ``adapter``'s logits of 64 fixed unit embeddings with ``options`` changed, and
    the prompts of each text-tower pass they took."""
    feats = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    adapter = cocoop.CoCoOp(adapter.model, adapter.classnames, {**adapter.options, **options},
                            adapter.learner, adapter.net, adapter.scale)
    passes.clear()
    return adapter.logits(feats), list(passes)


def test_cocoop_inference_with_many_classes_stays_within_the_prompt_budget(
        learned_cocoop, digits, text_passes):
    """Guards CoCoOp's inference memory: a pass of ``infer_batch`` images ran images x classes
    prompts through the text tower at once (64 images of 997 classes: 63 808 prompts, ~20 GB
    on tiny-clip). The images per pass now keep that within ``infer_prompts`` (1024 by
    default), with the same logits as one pass of all the images."""
    names = [f"thing {i}" for i in range(300)]
    many = learned_cocoop.for_classes(LabelledImages(digits[0].images[:1], [0], names, ["{}"]))
    cut, passes = _scored(many, text_passes)
    assert passes == [3 * 300] * 21 + [300]  # 1024 // 300 = 3 images a pass
    torch.testing.assert_close(cut, _scored(many, text_passes, infer_prompts=64 * 300)[0],
                               atol=1e-5, rtol=1e-5)
    # an adapter saved before infer_prompts existed scores within the default budget
    assert cocoop.images_per_pass({"infer_batch": 64}, 997) == 1


def test_cocoop_images_per_pass_change_no_logits(learned_cocoop, text_passes):
    """With few classes the default 64 images stay one pass; ``infer_batch`` still bounds the
    images of a pass and ``infer_prompts`` their prompts (at least one image's). Each image's
    logits do not depend on which images share its pass (to float32 rounding: the text tower's
    matmuls round by batch size, ~2e-7 on the unit text embeddings, as any two infer_batch
    values always did)."""
    whole, passes = _scored(learned_cocoop, text_passes)
    assert passes == [64 * 10]
    one_by_one, passes = _scored(learned_cocoop, text_passes, infer_prompts=1)
    assert passes == [10] * 64
    torch.testing.assert_close(one_by_one, whole, atol=1e-5, rtol=1e-5)
    assert _scored(learned_cocoop, text_passes, infer_batch=8)[1] == [8 * 10] * 8


@pytest.mark.parametrize("method", [coop, cocoop])
def test_learned_prompts_transfer_to_other_classes(method, model, digits, ctx):
    """Base-to-novel: a learned (unified) context before other class names scores each of
    those classes exactly as it scored that class among all of them, since each class's prompt
    (and CoCoOp's per-image shift) depends on nothing else."""
    train, test = digits
    adapter = method.fit(model, train, {"epochs": 1, "lr": 0.05, "init": ""}, ctx)
    feats = ctx.features(model, test).embeddings[:8]
    picked = [3, 1, 7]
    subset = select_classes(test, [test.classnames[i] for i in picked])
    moved = adapter.for_classes(subset)
    assert moved.classnames == subset.classnames and type(moved) is type(adapter)
    torch.testing.assert_close(moved.logits(feats), adapter.logits(feats)[:, picked],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="class-specific context belongs to the classes"):
        coop.fit(model, train, {"epochs": 1, "class_specific": True}, ctx).for_classes(subset)


# -- every method: save, load, identical logits ----------------------------------------------
# the methods whose adapters load back from adapter.json
FEW_SHOT = [name for name in ADAPT_METHODS if hasattr(get_method(name), "ADAPTER")]


def test_linear_probe_logits_are_the_standardised_features_through_its_fit(model, digits, ctx):
    from cliplab.evaluate.linear_probe import fit_logistic
    train, test = digits
    adapter = get_method("linear-probe").fit(model, train, {"l2": 0.01}, ctx)
    x = ctx.features(model, train).embeddings.float()
    mean, std = x.mean(0), x.std(0)
    weight, bias = fit_logistic((x - mean) / std, train.labels, 10, 0.01)
    assert bias.abs().max() > 1e-3  # a bias left out would show
    t = ctx.features(model, test).embeddings.float()
    torch.testing.assert_close(adapter.logits(t), (t - mean) / std @ weight + bias,
                               atol=1e-4, rtol=1e-4)


def test_linear_probe_l2_auto_fits_the_strength_a_validation_split_chooses(model, digits, ctx):
    """``l2: auto`` (it crashed: the choice came back with its fit, as a tuple) picks from
    ``l2_grid`` what `choose_l2` picks on the standardised training features, then fits all
    of them with it."""
    from cliplab.evaluate.linear_probe import choose_l2, fit_logistic
    train, test = digits
    grid = [1e-4, 1e-2, 10.0]
    adapter = get_method("linear-probe").fit(model, train, {"l2": "auto", "l2_grid": grid}, ctx)
    x = ctx.features(model, train).embeddings.float()
    x = (x - x.mean(0)) / x.std(0)
    chosen, _ = choose_l2(x, train.labels, 10, grid, seed=ctx.seed)
    assert adapter.options["l2"] == chosen and chosen in grid
    assert adapter.options["l2_chosen_on"] == ("a random 20% of the training images "
                                               "(no validation split)")
    weight, bias = fit_logistic(x, train.labels, 10, chosen)
    torch.testing.assert_close(adapter.weight, weight)


def test_linear_probe_l2_auto_chooses_on_the_runs_validation_split(model, digits):
    """With a validation split (val_shots, data.val) ``l2: auto`` chose on 20% of the few
    training shots and left the split unused; now each strength is fitted on every training
    shot and the best on the validation split is kept (ties: the stronger), as CoOp's
    linear-probe baseline searches C, and its validation accuracy is recorded."""
    from cliplab.evaluate.linear_probe import fit_logistic
    train, test = digits
    val = test.subset(torch.arange(30, 60))
    grid = [1e-4, 1e-2, 10.0]
    ctx = AdaptContext(FeatureCache(), val=val, progress=False)
    adapter = get_method("linear-probe").fit(model, train, {"l2": "auto", "l2_grid": grid}, ctx)
    x = ctx.features(model, train).embeddings.float()
    mean, std = x.mean(0), x.std(0)
    vx = (ctx.features(model, val).embeddings.float() - mean) / std

    def val_acc(l2):
        w, b = fit_logistic((x - mean) / std, train.labels, 10, l2)
        return ((vx @ w + b).argmax(1) == val.labels).float().mean().item()

    accs = {l2: val_acc(l2) for l2 in grid}
    assert adapter.options["l2"] == max(grid, key=lambda l2: (accs[l2], l2))
    assert adapter.options["l2_chosen_on"] == "validation"
    own = (adapter.logits(ctx.features(model, val).embeddings).argmax(1) == val.labels)
    assert adapter.options["val_acc1"] == pytest.approx(own.float().mean().item())
    assert adapter.options["val_acc1"] == pytest.approx(max(accs.values()))


@pytest.mark.parametrize("features", ["tokens", "layers"])
def test_a_probe_adapter_on_extra_features_scores_through_the_zeroshot_task(model, digits,
                                                                           features):
    """`score` runs the zeroshot task with the adapter as its classifier; an adapter reading
    tokens (or layers) gets them computed (the classifier's ``probe``): its acc1 is the share
    of test images its own logits rank right."""
    train, test = digits
    if features == "layers":  # it reads the last 4 blocks
        model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=4,
                            heads=2, embed_dim=16, context_length=48)
    adapter = get_method("linear-probe").fit(model, train, {"features": features, "l2": 0.01},
                                             AdaptContext(FeatureCache(), progress=False))
    assert adapter.probe == features
    scored = adapter.score({"test": test}, FeatureCache())["test"]
    right = (adapter.logits(test.images).argmax(1) == test.labels).float().mean().item()
    assert scored["acc1"] == pytest.approx(right, abs=1e-6)


def test_a_layers_probe_adapter_refuses_a_tower_of_fewer_blocks_than_it_reads(model, digits):
    """The probe reads the last 4 blocks' states; a 1-block tower has 2 hidden states (the
    patch embeddings and its block): they were taken silently, embeddings included."""
    with pytest.raises(ConfigError, match=r"^options.features: layers reads the last 4 blocks "
                                          r"of the image tower, but this model's has 1; use "
                                          r"features tokens, backbone or embeddings"):
        get_method("linear-probe").fit(model, digits[0], {"features": "layers"},
                                       AdaptContext(FeatureCache(), progress=False))


def test_zeroshot_fills_the_templates_with_descriptions_or_class_names(model, digits, ctx):
    import dataclasses
    train, _ = digits
    described = dataclasses.replace(train, descriptions=[f"the digit {c}"
                                                         for c in train.classnames])
    for names, texts in (("prompt", described.descriptions), ("class", train.classnames)):
        head = get_method("zeroshot").fit(model, described, {"names": names}, ctx).weights
        torch.testing.assert_close(head, zeroshot_classifier(model, texts, train.templates))
    # by default the descriptions: the prompts a dataset ships are what it is best read by
    default = get_method("zeroshot").fit(model, described, {}, ctx).weights
    torch.testing.assert_close(default, zeroshot_classifier(model, described.descriptions,
                                                            train.templates))


@pytest.mark.parametrize("name", sorted(FEW_SHOT))
def test_round_trip_identical_logits(name, model, digits, tmp_path):
    train, test = digits
    val = load_digits("test").subset(torch.arange(100, 140))
    ctx = AdaptContext(FeatureCache(), val=val, progress=False)
    options = {"epochs": 2} if "epochs" in get_method(name).Options.model_fields else {}
    if name.startswith("tip"):
        options.update(search=True, search_steps=[5, 4])
    if name == "linear-probe":
        options.update(features="tokens")
    adapter = get_method(name).fit(model, train, options, ctx)
    before = adapter.logits(test.images, ctx.cache)
    adapter.save(tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", model)
    assert loaded.method == name
    assert torch.equal(loaded.logits(test.images, FeatureCache()), before)
    assert before.shape == (len(test), 10)


def test_bad_inputs_are_one_line_errors(model, digits, ctx, tmp_path):
    train, _ = digits
    with pytest.raises(ConfigError, match="unknown adapt method 'nope'"):
        get_method("nope")
    with pytest.raises(ConfigError, match=r"adapt method 'clip-adapter': unknown key "
                       r"options\.ratioo \(valid: .*reduction"):
        clip_adapter.fit(model, train, {"ratioo": 1}, ctx)
    with pytest.raises(ConfigError, match=r"options\.epochs: expected a valid integer.*'many'"):
        clip_adapter.fit(model, train, {"epochs": "many"}, ctx)
    with pytest.raises(ConfigError, match=r"options\.n_ctx: expected greater than or equal "
                                          r"to 1, got 0"):
        coop.fit(model, train, {"n_ctx": 0}, ctx)
    with pytest.raises(ConfigError, match=r"^adapt method 'cocoop': options\.infer_prompts: "
                       r"expected greater than or equal to 1, got 0$"):
        cocoop.fit(model, train, {"infer_prompts": 0}, ctx)
    with pytest.raises(ConfigError, match="val_shots"):
        tip_adapter.fit(model, train, {"search": True}, ctx)
    with pytest.raises(ModelError, match="not an adapter folder"):
        load_adapter(tmp_path, model)


def test_numbers_written_as_strings_are_numbers(model, digits, ctx):
    """YAML 1.1 reads ``1e-2`` as a string; the options schema parses it (one place)."""
    train, _ = digits
    adapter = clip_adapter.fit(model, train, {"lr": "1e-2", "epochs": "1"}, ctx)
    assert adapter.options["lr"] == 0.01 and adapter.options["epochs"] == 1


def test_tip_adapter_keys_average_augmented_views(model, digits, ctx):
    """The paper's cache: each key is the normalised mean of its shot's augmented views'
    embeddings (seeded, so the same seed gives the same keys); 0 views keys the plain ones."""
    train, _ = digits
    views = tip_adapter.augmented_embeddings(model, train.images, 3, seed=ctx.seed)
    assert views.shape == (3, len(train), 16)
    plain = F.normalize(ctx.features(model, train).embeddings, dim=-1)
    assert not torch.allclose(F.normalize(views[0], dim=-1), plain, atol=1e-3)  # augmented
    assert not torch.allclose(views[0], views[1])  # each view its own draw
    adapter = tip_adapter.fit(model, train, {"augment_views": 3}, ctx)
    torch.testing.assert_close(adapter.keys, F.normalize(views.mean(0), dim=-1))
    unaugmented = tip_adapter.fit(model, train, {"augment_views": 0}, ctx)
    torch.testing.assert_close(unaugmented.keys, plain)


def test_tip_adapter_augment_overrides_reach_the_views(model, digits, ctx):
    """``augment`` overrides the model's augmentation for the keys' views: with every jitter
    off and no flips the views are the plain images; with flips left on they are not; a key
    that is no augmentation option is a one-line error naming it."""
    train, _ = digits
    plain = F.normalize(ctx.features(model, train).embeddings, dim=-1)
    still = {"scale": [1, 1], "translate": 0, "rotate_deg": 0}
    none = tip_adapter.fit(model, train, {"augment_views": 2, "augment": {**still, "hflip": False}},
                           ctx)
    torch.testing.assert_close(none.keys, plain, atol=1e-4, rtol=0)
    assert none.options["augment"] == {**still, "hflip": False}
    flips = tip_adapter.fit(model, train, {"augment_views": 2, "augment": still}, ctx)
    assert not torch.allclose(flips.keys, plain, atol=1e-3)
    with pytest.raises(ConfigError, match="augment.*hflp"):
        tip_adapter.fit(model, train, {"augment": {"hflp": False}}, ctx)


def test_tip_adapter_f_trains_on_augmented_views(model, digits, ctx, monkeypatch):
    """Every training draw sees one of the augmented views the keys were built from."""
    train, _ = digits
    seen = []
    real = tip_adapter_f.tip_logits

    def spy(feats, *args):
        seen.append(feats.detach().clone())
        return real(feats, *args)

    monkeypatch.setattr(tip_adapter_f, "tip_logits", spy)
    tip_adapter_f.fit(model, train, {"augment_views": 2, "epochs": 2, "batch_size": 8}, ctx)
    views = F.normalize(tip_adapter.augmented_embeddings(model, train.images, 2, ctx.seed),
                        dim=-1)
    drawn = torch.cat(seen)
    assert len(drawn) == 2 * len(train)
    # each drawn row is a view of some shot, and both views are drawn
    dist = torch.cdist(drawn, views.flatten(0, 1))
    assert dist.min(1).values.max() < 1e-3  # cdist is exact to ~1e-4 only
    which = dist.argmin(1) // len(train)
    assert set(which.tolist()) == {0, 1}


def test_tip_adapter_f_trains_each_view_against_its_own_shots_label(model, digits, ctx,
                                                                   monkeypatch):
    """Guards the pairing of features and targets: each row the loss scores must be a view of
    the shot whose label it is trained towards, not of another shot in the batch."""
    import types

    train, _ = digits
    drawn, targets = [], []
    real = tip_adapter_f.tip_logits

    def spy_logits(feats, *args):
        drawn.append(feats.detach().clone())
        return real(feats, *args)

    def spy_loss(logits, labels):
        targets.append(labels.clone())
        return F.cross_entropy(logits, labels)

    monkeypatch.setattr(tip_adapter_f, "tip_logits", spy_logits)
    monkeypatch.setattr(tip_adapter_f, "F", types.SimpleNamespace(normalize=F.normalize,
                                                                  cross_entropy=spy_loss))
    tip_adapter_f.fit(model, train, {"augment_views": 2, "epochs": 2, "batch_size": 8}, ctx)
    views = F.normalize(tip_adapter.augmented_embeddings(model, train.images, 2, ctx.seed),
                        dim=-1)
    rows, labels = torch.cat(drawn), torch.cat(targets)
    assert len(rows) == len(labels) == 2 * len(train)
    dist = torch.cdist(rows, views.flatten(0, 1))
    assert dist.min(1).values.max() < 1e-3
    shot = dist.argmin(1) % len(train)  # views are [view, shot]: the shot each row shows
    assert labels.tolist() == train.labels[shot].tolist()
    assert len(set(labels.tolist())) > 1  # several classes per batch: a swap would show


def test_an_adapter_refuses_a_model_it_was_not_fitted_on(model, digits, ctx, tmp_path):
    """load_adapter on other weights fails in one line (it scored their features with the
    adapter without a word)."""
    import copy

    train, _ = digits
    get_method("linear-probe").fit(model, train, {}, ctx).save(tmp_path / "a")
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(ModelError, match="fitted on other weights"):
        load_adapter(tmp_path / "a", other)
    assert load_adapter(tmp_path / "a", model).method == "linear-probe"
    # saved before adapter.json recorded the weights: loaded, but never without a word
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text(encoding="utf-8"))
    del meta["fingerprint"]
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.warns(CliplabWarning, match=r"a records no weights fingerprint \(an adapter "
                      r"saved by an older cliplab\): the model given is not checked"):
        assert load_adapter(tmp_path / "a", other).method == "linear-probe"


def test_options_templates_need_one_place_for_the_class():
    """`options.templates=['a {c} shape']` (the style of template files) or a prompt with no
    '{}' gave every class the same prompt, and `[]` silently fell back to the dataset's while
    recording []; `{c}` now reads as `{}` and the others are refused."""
    from cliplab.adapt.options import PromptOptions
    from cliplab.config import validate

    assert validate(PromptOptions, {"templates": ["a {c} shape"]}).templates == ["a {} shape"]
    assert validate(PromptOptions, {"templates": "a {} shape"}).templates == ["a {} shape"]
    assert validate(PromptOptions, {}).templates is None
    for value, problem in ((["a shape"], "every prompt needs one '{}' where the class goes; not "
                                         "'a shape'"),
                           (["{} of {}"], "every prompt needs one '{}'"),
                           ([], "must be a non-empty list of prompts")):
        with pytest.raises(ConfigError, match="^" + re.escape(f"x: templates: {problem}")):
            validate(PromptOptions, {"templates": value}, "x")


# -- the few-shot methods' training loop --------------------------------------------------------
def test_train_steps_schedules_every_batch_and_reports_each_epochs_mean_loss(monkeypatch):
    from cliplab.adapt import training
    optimizers, rates = [], []
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer",
                        lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    p = torch.nn.Parameter(torch.zeros(2))

    def loss_fn(rows):  # the loss is the batch's size: 4, 4, 2 per epoch
        rates.append(optimizers[0].param_groups[0]["lr"])
        return (p * 0).sum() + len(rows)

    history = training.train_steps([p], loss_fn, n=10, epochs=2, batch_size=4, lr=1.0,
                                   progress=False)
    assert history == pytest.approx([10 / 3, 10 / 3])
    # 3 batches an epoch, the last one short: a cosine over all 6 steps
    assert rates == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])


def test_an_adapter_scores_only_sets_of_its_classes_in_its_order(model, digits):
    """Labels are class indices: a set of the same classes in another order would be scored
    against the wrong rows without a word (run_adapt checks its sets; `score` is also the
    Python API's), so it is refused naming the first class that differs."""
    train, test = digits
    adapter = get_method("linear-probe").fit(model, train, {"l2": 0.01},
                                             AdaptContext(FeatureCache(), progress=False))
    order = list(reversed(range(len(test.classnames))))
    flipped = type(test)(images=test.images, labels=torch.tensor(order)[test.labels],
                         classnames=[test.classnames[i] for i in order],
                         templates=test.templates)
    with pytest.raises(DataError, match=rf"^score: the adapter and test must have the same "
                                        rf"classes in the same order; class 0 is "
                                        rf"'{train.classnames[0]}' in the adapter but "
                                        rf"'{train.classnames[-1]}' in test"):
        adapter.score({"test": flipped}, FeatureCache())
    right = (adapter.logits(test.images).argmax(1) == test.labels).float().mean().item()
    assert adapter.score({"test": test}, FeatureCache())["test"]["acc1"] == pytest.approx(right)
    # a list of sets was an AttributeError traceback: the sets are named
    with pytest.raises(InputError, match=r"^score: sets must be a dict of named labelled sets, "
                                         r"e.g. \{'test': data\}; got list$"):
        adapter.score([test], FeatureCache())


@pytest.mark.parametrize("options, context", [
    ({"init": "", "n_ctx": 100}, "options.n_ctx=100"),
    ({"init": "a " * 70}, "options.init (139 tokens)")])  # byte-level: 'a', ' ', 'a', ...
def test_a_prompt_longer_than_the_text_tower_names_the_option(model, digits, ctx, options,
                                                              context):
    with pytest.raises(ModelError, match=rf"^a prompt is longer than the text tower's "
                       rf"{model.context_length} tokens \(\d+ with class '\w+'\); shorten the "
                       rf"class names or the context, {re.escape(context)}$"):
        get_method("coop").fit(model, digits[0], {**options, "epochs": 1}, ctx)


def test_a_frozen_block_gives_each_part_its_own_mode_back(model):
    """`frozen` (a method training weights in place freezes the rest) restored the whole
    model's mode at once: a tower kept in eval mode came back training."""
    from cliplab.adapt.base import frozen

    model.train()
    model.tower("text").eval()
    with frozen(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.tower("image").training
    assert not any(m.training for m in model.tower("text").modules())
    model.eval()
