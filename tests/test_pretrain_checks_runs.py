"""`cliplab pretrain` run folders: a user's files in --out are never overwritten, a refused
or failed resume changes nothing, a run stopped during its final evaluation can be finished,
and what a run logs and says is what it did (the base rate, a warm-up longer than the run)."""

import json
import math
import os
import shutil
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cliplab.cli import main
from cliplab.data.shapes import load_shapes
from cliplab.errors import ConfigError
from cliplab.output_folder import RUN_MARKERS
from cliplab.provenance import without_provenance
from cliplab.train.config import TrainConfig
from cliplab.train.pretrain import run_pretrain
from cliplab.train.schedule import warmup_cosine
from cliplab.train.trainer import Trainer
from tests.cli_output import folder_tree as tree
from tests.tiny_models import small_model
from tests.warned import warned

MODEL = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                            "layers": 1, "heads": 2, "embed_dim": 16,
                                            "context_length": 48}}
SHAPES = {"source": "shapes", "n": 128, "seed": 0, "kinds": ["single"], "image_size": 32}
EVAL = {"tasks": [{"name": "colour", "task": "zeroshot",
                   "data": {"source": "shapes", "attribute": "color", "n": 64, "seed": 1,
                            "image_size": 32}}]}
TINY_SHAPES = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
# the shipped recipe made small: a run of seconds
METRICS = "metrics.jsonl"
SMALL = ["data.train.n=64", "train.epochs=null", "train.batch_size=32", "eval=null",
         "model.options.width=32", "model.options.layers=1", "model.options.embed_dim=16"]


def recipe(out: Path | None, evaluate: bool = False, **train) -> dict:
    cfg = {"model": MODEL, "data": {"train": SHAPES},
           "train": {"steps": 4, "batch_size": 32, "lr": 3e-3, "warmup": 1, "log_every": 1,
                     "save_every": 2, "augment": False, **train},
           "eval": EVAL if evaluate else None}
    return {**cfg, "out": str(out)} if out is not None else cfg


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_the_run_files_are_the_ones_other_commands_take_for_a_run():
    from cliplab.runs import CONFIG_FILE, METRICS_FILE

    assert {CONFIG_FILE, METRICS_FILE} == set(RUN_MARKERS)


# -- --out of a new run ---------------------------------------------------------------------
def test_an_out_holding_the_users_recipe_is_refused_untouched(tmp_path, capsys):
    """`--config exp/config.yaml --out exp` replaced the user's commented recipe with the run's
    config."""
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(TINY_SHAPES, exp / "config.yaml")
    before = tree(exp)
    assert main(["pretrain", "--config", str(exp / "config.yaml"), "--out", str(exp),
                 "--no-progress", "train.steps=2", *SMALL]) == 2
    assert capsys.readouterr().err == (
        f"cliplab: error: --out {exp} holds config.yaml, which no cliplab run in this folder "
        "wrote; a new run needs a new or empty folder (its files are left as they are): "
        "choose another --out\n")
    assert tree(exp) == before


def test_an_out_holding_other_files_or_another_runs_config_is_refused(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*notes holds todo\.txt, which no cliplab"):
        run_pretrain(recipe(notes), progress=False)
    assert tree(notes) == {"todo.txt": b"mine"}
    # a run's config.yaml copied into a new folder is the user's there (its out is elsewhere)
    run_pretrain(recipe(tmp_path / "first", steps=1), progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "first" / "config.yaml", copy / "config.yaml")
    with pytest.raises(ConfigError, match=r"holds config\.yaml, which no cliplab run"):
        run_pretrain(recipe(copy), progress=False)


def test_an_out_left_by_a_run_stopped_while_saving_says_so(tmp_path):
    """A few-shot adapt killed after adapter.safetensors, before results.json: the refusal said
    no cliplab run wrote the file, beside the folder's own config.yaml."""
    from cliplab.runs import RunDir, check_no_foreign_files

    out = tmp_path / "ad3"
    out.mkdir()
    RunDir(out).write_config({"method": "linear-probe", "out": str(out)})
    (out / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds adapter\.safetensors beside the config\.yaml "
                                          r"of a run of this folder stopped before its end"):
        check_no_foreign_files(out)

def test_a_users_commented_recipe_naming_the_out_is_refused_untouched(tmp_path):
    """A recipe of the user's at OUT/config.yaml whose ``out:`` is OUT is theirs (it has their
    comments): refused, not taken for a config a cliplab run wrote there and replaced."""
    from cliplab.runs import is_own_config

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text("# my recipe: keep these notes\n"
                                     + yaml.safe_dump(recipe(exp), sort_keys=False))
    before = tree(exp)
    assert not is_own_config(exp)
    with pytest.raises(ConfigError, match=r"holds config\.yaml, which no cliplab run in this "
                                          r"folder wrote"):
        run_pretrain(recipe(exp), progress=False)
    assert tree(exp) == before


def test_a_failure_removes_the_run_folder_only_while_it_holds_just_its_config(tmp_path):
    """`removed_if_unstarted`: a run that fails before it logged or saved anything leaves no
    folder; one that had started (checkpoints/, metrics.jsonl) keeps everything it wrote, and
    a folder that was there before is never removed."""
    from cliplab.runs import removed_if_unstarted

    def fail_in(run, existed=False):
        with pytest.raises(RuntimeError, match="boom"):
            with removed_if_unstarted(run, existed=existed):
                raise RuntimeError("boom")

    for started in (None, "checkpoints", METRICS):
        run = tmp_path / f"run-{started}"
        run.mkdir()
        (run / "config.yaml").write_text("out: run\n")
        if started == "checkpoints":
            (run / "checkpoints" / "step-1").mkdir(parents=True)
        elif started:
            (run / started).write_text('{"step": 1, "loss": 1.0}\n')
        before = tree(run)
        fail_in(run)
        if started is None:
            assert not run.exists()
        else:
            assert tree(run) == before and (run / started).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("out: mine\n")
    fail_in(mine, existed=True)
    assert tree(mine) == {"config.yaml": b"out: mine\n"}


def test_an_attempt_stopped_before_it_logged_is_started_again(tmp_path):
    """What an attempt killed before its first record leaves (its own config.yaml) is no
    reason to refuse the folder; the new run replaces it."""
    out = tmp_path / "run"
    run_pretrain(recipe(out, steps=1), progress=False)
    for entry in out.iterdir():  # as if killed before it logged anything
        if entry.name != "config.yaml":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    results = run_pretrain(recipe(out, steps=2), progress=False)
    assert results["train"]["step"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2


# -- resume ---------------------------------------------------------------------------------
def _stopped_at_step_2(out: Path) -> None:
    """A 4-step run as if killed after its step-2 checkpoint."""
    run_pretrain(recipe(out), progress=False)
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "results.json").unlink()


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    """A resume refused as complete (steps shortened below the checkpoint) rewrote
    config.yaml first, and every later plain `--resume latest` was refused too."""
    out = tmp_path / "run"
    _stopped_at_step_2(out)
    before = tree(out)
    with pytest.raises(ConfigError, match=r"nothing to resume: .*step-2 is at step 2, past "
                                          r"the run's length of 1 step\(s\) now"):
        run_pretrain(recipe(out, steps=1), resume="latest", progress=False)
    assert tree(out) == before
    assert main(["pretrain", "--out", str(out), "--resume", "latest", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 4


def test_a_corrupt_trainer_state_names_the_file_and_the_earlier_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    run_pretrain(recipe(out), progress=False)
    (out / "results.json").unlink()
    state = out / "checkpoints" / "step-4" / "trainer_state.pt"
    os.truncate(state, 1000)
    before = tree(out)
    assert main(["pretrain", "--out", str(out), "--resume", "latest", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cliplab: error: cannot resume: {state} is unreadable (")
    assert err.endswith(f"; resume from an earlier checkpoint with --resume "
                        f"{out / 'checkpoints' / 'step-2'} (this run has step-2)\n")
    assert err.count("\n") == 1 and tree(out) == before
    state.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ConfigError, match=r"trainer_state\.pt is unreadable .*--resume"):
        run_pretrain(recipe(out), resume="latest", progress=False)
    torch.save([1, 2], state)  # readable, but no trainer state
    with pytest.raises(ConfigError, match=r"trainer_state\.pt is not a trainer state \(it holds "
                       r"a list\); resume from an earlier checkpoint"):
        run_pretrain(recipe(out), resume="latest", progress=False)
    # the earlier checkpoint it names continues the run, and writes step-4 anew
    run_pretrain(recipe(out), resume=str(out / "checkpoints" / "step-2"), progress=False)
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 4


def test_resume_latest_needs_the_run_folder(tmp_path, monkeypatch):
    """Without --out it said `cannot resume: latest holds no trainer_state.pt`, after
    making a new default run folder and loading everything."""
    monkeypatch.chdir(tmp_path)
    message = r"^--resume latest continues the newest checkpoint of a run folder: give the " \
              r"run folder as --out RUN$"
    with pytest.raises(ConfigError, match=message):
        run_pretrain(recipe(None), resume="latest", progress=False)
    assert not (tmp_path / "runs").exists()
    trainer = Trainer(small_model(), TrainConfig.from_dict({**recipe(None)["train"],
                                                             "progress": False}))
    with pytest.raises(ConfigError, match=r"^resume 'latest' continues the newest checkpoint "
                       r"of a run folder: give the Trainer its run_dir \(on the command line: "
                       r"--out RUN\)$"):  # from Python, without a run folder
        trainer.fit(load_shapes(n=64, seed=0, kinds=("single",), image_size=32),
                    resume="latest")


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """They stayed in checkpoints/ beside the resumed run's: a later `--resume latest` (or
    `--model RUN`) took the old run's step-4 over the resumed run's step-3."""
    out = tmp_path / "run"
    run_pretrain(recipe(out), progress=False)  # steps 1-4, checkpoints at 2 and 4
    old = {name: tree(out / "checkpoints" / name) for name in ("step-2", "step-4")}
    old_results = (out / "results.json").read_bytes()
    capsys.readouterr()
    # resumed from step-2 and stopped at 3 (a shorter run stands for a killed one): the run
    # before's results.json (step 4, its model at checkpoints/step-4) is set aside with step-4
    run_pretrain(recipe(out, steps=3), resume=str(out / "checkpoints" / "step-2"),
                 progress=False)
    assert capsys.readouterr().err.count(
        f"resumed from step 2: what the run before wrote past it (step-4, results.json) is "
        f"moved to {out / 'superseded'}") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert tree(out / "superseded" / "step-4") == old["step-4"]  # kept, bit for bit
    assert (out / "superseded" / "results.json").read_bytes() == old_results
    assert tree(out / "checkpoints" / "step-2") == old["step-2"]
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 3
    run_pretrain(recipe(out), resume="latest", progress=False)  # continues step-3, not step-4
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 4
    assert sorted(p.name for p in (out / "superseded").iterdir()) == [
        "results-2.json", "results.json", "step-4"]
    # a second resume from step-2 numbers what it sets aside after what is there already
    run_pretrain(recipe(out, steps=3), resume=str(out / "checkpoints" / "step-2"),
                 progress=False)
    assert sorted(p.name for p in (out / "superseded").iterdir()) == [
        "results-2.json", "results-3.json", "results.json", "step-3", "step-4", "step-4-2"]
    assert tree(out / "superseded" / "step-4") == old["step-4"]


class Killed(BaseException):
    """A kill -9 between two statements (nothing after it runs)."""


def test_a_resume_killed_between_setting_aside_and_dropping_records_loses_nothing(
        tmp_path, monkeypatch):
    """The resume dropped the records past its checkpoint first: a kill before the later
    checkpoints were set aside left a run that still called itself complete (step-4 and
    results.json in place) with its records of steps 3-4 gone for good. Now the checkpoints go
    first; a kill then leaves step-2 the latest, and --resume latest redoes steps 3-4."""
    from cliplab.runs import RunDir

    out = tmp_path / "run"
    run_pretrain(recipe(out), progress=False)  # steps 1-4, checkpoints at 2 and 4

    def killed(self, step):
        raise Killed
    monkeypatch.setattr(RunDir, "drop_records_after", killed)
    with pytest.raises(Killed):
        run_pretrain(recipe(out), resume=str(out / "checkpoints" / "step-2"), progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    run_pretrain(recipe(out), resume="latest", progress=False)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 4

def test_resume_from_a_checkpoint_that_does_not_exist_says_so(tmp_path):
    """It said the folder `holds no trainer_state.pt`, as if it were there."""
    from cliplab.train.checkpoint import resume_folder

    gone = tmp_path / "run" / "checkpoints" / "step-99"
    with pytest.raises(ConfigError, match=f"^cannot resume: {gone} does not exist; give a "
                       r"checkpoint folder \(RUN/checkpoints/step-N\) or --resume latest"):
        resume_folder(str(gone), None)
    gone.mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"^cannot resume: {gone} holds no trainer_state.pt$"):
        resume_folder(str(gone), None)


def test_a_run_stopped_during_its_final_evaluation_is_finished_by_a_resume(tmp_path, capsys):
    """The final checkpoint written, the run killed while evaluating: `--resume latest` was
    refused as complete, and a new run in the folder too, so it could never be finished."""
    out = tmp_path / "run"
    done = run_pretrain(recipe(out, evaluate=True), progress=False)
    logged = records(out)
    assert "eval/colour/acc1" in logged[-1]
    for drop_eval_record in (False, True):  # killed before or after the eval was logged
        (out / "results.json").unlink()
        if drop_eval_record:
            (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in logged[:-1]))
        again = run_pretrain(recipe(out, evaluate=True), resume="latest", progress=False)
        assert "running only its final evaluation" in capsys.readouterr().err
        written = json.loads((out / "results.json").read_text())

        def timeless(results: dict) -> dict:  # how long it took and when it was written aside
            return {**without_provenance(results), "wall_time_s": 0}

        assert timeless(written) == timeless(json.loads(json.dumps(done)))
        assert timeless(again) == timeless(done)
        assert written["created"] >= done["created"]  # the record of the resume that wrote it
        assert records(out) == logged  # the evaluation logged once
    with pytest.raises(ConfigError, match="nothing to resume: .*the run is complete; a "
                                          "longer train.steps or train.epochs extends it$"):
        run_pretrain(recipe(out, evaluate=True), resume="latest", progress=False)


# -- what a run logs and says ---------------------------------------------------------------
def test_the_logged_lr_is_the_base_rate_whatever_the_first_groups_scale(tmp_path):
    """With the temperature's rate scaled to 0 every logged lr was 0.0 while the rest trained
    at the full rate: the first parameter group's rate was logged."""
    out = tmp_path / "run"
    run_pretrain(recipe(out, warmup=0, lr_scale={"logit_scale": 0.0}), progress=False)
    lrs = [r["lr"] for r in records(out) if "lr" in r]
    assert lrs == pytest.approx([3e-3 * warmup_cosine(s, 4, 0) for s in range(4)], rel=1e-9)
    assert lrs[0] == pytest.approx(3e-3)


def test_a_warmup_under_one_is_a_fraction_of_the_run(tmp_path):
    run_pretrain(recipe(tmp_path / "half", warmup=0.5), progress=False)  # 2 of 4 steps
    lrs = [r["lr"] for r in records(tmp_path / "half") if "lr" in r]
    assert lrs == pytest.approx([3e-3 * warmup_cosine(s, 4, 2) for s in range(4)], rel=1e-9)


def test_a_warmup_longer_than_the_run_is_told(tmp_path, recwarn):
    """warmup=100 of a 4-step run trained at 1-4% of train.lr without a word."""
    run_pretrain(recipe(tmp_path / "long", warmup=100), progress=False)
    err = warned(recwarn)
    assert "train: train.warmup=100 steps is longer than the run (4 steps), so the " \
           "rate never reaches train.lr (it peaks at 4% of it)" in err
    assert err.count("\n") == 1
    run_pretrain(recipe(tmp_path / "fits", warmup=4), progress=False)
    assert warned(recwarn) == ""
    from cliplab.train.schedule import warmup_warning

    assert warmup_warning(4, 4) is None  # the last step runs at the full rate
    assert "train.warmup=5 steps is longer than the run (4 steps)" in warmup_warning(5, 4)
    assert math.isclose(records(tmp_path / "fits")[3]["lr"], 3e-3)  # the peak, at the last step


def test_ranks_are_checked_before_any_loading_and_warned_from_rank_0(tmp_path, monkeypatch,
                                                                      recwarn):
    """As rank 1 of 2: a global batch the ranks cannot share is refused before the data loads
    (it was found after data, model and eval sets), and the eval_every warning is rank 0's
    alone (it was checked before the ranks were known, so every rank printed it)."""
    from cliplab.train import distributed, pretrain

    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)

    def loaded(*args):
        raise AssertionError("the data was loaded first")
    monkeypatch.setattr(pretrain, "_pairs", loaded)
    with pytest.raises(ConfigError, match=r"^train.batch_size=33 must divide evenly over 2 "
                       "ranks$"):
        run_pretrain(recipe(tmp_path / "run", batch_size=33, eval_every=2), progress=False)
    assert "eval_every" not in warned(recwarn)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ConfigError, match="must divide evenly"):
        run_pretrain(recipe(tmp_path / "run", batch_size=33, eval_every=2), progress=False)
    assert "train.eval_every=2 has no eval: suite to run" in warned(recwarn)
    assert not (tmp_path / "run").exists()
    # the loading bars (read shards, encode captions) are rank 0's alone: each rank drew them
    shown = {}

    def loading(spec, progress, where, model_input=None):
        shown[distributed.rank()] = progress
        raise ConfigError("stop here")
    monkeypatch.setattr(pretrain, "_pairs", loading)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        with pytest.raises(ConfigError, match="stop here"):
            run_pretrain(recipe(tmp_path / "run"), progress=True)
    assert shown == {0: True, 1: False}


@pytest.mark.parametrize("device, world, expected", [
    ("cpu", "2", "gloo"), ("cuda", "2", "nccl"), ("cuda:1", "1", "nccl"),
    ("cuda:1", "2", "train.device=cuda:1 under torchrun puts every rank on GPU 1")])
def test_the_backend_follows_train_device(device, world, expected, monkeypatch):
    """train.device=cpu on a GPU machine took nccl (it moves CUDA tensors only) and failed;
    a fixed cuda:N over several ranks put them all on one GPU."""
    import torch

    from cliplab.train.distributed import backend_for

    monkeypatch.setenv("WORLD_SIZE", world)
    if expected in ("gloo", "nccl"):
        assert backend_for(torch.device(device)) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            backend_for(torch.device(device))


def test_a_checkpoint_of_another_run_resumes_only_with_that_runs_config(tmp_path):
    """`--out A --resume B/checkpoints/step-2` continued B's weights and data position on A's
    other data, a silent mix of two runs; it is refused naming B and what differs. The same
    recipe in a new folder still continues B exactly (a fork)."""
    other = tmp_path / "other"
    run_pretrain(recipe(other), progress=False)
    ckpt = other / "checkpoints" / "step-2"
    mine = recipe(tmp_path / "mine")
    mine["data"] = {"train": {**SHAPES, "seed": SHAPES.get("seed", 0) + 5}}
    with pytest.raises(ConfigError, match=rf"^--resume {re.escape(str(ckpt))} is a checkpoint of "
                       rf"the run {re.escape(str(other.resolve()))}, whose config differs: data "):
        run_pretrain(mine, resume=str(ckpt), progress=False)
    assert not (tmp_path / "mine").exists()
    run_pretrain(recipe(tmp_path / "fork"), resume=str(ckpt), progress=False)
    a = load_file(other / "checkpoints" / "step-4" / "model" / "model.safetensors")
    b = load_file(tmp_path / "fork" / "checkpoints" / "step-4" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
