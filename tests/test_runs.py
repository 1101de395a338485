"""Run folders: metrics.jsonl plus TensorBoard events of the same numbers, newest checkpoint."""

import json

import pytest

from cliplab.data.shapes import load_shapes
from cliplab.runs import RunDir, latest_checkpoint
from cliplab.train.trainer import TrainConfig, Trainer
from tests.tensorboard_events import scalar_events
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


def test_dropped_records_leave_tensorboard_with_each_step_once(tmp_path):
    """A resume from step 2 logs steps 3 and 4 again, and a redone final evaluation logs step
    4's evaluation again: TensorBoard showed both values of each (only metrics.jsonl was
    trimmed). Now each step shows once, with the last value, and the kept training record of
    the redone step is still there."""
    run = RunDir(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        run.log({"step": step, "loss": float(step)})
    run.drop_records_after(2)  # the same writer, still open: purged all the same
    for step in (3, 4):
        run.log({"step": step, "loss": 10.0 + step})
    run.log({"step": 4, "eval/acc1": 0.25})
    run.close()
    resumed = RunDir(tmp_path, tensorboard=True)  # another process finishes the evaluation
    resumed.drop_records_at(4, keep=lambda record: "loss" in record)
    resumed.log({"step": 4, "eval/acc1": 0.5})
    resumed.close()
    resumed.log({"step": 5, "loss": 0.5})  # a writer reopened later purges nothing again
    resumed.close()
    assert scalar_events(tmp_path) == {"loss": [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0),
                                                (5, 0.5)],
                                       "eval/acc1": [(4, 0.5)]}
    assert [r for r in resumed.records()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 13.0},
        {"step": 4, "loss": 14.0}, {"step": 4, "eval/acc1": 0.5}, {"step": 5, "loss": 0.5}]


def test_a_purge_holds_when_the_writer_counter_crosses_a_digit(tmp_path, monkeypatch):
    """Event file names hold the second, the pid and a per-process counter; TensorBoard reads
    them in name order. A writer reopened in the same second with counter 10 after 9 sorted
    first, and the stale step-3 value came back (seen in the suite, which opens many writers)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    run = RunDir(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        run.log({"step": step, "loss": float(step)})
    run.drop_records_after(2)
    run.log({"step": 3, "loss": 30.0})
    run.close()
    assert scalar_events(tmp_path) == {"loss": [(1, 1.0), (2, 2.0), (3, 30.0)]}


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


def test_results_and_records_are_strict_json_with_nan_as_null(tmp_path):
    """Python wrote NaN and Infinity tokens, which are not JSON: JavaScript's JSON.parse, Go
    and Rust refuse such a results.json."""
    import numpy as np

    from cliplab.output_folder import write_json

    data = {"acc1": float("nan"), "loss": np.float32("inf"), "ok": 0.5,
            "curve": [1.0, float("-inf")], "rows": np.array([np.nan, 2.0])}
    write_json(tmp_path / "results.json", data)
    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"acc1": None, "loss": None, "ok": 0.5, "curve": [1.0, None],
                                "rows": [None, 2.0]}
    run = RunDir(tmp_path / "run")
    run.log({"step": 1, "loss": float("nan")})
    line = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {
        "step": 1, "loss": None}


def test_each_fit_ends_its_tensorboard_writer_thread(tmp_path):
    """run_pretrain, run_adapt and the quickstart never closed their run's writer: from
    Python, each left one more thread running (3 -> 7 -> 8 -> 9 ... over pretrains)."""
    import threading

    pairs = load_shapes(n=32, seed=0, kinds=("single",), image_size=32)
    cfg = TrainConfig.from_dict(dict(steps=1, batch_size=16, lr=1e-3, warmup=0,
                                     progress=False, augment=False))
    Trainer(small_model(), cfg, RunDir(tmp_path / "first", tensorboard=True)).fit(pairs)
    before = threading.active_count()
    for i in range(3):
        run = RunDir(tmp_path / f"run{i}", tensorboard=True)
        Trainer(small_model(), cfg, run).fit(pairs)
        assert _scalars(tmp_path / f"run{i}")["loss"]  # it did write events
    assert threading.active_count() == before


def test_a_stopped_lora_run_names_the_adapters_its_checkpoints_hold(tmp_path, capsys):
    """Its checkpoints hold adapter/, not model/: the stop named a path that did not exist."""
    from cliplab.runs import removed_unless_checkpointed

    run = RunDir(tmp_path / "lora", tensorboard=False)
    run.atomic_checkpoint(2, lambda f: (f / "adapter").mkdir())
    with pytest.raises(KeyboardInterrupt):
        with removed_unless_checkpointed(run.path, False, "adapt"):
            raise KeyboardInterrupt
    assert "(each checkpoints/step-N/adapter is what the run had trained)" in \
        capsys.readouterr().err
    assert (run.path / "checkpoints" / "step-2" / "adapter").is_dir()
