"""The command line: --help everywhere, one-line errors with exit code 2."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cliplab.cli import COMMANDS, main
from cliplab.cli import QUIET_RANK_WAIT_S
from tests.cli_output import one_line_error

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cliplab", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_top_level_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cliplab " + command in capsys.readouterr().out


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplab: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_config_file(tmp_path):
    _one_line_error(run_cli("pretrain", "--config", str(tmp_path / "nope.yaml")),
                    "nope.yaml", "does not exist")


def test_unknown_config_key_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny-clip}\ndata: {train: {source: shapes, n: 8}}\n"
                   "train: {epochs: 1, lrr: 3}\n")
    _one_line_error(run_cli("pretrain", "--config", str(cfg)), "lrr")


@pytest.mark.parametrize("recipe, command, owner, foreign", [
    ("curate/basic.yaml", "adapt", "curate",
     "keys chunk_size, examples, output, steps, workers are"),
    # seed is merge's too (dare's masks): not told as foreign
    ("adapt/digits.yaml", "merge --models a b", "adapt",
     "keys data, options, shots, val_shots are"),
    # pretrain's and quickstart's keys are the same: the one that accepts the file is named
    ("pretrain/tiny-shapes.yaml", "curate", "pretrain", "keys eval, model, train are"),
    ("eval/shapes.yaml", "data shard", "eval", "key tasks is"),
])
def test_a_config_for_another_command_is_named_as_such(recipe, command, owner, foreign, capsys):
    path = REPO / "configs" / recipe
    assert main([*command.split(), "--config", str(path)]) == 2
    named = command.partition(" --")[0]
    assert one_line_error(capsys) == (
        f"{path} is a config for `cliplab {owner}`, not for `cliplab {named}` (its {foreign} not "
        f"{named}'s); run `cliplab {owner} --config {path}`")


def test_a_config_with_a_typo_is_not_taken_for_another_commands(tmp_path, capsys):
    # `steps` is curate's, `lrr` no command's: the unknown keys are told as they are
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: tiny-clip}\ndata: {train: shapes}\nsteps: 3\nlrr: 3\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = one_line_error(capsys)
    assert "unknown key steps" in err and "unknown key lrr" in err and "a config for" not in err


def test_invalid_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  preset: tiny-clip\n  options: {a: [1, 2}\n")
    _one_line_error(run_cli("pretrain", "--config", str(cfg)), "bad.yaml:line")


def test_bad_override_and_missing_data_dir(tmp_path):
    _one_line_error(run_cli("quickstart", "train.epochs"), "key=value")
    (tmp_path / "data").mkdir()  # no IDX files in it
    _one_line_error(run_cli("quickstart", "--data-dir", str(tmp_path / "data"), "--out",
                            str(tmp_path / "run")), str(tmp_path / "data"), "dataset-fashion-mnist")
    assert not (tmp_path / "run").exists()  # no half-made run folder for a run that never ran


def test_overrides_may_follow_options_and_unknown_flags_show_the_commands_usage(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "shard", "--source", "digits", "data.split=test", "--out", str(out),
                 "samples_per_shard=100", "--no-progress", "image_format=png"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [100] * 5 + [40]
    assert index["image_format"] == "png"
    with pytest.raises(SystemExit):
        main(["eval", "--config", "s.yaml", "--model", "m", "--bogus"])
    err = capsys.readouterr().err
    assert "usage: cliplab eval" in err and "unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        main(["serve", "INDEX", "port=1"])  # serve takes no overrides
    assert "unrecognized arguments: port=1" in capsys.readouterr().err


def test_unknown_model_in_eval(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    _one_line_error(run_cli("eval", "--model", "no-such-model", "--suite", str(suite)),
                    "no-such-model")


def test_debug_shows_the_traceback(tmp_path):
    """... and exits 2 as without it: a script checking for bad input's code saw 1."""
    out = run_cli("--debug", "pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("cliplab.errors.ConfigError: config "
                                                           "file")


def test_a_run_folder_holding_a_run_is_refused_unless_resumed(tmp_path, capsys):
    """A second pretrain into the same --out would mix its checkpoints and metrics with the
    first's (and `--model OUT` would load the higher step, the old run's): refused, unchanged;
    --resume latest continues it; --resume latest of a folder without checkpoints says so."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    args = ["pretrain", "--config", str(recipe), "--no-progress",
            "data.train.n=64", "train.batch_size=32", "eval=null",
            "model.options.width=32", "model.options.layers=1", "model.options.embed_dim=16"]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "train.epochs=1", "train.save_every=1"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main([*args, "--out", str(out), "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # complete: --resume latest alone was refused as "nothing to resume"
    assert err == [f"cliplab: error: --out {out} already holds a run (checkpoints up to "
                   "step-2); extend it with --resume latest and a longer train.steps or "
                   "train.epochs, or choose a new --out"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main([*args, "--out", str(out), "train.epochs=2", "--resume", "latest"]) == 0
    assert (out / "checkpoints" / "step-4").is_dir()
    # without --config a resume reads the run's config.yaml: none of the overrides retyped
    assert main(["pretrain", "--out", str(out), "--resume", "latest", "--no-progress",
                 "train.epochs=3"]) == 0
    assert (out / "checkpoints" / "step-6").is_dir()
    assert main(["pretrain", "--out", str(tmp_path / "none"), "--resume", "latest"]) == 2
    assert "none/config.yaml does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "none")]) == 2
    assert "pretrain needs --config RECIPE" in capsys.readouterr().err
    assert main([*args, "train.epochs=1", "--out", str(tmp_path / "new"), "--resume",
                 "latest"]) == 2
    assert "holds no checkpoint to continue" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["adapt", "--method", "zeroshot", "--model", str(out), "--out", str(out),
                 "data.train={source: digits, split: train}", "--no-progress",
                 "data.test={source: digits, split: test}", "shots=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_an_out_under_the_home_folder_is_written_there_from_the_command_line_and_a_config(
        tmp_path, monkeypatch):
    """`--out '~/run'` (quoted, or from a script) and a config's `out: ~/run` (YAML meets no
    shell) made a folder literally named `~` below the working folder: `~` is the home."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    args = ["pretrain", "--config", str(recipe), "--no-progress", "data.train.n=32",
            "train.batch_size=16", "train.steps=1", "train.epochs=null", "eval=null",
            "model.options.width=32", "model.options.layers=1", "model.options.embed_dim=16"]
    assert main([*args, "--out", "~/run"]) == 0
    assert main([*args, "out=~/run2"]) == 0
    assert main(["merge", "--method", "uniform", "--models", str(home / "run"),
                 str(home / "run2"), "--out", "~/soup"]) == 0
    assert {p.name for p in home.iterdir()} == {"run", "run2", "soup"}
    assert (home / "run" / "checkpoints").is_dir() and not (work / "~").exists()

def test_a_run_refused_at_its_start_leaves_no_folder(tmp_path, capsys):
    """A run that fails before its first step (its config written, nothing else) removes the
    folder it made, so the corrected command starts clean; a folder that was there stays."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    args = ["pretrain", "--config", str(recipe), "--no-progress", "train.batch_size=128",
            "eval=null"]
    assert main([*args, "data.train.n=64", "--out", str(tmp_path / "new")]) == 2
    assert "batch of 128 is larger than the dataset (64 pairs)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # an empty training or replay set is said to be empty, not a batch too large for it
    assert main([*args, "data.train.n=0", "--out", str(tmp_path / "new")]) == 2
    assert "data.train holds no pairs (source 'shapes' loaded none)" in capsys.readouterr().err
    assert main([*args, "data.train.n=64", "data.replay={ratio: 0.5, source: shapes, n: 0}",
                 "--out", str(tmp_path / "new")]) == 2
    assert "data.replay holds no pairs" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main([*args, "data.train.n=64", "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()
    # adapt: a method that refuses its options (before any work, as fit would)
    assert main(["adapt", "--method", "tip-adapter", "--model", "tiny-clip", "--no-progress",
                 "--out", str(tmp_path / "adapt"), "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", "shots=1", "val_shots=0",
                 "compare_zeroshot=false", "options.search=true"]) == 2
    assert "search=true needs a validation split" in capsys.readouterr().err
    assert not (tmp_path / "adapt").exists()


def test_eval_checks_every_tasks_data_before_encoding_any(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, split: test}}\n"
                     "  - {name: probe, task: linear_probe, train: {source: digits, split: train},"
                     " test: {source: digits, split: test, splt: 1}}\n")
    assert main(["eval", "--config", str(suite), "--model", "tiny-clip"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"cliplab: error: {suite}: tasks[1] (name 'probe'): test: unknown "
                           "option 'splt' for digits (valid: image_size, seed, split, "
                           "test_fraction; for any source: shift, shift_seed; for "
                           "class-labelled data: classes, holdout, templates)")


@pytest.mark.parametrize("argv, said", [
    (["merge", "--method", "greedy", "--method", "uniform", "--models", "a", "b", "--out", "m"],
     "cliplab merge: error: --method given twice (greedy and uniform); give one"),
    (["adapt", "--model", "qs1", "--model", "pt1", "--method", "zeroshot"],
     "cliplab adapt: error: --model given twice (qs1 and pt1); give one"),
    (["merge", "--models", "a", "b", "--models", "c", "--out", "m"],
     "cliplab merge: error: --models given twice (a b and c); give one"),
    (["data", "shard", "--data", "shapes", "--data", "digits", "--out", "s"],
     "cliplab data shard: error: --data/--source given twice (shapes and digits); give one"),
])
def test_an_option_given_twice_with_two_values_is_refused(argv, said, capsys, tmp_path,
                                                          monkeypatch):
    """argparse keeps an option's last value: `--out a --out b` wrote only b, `--model A
    --model B` adapted B, without a word (README: a key given twice is refused)."""
    monkeypatch.chdir(tmp_path)  # what a regression would write lands here
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == said


def test_an_option_given_twice_alike_is_one_setting(tmp_path):
    from cliplab.cli import build_parser, parse_command_line

    args = parse_command_line(build_parser(), ["serve", "idx", "--port", "9", "--port", "9"])
    assert args.port == 9 and "_options_given" not in vars(args)


def test_eval_takes_one_suite(tmp_path, capsys):
    """--suite is --config's alias: given both, the last silently won."""
    with pytest.raises(SystemExit) as info:
        main(["eval", "--suite", "a.yaml", "--config", "b.yaml", "--model", "tiny-clip"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "cliplab eval: error: --config/--suite given twice (a.yaml and b.yaml); give one")


def test_default_run_folders_of_runs_started_in_one_second_differ(tmp_path, monkeypatch):
    from cliplab.runs import default_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261202-120000")
    first = default_run_dir("adapt-coop")
    first.mkdir(parents=True)
    second = default_run_dir("adapt-coop")
    assert (first.name, second.name) == ("adapt-coop-20261202-120000",
                                         "adapt-coop-20261202-120000-2")
    second.mkdir(parents=True)  # a third run in that second takes the next number
    assert default_run_dir("adapt-coop").name == "adapt-coop-20261202-120000-3"


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    """``cliplab ... | head`` (or a killed tee) after the work is done: a BrokenPipeError
    traceback and exit 1; now quiet, 141 as git and coreutils end (128 + SIGPIPE)."""
    command = subprocess.Popen(
        [sys.executable, "-m", "cliplab", "data", "shard", "--data", "shapes", "data.n=8",
         "data.image_size=32", "--out", str(tmp_path / "shards"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command.stdout.close()  # the reader is gone before the result is printed
    err = command.stderr.read()
    assert command.wait(timeout=300) == 141, err
    assert err == ""
    assert (tmp_path / "shards" / "index.json").is_file()  # the work itself is done


def test_progress_bars_into_a_log_are_redrawn_every_30_s(tmp_path):
    """Redirected to a file (a CI log) a bar left ten states a second (78 for an 8 s bar, 3 MB
    for an hour of pretraining); the user's own TQDM_MININTERVAL is kept."""
    env = {key: value for key, value in os.environ.items() if key != "TQDM_MININTERVAL"}
    states = {}
    for interval in (None, "0"):
        with open(tmp_path / "log", "w", encoding="utf-8") as log:
            subprocess.run([sys.executable, "-m", "cliplab", "data", "shard", "--data", "shapes",
                            "data.n=1500", "--out", str(tmp_path / f"s{interval}")],
                           stdout=subprocess.DEVNULL, stderr=log, timeout=300, check=True,
                           env=env if interval is None else {**env, "TQDM_MININTERVAL": interval})
        drawn = (tmp_path / "log").read_text(encoding="utf-8").replace("\r", "\n")
        states[interval] = sum("%|" in line for line in drawn.splitlines())
    assert states[None] <= 3 < states["0"], states


def test_a_finished_run_names_its_model_absolute(tmp_path, monkeypatch, capsys):
    """``--out run`` recorded ``model_dir: run/checkpoints/...``: a script reading results.json
    from another folder found no model (eval and adapt record theirs absolute)."""
    recipe = REPO / "configs" / "pretrain" / "tiny-shapes.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", str(recipe), "--out", "run", "--no-progress",
                 "data.train.n=32", "train.epochs=1", "train.batch_size=16",
                 "eval.tasks.0.data.n=8", "eval.tasks.1.data.n=8"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert results["model_dir"] == str(tmp_path.resolve() / "run/checkpoints/step-2/model")
    assert f"model: {results['model_dir']}" in capsys.readouterr().out


def test_resume_auto_starts_goes_on_or_reports_a_complete_run(tmp_path, monkeypatch, capsys):
    """One command line for a job a scheduler may stop and start again: it starts a run, goes
    on from the latest checkpoint (here: a longer run extending it), and reports a complete
    run with exit 0 (a fresh start with --resume latest, and a retry of a complete run, were
    exit 2, bad input's code)."""
    recipe = REPO / "configs" / "pretrain" / "tiny-shapes.yaml"
    monkeypatch.chdir(tmp_path)
    line = ["pretrain", "--config", str(recipe), "--out", "run", "--resume", "auto",
            "--no-progress", "data.train.n=32", "train.batch_size=16", "eval.tasks.0.data.n=8",
            "eval.tasks.1.data.n=8"]
    assert main([*line, "train.epochs=1"]) == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert first["train"]["step"] == 2 and first["resumed_from"] is None
    capsys.readouterr()
    assert main([*line, "train.epochs=1"]) == 0  # again: complete, reported as it was
    said = capsys.readouterr()
    assert said.err == "pretrain: run is complete already (--resume auto); its results:\n"
    assert f"model: {first['model_dir']}" in said.out
    assert main([*line, "train.epochs=2"]) == 0  # longer: goes on from step 2
    second = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert second["train"]["step"] == 4 and second["resumed_from"]["step"] == 2


def test_version_is_the_package_version():
    from cliplab import __version__
    from importlib.metadata import version

    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"cliplab {__version__}"
    assert version("cliplab") == __version__


def test_help_and_usage_errors_import_no_model_code():
    """`cliplab --help`, a command's --help and a wrong method took ~8 s: building the parser
    imported torch and transformers to list the adapt and merge methods."""
    script = ("import sys\nfrom cliplab.cli import main\n"
              "for argv in (['--version'], ['adapt', '--help'], ['merge', '--help'],"
              " ['adapt', '--method', 'co-op']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
              "print('imported:', heavy)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("imported: []")
    # the lazily exported names are still there
    from cliplab import adapt, merge
    from cliplab.adapt.base import AdaptContext
    from cliplab.merge.soup import greedy_soup

    assert adapt.AdaptContext is AdaptContext and merge.greedy_soup is greedy_soup
    from cliplab.merge.stock import model_stock as the_function  # its module imported first
    from cliplab.merge import model_stock

    assert model_stock is the_function  # not a module of that name
    assert sorted(merge.__all__) == sorted(set(merge.__all__))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        merge.nope
    # dir() (and so completion) shows them before their first use
    assert set(merge.__all__) <= set(dir(merge)) and "task_vector" in dir(merge)
    assert {"AdaptContext", "Adapter", "get_method", "ADAPT_METHODS"} <= set(dir(adapt))


@pytest.mark.parametrize("world, refused", [("2", True), ("1", False)])
def test_a_one_process_command_under_torchrun_is_refused(world, refused, tmp_path, capsys,
                                                         monkeypatch):
    """torchrun runs every rank's copy of the command: one that does not share its work (all
    but pretrain) would run whole N times into the same folder, so it is refused first."""
    results = tmp_path / "results.json"
    results.write_text('{"results": {"digits": {"acc1": 0.5}}}')
    monkeypatch.setenv("WORLD_SIZE", world)
    code = main(["report", "--inputs", str(results), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert (code == 2) == refused and (tmp_path / "r").exists() != refused
    if refused:
        assert err.strip() == (
            "cliplab: error: cliplab report runs in one process, but torchrun launched "
            "WORLD_SIZE=2 copies (each would run it whole into the same output); run it without "
            "torchrun (only pretrain shares its work over ranks)")
        monkeypatch.setenv("RANK", "1")  # the other ranks refuse too, without repeating it
        assert main(["report", "--inputs", str(results), "--out", str(tmp_path / "r")]) == 2
        assert capsys.readouterr().err == "" and not (tmp_path / "r").exists()


def test_usage_errors_and_help_under_torchrun_are_said_by_the_first_rank_only(capsys,
                                                                           monkeypatch):
    """Each rank parses the same command line: a usage error or --help was printed once per
    rank, and a refused ``data shard`` was named ``cliplab data``."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as stop:
            main(["curate", "--out", "x"])
        assert stop.value.code == 2
        with pytest.raises(SystemExit) as stop:
            main(["adapt", "--help"])
        assert stop.value.code == 0
        out, err = capsys.readouterr()
        assert ("required: --config" in err and "usage: cliplab adapt" in out) == shown
        assert shown or out == err == ""
    assert main(["data", "shard", "--data", "shapes", "--out", "x"]) == 2
    assert capsys.readouterr().err.startswith("cliplab: error: cliplab data shard runs in one "
                                              "process, but torchrun launched WORLD_SIZE=2")


@pytest.mark.parametrize("world, local_rank, says", [
    ("2", "0", True), ("2", "1", False), ("4", "0", True), ("1", "0", True)])
def test_a_recipe_error_under_torchrun_is_said_once_a_machine(world, local_rank, says,
                                                              tmp_path, capsys, monkeypatch):
    """Every rank of a machine reads the same recipe and command line, so local rank 0 says
    what is wrong with them (torchrun printed the line once per rank) and torchrun stops the
    others while they wait; a machine's local rank 0 on another machine (RANK 2) still says
    it. A rank still running after the wait failed alone: it says its error, naming itself
    (it exited quietly, and the user saw no cliplab line at all)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: run\ntrain:\n  steps: 2\n")
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "2" if world == "4" else local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    code = main(["pretrain", "--config", str(recipe), "train.stepz=3"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    if says:
        assert err.startswith(f"cliplab: error: {recipe} + command line: ")
        assert "unknown key train.stepz" in err
        assert len(err.strip().splitlines()) == 1 and waits == []
    else:  # it leaves after local rank 0, or torchrun could stop that one first
        assert waits == [QUIET_RANK_WAIT_S]
        assert err.startswith(f"cliplab: error: rank 1: {recipe} + command line: ")
        assert len(err.strip().splitlines()) == 1


def test_the_help_of_eval_adapt_and_merge_names_every_registered_task_and_method(capsys):
    """The lists a user chooses from, in `--help`: eval's tasks are written there by hand (the
    parser starts without torch, which the task modules import), so this keeps them equal."""
    from cliplab.adapt import ADAPT_METHODS
    from cliplab.evaluate.tasks import TASKS
    from cliplab.merge.methods import MERGE_METHODS

    for command, names in (("eval", TASKS), ("adapt", ADAPT_METHODS), ("merge", MERGE_METHODS)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)] \
            == [], command


def test_a_help_that_lists_config_keys_lists_every_one(capsys):
    """`--help`'s "Config keys: ..." is a command's reference: a key missing there is hidden."""
    from cliplab.cli.config_owner import CONFIG_SCHEMAS, config_keys

    listed = 0
    for command in CONFIG_SCHEMAS:
        with pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if "Config keys:" not in text:
            continue
        listed += 1
        keys = text.split("Config keys:", 1)[1].split(";")[0].split(". ")[0]
        words = set(re.findall(r"[a-z_]+", keys))
        assert config_keys(command) <= words, (command, config_keys(command) - words)
    assert listed == len(CONFIG_SCHEMAS) - 1  # eval's config is its suite: {tasks, precision}
    # pretrain's train section in full (all but progress, which --no-progress sets)
    from cliplab.train.trainer import TrainConfig

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    train = set(re.findall(r"[a-z_]+", text.split("replay}, train {", 1)[1].split("}")[0]))
    assert set(TrainConfig.model_fields) - {"progress"} <= train


def test_every_help_fits_80_columns_and_keeps_names_whole(monkeypatch):
    """adapt's usage line was 128 characters (its --method choices, which argparse cannot
    wrap), merge's 86; the wrapper broke names at hyphens (`task-` / `arithmetic`)."""
    from cliplab.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    helps = {"cliplab": parser.format_help()}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        helps[name] = sub.format_help()
        inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for action in inner:
            helps.update({f"{name} {n}": p.format_help() for n, p in action.choices.items()})
    assert len(helps) >= 14
    for name, text in helps.items():
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert wide == [], (name, wide)
        broken = [line for line in text.splitlines() if re.search(r"\w-$", line)]
        assert broken == [], (name, broken)
    assert "task-arithmetic" in helps["cliplab"] and "task-arithmetic" in helps["merge"]


def test_adapt_help_says_what_a_lora_run_writes(capsys):
    """It said finetune and lora runs write checkpoints/step-N/model: a LoRA run's checkpoints
    hold only the peft adapter (and `cliplab export RUN` of one is refused), the model being
    merged/ with options.merge=true."""
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "finetune a run folder (checkpoints/step-N/model, a model folder)" in said
    assert ("lora a run folder of peft adapter folders (checkpoints/step-N/adapter, no model "
            "there: with options.merge=true also merged/, the model folder)") in said
