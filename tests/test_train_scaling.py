"""Trainer features for large batches and continued training: GradCache accumulation, gradient
checkpointing, partly locked towers, replay mixing, evaluation during training."""

import json

import pytest
import torch

from cliplab.data.pairs import concat_pairs
from cliplab.data.shapes import load_shapes
from cliplab.train.batches import EpochBatches, PartnerBatches, ReplayBatches
from cliplab.train.grad_cache import grad_cache_backward
from cliplab.models import build_model
from cliplab.runs import RunDir
from cliplab.train.frozen_features import image_backbone_features, text_backbone_features
from cliplab.train.trainer import TrainConfig, Trainer
from tests.tiny_models import small_model as _one_block_model
from tests.warned import warned


def small_model(seed=0, **kw):
    """Two blocks per tower, so 'all but the last block' differs from 'all'."""
    return _one_block_model(seed, layers=2, **kw)


@pytest.fixture(scope="module")
def pairs():
    return load_shapes(n=64, seed=0, kinds=("single",), image_size=32)


def config(**kw):
    base = dict(steps=3, batch_size=32, lr=3e-3, warmup=1, log_every=1, progress=False,
                augment=False)
    base.update(kw)
    return TrainConfig.from_dict(base)


def grads_of_one_step(model, pairs, **kw):
    """Gradients of the first step (weights after Adam steps would blow up round-off in
    parameters whose true gradient is zero, such as attention key biases)."""
    Trainer(model, config(steps=1, grad_clip=0, **kw)).fit(pairs)
    return {k: p.grad.clone() for k, p in model.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [8, 12])  # 12 does not divide the batch of 32
def test_grad_cache_gives_the_large_batch_update(pairs, micro):
    whole = grads_of_one_step(small_model(), pairs)
    chunked = grads_of_one_step(small_model(), pairs, micro_batch_size=micro)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)


def test_grad_cache_backward_matches_autograd_with_dropout():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
    x, y = torch.randn(10, 6), torch.randn(10, 6)

    def loss_fn(a, b):
        return (a @ b.t()).logsumexp(1).mean()

    def embed(rows):
        return net(x[rows]), net(y[rows])

    torch.manual_seed(1)
    state = torch.get_rng_state()
    # the reference: the same dropout masks, drawn chunk by chunk as GradCache draws them
    ref_img, ref_txt = [], []
    for s in range(0, 10, 4):
        a, b = embed(slice(s, min(s + 4, 10)))
        ref_img.append(a)
        ref_txt.append(b)
    ref_after = torch.get_rng_state()
    loss_fn(torch.cat(ref_img), torch.cat(ref_txt)).backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.set_rng_state(state)
    grad_cache_backward(embed, 10, 4, loss_fn)
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    # the replayed passes leave the generator where one pass left it (the next step's dropout)
    assert torch.equal(torch.get_rng_state(), ref_after)


def test_gradient_checkpointing_gives_the_same_update(pairs):
    plain = grads_of_one_step(small_model(), pairs)
    model = small_model()
    ckpt = grads_of_one_step(model, pairs, gradient_checkpointing=True)
    assert model.model.is_activation_checkpointing
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grad_cache_replays_dropout_drawn_on_apples_gpu(monkeypatch):
    """On MPS dropout draws from the MPS generator: its state must be replayed as the CPU's
    and CUDA's are (stood for here by a CPU generator behind torch.mps's state functions)."""
    mps = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", mps.get_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", mps.set_state)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)
    x, y = torch.randn(10, 6), torch.randn(10, 6)

    def net(v):
        hidden = first(v)
        return second(hidden * (torch.rand(hidden.shape, generator=mps) > 0.5) * 2)

    def embed(rows):
        return net(x[rows]), net(y[rows])

    def loss_fn(a, b):
        return (a @ b.t()).logsumexp(1).mean()

    start = mps.get_state()
    ref = [embed(slice(s, min(s + 4, 10))) for s in range(0, 10, 4)]
    loss_fn(torch.cat([a for a, _ in ref]), torch.cat([b for _, b in ref])).backward()
    expected = [p.grad.clone() for p in (*first.parameters(), *second.parameters())]
    for p in (*first.parameters(), *second.parameters()):
        p.grad = None
    mps.set_state(start)
    grad_cache_backward(embed, 10, 4, loss_fn)
    for p, g in zip((*first.parameters(), *second.parameters()), expected):
        torch.testing.assert_close(p.grad, g)


def test_locked_tower_except_last_block_trains_only_that_block_and_what_follows(pairs):
    model = small_model()
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    Trainer(model, config(lock_image=True, lock_image_except_last=1)).fit(pairs)
    changed = {k for k, v in model.vision_tower.state_dict().items() if not torch.equal(v, before[k])}
    # the final norm trains with the last block, as in OpenCLIP's lock (its last group)
    assert {k.split(".")[0] for k in changed} == {"encoder", "post_layernorm"}
    assert all(k.startswith(("encoder.layers.1.", "post_layernorm.")) for k in changed)


def test_clip_loss_clamps_the_temperature_at_100(pairs):
    model = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    Trainer(model, config(steps=1)).fit(pairs)
    assert model.logit_scale.item() == pytest.approx(4.6052)


def test_siglip_loss_and_a_heads_loss_leave_a_released_siglips_temperature_alone(pairs):
    """A released SigLIP's temperature is exp(4.72) = 112, above CLIP's clamp at 100: the
    sigmoid loss trains it freely (the paper has no clamp), and a classification head's loss
    does not train it at all, so neither may pull it down to 4.6052."""
    from cliplab.adapt.head import ClassifierHead
    from cliplab.data.types import LabelledImages

    def released_siglip():
        model = build_model("tiny-siglip", image_size=32, patch_size=8, width=32, layers=1,
                            heads=2, context_length=48)
        with torch.no_grad():
            model.logit_scale.fill_(4.72)
        return model

    model = released_siglip()
    Trainer(model, config(steps=1, lr=1e-4, loss="siglip")).fit(pairs)
    assert model.logit_scale.item() == pytest.approx(4.72, abs=1e-3)

    model = released_siglip()
    labels = torch.arange(len(pairs.images)) % 3
    head = ClassifierHead(torch.randn(3, model.embed_dim), 10.0, ["a", "b", "c"])
    before = model.logit_scale.item()
    Trainer(model, config(steps=1), head=head).fit(
        LabelledImages(pairs.images, labels, ["a", "b", "c"], ["{}"]))
    assert model.logit_scale.item() == before  # untrained, unchanged


def test_the_clip_loss_on_a_siglip_model_says_it_leaves_the_bias_untrained(pairs, recwarn):
    """SigLIP's probabilities add its logit bias to every score; the default train.loss (clip)
    never trains it, so a SigLIP pretrained so kept its -10 silently (cos 0.3 scored 0.0009)."""
    model = build_model("tiny-siglip", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                        context_length=48)
    Trainer(model, config(steps=1, lr=1e-3)).fit(pairs)
    assert model.logit_bias.item() == -10.0  # what the warning says: untrained
    assert warned(recwarn).count("train.loss=clip does not train this model's logit "
                                 "bias (it stays -10.00)") == 1
    Trainer(model, config(steps=1, lr=1e-3, loss="siglip")).fit(pairs)
    assert model.logit_bias.item() != -10.0 and "logit bias" not in warned(recwarn)
    Trainer(_one_block_model(), config(steps=1)).fit(pairs)  # a CLIP has no bias to train
    assert "logit bias" not in warned(recwarn)
    model.logit_bias.requires_grad_(False)  # frozen (LoRA): no loss would train it
    Trainer(model, config(steps=1, lr=1e-3)).fit(pairs)
    assert "logit bias" not in warned(recwarn)


def test_replay_batches_mix_the_ratio_and_cover_each_set():
    batches = ReplayBatches(n_new=40, n_old=30, batch_size=10, ratio=0.3, seed=0)
    seen_new, seen_old = [], []
    for _ in range(4):  # one epoch of the new data: 40 / 7 -> 5 batches; take 4
        idx = batches.next()
        assert len(idx) == 10
        seen_new += [i for i in idx.tolist() if i < 40]
        seen_old += [i for i in idx.tolist() if i >= 40]
    assert len(seen_new) == 28 and len(seen_old) == 12
    assert len(set(seen_new)) == 28 and len(set(seen_old)) == 12  # no repeats within an epoch
    assert all(40 <= i < 70 for i in seen_old)


def test_epoch_batches_reshuffle_each_epoch_and_drop_the_short_batch():
    batches = EpochBatches(10, 4, seed=3)
    assert batches.per_epoch == 2  # 10 // 4: the short third batch of 2 is dropped
    drawn = [batches.next() for _ in range(4)]
    assert all(len(b) == 4 for b in drawn) and batches.epoch == 1
    for epoch, pair in enumerate((drawn[:2], drawn[2:])):  # a fresh permutation each epoch
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch))
        assert torch.equal(torch.cat(pair), order[:8])
    assert not torch.equal(torch.cat(drawn[:2]), torch.cat(drawn[2:]))


def test_partner_batches_reshuffle_each_epoch():
    candidates = (torch.arange(24).view(12, 2) + 1) % 12  # 12 images, 2 candidates each
    batches = PartnerBatches(candidates, batch_size=12, seed=0)
    epochs = [batches.next().tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_replay_share_is_rounded_and_its_order_its_own():
    # round(0.25 * 6) = round(1.5) = 2 replayed per batch (int would give 1)
    batches = ReplayBatches(n_new=20, n_old=20, batch_size=6, ratio=0.25, seed=0)
    idx = batches.next()
    assert (idx >= 20).sum() == 2
    # equal sizes: had the replay set the new data's seed, it would walk the same order
    same = ReplayBatches(n_new=20, n_old=20, batch_size=20, ratio=0.5, seed=0)
    new, old = same.next().split(10)
    assert not torch.equal(new, old - 20)


def test_replay_training_draws_from_both_sets(pairs):
    old = load_shapes(n=64, seed=5, kinds=("single",), image_size=32)
    data = concat_pairs(pairs, old)
    assert len(data) == 128 and data.captions[64:] == old.captions
    model = small_model()
    last = Trainer(model, config(steps=2)).fit(pairs, replay=old, replay_ratio=0.25)
    assert last["step"] == 2


def test_evaluation_runs_every_n_steps_and_lands_in_metrics(pairs, tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"eval/probe": float(len(calls))}

    Trainer(small_model(), config(steps=5, eval_every=2), RunDir(tmp_path)).fit(
        pairs, evaluate=evaluate)
    assert calls == [False, False, False]  # steps 2, 4 and the last (5), in eval mode
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/probe"]) for r in records if "eval/probe" in r]
    assert evals == [(2, 1.0), (4, 2.0), (5, 3.0)]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_frozen_tower_features_run_in_eval_mode_and_leave_the_mode_as_it_was(pairs, tower):
    model = small_model()
    model.train()
    module = model.vision_tower if tower == "image" else model.text_tower
    seen = []
    model.tower_layers(tower)[0].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    if tower == "image":
        image_backbone_features(model, pairs.images[:3], progress=False)
    else:
        text_backbone_features(model, ["a cat", "a dog"], progress=False)
    assert seen == [False] and module.training


@pytest.mark.parametrize("tower", ["image", "text"])
def test_locked_tower_features_are_computed_once_with_the_same_update(pairs, tower,
                                                                      monkeypatch):
    """A fully locked tower runs once per dataset (not every step) and the step is unchanged."""
    lock = {f"lock_{tower}": True}
    uncached = grads_of_one_step(small_model(), pairs, cache_frozen_features=False, **lock)
    model = small_model()
    calls = []
    backbone = getattr(model, f"{tower}_backbone")
    module = model.vision_tower if tower == "image" else model.text_tower
    monkeypatch.setattr(model, f"{tower}_backbone",
                        lambda *a, **kw: calls.append(module.training) or backbone(*a, **kw))
    Trainer(model, config(steps=3, **lock)).fit(pairs)
    # 64 images / distinct captions: one pass, in eval mode (no dropout in features reused by
    # every step), then only projections
    assert calls == [False]
    cached = grads_of_one_step(small_model(), pairs, **lock)
    assert cached.keys() == uncached.keys()
    for k in cached:
        torch.testing.assert_close(cached[k], uncached[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_locked_image_tower_with_augmentation_runs_every_step(pairs, monkeypatch):
    """Augmented images differ each step: caching their features would silently skip the
    augmentation."""
    model = small_model()
    calls = []
    backbone = model.image_backbone
    monkeypatch.setattr(model, "image_backbone",
                        lambda *a, **kw: calls.append(1) or backbone(*a, **kw))
    Trainer(model, config(steps=3, lock_image=True, augment=True)).fit(pairs)
    assert len(calls) == 3


def test_a_locked_tower_stays_in_eval_mode_after_a_mid_run_evaluation(pairs):
    """LiT's locked tower runs without dropout for the whole run: leaving an evaluation put
    every submodule back in train mode, the locked tower too, from the first eval_every on."""
    model = small_model()
    seen = []
    model.tower_layers("image")[0].register_forward_pre_hook(
        lambda m, args: seen.append(m.training))
    Trainer(model, config(steps=4, lock_image=True, augment=True, eval_every=1)).fit(
        pairs, evaluate=lambda m: {"eval/x": 0.0})
    assert seen == [False] * 4


def test_fsdp_in_one_process_is_told_not_silently_dropped(recwarn):
    """A recipe with train.fsdp tried out in one process trains the whole model: said."""
    Trainer(small_model(), TrainConfig(steps=1, batch_size=4, progress=False, fsdp=True))
    assert warned(recwarn) == ("train: train.fsdp shards the towers over torchrun's ranks; in "
                               "one process the model trains whole\n")
    Trainer(small_model(), TrainConfig(steps=1, batch_size=4, progress=False))
    assert warned(recwarn) == ""
