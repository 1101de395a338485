"""Run folders: metrics.jsonl plus TensorBoard events of the same numbers, newest checkpoint."""

import json

import pytest

from cliplab.data.shapes import load_shapes
from cliplab.runs import RunDir, latest_checkpoint
from cliplab.train.trainer import TrainConfig, Trainer
from tests.tiny_models import small_model

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder) -> dict[str, dict[int, float]]:
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_short_run_writes_events_tensorboard_reads_back(tmp_path):
    pairs = load_shapes(n=32, seed=0, kinds=("single",), image_size=32)
    cfg = TrainConfig.from_dict(dict(steps=4, batch_size=16, lr=1e-3, warmup=1, log_every=2,
                                     eval_every=2, progress=False, augment=False))
    run = RunDir(tmp_path)
    Trainer(small_model(), cfg, run).fit(pairs, evaluate=lambda m: {"eval/toy/acc1": 0.25})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tmp_path)
    for key in ("loss", "lr", "logit_scale", "images_per_s", "eval/toy/acc1"):
        logged = {r["step"]: r[key] for r in records if key in r}
        assert logged and set(scalars[key]) == set(logged) == {2, 4}, key
        for step, value in logged.items():
            assert scalars[key][step] == pytest.approx(value, rel=1e-6), (key, step)
    assert "step" not in scalars  # the x axis, not a curve


def test_every_numeric_key_and_nothing_else_becomes_a_scalar(tmp_path):
    run = RunDir(tmp_path, tensorboard=True)
    run.log({"step": 3, "loss": 1.5, "epoch": 0, "note": "warm-up", "flag": True,
             "nan": float("nan")})
    run.log({"step": 7, "loss": 0.5})
    run.close()
    assert _scalars(tmp_path) == {"loss": {3: 1.5, 7: 0.5}, "epoch": {3: 0.0}}


def test_tensorboard_can_be_turned_off(tmp_path, monkeypatch):
    RunDir(tmp_path / "flag", tensorboard=False).log({"step": 1, "loss": 1.0})
    monkeypatch.setenv("CLIPLAB_TENSORBOARD", "0")
    RunDir(tmp_path / "env").log({"step": 1, "loss": 1.0})
    for name in ("flag", "env"):
        assert [p.name for p in (tmp_path / name).iterdir()] == ["metrics.jsonl"]


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (2, 10, 9):
        run.atomic_checkpoint(step, lambda folder: (folder / "x").write_text("1"))
    (tmp_path / "checkpoints" / "step-11.tmp").mkdir()  # a write that was killed
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"


def test_results_with_numpy_numbers_are_written_as_plain_json(tmp_path):
    """A run's results.json takes numpy scalars and arrays as plain numbers (it raised
    TypeError where the other stages' writer did not)."""
    import numpy as np

    path = RunDir(tmp_path).write_json("results.json", {"acc1": np.float32(0.5),
                                                         "counts": np.arange(3)})
    assert json.loads(path.read_text()) == {"acc1": 0.5, "counts": [0, 1, 2]}
    assert not list(tmp_path.glob("*.tmp"))
