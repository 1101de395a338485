"""`cliplab pretrain` under torchrun: two gloo ranks on CPU take the step one process takes on
the same global batch (InfoNCE and SigLIP, plain, tiled and GradCache), the CLI run matches a
single-process run, an FSDP run evaluates its sharded towers as one process evaluates its
checkpoint, and a rank that dies ends the other with one clear error line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel

from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext
from cliplab.train import pretrain

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from trainer_grads import SCENARIOS, one_step  # noqa: E402

from tests.torchrun_launch import torchrun, torchrun_env  # noqa: E402

SCRIPT = Path(__file__).parent / "dist_scripts" / "trainer_grads.py"
MODEL = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                            "layers": 1, "heads": 2, "embed_dim": 16,
                                            "context_length": 48}}




@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("torchrun")
    done = torchrun(str(SCRIPT), str(out), log_dir=tmp_path_factory.mktemp("torchrun-logs"))
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_ranks_take_the_one_process_step(two_rank_steps, scenario):
    torch.set_num_threads(1)
    reference = one_step(*SCENARIOS[scenario])
    for rank in two_rank_steps:
        got = rank[scenario]
        # FSDP really sharded the blocks of both towers (a locked tower's stay sharded after
        # the forward that cached its features), and gathers full weights on rank 0 only
        assert got["sharded"] == ({"image", "text"} if "fsdp" in scenario else set())
        if "fsdp" in scenario:
            assert (got["gathered"] > 0) == (rank is two_rank_steps[0])
        assert got["loss"] == pytest.approx(reference["loss"], abs=1e-5)
        # every rank reads the towers' weights whole (the eval caches' key), not its shard
        assert got["towers"] == two_rank_steps[0][scenario]["towers"]
        assert got["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5, msg=name)


def _recipe(out: Path, **train) -> dict:
    return {"model": MODEL,
            "data": {"train": {"source": "shapes", "n": 96, "seed": 0, "kinds": ["single"],
                               "image_size": 32}},
            "train": {"steps": 3, "batch_size": 32, "lr": 1e-3, "warmup": 1, "log_every": 1,
                      "augment": True, **train},
            "out": str(out)}


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("sharded", [False, True])
def test_torchrun_pretrain_logs_the_single_process_losses(tmp_path, sharded):
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_recipe(tmp_path / name,
                                                                      fsdp=sharded)))
    one = subprocess.run([sys.executable, "-m", "cliplab", "pretrain", "--config",
                          str(tmp_path / "one.yaml"), "--no-progress"],
                         env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "cliplab", "pretrain", "--config", str(tmp_path / "two.yaml"),
                   "--no-progress", log_dir=tmp_path / "logs")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model: ") == 1  # rank 0 reports
    # steps 2 and 3 start from weights both runs updated: the whole loop agrees, not one loss
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    assert len(_losses(tmp_path / "two")) == 3
    assert (tmp_path / "two" / "checkpoints" / "step-3" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "two" / "results.json").read_text())["train"]["step"] == 3
    # the checkpoint holds the full weights however they were sharded
    one_w = load_file(tmp_path / "one" / "checkpoints" / "step-3" / "model" / "model.safetensors")
    two_w = load_file(tmp_path / "two" / "checkpoints" / "step-3" / "model" / "model.safetensors")
    assert one_w.keys() == two_w.keys()
    assert all(one_w[k].shape == two_w[k].shape for k in one_w)
    CLIPModel.from_pretrained(tmp_path / "two" / "checkpoints" / "step-3" / "model")


def _run_and_resume_at_step_2(tmp_path, **train) -> tuple[dict, dict]:
    """The step-4 weights of a 2-rank run of 4 steps (``train`` keys set) and of the same run
    resumed under torchrun from its step-2 checkpoint."""
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(_recipe(tmp_path / "full", steps=4, save_every=2, **train)),
                    encoding="utf-8")
    done = torchrun("-m", "cliplab", "pretrain", "--config", str(full), "--no-progress",
                    log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(yaml.safe_dump(_recipe(tmp_path / "resumed", steps=4, **train)),
                       encoding="utf-8")
    done = torchrun("-m", "cliplab", "pretrain", "--config", str(resumed), "--no-progress",
                    "--resume", str(tmp_path / "full" / "checkpoints" / "step-2"),
                    log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(load_file(tmp_path / run / "checkpoints" / "step-4" / "model" /
                           "model.safetensors") for run in ("full", "resumed"))


def test_fsdp_run_resumes_from_its_gathered_checkpoint(tmp_path):
    """Weights and AdamW state saved whole from the shards and put back onto them: a run
    resumed at step 2 ends where the uninterrupted run ends."""
    a, b = _run_and_resume_at_step_2(tmp_path, fsdp=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # a checkpoint of one process (fsdp: true shards nothing there; its AdamW state is keyed by
    # position, not name) resumes onto the shards too: it was refused as "another model"
    pretrain.run_pretrain(_recipe(tmp_path / "single", steps=4, save_every=2, fsdp=True),
                          progress=False)
    single = tmp_path / "from-single.yaml"
    single.write_text(yaml.safe_dump(_recipe(tmp_path / "from-single", steps=4, fsdp=True)))
    done = torchrun("-m", "cliplab", "pretrain", "--config", str(single), "--no-progress",
                    "--resume", str(tmp_path / "single" / "checkpoints" / "step-2"),
                    log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    # steps 3 and 4 on two ranks log the losses of the uninterrupted single process
    assert _losses(tmp_path / "from-single") == pytest.approx(
        _losses(tmp_path / "single")[2:], abs=1e-4)


def test_fsdp_run_with_a_locked_tower_resumes_as_it_ran_on(tmp_path):
    """A fully locked tower's features (LiT's text tower) are cached by a forward through its
    sharded blocks before the checkpoint is loaded; those blocks stayed gathered (plain tensors,
    not shards), and loading the checkpoint onto them was refused as "do not fit this run's
    model". The resumed run now ends where the uninterrupted run ends, bit for bit."""
    a, b = _run_and_resume_at_step_2(tmp_path, lock_text=True, fsdp=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


EVAL = {"tasks": [{"name": "colour", "task": "zeroshot",
                   "data": {"source": "shapes", "attribute": "color", "n": 24, "seed": 1,
                            "image_size": 32}},
                  {"name": "captions", "task": "retrieval",
                   "data": {"source": "shapes", "n": 24, "seed": 7, "image_size": 32}}]}


def test_fsdp_run_evaluates_its_shards_as_one_process_evaluates_its_checkpoint(tmp_path):
    """Every rank evaluates the sharded towers (the feature caches fingerprint the gathered
    weights) during training and at the end: the run finishes, writes its checkpoint, and
    reports what evaluating that checkpoint in one process gives."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**_recipe(tmp_path / "run", steps=2, eval_every=1,
                                             fsdp=True), "eval": EVAL}))
    done = torchrun("-m", "cliplab", "pretrain", "--config", str(cfg), "--no-progress",
                    log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "step-2" / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["step"] == 2 and Path(results["model_dir"]) == model_dir
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/colour/acc1" in r]
    assert [r["step"] for r in evals] == [1, 2]  # mid-run and at the end
    torch.set_num_threads(1)
    expected = pretrain.scalar_metrics(
        run_suite(str(model_dir), EVAL, TaskContext(progress=False)), "eval")
    got = pretrain.scalar_metrics(results["evals"], "eval")
    assert {"eval/colour/acc1", "eval/captions/text_retrieval_recall@1"} <= got.keys()
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected, abs=1e-5)
    assert {k: evals[-1][k] for k in expected} == pytest.approx(expected, abs=1e-5)


def test_the_last_checkpoint_is_written_before_the_last_evaluation(tmp_path, monkeypatch):
    """An evaluation that fails at the end of a run loses none of its training."""
    def failing(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(pretrain, "run_suite", failing)
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        pretrain.run_pretrain({**_recipe(tmp_path / "run", steps=2), "eval": EVAL},
                              progress=False)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    assert (step / "trainer_state.pt").is_file()
    CLIPModel.from_pretrained(step / "model")
    assert _losses(tmp_path / "run") and not (tmp_path / "run" / "results.json").exists()


# rank 1 stands in for a GPU that falls off the bus: it exits during its second step
_DYING_RANK = """
import os, sys
from cliplab.train.objectives import ContrastiveObjective
backward, steps = ContrastiveObjective.backward, []
def dying(self, batch):
    steps.append(1)
    if len(steps) == 2:
        os._exit(3)
    return backward(self, batch)
ContrastiveObjective.backward = dying
from cliplab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_dies_ends_the_run_with_one_error_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tmp_path / "run", steps=5, dist_timeout_s=30)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["pretrain", "--config", str(cfg), "--no-progress"]
    procs = []
    for rank in range(2):
        env = {**torchrun_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "cliplab", *args] if rank == 0 else \
            [sys.executable, "-c", _DYING_RANK, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cliplab: error: rank 0 of 2: ") and "another rank stopped" in last
    assert "Traceback" not in err


def test_a_scheduler_stop_of_torchrun_is_said_once_with_the_resume_hint(tmp_path):
    """SIGTERM to torchrun (a job scheduler's stop), which its agent passes on to the ranks:
    they died of it without a word. Local rank 0 now says how to resume, once."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tmp_path / "run", steps=500, save_every=2)),
                   encoding="utf-8")
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--log-dir", str(tmp_path / "logs"), "-m", "cliplab", "pretrain", "--config", str(cfg),
         "--no-progress"], env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    first = tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.pt"
    deadline = time.monotonic() + 120
    while not first.is_file() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launch.send_signal(signal.SIGTERM)
    _, err = launch.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.startswith("cliplab:")]
    assert len(lines) == 2, err[-3000:]
    assert lines[0].startswith(f"cliplab: {tmp_path / 'run'} holds checkpoints up to step-")
    assert lines[0].endswith("; resume with: torchrun --nproc-per-node 2 -m cliplab pretrain "
                             f"--out {tmp_path / 'run'} --resume latest")
    assert lines[1] == "cliplab: terminated"


def _group_ends(out: Path, mode: str, *runs: tuple[str, bool]) -> list:
    """``dist_scripts/group_ends.py`` on two ranks over 2-step runs (name, sharded) under
    ``out``; each rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    recipes = []
    for name, sharded in runs:
        recipes.append(out / f"{name}.yaml")
        recipes[-1].write_text(yaml.safe_dump(_recipe(out / name, steps=2, save_every=1,
                                                      fsdp=sharded)))
    done = torchrun(str(Path(__file__).parent / "dist_scripts" / "group_ends.py"), str(out),
                    mode, *map(str, recipes), log_dir=out / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    for name, _ in runs:
        assert json.loads((out / name / "results.json").read_text())["train"]["step"] == 2
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_sharded_run_ends_its_process_group_and_its_threads(tmp_path):
    """FSDP's mesh held the process group past ``destroy_process_group``, so gloo's worker
    threads ran into the interpreter's exit, where one releasing a finished collective's tensors
    aborted the rank now and then (SIGABRT, "terminate called without an active exception").
    A sharded run now ends with as many threads as a plain one, whose group ends at once."""
    plain = _group_ends(tmp_path / "plain", "threads", ("run", False))
    sharded = _group_ends(tmp_path / "fsdp", "threads", ("run", True))
    assert sharded == plain


def test_a_group_the_script_made_outlives_its_runs(tmp_path):
    """Under a script's own process group, run_pretrain trains in it and leaves it to the
    script (it destroyed it, ending the script's collectives; torch cannot join a group twice in
    one process, so a second run could not start): two runs, plain and sharded, then a
    collective of the script's own."""
    reports = _group_ends(tmp_path, "own-group", ("plain", False), ("fsdp", True))
    assert reports == [{"kept": [True, True], "sum": 1.0}] * 2


def test_ranks_given_different_configs_are_refused_naming_the_keys(tmp_path):
    """A launcher that gave one rank another override (train.lr here) trained silently: rank 1
    stepped at its own rate while config.yaml recorded rank 0's (other keys aborted in a
    mismatched collective). Both ranks now refuse, naming the key, before any folder is made.
    Two machines' local ranks 0 (each says it: no quiet wait)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tmp_path / "run", dist_timeout_s=60)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**torchrun_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        extra = ["train.lr=0.005"] if rank == 1 else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cliplab", "pretrain", "--config", str(cfg), "--no-progress",
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            "cliplab: error: rank 1 was given another config than rank 0 (train.lr: 0.005 "
            "(rank 0: 0.001)): every rank must run the same recipe, command line and files")
    assert not (tmp_path / "run").exists()
