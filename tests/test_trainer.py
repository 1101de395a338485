"""The Trainer: learning, frozen towers, checkpoints, exact resume."""

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cliplab.data.shapes import load_shapes
from cliplab.errors import ConfigError
from cliplab.models import DualEncoder
from cliplab.runs import RunDir
from cliplab.train.config import TrainConfig
from cliplab.train.trainer import Trainer
from tests.tiny_models import small_model



@pytest.fixture(scope="module")
def pairs():
    return load_shapes(n=96, seed=0, kinds=("single",), image_size=32)


def config(**kw):
    base = dict(steps=6, batch_size=16, lr=3e-3, warmup=2, log_every=1, progress=False,
                augment=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_training_lowers_the_loss_and_writes_a_run(tmp_path, pairs):
    run = RunDir(tmp_path)
    model = small_model()
    Trainer(model, config(steps=60, lr=1e-3, augment=False), run).fit(pairs)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 60 and records[-1]["step"] == 60
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.3
    ckpt = tmp_path / "checkpoints" / "step-60"
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    reloaded = DualEncoder.load(ckpt / "model")
    for a, b in zip(reloaded.model.state_dict().values(), model.model.state_dict().values()):
        assert torch.equal(a, b)


def _dropout(model, p: float):
    """``model`` with attention dropout ``p`` (the presets have none): its masks draw from the
    global generator, which a resume must restore."""
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = p
    return model


# dropout: its masks draw from the global generator; replay: two batch streams (new data,
# replayed pairs) continue where the checkpoint left them
@pytest.mark.parametrize("dropout,replay", [(0.0, False), (0.2, False), (0.0, True)])
def test_resumed_run_equals_uninterrupted_run(tmp_path, pairs, dropout, replay):
    extra = {"replay": load_shapes(n=40, seed=5, kinds=("single",), image_size=32),
             "replay_ratio": 0.25} if replay else {}
    full = _dropout(small_model(), dropout)
    Trainer(full, config(steps=8, save_every=0), RunDir(tmp_path / "full")).fit(pairs, **extra)

    first = _dropout(small_model(), dropout)
    Trainer(first, config(steps=8, save_every=3), RunDir(tmp_path / "part")).fit(pairs, **extra)
    # drop everything after step 3, then resume from it in a fresh process-like state
    part = RunDir(tmp_path / "part")
    # different init: resume must restore the weights
    resumed = _dropout(small_model(seed=123), dropout)
    torch.manual_seed(999)
    Trainer(resumed, config(steps=8), part).fit(pairs, resume=part.checkpoint_dir(3), **extra)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_carries_the_gpu_generator_to_the_resume(tmp_path, pairs, monkeypatch):
    """Dropout on a GPU draws from its own generator: a resume restores it as it does the CPU
    ones (it was not saved, so such a run did not resume bit-identically). A fake GPU here."""
    gpu = {"state": torch.tensor([7, 7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: gpu.update(restored=s))
    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=2, save_every=2, device="cpu"), run).fit(pairs)
    gpu["state"] = torch.tensor([1, 2], dtype=torch.uint8)  # drawn on since the checkpoint
    Trainer(small_model(), config(steps=3, device="cpu"), run).fit(pairs,
                                                                    resume=run.checkpoint_dir(2))
    assert torch.equal(gpu["restored"], torch.tensor([7, 7], dtype=torch.uint8))


def test_an_extended_run_takes_its_first_resumed_step_at_the_new_schedule(tmp_path, pairs):
    """More steps on resume: the schedule follows the new length from the step reached. The
    optimizer came back with the old run's rate, so the first resumed step used it (and a
    finished run extended took a step at rate 0) while the log showed the new one."""
    from cliplab.train.schedule import warmup_cosine

    for reached in (3, 6):  # mid-run, and a finished run (its rate at 0)
        run = RunDir(tmp_path / str(reached))
        Trainer(small_model(), config(steps=6, save_every=3), run).fit(pairs)
        used = []
        handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
        try:
            Trainer(small_model(), config(steps=12, save_every=0), run).fit(
                pairs, resume=run.checkpoint_dir(reached))
        finally:
            handle.remove()
        expected = [3e-3 * warmup_cosine(step, 12, 2) for step in range(reached, 12)]
        assert used == pytest.approx(expected, rel=1e-12), reached
        logged = {r["step"]: r["lr"] for r in run.records() if "lr" in r}
        assert [logged[step + 1] for step in range(reached, 12)] == pytest.approx(expected)


def test_keep_checkpoints_keeps_the_newest_and_the_run_still_resumes(tmp_path, pairs):
    """save_every=1 with keep_checkpoints=2 leaves step-5 and step-6 of a 6-step run (every
    save removes what is older than the newest two), and the run extends from its latest."""
    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=6, save_every=1, keep_checkpoints=2), run).fit(pairs)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-5", "step-6"]
    Trainer(small_model(), config(steps=8, save_every=1, keep_checkpoints=2), run).fit(
        pairs, resume=run.latest_checkpoint())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-7", "step-8"]
    with pytest.raises(ConfigError, match="keep_checkpoints: expected greater than 0"):
        config(keep_checkpoints=0)
    # resumed from an earlier step while later ones exist: the checkpoint just saved stays
    # (the first run's step-6 is set aside in superseded/, untouched by keep_checkpoints)
    other = RunDir(tmp_path / "other")
    Trainer(small_model(), config(steps=6, save_every=2), other).fit(pairs)
    Trainer(small_model(), config(steps=5, save_every=1, keep_checkpoints=1), other).fit(
        pairs, resume=other.checkpoint_dir(4))
    assert sorted(p.name for p in (tmp_path / "other" / "checkpoints").iterdir()) == ["step-5"]
    assert sorted(p.name for p in (tmp_path / "other" / "superseded").iterdir()) == ["step-6"]


def test_locked_text_tower_does_not_change(pairs, tmp_path):
    model = small_model()
    before = {k: v.clone() for k, v in model.text_tower.state_dict().items()}
    img_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    Trainer(model, config(lock_text=True), None).fit(pairs)
    for k, v in model.text_tower.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, img_before[k]) for k, v in model.vision_tower.state_dict().items())


def test_bf16_autocast_trains(pairs):
    model = small_model()
    last = Trainer(model, config(precision="bf16", steps=3), None).fit(pairs)
    assert torch.isfinite(torch.tensor(last["loss"]))


def test_bf16_on_cpu_trains_with_eager_attention_then_restores_the_models_kernel(pairs):
    model = small_model(layers=2)  # the first block runs HF's attention (the last is pooled)
    seen = []
    model.tower_layers("image")[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))
    Trainer(model, config(precision="bf16", steps=2), None).fit(pairs)
    assert seen and set(seen) == {"eager"}
    assert model.model.config._attn_implementation == "sdpa"
    seen.clear()
    Trainer(model, config(steps=1), None).fit(pairs)
    assert seen and set(seen) == {"sdpa"}


def test_bad_train_options_are_clear_errors(pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.lrate \(valid: augment, "):
        TrainConfig.from_dict({"lrate": 1})
    with pytest.raises(ConfigError, match=r"train\.augment: unknown augment option.*'flip'"):
        TrainConfig.from_dict({"augment": {"flip": False}})
    with pytest.raises(ConfigError, match=r"train\.precision: expected 'fp32', 'bf16' or 'auto'"):
        TrainConfig.from_dict({"precision": "fp8"})
    with pytest.raises(ConfigError, match="larger than the dataset"):
        Trainer(small_model(), config(batch_size=512), None).fit(pairs)
    with pytest.raises(ConfigError, match="cannot resume"):
        Trainer(small_model(), config(), RunDir(tmp_path)).fit(pairs, resume=tmp_path)


def test_lr_scale_sets_the_rate_of_matching_parameters():
    model = small_model()
    trainer = Trainer(model, config(lr=1e-3, lr_scale={"text_projection": 0.1}), None)
    opt = trainer._optimizer()
    text_proj = model.model.text_projection.weight
    for group in opt.param_groups:
        holds = any(p is text_proj for p in group["params"])
        assert group["lr"] == (1e-4 if holds else 1e-3)
    # weight decay only on matrices, never on the temperature
    for group in opt.param_groups:
        if any(p is model.logit_scale for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_augment_overrides_reach_the_preprocessor(pairs, monkeypatch):
    """train.augment={...} replaces the model's augmentation for this run only."""
    model = small_model()
    seen = []
    original = model.preprocess

    def spy(images, train=False, generator=None, augment=None):
        seen.append((train, augment))
        return original(images, train=train, generator=generator, augment=augment)

    monkeypatch.setattr(model, "preprocess", spy)
    Trainer(model, config(steps=1, augment={"hflip": False, "rotate_deg": 0}), None).fit(pairs)
    train, augment = seen[0]
    assert train and augment.hflip is False and augment.rotate_deg == 0
    assert augment.translate == model.preprocess_config.augment.translate
    assert model.preprocess_config.augment.hflip is True  # the model's own config is untouched

    seen.clear()  # no overrides ({}) is the model's own augmentation, on (it switched it off)
    Trainer(model, config(steps=1, augment={}), None).fit(pairs)
    assert seen[0][0] is True


def test_numbers_written_as_strings_are_numbers():
    from cliplab.config import apply_overrides

    cfg = apply_overrides({}, ["train.lr=2e-3", "train.batch_size=64", "out=runs/x"])
    assert cfg["out"] == "runs/x"
    # YAML 1.1 reads 2e-3 as a string; the schema makes it the number people mean
    overridden = TrainConfig.from_dict(cfg["train"])
    assert overridden.lr == 0.002 and overridden.batch_size == 64
    parsed = TrainConfig.from_dict({"lr": "3e-4", "batch_size": "32"})
    assert parsed.lr == 3e-4 and parsed.batch_size == 32 and isinstance(parsed.batch_size, int)
    with pytest.raises(ConfigError, match=r"train\.lr: expected a valid number.*'fast'"):
        TrainConfig.from_dict({"lr": "fast"})


def test_precision_auto_follows_the_hardware(monkeypatch):
    import warnings

    from cliplab.models import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(precision, "_WARNED", set())
    assert precision.resolve_precision("auto", cpu) == "fp32"
    with pytest.warns(UserWarning, match="emulated"):
        assert precision.resolve_precision("bf16", cpu) == "bf16"
    with warnings.catch_warnings():  # once a process: training and its evals each resolve it
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16", cpu) == "bf16"
    assert precision.resolve_precision("fp32", cpu) == "fp32"


def test_an_emulating_gpu_has_no_native_bf16(monkeypatch):
    """A V100/T4 runs bf16 emulated (torch's is_bf16_supported says yes by default there):
    auto stays fp32 on it."""
    from cliplab.models import precision

    def supported(including_emulation: bool = True) -> bool:
        return including_emulation  # an emulating GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert not precision.bf16_is_native(torch.device("cuda"))
    assert precision.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_a_cpu_that_emulates_bf16_has_no_native_bf16(monkeypatch):
    """oneDNN says bf16 from plain AVX-512 on (Skylake, Cascade Lake), where bf16 products take
    twice fp32's time: auto asks for AVX512-BF16 or AMX units on x86."""
    import platform

    from cliplab.models import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True),
                                     (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert precision.bf16_is_native(cpu) is native
        assert precision.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # ARM: oneDNN's answer
    assert precision.bf16_is_native(cpu)


def test_the_trainer_runs_in_the_resolved_precision(monkeypatch):
    from cliplab.models import precision

    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(precision, "bf16_is_native", lambda device, n=native: n)
        trainer = Trainer(small_model(), TrainConfig.from_dict(
            {"precision": "auto", "progress": False, "batch_size": 4}))
        assert trainer.precision == expected and trainer.embed.precision == expected


DECAYED = ("text_projection.weight", "visual_projection.weight",  # matrices
           "vision_model.encoder.layers.0.self_attn.q_proj.weight",
           "text_model.encoder.layers.0.mlp.fc1.weight")
NOT_DECAYED = ("logit_scale",  # the temperature, biases, norm gains, position/class embeddings
               "vision_model.encoder.layers.0.self_attn.q_proj.bias",
               "text_model.encoder.layers.0.mlp.fc1.bias",
               "vision_model.encoder.layers.0.layer_norm1.weight",
               "text_model.final_layer_norm.bias",
               "vision_model.embeddings.class_embedding",
               "vision_model.embeddings.position_embedding.weight",
               "text_model.embeddings.position_embedding.weight")


def test_weight_decay_falls_on_matrices_not_on_biases_norms_embeddings_or_temperature():
    """train.weight_decay is the decay of the group holding each weight matrix; biases,
    LayerNorm gains, position/class embeddings and logit_scale sit in groups without decay;
    every trainable parameter is in exactly one group."""
    model = small_model()
    opt = Trainer(model, config(weight_decay=0.2), None)._optimizer()
    decay = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in decay
            decay[id(p)] = group["weight_decay"]
    params = dict(model.model.named_parameters())
    assert set(decay) == {id(p) for p in params.values()}
    for name in DECAYED:
        assert decay[id(params[name])] == 0.2, name
    for name in NOT_DECAYED:
        assert decay[id(params[name])] == 0.0, name


def test_one_step_is_adamw_with_decoupled_weight_decay(pairs):
    """One step (no warm-up, no clipping) from the gradient g it saw: Adam's first step is
    lr * g / (|g| + eps) (bias-corrected moments m = g, v = g^2), and AdamW shrinks a decayed
    weight by (1 - lr * weight_decay) first: p1 = p0 * (1 - lr * wd) - lr * g / (|g| + 1e-8),
    with wd = 0 for biases, gains and the temperature (which stays below the clamp here)."""
    lr, wd = 0.05, 0.5
    model = small_model()
    params = dict(model.model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    grads = {}

    def record(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in params.items()
                      if p.grad is not None})

    handle = register_optimizer_step_pre_hook(record)
    try:
        Trainer(model, config(steps=1, warmup=0, lr=lr, weight_decay=wd, grad_clip=0,
                              augment=False), None).fit(pairs)
    finally:
        handle.remove()
    for names, decay in ((DECAYED, wd), (NOT_DECAYED, 0.0)):
        for name in names:
            g, p0 = grads[name], before[name]
            expected = p0 * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(params[name].detach(), expected, rtol=1e-5, atol=1e-6,
                                       msg=name)
    assert model.logit_scale.item() < 4.6  # the temperature was not clamped in this test


def test_logit_scale_is_clamped_at_ln_100_after_each_step(pairs):
    """CLIP's temperature limit: a logit_scale of 5.0 (exp = 148) is ln(100) = 4.6052 after one
    step, and the log shows the scale 100."""
    model = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    last = Trainer(model, config(steps=1, warmup=0, lr=1e-4, augment=False), None).fit(pairs)
    assert model.logit_scale.item() == pytest.approx(4.6052, abs=1e-6)
    assert last["logit_scale"] == pytest.approx(100.0, rel=1e-4)


def test_lr_scale_refuses_negative_and_unmatched_keys_and_the_longest_key_wins():
    with pytest.raises(ConfigError, match=r"train\.lr_scale\.text_projection: expected "
                                          r"greater than or equal to 0"):
        TrainConfig.from_dict({"lr_scale": {"text_projection": -1}})
    with pytest.raises(ConfigError, match="'text_projecton' is in the name of no trainable"):
        Trainer(small_model(), config(lr_scale={"text_projecton": 0.0}), None)._optimizer()
    for scales in ({"text": 2.0, "text_projection": 0.0}, {"text_projection": 0.0, "text": 2.0}):
        model = small_model()  # the same rates whatever the keys' order
        opt = Trainer(model, config(lr=1e-3, lr_scale=scales), None)._optimizer()
        rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert rate[id(model.model.text_projection.weight)] == 0.0
        assert rate[id(next(model.model.text_model.parameters()))] == 2e-3


def test_the_logged_rate_is_the_one_each_step_used(tmp_path, pairs):
    """Step 1 of a 2-step warm-up runs at lr/2, the last at its cosine value (the log showed
    the next step's rate, ending at a 0 that never trained)."""
    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=3, warmup=2, lr=1e-3, augment=False), run).fit(pairs)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_a_run_follows_warmup_then_cosine_down_to_min_lr_ratio(tmp_path, pairs):
    """A 10-step run with 2 warm-up steps and train.min_lr_ratio=0.1 logs, per step s, the rate
    lr * (s + 1) / 2 during warm-up, then lr * (0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2)
    (hand formula; the floor 0.1 * lr would be reached at step 10)."""
    run = RunDir(tmp_path)
    Trainer(small_model(), config(steps=10, warmup=2, lr=1e-3, min_lr_ratio=0.1,
                                  augment=False), run).fit(pairs)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    expected = [1e-3 * (s + 1) / 2 if s < 2 else
                1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
                for s in range(10)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-9)
    assert records[6]["lr"] == pytest.approx(0.55e-3)  # half-way through the decay


def test_device_and_lock_options_are_checked(pairs):
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu' is no device"):
        TrainConfig.from_dict({"device": "gpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.device: 'cuda', but this PyTorch sees "
                                              "no CUDA device"):
            TrainConfig.from_dict({"device": "cuda"})
    with pytest.raises(ConfigError, match="lock_text_except_last .* needs lock_text: true"):
        TrainConfig.from_dict({"lock_text_except_last": 1})
    from cliplab.errors import ModelError

    with pytest.raises(ModelError, match="the text tower has 1 blocks"):
        Trainer(small_model(), config(lock_text=True, lock_text_except_last=1), None)


def nan_from(step: int, trainer: Trainer) -> Trainer:
    """``trainer`` whose loss is NaN from its ``step``-th step on."""
    backward, calls = trainer.objective.backward, []

    def poisoned(batch):
        calls.append(1)
        loss = backward(batch)
        return loss * float("nan") if len(calls) >= step else loss
    trainer.objective.backward = poisoned
    return trainer


def test_a_run_whose_loss_turns_nan_stops_before_logging_or_saving_it(tmp_path, pairs):
    """`train.lr=1e6` gave NaN from step 2, yet the run saved NaN weights, logged bare NaN
    into metrics.jsonl and reported chance accuracy as a success. What it logs after step 2
    is only the record saying it diverged."""
    from cliplab.errors import TrainingDiverged

    run = RunDir(tmp_path / "every")
    trainer = nan_from(3, Trainer(small_model(), config(steps=8, save_every=2), run))
    with pytest.raises(TrainingDiverged, match=r"^train: the loss, the gradients or the weights "
                       r"became NaN "
                       r"or infinite at step 3 \(train.lr 0.003\), so the run stopped; nothing "
                       r"after step 2 was logged or saved. Lower train.lr, lengthen "
                       r"train.warmup$"):
        trainer.fit(pairs)
    records = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[2:] == [{"step": 3, "diverged": "the loss, the gradients or the weights "
                            "became NaN or infinite at step 3 (train.lr 0.003)"}]
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step-2"]
    # checked only where a step syncs anyway: here the final step, when the log is sparse
    run = RunDir(tmp_path / "sparse")
    trainer = nan_from(3, Trainer(small_model(), config(steps=6, log_every=100, save_every=0,
                                                        grad_clip=0), run))
    with pytest.raises(TrainingDiverged, match="between steps 1 and 6 .*warmup or set "
                       "train.grad_clip$"):
        trainer.fit(pairs)
    assert not (run.path / "checkpoints").exists() or not any((run.path / "checkpoints").iterdir())
    # a checkpoint step checks too, with logs sparse: NaN from step 3, refused at step 4
    run = RunDir(tmp_path / "saved")
    trainer = nan_from(3, Trainer(small_model(), config(steps=8, log_every=100, save_every=2),
                                  run))
    with pytest.raises(TrainingDiverged, match="between steps 3 and 4 "):
        trainer.fit(pairs)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step-2"]
    assert [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 4, "diverged": "the loss, the gradients or the weights became NaN or "
                                "infinite between steps 3 and 4 (train.lr 0.003)"}]


def test_a_diverged_run_says_so_in_its_folder_until_a_resume_redoes_the_steps(tmp_path, pairs,
                                                                             capsys):
    """A run stopped by a NaN loss left nothing in its folder saying so: `cliplab report` said
    "stopped or still running", as of a killed or live run."""
    from cliplab.errors import TrainingDiverged
    from cliplab.evaluate.report_inputs import read_input

    run = RunDir(tmp_path / "run")
    run.write_config({"train": {}})  # what a pretrain run writes first
    with pytest.raises(TrainingDiverged):
        nan_from(3, Trainer(small_model(), config(steps=6, save_every=2), run)).fit(pairs)
    note = ("no results.json: the run diverged at step 3 (the loss, the gradients or the "
            "weights became NaN or infinite at step 3 (train.lr 0.003)), so its last logged "
            "values only, no final evaluation")
    assert read_input(run.path).note == note
    assert f"report: {run.path}: {note}" in capsys.readouterr().err
    # resumed from its last checkpoint (after the cause was fixed), the run says no more
    Trainer(small_model(), config(steps=6, save_every=2), run).fit(pairs, resume="latest")
    records = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert not any("diverged" in r for r in records)
    assert "diverged" not in read_input(run.path).note


def test_a_run_whose_gradients_turn_infinite_stops_though_its_loss_is_finite(tmp_path, pairs):
    from cliplab.errors import TrainingDiverged

    run = RunDir(tmp_path / "run")
    trainer = Trainer(small_model(), config(steps=6, save_every=2, grad_clip=1.0), run)
    backward, calls = trainer.objective.backward, []

    def infinite_gradient(batch):
        calls.append(1)
        loss = backward(batch)
        if len(calls) >= 3:
            trainer.params[0].grad.fill_(float("inf"))
        return loss
    trainer.objective.backward = infinite_gradient
    with pytest.raises(TrainingDiverged, match="became NaN or infinite at step 3 "):
        trainer.fit(pairs)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step-2"]


def test_a_last_step_that_leaves_infinite_weights_is_not_saved(tmp_path, pairs):
    """The loss and gradients of the last step are finite, its update is not (a weight decay
    of 1e36): checked only before the step, the run saved and evaluated infinite weights."""
    from cliplab.errors import TrainingDiverged

    run = RunDir(tmp_path / "run")
    trainer = Trainer(small_model(), config(steps=1, lr=1e3, weight_decay=1e36, warmup=0), run,
                      settings="options.train")
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite at step 1 "
                       r"\(options.train.lr 1000\).*Lower options.train.lr or "
                       r"options.train.weight_decay, lengthen options.train.warmup"):
        trainer.fit(pairs)
    assert not (run.path / "checkpoints").exists() or not any((run.path / "checkpoints").iterdir())


def test_a_rate_past_float32_is_one_line_naming_it(tmp_path, pairs):
    """AdamW's step size (lr / bias correction) overflowed inside torch: a raw traceback. The
    warm-up warning names the keys where they are written too (options.train in adapt)."""
    from cliplab.errors import TrainingDiverged
    from cliplab.train.schedule import warmup_warning

    trainer = Trainer(small_model(), config(steps=1, lr=1e38, warmup=0), RunDir(tmp_path),
                      settings="options.train")
    with pytest.raises(TrainingDiverged, match=r"^train: options.train.lr 1e\+38 overflows the "
                       r"optimizer's arithmetic at step 1 .*; lower options.train.lr$"):
        trainer.fit(pairs)
    assert warmup_warning(3, 1, "options.train").startswith(
        "train: options.train.warmup=3 steps is longer than the run (1 steps), so the "
        "rate never reaches options.train.lr")


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_the_logged_gradient_norm_is_the_gradients_norm_with_or_without_clipping(
        grad_clip, tmp_path, pairs):
    """Without clipping (grad_clip 0) every record said grad_norm 0.0."""
    trainer = Trainer(small_model(), config(steps=1, grad_clip=grad_clip), RunDir(tmp_path))
    trainer.fit(pairs)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # the gradients the step applied (left on the parameters), as clipping left them
    left = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                 for p in trainer.params]))
    if grad_clip:
        assert left.item() == pytest.approx(grad_clip, rel=1e-3)
        assert record["grad_norm"] > 10 * grad_clip  # the norm before clipping
    else:
        assert record["grad_norm"] == pytest.approx(left.item(), rel=1e-5) and left > 0


def test_log_cadence_modes_and_temperature_floor(tmp_path, pairs):
    """log_every=3 over 7 steps logs steps 3, 6 and the last; trainable layers run in train
    mode, a locked tower's in eval mode (no dropout in what it computes), and the model ends in
    eval mode; the temperature is clamped at exp(0) = 1 from below."""
    model = small_model()
    modes = {"image": [], "text": []}
    for tower, seen in modes.items():
        model.tower(tower).embeddings.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(m.training))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    Trainer(model, config(steps=7, log_every=3, lock_text=True, cache_frozen_features=False),
            RunDir(tmp_path)).fit(pairs)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert set(modes["image"]) == {True} and set(modes["text"]) == {False}
    assert not model.training
    assert model.logit_scale.item() >= 0 and records[0]["logit_scale"] >= 1


def test_fractional_epochs_round_to_steps(tmp_path, pairs):
    # 96 pairs in batches of 16: 6 steps an epoch; 0.25 epoch is 1.5 steps, rounded to 2
    Trainer(small_model(), config(steps=None, epochs=0.25, save_every=0),
            RunDir(tmp_path)).fit(pairs)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]



def _timed(trainer: Trainer, clock: list[float], seconds: dict[int, float]) -> Trainer:
    """``trainer`` whose steps take ``seconds[i]`` (1 by default) on the fake ``clock``."""
    backward, calls = trainer.objective.backward, []

    def timed(batch):
        calls.append(1)
        clock[0] += seconds.get(len(calls), 1.0)
        return backward(batch)
    trainer.objective.backward = timed
    return trainer


def test_time_s_runs_on_over_a_resume_and_images_per_s_is_the_rate_since_the_last_log(
        tmp_path, pairs, monkeypatch):
    """time_s restarted at 0 in a resumed process (a loss-vs-time plot went back in time), and
    images_per_s was the average since the process began training, neither the run's nor the
    interval's. A checkpoint of an older version (no time_s in it) continues from the time
    its run logged."""
    from types import SimpleNamespace

    clock = [100.0]
    monkeypatch.setattr("cliplab.train.trainer.time", SimpleNamespace(time=lambda: clock[0]))
    run = RunDir(tmp_path / "run")
    # 16 images a step; the third step takes 9 s, every other 1 s
    _timed(Trainer(small_model(), config(steps=4, save_every=2), run), clock, {3: 9.0}).fit(pairs)
    records = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_s"] for r in records] == [1, 2, 11, 12]
    assert [r["images_per_s"] for r in records] == [16, 16, 16 / 9, 16]
    # a new process, its clock elsewhere, resumes from step 2 (logged at 2 s)
    clock[0] = 5000.0
    _timed(Trainer(small_model(), config(steps=4), run), clock, {}).fit(
        pairs, resume=run.checkpoint_dir(2))
    records = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_s"] for r in records] == [1, 2, 3, 4]
    # an older checkpoint without time_s: the run's log at its step says it
    state_file = run.checkpoint_dir(2) / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["time_s"]
    torch.save(state, state_file)
    _timed(Trainer(small_model(), config(steps=4), run), clock, {}).fit(
        pairs, resume=run.checkpoint_dir(2))
    records = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_s"] for r in records] == [1, 2, 3, 4]


def test_a_run_without_the_tensorboard_package_says_it_writes_no_event_files(
        tmp_path, pairs, monkeypatch, recwarn):
    """Installed without the tensorboard extra, runs silently wrote no event files, though
    README tells users to open them. Said once per run; not when turned off on purpose."""
    from tests.warned import warned

    for where in ("cliplab.runs", "cliplab.train.trainer"):
        monkeypatch.setattr(f"{where}.tensorboard_available", lambda: False, raising=False)
    run = RunDir(tmp_path / "run")
    Trainer(small_model(), config(steps=3, save_every=0), run).fit(pairs)
    assert warned(recwarn) == (
        f"train: no TensorBoard event files in {run.path}: the tensorboard package is not "
        "installed (pip install 'cliplab[tensorboard]'; metrics.jsonl holds every record); "
        "CLIPLAB_TENSORBOARD=0 turns them off without this note\n")
    assert [p.name for p in run.path.iterdir() if p.name.startswith("events.")] == []
    monkeypatch.setenv("CLIPLAB_TENSORBOARD", "0")
    Trainer(small_model(), config(steps=3, save_every=0), RunDir(tmp_path / "off")).fit(pairs)
    assert warned(recwarn) == ""
