"""`cliplab pretrain` runs: evaluation during training, continued pretraining with replay, and
exact resume of a run killed with SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cliplab.errors import ConfigError
from cliplab.models import DualEncoder
from cliplab.train.pretrain import run_pretrain
from tests.warned import warned

MODEL = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                            "layers": 1, "heads": 2, "embed_dim": 16,
                                            "context_length": 48}}
SHAPES = {"source": "shapes", "n": 128, "seed": 0, "kinds": ["single"], "image_size": 32}


def recipe(out: Path, **train) -> dict:
    return {"model": MODEL, "data": {"train": SHAPES},
            "train": {"steps": 4, "batch_size": 32, "lr": 3e-3, "warmup": 1, "log_every": 1,
                      "augment": False, **train},
            "eval": {"tasks": [{"name": "colour", "task": "zeroshot",
                                "data": {"source": "shapes", "attribute": "color", "n": 64,
                                         "seed": 1, "image_size": 32}}]},
            "out": str(out)}


def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_every_n_steps_is_logged_and_reported(tmp_path):
    results = run_pretrain(recipe(tmp_path / "run", eval_every=2), progress=False)
    evals = [r for r in records(tmp_path / "run") if "eval/colour/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert results["evals"]["colour"]["acc1"] == evals[-1]["eval/colour/acc1"]


def test_continued_pretraining_starts_from_a_run_and_replays_old_data(tmp_path):
    run_pretrain(recipe(tmp_path / "first"), progress=False)
    first = DualEncoder.load(tmp_path / "first" / "checkpoints" / "step-4" / "model")
    cfg = recipe(tmp_path / "second", lr=0.0, weight_decay=0.0)
    cfg["model"] = {"name": str(tmp_path / "first")}  # a run folder: its newest checkpoint
    cfg["data"]["replay"] = {"ratio": 0.25, **SHAPES}
    cfg["data"]["train"] = {**SHAPES, "seed": 3}
    results = run_pretrain(cfg, progress=False)
    second = DualEncoder.load(results["model_dir"])
    for (k, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k  # lr 0: the weights it started from, unchanged


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cliplab", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_identical_weights(tmp_path):
    steps = 14
    for name in ("full", "killed"):
        cfg = recipe(tmp_path / name, steps=steps, save_every=1, augment=True)
        cfg["eval"] = None
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    full = _cli(["pretrain", "--config", str(tmp_path / "full.yaml"), "--no-progress"])
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()

    kill_after = random.Random().randint(2, steps - 4)  # a new point each run; every message
    # below names it, so a failure can be replayed
    killed = _cli(["pretrain", "--config", str(tmp_path / "killed.yaml"), "--no-progress"])
    marker = tmp_path / "killed" / "checkpoints" / f"step-{kill_after}"
    deadline = time.time() + 300
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, \
        f"the run ended before it could be killed after step {kill_after}"
    assert not (tmp_path / "killed" / "checkpoints" / f"step-{steps}").exists(), kill_after

    resumed = _cli(["pretrain", "--config", str(tmp_path / "killed.yaml"), "--resume", "latest",
                    "--no-progress"])
    assert resumed.wait(timeout=300) == 0, \
        f"killed after step {kill_after}: " + resumed.stderr.read().decode()
    a = load_file(tmp_path / "full" / "checkpoints" / f"step-{steps}" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / f"step-{steps}" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step ~{kill_after}"


def test_old_recipe_keys_name_the_new_ones(tmp_path):
    cfg = recipe(tmp_path / "run")
    cfg["eval"] = [{"name": "colour", "source": "shapes", "attribute": "color"}]
    with pytest.raises(ConfigError, match=r"^the pretrain config: eval: .*use eval.tasks"):
        run_pretrain(cfg, progress=False)
    cfg = recipe(tmp_path / "run")
    cfg["model"] = {"preset": "tiny-clip"}
    with pytest.raises(ConfigError, match=r"model: renamed key 'preset': use 'name'"):
        run_pretrain(cfg, progress=False)
    cfg = recipe(tmp_path / "run", batch_size="many")
    cfg["eval"]["tasks"].append({"name": "r", "task": "retrieval", "dta": {}})
    with pytest.raises(ConfigError) as err:
        run_pretrain(cfg, progress=False)
    # every problem in one line, before anything is made
    assert "train.batch_size: expected a valid integer" in str(err.value)
    assert "eval.tasks[1] (name 'r').data is required" in str(err.value)
    assert "unknown key eval.tasks[1] (name 'r').dta" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_complete_run_and_a_changed_config_and_redoes_later_records(tmp_path):
    """Resuming a finished run wiped its results (an empty loop wrote them anew); a changed
    setting was taken without a word (the restored optimizer kept the old rate while
    config.yaml said the new one); records logged after the checkpoint came twice."""
    out = tmp_path / "run"
    run_pretrain(recipe(out, save_every=2), progress=False)
    done = (out / "results.json").read_text()
    whole = [r["step"] for r in records(out)]
    with pytest.raises(ConfigError, match="nothing to resume: .*step-4 is at step 4 of 4"):
        run_pretrain(recipe(out, save_every=2), resume="latest", progress=False)
    assert (out / "results.json").read_text() == done

    import shutil
    shutil.rmtree(out / "checkpoints" / "step-4")  # as if stopped after step 4 was logged
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.lr \(checkpoint 0\.003, now 0\.1\)"):
        run_pretrain(recipe(out, save_every=2, lr=0.1), resume="latest", progress=False)
    assert (out / "config.yaml").read_text() == config
    wider = recipe(out, save_every=2)
    wider["model"] = {**MODEL, "options": {**MODEL["options"], "width": 64}}
    with pytest.raises(ConfigError, match=r"cannot resume .*: a resume continues the run as it "
                                          r"was configured, and model \("):
        run_pretrain(wider, resume="latest", progress=False)
    # another eval suite would log other numbers under the run's eval/colour curve
    shapes = recipe(out, save_every=2)
    shapes["eval"]["tasks"][0]["data"]["attribute"] = "shape"
    with pytest.raises(ConfigError, match=r"and eval\.tasks\.0\.data\.attribute \(the run's "
                                          r"curve holds the old suite's numbers\) changed"):
        run_pretrain(shapes, resume="latest", progress=False)
    assert (out / "config.yaml").read_text() == config
    # the checkpoint's own check, for a resume from Python without the run's config.yaml
    from cliplab.train.trainer import Trainer
    from cliplab.train.config import TrainConfig
    from cliplab.data.sources import as_pairs, load_source
    from cliplab.models.resolve import load_model
    from cliplab.runs import RunDir

    trainer = Trainer(load_model(wider["model"]), TrainConfig.from_dict(
        {**recipe(out, save_every=2)["train"], "progress": False}), RunDir(tmp_path / "py"))
    with pytest.raises(ConfigError, match="weights or optimizer do not fit this run's model"):
        trainer.fit(as_pairs(load_source(SHAPES)), resume=out / "checkpoints" / "step-2")
    trainer = Trainer(load_model(MODEL), TrainConfig.from_dict(
        {**recipe(out, lr=0.1)["train"], "progress": False}), RunDir(tmp_path / "py2"))
    with pytest.raises(ConfigError, match=r"train\.lr \(checkpoint 0\.003, now 0\.1\)"):
        trainer.fit(as_pairs(load_source(SHAPES)), resume=out / "checkpoints" / "step-2")
    # how the run is shown and saved may change
    first = json.loads(done)
    # what ran (train.precision's default fp32; device auto resolved to this machine's cpu)
    assert first["resumed_from"] is None and (first["precision"], first["device"]) == (
        "fp32", "cpu")
    assert first["eval_precision"] == "fp32"  # the suite's, which its evals ran in
    run_pretrain(recipe(out, save_every=3, log_every=1), resume="latest", progress=False)
    assert [r["step"] for r in records(out)] == whole  # steps 3, 4 and the eval once each
    # results.json says the run went on from step 2 (its config.yaml reads as a fresh run)
    assert json.loads((out / "results.json").read_text())["resumed_from"] == {
        "checkpoint": str((out / "checkpoints" / "step-2").resolve()), "step": 2,
        "precision": "fp32"}


def test_a_resume_where_auto_resolves_otherwise_says_so_and_records_both(tmp_path,
                                                                         monkeypatch, recwarn):
    """train.precision auto on another device (a GPU, a CPU without bf16 units) runs the rest
    of a run in another precision: said, and results.json keeps both (it kept the last)."""
    from cliplab.models import precision

    out = tmp_path / "run"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    run_pretrain(recipe(out, precision="auto", save_every=2, steps=2), progress=False)
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    warned(recwarn)
    results = run_pretrain(recipe(out, precision="auto", save_every=2, steps=4),
                           resume="latest", progress=False)
    assert "the steps up to 2 ran in bf16, the rest runs in fp32" in warned(recwarn)
    assert results["precision"] == "fp32" and results["resumed_from"]["precision"] == "bf16"
    # stopped during its final evaluation: the resume runs no step, so every step ran in the
    # checkpoint's precision
    (out / "results.json").unlink()
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    results = run_pretrain(recipe(out, precision="auto", save_every=2, steps=4),
                           resume="latest", progress=False)
    assert "ran in" not in warned(recwarn) and results["precision"] == "fp32"


def test_eval_every_without_an_eval_suite_says_so(tmp_path, recwarn):
    cfg = {**recipe(tmp_path / "run", eval_every=2), "eval": None}
    run_pretrain(cfg, progress=False)
    assert "train.eval_every=2 has no eval: suite" in warned(recwarn)
    assert not [r for r in records(tmp_path / "run") if any(k.startswith("eval/") for k in r)]


def test_pretraining_on_an_image_folder_reports_what_it_skipped(tmp_path, capsys):
    """Labelled data made into caption pairs kept its skip record (pretrain said 0), and
    the run tells it on stderr besides results.json."""
    from tests.image_folders import pets_folder

    folder = pets_folder(tmp_path / "pets", per_class=4, broken_in="cat")
    cfg = recipe(tmp_path / "run", steps=1, batch_size=4)
    cfg["data"]["train"] = {"source": "image-folder", "path": str(folder), "image_size": 16}
    cfg["eval"] = None
    results = run_pretrain(cfg, progress=False)
    assert results["skipped"]["counts"] == {"unreadable_image": 1}
    assert "data.train: skipped 1 sample: unreadable_image=1" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_go_on(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="stopped before its first checkpoint.*remove it"):
        run_pretrain(recipe(out), resume="latest", progress=False)
    with pytest.raises(ConfigError, match="stopped before its first checkpoint.*or remove it"):
        run_pretrain(recipe(out), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        run_pretrain(recipe(tmp_path / "file"), progress=False)


# another cliplab process holding --out as a running command does (`output_folder.hold`)
_HOLDER = """
import sys
from cliplab.output_folder import hold
from cliplab.output_lock import holding_outputs
with holding_outputs():
    hold(sys.argv[1])
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_live_runs_folder_is_refused_as_being_written_not_as_stopped(tmp_path):
    """A run that had logged but not yet saved a checkpoint got "its run stopped before its
    first checkpoint: remove it" for its folder, and a new run aimed at a live run's folder with
    checkpoints "continue it with --resume latest": the lock that tells a live run was checked
    after the wording was chosen. A live run's folder is now said to be one."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        live = (f"--out {out} is being written by another cliplab run (pid {holder.pid}); "
                "wait for it to end, or choose another --out")
        for resume in ("latest", None):
            with pytest.raises(ConfigError) as refused:
                run_pretrain(recipe(out), resume=resume, progress=False)
            assert str(refused.value) == live
        (out / "checkpoints" / "step-2").mkdir(parents=True)
        with pytest.raises(ConfigError) as refused:
            run_pretrain(recipe(out), progress=False)
        assert str(refused.value) == live
    finally:
        holder.communicate("")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    with pytest.raises(ConfigError, match="continue it with --resume latest"):  # it ended
        run_pretrain(recipe(out), progress=False)
