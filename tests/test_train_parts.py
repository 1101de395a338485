"""The trainer's parts on their own: TrainConfig's schema, the objectives against hand-computed
losses, one StepBatch shape from every input, ranks splitting the global batch, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from cliplab.config import Section, validate
from cliplab.data.digits import load_digits
from cliplab.data.shapes import load_shapes
from cliplab.errors import ConfigError
from cliplab.train.checkpoint import STATE_FILE
from cliplab.train.config import TrainConfig
from cliplab.train import contrastive
from cliplab.train.embed import Embedder
from cliplab.train.losses import clip_loss, clip_loss_hard_negatives
from cliplab.train.objectives import ClassificationObjective, ContrastiveObjective
from cliplab.runs import RunDir
from cliplab.train.step_batch import StepBatch
from cliplab.train.step_inputs import MemoryInputs
from cliplab.train.trainer import Trainer
from tests.tiny_models import small_model
from tests.warned import warned


@pytest.fixture(scope="module")
def pairs():
    return load_shapes(n=32, seed=0, kinds=("single",), image_size=32)


def config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"steps": 2, "batch_size": 8, "warmup": 1, "log_every": 1,
                                  "progress": False, "augment": False, **kw})


# -- TrainConfig ------------------------------------------------------------------------------
def test_train_config_defaults_and_errors_name_the_key():
    cfg = TrainConfig.from_dict(None)
    assert (cfg.batch_size, cfg.lr, cfg.loss, cfg.precision, cfg.steps, cfg.augment) == \
        (256, 1e-3, "clip", "fp32", None, True)
    assert TrainConfig.from_dict({"augment": {"hflip": False}}).augment == {"hflip": False}
    for key, value, message in [
            ("batch_size", 1, r"train\.batch_size: expected greater than or equal to 2"),
            ("loss", "hinge", r"train\.loss: expected 'clip' or 'siglip', got 'hinge'"),
            ("loss_tile", True, r"train\.loss_tile: expected an integer, got True"),
            ("micro_batch_size", 0, r"train\.micro_batch_size: expected greater than 0"),
            # as large as the batch it splits nothing (it passed silently)
            ("micro_batch_size", 256, r"micro_batch_size 256 is not below batch_size 256: it "
                                      r"splits nothing"),
            ("lr_scale", {"text": "x"}, r"train\.lr_scale\.text: expected a valid number"),
            ("steps", 0, r"train\.steps: expected greater than 0")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({key: value})


def test_train_config_inside_a_stage_schema_names_file_and_key():
    class Stage(Section):
        train: TrainConfig = TrainConfig()

    with pytest.raises(ConfigError, match=r"^x\.yaml: train\.batch_size: expected a valid "
                                          r"integer.*'many'$"):
        validate(Stage, {"train": {"batch_size": "many"}}, "x.yaml")
    assert validate(Stage, {}, "x.yaml").train.batch_size == 256


# -- objectives -------------------------------------------------------------------------------
def _loaded_batch(model, pairs, n=6, keys=None, extra=0):
    """The first n pairs (and ``extra`` more captions in the table, for hard negatives)."""
    tokens = model.tokenize([c[0] for c in pairs.captions[:n + extra]])
    pixels = model.preprocess(pairs.images[:n])
    return StepBatch(pixels, texts=tokens, captions=torch.arange(n),
                     keys=torch.arange(n) if keys is None else keys)


def _normalised_features(model, batch, rows=None):
    rows = batch.captions if rows is None else rows
    img = F.normalize(model.encode_image(batch.images, normalize=False), dim=-1)
    txt = F.normalize(model.encode_text(batch.texts["input_ids"][rows],
                                        batch.texts["attention_mask"][rows], normalize=False),
                      dim=-1)
    return img, txt


def _grads(model) -> dict:
    return {k: p.grad.clone() for k, p in model.model.named_parameters() if p.grad is not None}


def _assert_same_update(model, loss, expected, want):
    torch.testing.assert_close(loss, expected.detach())
    got = _grads(model)
    assert got.keys() == want.keys()
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("shared_keys", [False, True])
def test_contrastive_objective_is_clips_loss_in_any_micro_batches_and_tiles(
        pairs, shared_keys, monkeypatch):
    model = small_model()
    keys = torch.tensor([0, 1, 0, 2, 3, 1]) if shared_keys else None
    batch = _loaded_batch(model, pairs, keys=keys)
    img, txt = _normalised_features(model, batch)
    if shared_keys:  # pairs sharing a key are positives of each other (hand-checked elsewhere)
        expected = clip_loss(img, txt, model.logit_scale, keys)
    else:  # by hand: symmetric cross-entropy of exp(scale) * cosine similarities
        logits = model.logit_scale.exp() * img @ txt.t()
        target = torch.arange(6)
        expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    expected.backward()
    want = _grads(model)
    tiled_calls = []
    tiled = contrastive.tiled_clip_loss
    monkeypatch.setattr(contrastive, "tiled_clip_loss",
                        lambda *a, **k: tiled_calls.append(k["tile"]) or tiled(*a, **k))
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=False)
    for chunk in (None, 4):
        for tile in (None, 4):
            model.zero_grad(set_to_none=True)
            objective = ContrastiveObjective(embed, "clip", tile=tile, micro_batch_size=chunk)
            _assert_same_update(model, objective.backward(batch), expected, want)
    assert tiled_calls == [4, 4]  # the tiled loss ran when a tile was given, in its tiles


def test_contrastive_objective_with_hard_negatives_is_negclips_loss(pairs):
    model = small_model()
    keys = torch.tensor([0, 1, 0, 2, 3, 1])
    batch = _loaded_batch(model, pairs, keys=keys, extra=2)
    # rows 6 and 7 of the table are extra captions; row 0 (a pair's own caption) is a valid
    # negative of another image; -1: no negative
    batch.negatives = torch.tensor([6, -1, 7, 0, -1, 1])
    has = batch.negatives >= 0
    img, txt = _normalised_features(model, batch)
    _, neg = _normalised_features(model, batch, batch.negatives.clamp(min=0))
    neg = neg * has[:, None]
    expected = clip_loss_hard_negatives(img, txt, neg, has, model.logit_scale, keys)
    expected.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=False)
    _assert_same_update(model, ContrastiveObjective(embed, "clip").backward(batch), expected, want)


def test_classification_objective_is_cross_entropy_in_any_micro_batches():
    model = small_model()
    digits = load_digits("train")
    head = torch.nn.Linear(16, 10)
    batch = StepBatch(model.preprocess(digits.images[:7]), labels=digits.labels[:7])
    expected = F.cross_entropy(head(model.encode_image(batch.images, normalize=False)),
                               batch.labels)
    expected.backward()
    want = head.weight.grad.clone()
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=False)
    for chunk in (None, 3):
        head.zero_grad(set_to_none=True)
        loss = ClassificationObjective(embed, head, micro_batch_size=chunk).backward(batch)
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(head.weight.grad, want)


def test_classification_head_and_loss_run_in_fp32_under_bf16():
    """bf16 autocast is for the towers: the head's logits were rounded to bf16 (by up to 0.03
    at CLIP's scale) before the fp32 cross-entropy."""
    model = small_model()
    digits = load_digits("train")
    head = torch.nn.Linear(16, 10)
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(
        (torch.is_autocast_enabled("cpu"), inputs[0].dtype, output.dtype)))
    batch = StepBatch(model.preprocess(digits.images[:7]), labels=digits.labels[:7])
    embed = Embedder(model, torch.device("cpu"), "bf16", augment=False)
    ClassificationObjective(embed, head).backward(batch)
    assert seen == [(False, torch.float32, torch.float32)]


def test_siglip_needs_a_logit_bias():
    with pytest.raises(ConfigError, match="train.loss=siglip needs a model with a logit bias"):
        Trainer(small_model(), config(loss="siglip"))


def test_the_objective_is_chosen_by_the_trainer_and_the_data_must_fit_it(pairs):
    assert isinstance(Trainer(small_model(), config()).objective, ContrastiveObjective)
    trainer = Trainer(small_model(), config(), head=torch.nn.Linear(16, 3))
    assert isinstance(trainer.objective, ClassificationObjective)
    with pytest.raises(ConfigError, match="a classification head trains on labelled images"):
        trainer.fit(pairs)


# -- inputs -----------------------------------------------------------------------------------
def test_two_ranks_each_take_their_half_of_the_same_global_batch(pairs):
    model = small_model()
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=True)
    cfg = config(augment=True)

    def batches(rank, world):
        inputs = MemoryInputs(pairs, cfg, model, embed.pixels, rank, world, torch.device("cpu"))
        rng = torch.Generator().manual_seed(0)
        return [inputs.next(rng) for _ in range(5)]  # 4 batches per epoch: crosses an epoch

    for whole, a, b in zip(batches(0, 1), batches(0, 2), batches(1, 2)):
        assert len(a) == len(b) == 4 and len(whole) == 8
        assert torch.equal(torch.cat([a.images, b.images]), whole.images)
        assert torch.equal(torch.cat([a.captions, b.captions]), whole.captions)
        assert torch.equal(torch.cat([a.keys, b.keys]), whole.keys)
        assert a.texts is whole.texts or torch.equal(a.texts["input_ids"],
                                                     whole.texts["input_ids"])


def test_labelled_batches_keep_each_image_with_its_label():
    from cliplab.data.types import LabelledImages

    # image i is filled with the value of its label, so a batch shows any misalignment
    labels = torch.arange(20) % 5
    images = labels.to(torch.uint8)[:, None, None, None].expand(20, 4, 4, 3).clone()
    data = LabelledImages(images, labels, [f"c{k}" for k in range(5)], ["{}"])
    for rank, world in ((0, 1), (1, 2)):
        inputs = MemoryInputs(data, config(batch_size=8), small_model(), lambda x, g: x, rank,
                              world, torch.device("cpu"))
        for _ in range(3):
            batch = inputs.next(torch.Generator().manual_seed(0))
            assert len(batch) == 8 // world
            assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.labels)


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_holds_the_config_and_refuses_a_state_without_data_position(pairs, tmp_path):
    run = RunDir(tmp_path)
    cfg = config(steps=1)
    Trainer(small_model(), cfg, run).fit(pairs)
    state_file = run.checkpoint_dir(1) / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    assert state["config"] == cfg.to_dict() and state["step"] == 1
    assert state["batches"]["new"] == {"epoch": 0, "pos": 8}
    assert state["batches"]["data"]["count"] == 32
    del state["batches"]  # as checkpoints written before replay existed
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match=r"cannot resume: .*trainer_state.pt lacks batches"):
        Trainer(small_model(), config(steps=2), run).fit(pairs, resume="latest")


def test_a_checkpoints_model_folder_names_the_run_and_step_it_came_from(pairs, tmp_path,
                                                                       monkeypatch):
    """A pretrained checkpoint's cliplab.json recorded no origin though its model card says it
    holds where the weights came from: it names the run folder (absolute, though given
    relative) and step; cliplab and plain transformers still open the folder."""
    import json

    from transformers import AutoModel

    from cliplab.models.dual_encoder import DualEncoder

    monkeypatch.chdir(tmp_path)
    run = RunDir("run")
    Trainer(small_model(), config(steps=2, save_every=1), run).fit(pairs)
    for step in (1, 2):
        folder = run.checkpoint_dir(step) / "model"
        meta = json.loads((folder / "cliplab.json").read_text(encoding="utf-8"))
        assert meta["trained_by"] == {"run": str(tmp_path.resolve() / "run"), "step": step}
    assert DualEncoder.load(folder).context_length == meta["context_length"]
    assert type(AutoModel.from_pretrained(folder)).__name__ == "CLIPModel"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "`trained_by`: the training run and step" in card


def test_a_resume_on_changed_training_data_is_refused(pairs, tmp_path):
    """The checkpoint's data position is an epoch and a place in its permutation, drawn over
    the set as it was: a set that lost images or had captions edited since made the resumed
    run another run (other batches, another epoch length), silently. Refused, saying what
    changed; the same data resumes; a checkpoint without the record (an older version) too."""
    import dataclasses

    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=2, save_every=1), run).fit(pairs)
    fewer = load_shapes(n=24, seed=0, kinds=("single",), image_size=32)
    edited = dataclasses.replace(pairs, captions=[["a crimson block"], *pairs.captions[1:]])
    for data, words in ((fewer, "32 samples then, 24 now"),
                        (edited, "the same 32 samples with other pixels, captions or labels")):
        with pytest.raises(ConfigError, match=rf"cannot resume: the training data changed since "
                           rf"the checkpoint \({words}\)"):
            Trainer(small_model(), config(steps=3, save_every=1), run).fit(
                data, resume=run.checkpoint_dir(1))
    Trainer(small_model(), config(steps=3, save_every=1), run).fit(pairs,
                                                                   resume=run.checkpoint_dir(2))
    state_file = run.checkpoint_dir(3) / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["batches"]["data"]  # as checkpoints written before the record
    torch.save(state, state_file)
    Trainer(small_model(), config(steps=4), run).fit(edited, resume="latest")


def test_a_checkpoint_keeps_and_a_resume_restores_apples_gpu_generator(pairs, tmp_path,
                                                                        monkeypatch):
    """Dropout on MPS draws from its own generator: saved and restored as CUDA's is (stood
    for by a CPU generator behind torch.mps's state functions)."""
    mps = torch.Generator().manual_seed(3)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", mps.get_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", mps.set_state)
    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=1), run).fit(pairs)
    saved = torch.load(run.checkpoint_dir(1) / STATE_FILE, weights_only=True)["mps_rng"]
    assert torch.equal(saved, mps.get_state())
    torch.rand(5, generator=mps)  # moved on since
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: restored.append(s.clone()))
    Trainer(small_model(), config(steps=2), run).fit(pairs, resume="latest")
    assert restored and torch.equal(restored[0], saved)


def test_a_batch_larger_than_its_data_names_the_keys():
    """Plain batches name train.batch_size and data.train; with a replay set the share of each
    batch the user never wrote is spelt out from the keys they did write."""
    from cliplab.train.batches import ReplayBatches

    with pytest.raises(ConfigError, match=r"^train\.batch_size: a batch of 128 is larger than "
                       r"the dataset \(50 pairs\) in data\.train; "):
        ReplayBatches(50, 0, 128, 0.0, seed=0)
    with pytest.raises(ConfigError, match=r"^the replay share of each batch \(32 of "
                       r"train\.batch_size=128 at data\.replay\.ratio=0\.25\) is larger than "
                       r"data\.replay \(10 pairs\); "):
        ReplayBatches(500, 10, 128, 0.25, seed=0)
    with pytest.raises(ConfigError, match=r"^the new-data share of each batch \(96 of "
                       r"train\.batch_size=128 at data\.replay\.ratio=0\.25\) is larger than "
                       r"the dataset \(50 pairs\) in data\.train; "):
        ReplayBatches(50, 100, 128, 0.25, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.replay\.ratio=0\.001 gives no replayed pair"):
        ReplayBatches(50, 100, 16, 0.001, seed=0)
    assert ReplayBatches(96, 32, 128, 0.25, seed=0).next().shape == (128,)  # exactly fits


def test_pretrain_prints_counts_as_integers_and_metrics_to_three_decimals(monkeypatch, capsys):
    """`cliplab pretrain`'s eval summary: ``compositional/n=100``, not ``n=100.000``."""
    from pathlib import Path

    import cliplab.train.pretrain as pretrain
    from cliplab.cli import main

    results = {"evals": {"compositional": {"attribute_swap": 0.56789, "n": 100}},
               "model_dir": "runs/x/checkpoints/step-3/model"}
    monkeypatch.setattr(pretrain, "run_pretrain", lambda cfg, resume, progress, where: results)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    assert main(["pretrain", "--config", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "compositional/attribute_swap=0.568, compositional/n=100\n" in out


def test_a_micro_batch_not_below_a_ranks_share_is_told(monkeypatch, recwarn):
    """Over ranks each embeds batch_size / world: a micro-batch that large splits nothing
    there (it passed silently); rank 0 says so once."""
    from cliplab.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(trainer_module.distributed, "rank", lambda: 0)
    Trainer(small_model(), config(batch_size=8, micro_batch_size=4))
    assert warned(recwarn) == (
        "train: train.micro_batch_size=4 is not below a rank's share of the batch "
        "(4 = 8 over 2 ranks): nothing is split, each step only embeds twice\n")
    Trainer(small_model(), config(batch_size=8, micro_batch_size=3))
    assert warned(recwarn) == ""
