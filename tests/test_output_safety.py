"""The one --out rule (`cliplab.output_folder.check_out`): an --out that is a file, an input (or
holds one, or lies inside one) or an unrelated folder is refused on one line (exit 2) and left
as it was; --overwrite replaces only a previous output of the same kind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cliplab.cli import main
from tests.cli_output import folder_tree as _tree, one_line_error as _one_line
from tests.image_folders import pets_folder

OPENCLIP = Path(__file__).parent / "fixtures" / "openclip" / "hub-gelu"


@pytest.fixture
def run(tiny_model_dir, tmp_path) -> Path:
    """A (fake) fine-tune run folder: config, metrics, one checkpoint with its model."""
    folder = tmp_path / "runs" / "ft1"
    shutil.copytree(tiny_model_dir, folder / "checkpoints" / "step-1" / "model")
    (folder / "config.yaml").write_text("model: {name: tiny-clip}\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (folder / "results.json").write_text('{"run": "mine"}')
    return folder


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "mydocs"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


@pytest.fixture
def ufile(tmp_path) -> Path:
    file = tmp_path / "ufile.txt"
    file.write_text("mine")
    return file


def _merge(models, out, *extra) -> list[str]:
    return ["merge", "--method", "uniform", "--models", *map(str, models), "--out", str(out),
            "--no-progress", *extra]


def test_merge_never_deletes_an_input_run_folder(run, tiny_model_dir, tmp_path, capsys):
    before = _tree(run)
    assert main(_merge([tiny_model_dir, run], run, "--overwrite")) == 2
    assert _one_line(capsys) == f"--out {run} is the input {run}; choose another folder"
    # the runs/ folder holding the input, and a folder inside the input, are refused alike
    assert main(_merge([tiny_model_dir, run], run.parent, "--overwrite")) == 2
    assert _one_line(capsys) == (f"--out {run.parent} holds the input {run}; choose another "
                                 "folder")
    inner = run / "checkpoints" / "step-1" / "model"
    assert main(_merge([tiny_model_dir, run], inner / "x", "--overwrite")) == 2
    assert "lies inside the input" in _one_line(capsys)
    assert _tree(run) == before


def test_merge_overwrite_refuses_other_folders_and_files(run, tiny_model_dir, docs, ufile,
                                                         tmp_path, capsys):
    assert main(_merge([tiny_model_dir, run], docs, "--overwrite")) == 2
    assert _one_line(capsys) == (f"--overwrite replaces only a previous merge output; {docs} "
                                 "holds other files (e.g. thesis.txt); choose a new folder")
    assert _tree(docs) == {"thesis.txt": b"years of work"}
    for flags in ((), ("--overwrite",)):
        assert main(_merge([tiny_model_dir, run], ufile, *flags)) == 2
        assert _one_line(capsys) == f"--out {ufile} is a file; choose a folder"
        assert ufile.read_text() == "mine" and not (tmp_path / "ufile.txt.old").exists()
    # a previous merge output is replaced with --overwrite (and refused without)
    soup = tmp_path / "soup"
    assert main(_merge([tiny_model_dir, run], soup)) == 0
    assert main(_merge([tiny_model_dir, run], soup)) == 2
    assert "not empty; give a new folder or --overwrite" in _one_line(capsys)
    assert main(_merge([tiny_model_dir, run], soup, "--overwrite")) == 0
    assert (soup / "merge.json").is_file()
    # a merge output the user added notes to is theirs now: refused, nothing deleted
    (soup / "notes.txt").write_text("which soup won")
    before = _tree(soup)
    assert main(_merge([tiny_model_dir, run], soup, "--overwrite")) == 2
    assert _one_line(capsys) == (f"--overwrite replaces only a previous merge output; {soup} "
                                 "holds other files (e.g. notes.txt); choose a new folder")
    assert _tree(soup) == before


def test_export_never_deletes_its_input_or_other_folders(run, tiny_model_dir, docs, ufile,
                                                         tmp_path, capsys):
    before = _tree(run)
    assert main(["export", str(run), "--format", "onnx", "--out", str(run), "--overwrite"]) == 2
    assert _one_line(capsys) == f"--out {run} is the input {run}; choose another folder"
    assert _tree(run) == before
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    kept = _tree(model)
    assert main(["export", str(model), "--format", "open_clip", "--out", str(model),
                 "--overwrite"]) == 2
    assert _one_line(capsys) == f"--out {model} is the input {model}; choose another folder"
    assert _tree(model) == kept
    for fmt, kind in (("onnx", "ONNX export"), ("open_clip", "OpenCLIP export")):
        assert main(["export", str(model), "--format", fmt, "--out", str(docs),
                     "--overwrite"]) == 2
        assert _one_line(capsys) == (f"--overwrite replaces only a previous {kind} output; "
                                     f"{docs} holds other files (e.g. thesis.txt); choose a "
                                     "new folder")
        assert main(["export", str(model), "--format", fmt, "--out", str(ufile),
                     "--overwrite"]) == 2
        assert _one_line(capsys) == f"--out {ufile} is a file; choose a folder"
    assert _tree(docs) == {"thesis.txt": b"years of work"} and ufile.read_text() == "mine"


def test_export_overwrite_replaces_a_previous_export(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "oc"
    args = ["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "not empty" in _one_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert (out / "open_clip_config.json").is_file()
    # an OpenCLIP export is not what --format onnx may replace
    assert main(["export", str(tiny_model_dir), "--format", "onnx", "--out", str(out),
                 "--overwrite"]) == 2
    assert "only a previous ONNX export output" in _one_line(capsys)


def test_convert_never_deletes_its_source_or_other_folders(docs, ufile, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(OPENCLIP, src)
    kept = _tree(src)
    assert main(["convert", str(src), "--out", str(src), "--overwrite"]) == 2
    assert _one_line(capsys) == f"--out {src} is the input {src}; choose another folder"
    assert main(["convert", str(src), "--out", str(tmp_path), "--overwrite"]) == 2
    assert _one_line(capsys) == f"--out {tmp_path} holds the input {src}; choose another folder"
    assert _tree(src) == kept
    assert main(["convert", str(src), "--out", str(docs), "--overwrite"]) == 2
    assert _one_line(capsys) == ("--overwrite replaces only a previous convert output; "
                                 f"{docs} holds other files (e.g. thesis.txt); choose a new "
                                 "folder")
    assert main(["convert", str(src), "--out", str(ufile), "--overwrite"]) == 2
    assert _one_line(capsys) == f"--out {ufile} is a file; choose a folder"
    assert _tree(docs) == {"thesis.txt": b"years of work"} and ufile.read_text() == "mine"
    out = tmp_path / "model"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 0  # its own output
    assert (out / "config.json").is_file()


def test_data_shard_out_is_never_its_input_folder(tmp_path, capsys):
    """Shards written into (or over) the image folder they read would join or replace it."""
    pets = pets_folder(tmp_path / "pets", per_class=2, broken_in="dog")
    before = _tree(pets)
    for out, how in ((pets / "shards", "lies inside"), (pets, "is")):
        assert main(["data", "shard", "--data", str(pets), "--out", str(out),
                     "--no-progress"]) == 2
        assert f"--out {out} {how} the input {pets}" in _one_line(capsys)
    assert _tree(pets) == before


def test_shard_overwrite_replaces_only_a_shard_set(docs, ufile, tmp_path):
    from cliplab.data.shards import check_out_folder
    from cliplab.errors import DataError

    with pytest.raises(DataError, match="only a previous shard output; .* thesis.txt"):
        check_out_folder(docs, overwrite=True)
    with pytest.raises(DataError, match="is a file; choose a folder$"):
        check_out_folder(ufile, overwrite=True)
    with pytest.raises(DataError, match="holds the input"):
        check_out_folder(tmp_path, overwrite=True, inputs=[docs])
    assert _tree(docs) == {"thesis.txt": b"years of work"}


@pytest.fixture
def suite(tmp_path) -> Path:
    file = tmp_path / "suite.yaml"
    file.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, "
                    "split: test}}\n")
    return file


def _eval(model, suite, out, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--config", str(suite), "--out", str(out),
            "--no-progress", *extra]


def test_eval_refuses_a_run_folder_and_needs_overwrite(run, tiny_model_dir, suite, docs, ufile,
                                                       tmp_path, capsys):
    other = tmp_path / "p1"
    shutil.copytree(run, other)
    before = _tree(other)
    for flags in ((), ("--overwrite",)):
        assert main(_eval(tiny_model_dir, suite, other, *flags)) == 2
        assert _one_line(capsys).startswith(f"--out {other} is a run folder")
        assert main(_eval(tiny_model_dir, suite, ufile, *flags)) == 2
        assert _one_line(capsys) == f"--out {ufile} is a file; choose a folder"
    assert _tree(other) == before and ufile.read_text() == "mine"
    assert main(_eval(tiny_model_dir, suite, docs, "--overwrite")) == 2
    assert "only a previous eval output" in _one_line(capsys)
    assert _tree(docs) == {"thesis.txt": b"years of work"}

    out = tmp_path / "res"
    assert main(_eval(tiny_model_dir, suite, out)) == 0
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().err
    first = (out / "results.json").read_text()
    assert main(_eval(tiny_model_dir, suite, out)) == 2  # earlier results are not replaced
    assert "not empty; give a new folder or --overwrite" in _one_line(capsys)
    assert (out / "results.json").read_text() == first
    assert main(_eval(tiny_model_dir, suite, out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    capsys.readouterr()
    # a cache kept in --out made it more than results.json: the next --overwrite refused it
    for cache in (out, out / "cache"):
        assert main(_eval(tiny_model_dir, suite, out, "--overwrite", "--cache-dir",
                          str(cache))) == 2
        how = "is" if cache == out else "lies inside"
        assert _one_line(capsys) == f"--cache-dir {cache} {how} --out {out}; keep the cache " \
            "in a folder of its own (--out holds results.json alone)"
    # --overwrite replaces an eval's results.json, not any file of that name
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"accuracy": 0.93}')
    assert main(_eval(tiny_model_dir, suite, theirs, "--overwrite")) == 2
    assert _one_line(capsys) == ("--overwrite replaces only a previous eval output; "
                                 f"{theirs / 'results.json'} is not an eval's results (no "
                                 "model, suite and results keys); choose a new folder")
    assert (theirs / "results.json").read_text() == '{"accuracy": 0.93}'
    # another tool's file with a results key (e.g. a pretrain run's) is not an eval's either
    for other in ('{"results": {"zs": {"acc1": 0.9}}}', '{"model": "m", "results": {}}'):
        (theirs / "results.json").write_text(other)
        assert main(_eval(tiny_model_dir, suite, theirs, "--overwrite")) == 2
        assert "is not an eval's results" in _one_line(capsys)
        assert (theirs / "results.json").read_text() == other


def test_report_out_a_file_or_other_folder_is_a_one_line_error(docs, ufile, tmp_path, capsys):
    res = tmp_path / "X" / "results.json"
    res.parent.mkdir()
    res.write_text(json.dumps({"model": "m", "results": {"zs": {"acc1": 0.5}}}))
    assert main(["report", "--inputs", str(res), "--out", str(ufile), "--no-progress"]) == 2
    assert _one_line(capsys) == f"--out {ufile} is a file; choose a folder"
    assert main(["report", "--inputs", str(res), "--out", str(docs), "--no-progress"]) == 2
    assert "only a previous report output" in _one_line(capsys)
    assert main(["report", "--inputs", str(res), "--out", str(res.parent),
                 "--no-progress"]) == 2
    assert "only a previous report output" in _one_line(capsys)
    assert _tree(docs) == {"thesis.txt": b"years of work"} and ufile.read_text() == "mine"
    # a report.md of the user's was taken for a previous report: replaced, and every PNG in
    # its plots/ deleted
    (docs / "report.md").write_text("# my notes\n")
    (docs / "plots").mkdir()
    (docs / "plots" / "figure1.png").write_bytes(b"png")
    before = _tree(docs)
    assert main(["report", "--inputs", str(res), "--out", str(docs), "--no-progress"]) == 2
    assert _one_line(capsys) == (f"--out {docs}: its report.md was not written by cliplab "
                                 "report; choose a new folder")
    assert _tree(docs) == before
    # a new folder inside the input's folder is fine: a report writes only its own files
    assert main(["report", "--inputs", str(res), "--out", str(res.parent / "report"),
                 "--no-progress"]) == 0
    assert json.loads(res.read_text())["results"] == {"zs": {"acc1": 0.5}}


def test_merge_leaves_a_users_old_and_partial_folders_beside_out_alone(run, tiny_model_dir,
                                                                      tmp_path, capsys):
    """The merged folder is built, and the replaced one moved, under fresh hidden names: a
    user's own soup.old / soup.partial beside --out survive a merge and an --overwrite."""
    soup = tmp_path / "soup"
    for name in ("soup.old", "soup.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    assert main(_merge([tiny_model_dir, run], soup)) == 0
    assert main(_merge([tiny_model_dir, run], soup, "--overwrite")) == 0
    for name in ("soup.old", "soup.partial"):
        assert _tree(tmp_path / name) == {"mine.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "soup"))) == \
        ["soup", "soup.old", "soup.partial"]


def test_folders_a_killed_build_left_beside_out_are_removed_by_the_next(run, tiny_model_dir,
                                                                       tmp_path, capsys):
    """SIGKILL leaves the hidden folder a merge or export was building (a whole model); the
    next run into that --out, holding it, removes such folders and says so. Other hidden
    folders, and the Python API (which holds nothing), leave them alone."""
    from cliplab.output_folder import built_beside

    soup = tmp_path / "soup"
    left = [tmp_path / ".soup.partial-ab12cd_9", tmp_path / ".soup.old-zz00yy11"]
    users = [tmp_path / ".soup.partial-mine", tmp_path / ".soupy.partial-ab12cd_9"]
    for folder in left + users:
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
    (tmp_path / ".api.partial-ab12cd_9").mkdir()
    with built_beside(tmp_path / "api") as work:  # as the Python API builds: nothing held
        (work / "x").write_text("1")
    assert (tmp_path / ".api.partial-ab12cd_9").is_dir() and all(f.is_dir() for f in left)
    # killed between moving soup aside and renaming the new one in: soup is missing and its
    # old copy is the only one; nothing is removed, the old copy is named
    capsys.readouterr()
    assert main(_merge([tiny_model_dir, run], soup)) == 0
    err = capsys.readouterr().err
    assert f"cliplab: warning: {soup} is missing and {left[1]} holds the output it replaced" in err
    assert all(f.is_dir() for f in left) and "removed" not in err
    # with soup there, both are leftovers: removed by the next run into it
    assert main(_merge([tiny_model_dir, run], soup, "--overwrite")) == 0
    err = capsys.readouterr().err
    for folder in left:
        assert not folder.exists()
        assert f"cliplab: removed {folder}, left by a killed run into {soup}" in err
    assert all(f.is_dir() for f in users)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".soup.")) == \
        [".soup.partial-mine"]  # and the merge's own build was not taken for a leftover


def test_a_folder_called_checkpoints_is_no_run_and_dot_is_no_out_name(run, tiny_model_dir,
                                                                       tmp_path, capsys,
                                                                       monkeypatch):
    """Only a run's checkpoints (beside its config.yaml / metrics.jsonl) are refused as --out;
    a user's own ~/checkpoints/x is fine. `--out .` is refused before any work (it failed
    after the merge, with a traceback)."""
    mine = tmp_path / "work" / "checkpoints" / "soup"
    assert main(_merge([tiny_model_dir, run], mine)) == 0 and (mine / "merge.json").is_file()
    assert main(_merge([tiny_model_dir, run], run / "checkpoints" / "x")) == 2
    assert "lies inside" in _one_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for parent in (".", "..", "sub/.."):
        assert main(_merge([tiny_model_dir, run], parent)) == 2
        assert "names the current or a parent folder" in _one_line(capsys)
    assert not any(empty.iterdir())


def test_every_command_says_the_same_of_an_out_that_is_a_file(run, tiny_model_dir, suite, ufile,
                                                              tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    line = f"--out {ufile} is a file; choose a folder"
    for args in (_merge([tiny_model_dir, run], ufile),
                 ["curate", "--config", str(Path(__file__).parents[1] / "configs" / "curate" /
                                            "basic.yaml"),
                  "--data", str(photos), "--out", str(ufile), "--no-progress"],
                 ["index", "--model", str(tiny_model_dir), "--data", str(photos), "--out",
                  str(ufile), "--no-progress"],
                 _eval(tiny_model_dir, suite, ufile),
                 ["convert", str(OPENCLIP), "--out", str(ufile)],
                 ["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(ufile)]):
        assert main(args) == 2, args
        assert _one_line(capsys) == line, args
    assert ufile.read_text() == "mine"


def test_every_command_refuses_an_out_below_a_file_up_front(run, tiny_model_dir, suite, ufile,
                                                           tmp_path, capsys):
    """`export --out afile/sub` passed the checks (the nearest existing path was a file, not a
    folder) and failed after loading the model, with a raw "[Errno 17] File exists: 'afile'"."""
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    res = tmp_path / "X" / "results.json"
    res.parent.mkdir()
    res.write_text(json.dumps({"model": "m", "results": {"zs": {"acc1": 0.5}}}), encoding="utf-8")
    recipe = Path(__file__).parents[1] / "configs"
    out = ufile / "sub" / "deeper"
    line = f"--out {out}: {ufile} is a file, so no folder can be made in it; choose another folder"
    for args in (_merge([tiny_model_dir, run], out),
                 ["curate", "--config", str(recipe / "curate" / "basic.yaml"),
                  "--data", str(photos), "--out", str(out), "--no-progress"],
                 ["index", "--model", str(tiny_model_dir), "--data", str(photos), "--out",
                  str(out), "--no-progress"],
                 _eval(tiny_model_dir, suite, out),
                 ["convert", str(OPENCLIP), "--out", str(out)],
                 ["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(out)],
                 ["export", str(tiny_model_dir), "--format", "onnx", "--out", str(out)],
                 ["pretrain", "--config", str(recipe / "pretrain" / "tiny-shapes.yaml"),
                  "--out", str(out), f"model={tiny_model_dir}", "--no-progress"],
                 ["adapt", "--method", "zeroshot", "--model", str(tiny_model_dir), "shots=1",
                  "data.train={source: shapes, n: 4}", "data.test={source: shapes, n: 4}",
                  "--out", str(out), "--no-progress"],
                 ["data", "shard", "--data", "shapes", "data.n=4", "--out", str(out)],
                 ["report", "--inputs", str(res), "--out", str(out), "--no-progress"]):
        assert main(args) == 2, args
        assert _one_line(capsys) == line, args
    assert main(_eval(tiny_model_dir, suite, tmp_path / "e", "--cache-dir", str(out))) == 2
    assert _one_line(capsys) == line.replace("--out", "--cache-dir")
    assert ufile.read_text(encoding="utf-8") == "mine" and not (tmp_path / "e").exists()


def test_pretrain_names_its_run_folder(tiny_model_dir, tmp_path, monkeypatch,
                                                         capsys):
    import cliplab.train.pretrain as pretrain

    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    out = tmp_path / "run"
    model = out / "checkpoints" / "step-4" / "model"

    evals = {"zs": {"acc1": 0.5, "n": 10, "skipped": {"total": 2, "unreadable_image": 2}}}

    def finished(cfg, resume=None, progress=True, where=None):
        shutil.copytree(tiny_model_dir, model)
        return {"evals": evals, "model_dir": str(model)}

    monkeypatch.setattr(pretrain, "run_pretrain", finished)
    assert main(["pretrain", "--config", str(recipe), "--out", str(out), "--no-progress"]) == 0
    # each eval's numbers (not its data's skip record), the model, and the run folder to pass
    # to --out with --resume (not RUN/checkpoints)
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "zs/acc1=0.500, zs/n=10", f"model: {model}",
        f"run folder: {out} (results.json, metrics.jsonl, checkpoints/)"]


@pytest.fixture
def interrupted_run(tiny_model_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(recipe, run folder holding a checkpoint) with pretraining interrupted by Ctrl-C."""
    import cliplab.train.pretrain as pretrain

    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "checkpoints" / "step-4" / "model")

    def interrupted(cfg, resume=None, progress=True, where=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run_pretrain", interrupted)
    return recipe, out


def test_pretrain_interrupted_tells_how_to_resume(interrupted_run, tmp_path, capsys):
    recipe, out = interrupted_run
    assert main(["pretrain", "--config", str(recipe), "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"resume with: cliplab pretrain --out {out} --resume latest" in err
    assert err.strip().endswith("cliplab: interrupted")
    # no checkpoint: no hint
    fresh = tmp_path / "fresh"
    assert main(["pretrain", "--config", str(recipe), "--out", str(fresh), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "cliplab: interrupted"


def test_the_resume_hint_starts_a_line_of_its_own_after_an_open_bar(interrupted_run,
                                                                      monkeypatch, capsys):
    """It was glued to the progress bar's line (which ends in a carriage return until the bar
    closes), and the bar drawn again after it."""
    import sys

    from tqdm import tqdm

    import cliplab.train.pretrain as pretrain

    recipe, out = interrupted_run

    def interrupted_mid_bar(cfg, resume=None, progress=True, where=None):
        bar = tqdm(total=45, desc="train", file=sys.stderr)
        bar.update(4)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run_pretrain", interrupted_mid_bar)
    assert main(["pretrain", "--config", str(recipe), "--out", str(out)]) == 130
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    hint = f"cliplab: {out} holds checkpoints up to step-4; resume with: cliplab pretrain --out"
    assert any(line.startswith(hint) for line in lines), lines
    assert lines[-1] == "cliplab: interrupted"
    assert not any(line.startswith("train:") for line in
                   lines[next(i for i, line in enumerate(lines) if line.startswith(hint)):])


def test_an_interrupted_torchrun_run_is_said_once_with_a_torchrun_hint(interrupted_run,
                                                                        monkeypatch, capsys):
    """Ctrl-C reaches every rank: local rank 0 says it (each rank printed 'interrupted'), and
    its hint relaunches with torchrun (a streamed run resumes on as many ranks only: the hint
    without torchrun was refused)."""
    recipe, out = interrupted_run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, local in (("0", "0"), ("1", "1")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert main(["pretrain", "--config", str(recipe), "--out", str(out),
                     "--no-progress"]) == 130
        err = capsys.readouterr().err
        if rank == "0":
            assert (f"resume with: torchrun --nproc-per-node 2 --nnodes 2 -m cliplab pretrain "
                    f"--out {out} --resume latest") in err
            assert err.strip().endswith("cliplab: interrupted")
        else:
            assert err == ""


def test_a_torchrun_run_stopped_by_sigterm_is_said_once_with_a_torchrun_hint(
        interrupted_run, monkeypatch, capsys):
    """A scheduler's stop reaches torchrun, whose agent passes SIGTERM on to every rank: the
    ranks died of it without a word (no resume hint, a half-written step-N.tmp left), as
    cliplab left SIGTERM alone under torchrun. Each rank now unwinds as from Ctrl-C: local
    rank 0 says it once, with the hint, and every rank exits 143."""
    import os
    import signal
    import time

    import cliplab.train.pretrain as pretrain

    recipe, out = interrupted_run

    def stopped(cfg, resume=None, progress=True, where=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM went unhandled")

    def unhandled(signum, frame):  # SIGTERM's default action would end pytest itself
        raise AssertionError("cliplab left SIGTERM to its default action under torchrun")

    monkeypatch.setattr(pretrain, "run_pretrain", stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("LOCAL_RANK", rank)
            assert main(["pretrain", "--config", str(recipe), "--out", str(out),
                         "--no-progress"]) == 143
            err = capsys.readouterr().err
            if rank == "0":
                assert err.strip().splitlines() == [
                    f"cliplab: {out} holds checkpoints up to step-4; resume with: torchrun "
                    f"--nproc-per-node 2 -m cliplab pretrain --out {out} --resume latest",
                    "cliplab: terminated"]
            else:
                assert err == ""
            assert signal.getsignal(signal.SIGTERM) is unhandled  # put back after the command
    finally:
        signal.signal(signal.SIGTERM, before)


def test_interrupted_default_run_hint_names_only_the_run_it_made(tiny_model_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """Without --out the run folder is a new runs/pretrain-<time>: the hint names that one,
    never an earlier run's folder (interrupted before its own folder exists: no hint)."""
    import cliplab.train.pretrain as pretrain

    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs" / "pretrain-20260101-000000"
    shutil.copytree(tiny_model_dir, earlier / "checkpoints" / "step-9" / "model")
    made = tmp_path / "runs" / "pretrain-20261203-104216"

    def interrupted(cfg, resume=None, progress=True, where=None):
        if made_folder:
            shutil.copytree(tiny_model_dir, made / "checkpoints" / "step-2" / "model")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run_pretrain", interrupted)
    for made_folder in (False, True):
        assert main(["pretrain", "--config", str(recipe), "--no-progress", "out=null"]) == 130
        err = capsys.readouterr().err
        assert str(earlier) not in err and "runs/pretrain-20260101" not in err
        assert ("resume with: cliplab pretrain --out runs/pretrain-20261203-104216 --resume "
                "latest" in err) == made_folder


def test_ctrl_c_while_starting_up_is_one_line(monkeypatch, capsys):
    """Ctrl-C during the first seconds (building the parser imports transformers) ends like
    Ctrl-C later: one line, exit 130, no traceback."""
    import cliplab.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse_command_line", interrupted)
    assert main(["pretrain", "--help"]) == 130
    assert capsys.readouterr().err.strip() == "cliplab: interrupted"


def test_curate_and_index_leave_a_users_partial_folder_beside_out_alone(tiny_model_dir,
                                                                        tmp_path, capsys):
    """curate and index resume in OUT.partial; a folder of that name holding the user's own
    files (no progress record) is refused, untouched, instead of removed."""
    for argv in (["curate", "--config", str(Path(__file__).parents[1] / "configs" / "curate"
                                            / "basic.yaml"), "--data", "shapes", "data.n=8"],
                 ["index", "--model", str(tiny_model_dir), "--data", "shapes", "data.n=8"]):
        out = tmp_path / argv[0]
        mine = tmp_path / f"{argv[0]}.partial"
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2
        assert _one_line(capsys) == (f"{mine} is not a `cliplab {argv[0]}` work folder (it "
                                     "holds notes.txt); move it away or choose another --out")
        assert _tree(mine) == {"notes.txt": b"mine"} and not out.exists()


def test_pretrain_out_is_never_its_model_or_data(tiny_model_dir, tmp_path, capsys):
    """Continued pretraining from a model folder with --out that folder wrote a run into it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _tree(model)
    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    assert main(["pretrain", "--config", str(recipe), "--out", str(model), f"model={model}",
                 "--no-progress"]) == 2
    assert f"--out {model} is the input {model}" in _one_line(capsys)
    assert _tree(model) == before


def test_eval_out_and_cache_dirs_stay_out_of_its_data_and_model(tiny_model_dir, tmp_path,
                                                               capsys):
    """`eval --out` inside an image folder it scores became a new (empty) class of that
    dataset; a --cache-dir inside the model folder added feature files to it."""
    pets = pets_folder(tmp_path / "pets", per_class=2, broken_in="dog")
    suite = tmp_path / "if.yaml"
    suite.write_text("tasks:\n  - {task: zeroshot, data: {source: image-folder, "
                     f"path: {pets}}}}}\n")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before, model_before = _tree(pets), _tree(model)
    assert main(_eval(model, suite, pets / "ev")) == 2
    assert _one_line(capsys) == f"--out {pets / 'ev'} lies inside the input {pets}; choose " \
        "another folder"
    # so is one inside a folder a data spec names by another key (Fashion-MNIST's data_dir)
    idx = tmp_path / "idx"
    idx.mkdir()
    (tmp_path / "fm.yaml").write_text("tasks:\n  - {task: zeroshot, data: {source: fashion-mnist, "
                                      f"data_dir: {idx}}}}}\n")
    assert main(_eval(model, tmp_path / "fm.yaml", idx / "ev")) == 2
    assert _one_line(capsys) == f"--out {idx / 'ev'} lies inside the input {idx}; choose " \
        "another folder"
    # ... or a CLIP_benchmark set's root
    (tmp_path / "cb.yaml").write_text("tasks:\n  - {task: zeroshot, data: {source: "
                                      f"clip-benchmark, root: {idx}}}}}\n")
    assert main(_eval(model, tmp_path / "cb.yaml", idx / "ev")) == 2
    assert _one_line(capsys) == f"--out {idx / 'ev'} lies inside the input {idx}; choose " \
        "another folder"
    for cache in (model, model / "cache"):
        assert main(_eval(model, suite, tmp_path / "res", "--cache-dir", str(cache))) == 2
        how = "is" if cache == model else "lies inside"
        assert _one_line(capsys) == f"--cache-dir {cache} {how} the input {model}; choose " \
            "another folder"
    assert _tree(pets) == before and _tree(model) == model_before
    assert not (tmp_path / "res").exists()
    # a cache folder holding the inputs is fine: it only adds its own files
    assert main(_eval(model, suite, tmp_path / "res", "--cache-dir", str(tmp_path))) == 0
    assert _tree(pets) == before and _tree(model) == model_before


def test_adapt_cache_dir_stays_out_of_its_model_and_data(tiny_model_dir, tmp_path, capsys):
    pets = pets_folder(tmp_path / "pets", per_class=2, broken_in="dog")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before, model_before = _tree(pets), _tree(model)
    data = [f"data.{name}={{source: image-folder, path: {pets}}}" for name in ("train", "test")]
    for cache, source in ((model / "cache", model), (pets / "cache", pets)):
        assert main(["adapt", "--method", "zeroshot", "--model", str(model), "shots=1", *data,
                     "--out", str(tmp_path / "run"), "--cache-dir", str(cache),
                     "--no-progress"]) == 2
        assert _one_line(capsys) == f"--cache-dir {cache} lies inside the input {source}; " \
            "choose another folder"
    assert _tree(pets) == before and _tree(model) == model_before
    assert not (tmp_path / "run").exists()


def test_eval_out_naming_a_json_file_is_refused(tiny_model_dir, suite, tmp_path, capsys):
    """`--out res/results.json` made a folder called results.json holding results.json."""
    out = tmp_path / "res" / "results.json"
    assert main(_eval(tiny_model_dir, suite, out)) == 2
    assert _one_line(capsys) == (f"--out {out} names a file; choose a folder (results go to "
                                 f"{tmp_path / 'res' / 'results'}/results.json)")
    assert not (tmp_path / "res").exists()


def test_curate_out_inside_a_runs_checkpoints_is_refused(run, tmp_path, capsys):
    """A curated pool written into RUN/checkpoints/ would sit among the run's checkpoints."""
    before = _tree(run)
    out = run / "checkpoints" / "x"
    assert main(["curate", "--config", str(Path(__file__).parents[1] / "configs" / "curate" /
                                           "basic.yaml"),
                 "--data", "shapes", "data.n=8", "--out", str(out), "--no-progress"]) == 2
    assert _one_line(capsys) == (f"--out {out} lies inside the checkpoints of the run folder "
                                 f"{run}; choose another folder")
    assert _tree(run) == before and sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step-1"]


def test_merge_out_inside_an_input_run_folder_is_refused(run, tiny_model_dir, tmp_path, capsys):
    """The run folder given (not only the model folder it stands for) is an input: an --out
    inside it, beside its checkpoints, would make the merge part of that run."""
    before = _tree(run)
    assert main(_merge([tiny_model_dir, run], run / "merged")) == 2
    assert _one_line(capsys) == (f"--out {run / 'merged'} lies inside the input {run}; choose "
                                 "another folder")
    assert _tree(run) == before


def test_a_second_run_into_an_out_being_written_is_refused(tiny_model_dir, tmp_path, capsys):
    """Two runs started together both passed the checks before either wrote: merges, evals and
    shard sets lost one result without a word, curate hid its output in .OUT.old-*, pretrain
    mixed two configs. The output is held while a command runs; the other is refused."""
    import os

    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    out = tmp_path / "soup"
    args = ["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(out)]
    with holding_outputs():  # as a command in another process holds its output
        hold(tmp_path / "x" / ".." / "soup")  # one output however it is written
        assert main(args) == 2
        assert _one_line(capsys) == (f"--out {out} is being written by another cliplab run "
                                     f"(pid {os.getpid()}); wait for it to end, or choose "
                                     "another --out")
        assert not out.exists()
        # an out set in a config file (not --out) is held too: pretrain's, data shard's
        (tmp_path / "shard.yaml").write_text(f"data: {{source: shapes, n: 4}}\nout: {out}\n")
        assert main(["data", "shard", "--config", str(tmp_path / "shard.yaml")]) == 2
        assert "is being written by another cliplab run" in _one_line(capsys)
    assert main(args) == 0  # released with the block (a killed holder's lock goes with it)
    hold(out)  # outside a command (the Python API) nothing is held


def test_sigterm_is_an_interruption_that_cleans_up(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """kill (SIGTERM) left the hidden half-built export behind and said nothing (exit 143)."""
    import contextlib
    import os
    import signal

    import cliplab.models.convert.atomic as atomic

    real, work = atomic.built_beside, []

    @contextlib.contextmanager
    def killed_while_writing(out):
        with real(out) as folder:
            work.append(folder)
            (folder / "half.bin").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
            yield folder

    import cliplab.output_folder as output_folder

    import shutil
    import types

    def killed_again_while_cleaning(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a second kill must not cut the cleanup short
        return shutil.rmtree(path, *args, **kwargs)

    out = tmp_path / "oc"
    monkeypatch.setattr(atomic, "built_beside", killed_while_writing)
    monkeypatch.setattr(output_folder, "shutil", types.SimpleNamespace(
        rmtree=killed_again_while_cleaning))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip() == "cliplab: terminated"
    assert work and not work[0].exists()  # it was there, half-built, and is gone
    assert not out.exists() and list(tmp_path.glob(".oc*")) == []
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the command


def test_an_out_the_system_will_not_let_us_write_is_one_line(tiny_model_dir, suite, tmp_path,
                                                            monkeypatch, capsys):
    """A read-only --out was a traceback for every command but export, and eval found it only
    after running its whole suite; a full disk too."""
    import errno
    import os

    import cliplab.output_folder as output_folder
    from cliplab.cli import evaluate

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(output_folder.os, "access",
                        lambda path, mode: Path(path) != ro and real(path, mode))
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite),
                 "--out", str(ro / "e")]) == 2
    assert _one_line(capsys) == (f"--out {ro / 'e'}: cannot write in {ro} (a read-only file "
                                 "system, or no permission); choose another folder")
    assert main(["data", "shard", "--data", "shapes", "data.n=4", "--out", str(ro / "s")]) == 2
    assert "cannot write in" in _one_line(capsys)

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "e" / "x.json"))

    monkeypatch.setattr(evaluate, "run", full)
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite)]) == 2
    assert _one_line(capsys) == (f"{tmp_path / 'e' / 'x.json'}: No space left on device; free "
                                 "space there or choose another --out")

    # a writer that names no file (a tar's, SQLite's): the --out it wrote is named
    def unnamed(args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluate, "run", unnamed)
    assert main(["eval", "--model", "m", "--config", "s", "--out", str(tmp_path / "o")]) == 2
    assert _one_line(capsys) == (f"{tmp_path / 'o'}: No space left on device; free space there "
                                 "or choose another --out")

    # safetensors reports a full disk as its own error: it was a 20-line traceback
    from safetensors import SafetensorError

    def weights(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    from cliplab.models.convert import openclip_export
    monkeypatch.setattr(openclip_export, "save_tensors", weights)
    assert main(["export", str(tiny_model_dir), "--format", "open_clip", "--out",
                 str(tmp_path / "soup")]) == 2
    assert _one_line(capsys) == (f"{tmp_path / 'soup'}: No space left on device; free space "
                                 "there or choose another --out")
    assert not (tmp_path / "soup").exists()
    from cliplab.cli import _write_refusal  # a denied read of an input is no refused write
    assert _write_refusal(SafetensorError("Error while deserializing header: I/O error: "
                                          "Permission denied (os error 13)")) is None


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


def test_the_hold_is_seen_whatever_the_temporary_folder(tmp_path, monkeypatch, capsys):
    """The lock was a file of $TMPDIR: two runs of one --out with their own temporary folders
    (a scheduler's per-job $TMPDIR, containers with a private /tmp) both passed and wrote one
    folder together (two records per step in metrics.jsonl, one eval's results lost). The lock
    lives beside the output now: any process that can write it sees it."""
    import os
    import subprocess
    import sys
    import tempfile

    from cliplab.errors import ConfigError
    from cliplab.output_lock import check_not_held

    out = tmp_path / "shards"
    for name in ("tA", "tB"):
        (tmp_path / name).mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path / "tA")})
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tB"))
        assert main(["data", "shard", "--data", "shapes", "data.n=4", "--out", str(out)]) == 2
        live = (f"--out {out} is being written by another cliplab run (pid {holder.pid}); "
                "wait for it to end, or choose another --out")
        assert _one_line(capsys) == live
        with pytest.raises(ConfigError) as refused:  # a run folder's "live, not stopped" look
            check_not_held(out)
        assert str(refused.value) == live
        assert not out.exists()
    finally:
        holder.communicate("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tA", "tB"]  # the lock went with it
    assert main(["data", "shard", "--data", "shapes", "data.n=4", "--out", str(out)]) == 0


def test_a_holder_on_another_machine_is_named_with_it(tmp_path):
    """Two machines sharing a folder see one lock beside the output; a pid alone would send
    the user looking for a process on their own machine."""
    import fcntl

    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    out = tmp_path / "out"
    with open(tmp_path / ".out.cliplab-lock", "wb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write(b"pid 12 on node-7")
        other.flush()
        with holding_outputs(), pytest.raises(ConfigError, match=r"\(pid 12 on node-7\);"):
            hold(out)
    assert not out.exists()
    assert (tmp_path / ".out.cliplab-lock").read_text(encoding="utf-8") == "pid 12 on node-7"


def test_the_hold_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    """Another user who may write in the folder can plant a link at the lock's (predictable)
    name to a file of yours, and a file of yours may bear that name: the hold writes 'pid N'
    into what it opens. None of them is followed, opened for writing or written: the run is
    refused, naming it. The temporary folder's lock, used where none can be made beside the
    output, is no more followed, and a folder of it others may write in is not used."""
    import hashlib
    import os
    import tempfile

    import cliplab.output_lock as output_lock
    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    mine = tmp_path / "thesis.txt"
    mine.write_text("years of work", encoding="utf-8")
    out = tmp_path / "out"
    lock = tmp_path / ".out.cliplab-lock"
    planted = [lambda: lock.symlink_to(mine),
               lambda: lock.write_text("years of work", encoding="utf-8"),
               lambda: os.link(mine, lock), lambda: os.mkfifo(lock), lambda: lock.mkdir()]
    # a second name of a file of yours, even one that reads as a lock
    mine.write_text("pid 7", encoding="utf-8")
    for plant in planted:
        plant()
        with holding_outputs(), pytest.raises(ConfigError) as refused:
            hold(out)
        assert str(refused.value) == (
            f"--out {out}: {lock} is not a lock file of cliplab's (that name keeps two runs from "
            "writing the output together); move it away, or choose another --out")
        assert mine.read_text(encoding="utf-8") == "pid 7" and not out.exists()
        if lock.is_dir() and not lock.is_symlink():
            lock.rmdir()
        else:
            assert lock.is_symlink() or lock.is_fifo() or \
                lock.read_text(encoding="utf-8") in ("years of work", "pid 7")
            lock.unlink()

    monkeypatch.setattr(output_lock, "_beside_lock", lambda *args: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    locks = tmp_path / "tmp" / f"cliplab-locks-{os.getuid()}"
    locks.mkdir(mode=0o700)
    name = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:24] + ".lock"
    (locks / name).symlink_to(mine)
    with holding_outputs():
        hold(out)  # the link is not followed: no hold, no error, the file untouched
    assert mine.read_text(encoding="utf-8") == "pid 7"
    locks.chmod(0o777)  # a folder others may write in is not used at all
    with holding_outputs():
        hold(tmp_path / "other")
    assert sorted(p.name for p in locks.iterdir()) == [name]


def test_no_lock_beside_the_output_falls_back_to_the_temporary_folder(tmp_path, monkeypatch):
    """A parent that takes no new file (an --out that exists in a read-only folder) or a file
    system without flock (some NFS set-ups): the output is held in the temporary folder, as
    before, and its check sees it there; nothing is left beside it."""
    import errno
    import fcntl
    import os
    import tempfile
    import types

    import cliplab.output_folder as output_folder
    import cliplab.output_lock as output_lock
    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import check_not_held, holding_outputs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    locks = tmp_path / "tmp" / f"cliplab-locks-{os.getuid()}"
    out = tmp_path / "out"
    lock = tmp_path / ".out.cliplab-lock"
    real_open = os.open

    def read_only_parent(path, flags, *args):
        if Path(path) == lock and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def no_flock_beside(handle, how):
        if lock.exists() and os.path.samestat(os.fstat(handle.fileno()), lock.stat()):
            raise OSError(errno.ENOLCK, "No locks available")
        return fcntl.flock(handle, how)

    for way in ("read-only", "no flock"):
        with monkeypatch.context() as patch:
            if way == "read-only":
                patch.setattr(output_folder.os, "open", read_only_parent)
            else:
                patch.setattr(output_lock, "fcntl", types.SimpleNamespace(
                    **{k: getattr(fcntl, k) for k in dir(fcntl) if k.isupper()},
                    flock=no_flock_beside))
            with holding_outputs():
                hold(out)
                assert not lock.exists() and len(list(locks.iterdir())) == 1
                other = open(next(locks.iterdir()))
                with pytest.raises(BlockingIOError):  # really held
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                other.close()
                with holding_outputs(), pytest.raises(ConfigError, match="being written"):
                    check_not_held(out)  # another command's look
            assert list(locks.iterdir()) == [] and not lock.exists()


def test_a_released_hold_removes_its_lock_file_safely(tmp_path, monkeypatch):
    """Lock files were never removed (one per --out ever given: thousands in the temporary
    folder). Released, it is removed while still locked; a run that had opened it before the
    release gets a lock on a removed file, sees that and takes the new one. Folders the hold
    made for it go too unless the command wrote in them."""
    import fcntl

    import cliplab.output_lock as output_lock
    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    out = tmp_path / "runs" / "out"
    lock = tmp_path / "runs" / ".out.cliplab-lock"
    real = output_lock._beside_lock
    with holding_outputs():
        hold(out)
        late = real(out, out, ConfigError)  # another run opening it as this one ends
        assert [p.name for p in (tmp_path / "runs").iterdir()] == [lock.name]
        assert lock.read_text(encoding="utf-8").startswith(f"pid {__import__('os').getpid()} on ")
    assert not (tmp_path / "runs").exists()  # made for the lock, empty: removed
    handed = [late]  # the late run's open file comes first, then the path's new one
    monkeypatch.setattr(output_lock, "_beside_lock",
                        lambda *args: handed.pop() if handed else real(*args))
    with holding_outputs():
        hold(out)  # the late opener's lock is on the removed file: it takes the new one
        assert handed == [] and late.handle.closed
        other = open(lock)
        with pytest.raises(BlockingIOError):  # really held: a third run is refused
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.close()
        out.mkdir()  # the command wrote its output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["out"]


def test_a_look_at_the_lock_by_check_not_held_does_not_refuse_a_hold(tmp_path, monkeypatch):
    """`check_not_held` takes a shared lock for an instant to look; a `hold` starting in that
    instant (rank 0 of a torchrun job while a rank looks) refused a run "being written by
    another cliplab run" that did not exist (8 in 2 160 holds in a stress run)."""
    import fcntl
    import threading

    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    out = tmp_path / "out"
    looker = open(tmp_path / ".out.cliplab-lock", "wb")
    fcntl.flock(looker, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a look under way as the hold starts
    threading.Timer(0.03, lambda: fcntl.flock(looker, fcntl.LOCK_UN)).start()
    with holding_outputs():
        hold(out)
    looker.close()


def test_a_lock_removed_under_the_hold_every_time_refuses_it(tmp_path, monkeypatch):
    """Under contention (other runs taking and releasing the lock as this one tried) a hold
    whose lock file was removed under it on every attempt went on holding nothing (98 in 2 400
    holds of six processes): it is refused as being written."""
    from cliplab import output_folder, output_lock
    from cliplab.errors import ConfigError

    monkeypatch.setattr(output_lock, "_still_named", lambda handle, path: False)
    with output_lock.holding_outputs():
        with pytest.raises(ConfigError, match=r"being written by another cliplab run \(other "
                                              r"processes, which took it in turn\)"):
            output_folder.hold(tmp_path / "out")


def test_another_users_lock_is_readable_and_never_said_to_be_no_lock(tmp_path, monkeypatch):
    """With umask 077 (many clusters) the lock was made 0600: another user could not open it
    and was told it was "not a lock file of cliplab's; move it away" while its run wrote, and
    `holder_of` said no run held it. The lock is made readable by all; a lock this user cannot
    open is another user's, refused naming its owner, and not taken for free."""
    import errno
    import os
    import stat

    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import check_not_held, holder_of, holding_outputs

    out = tmp_path / "out"
    lock = tmp_path / ".out.cliplab-lock"
    old = os.umask(0o077)
    try:
        with holding_outputs():
            hold(out)
            assert stat.S_IMODE(lock.stat().st_mode) == 0o644
    finally:
        os.umask(old)

    lock.write_text("pid 12 on node-7", encoding="utf-8")  # another user's, mode 0600
    real_open = os.open

    def other_users(path, flags, *args):
        if Path(path) == lock and not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", other_users)
    with holding_outputs(), pytest.raises(ConfigError) as refused:
        hold(out)
    assert str(refused.value) == (
        f"--out {out}: {lock} is another user's lock file (uid {os.getuid()}), which this user "
        "cannot open to see whether their run writes it now; wait for that run to end or ask "
        "them, or choose another --out")
    assert holder_of(out) == (f"uid {os.getuid()}", lock, False)
    with pytest.raises(ConfigError) as looked:
        check_not_held(out)  # --resume auto, serve: not taken for a stopped run
    assert str(looked.value) == str(refused.value)  # not said to be written: it may be left
    assert lock.read_text(encoding="utf-8") == "pid 12 on node-7" and not out.exists()


def test_another_users_lock_on_nfs_is_not_passed_by(tmp_path, monkeypatch):
    """On NFS, flock is emulated with byte-range locks: an exclusive lock needs a file open for
    writing, and another user's lock opens only read-only, so it failed with EBADF, taken for
    "no flock here": the run held the temporary folder's lock instead and wrote together with
    the run holding the output. Now a held lock refuses, naming its holder; a free one (a killed
    run's) is removed and this run makes its own; one it cannot remove is refused, named."""
    import errno
    import fcntl
    import os
    import subprocess
    import sys
    import tempfile

    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    lock = tmp_path / ".out.cliplab-lock"
    real_open, real_flock, real_unlink = os.open, fcntl.flock, os.unlink

    def as_other_user(path, flags, *args):  # the lock is not ours: no write access to it
        if Path(path) == lock and flags & os.O_ACCMODE == os.O_RDWR and \
                not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def nfs_flock(handle, how):
        if how & fcntl.LOCK_EX and not handle.writable():
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(handle, how)

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(os, "open", as_other_user)
        monkeypatch.setattr(fcntl, "flock", nfs_flock)
        with holding_outputs(), pytest.raises(ConfigError) as refused:
            hold(out)
        assert str(refused.value) == (
            f"--out {out} is being written by another cliplab run (pid {holder.pid}); wait for "
            "it to end, or choose another --out")
        assert list((tmp_path / "tmp").iterdir()) == []  # no lock elsewhere either
    finally:
        holder.communicate("")

    lock.write_text("pid 12 on node-7", encoding="utf-8")  # a killed run's, another user's
    with holding_outputs():
        hold(out)
        assert lock.read_text(encoding="utf-8").startswith(f"pid {os.getpid()} on ")
        other = open(lock, "rb")
        with pytest.raises(BlockingIOError):  # really held, beside the output
            real_flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        other.close()
    assert not lock.exists() and list((tmp_path / "tmp").iterdir()) == []

    def not_removable(path, *args, **kwargs):  # a sticky folder, say: not ours to remove
        if Path(path) == lock:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    lock.write_text("pid 12 on node-7", encoding="utf-8")
    monkeypatch.setattr(os, "unlink", not_removable)
    with holding_outputs(), pytest.raises(ConfigError) as refused:
        hold(out)
    assert str(refused.value) == (
        f"--out {out}: {lock} is another user's lock file (uid {os.getuid()}), held by no run "
        "now, but on this file system (NFS) this user can neither lock it nor remove it; ask "
        "them to remove it, or choose another --out")
    assert lock.read_text(encoding="utf-8") == "pid 12 on node-7"


def test_a_lock_made_and_removed_under_each_open_refuses_the_hold(tmp_path, monkeypatch):
    """The same race one step earlier: each exclusive create found the lock file made by
    another run, each open found it removed again. The hold then fell back to the temporary
    folder's lock, which runs holding the lock beside the output never look at, and wrote with
    them; it is refused as being written, and nothing is made in the temporary folder."""
    import os
    import tempfile

    from cliplab import output_folder, output_lock
    from cliplab.errors import ConfigError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_open = os.open

    def racing(path, flags, *args):  # made by another run, then removed as it releases
        if str(path).endswith(".cliplab-lock"):
            if flags & os.O_EXCL:
                raise FileExistsError(17, "File exists", str(path))
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", racing)
    with output_lock.holding_outputs():
        with pytest.raises(ConfigError, match=r"being written by another cliplab run \(other "
                                              r"processes, which took it in turn\)"):
            output_folder.hold(tmp_path / "runs" / "out")
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "runs").exists()


def test_a_killed_runs_lock_is_taken_over_by_the_next_run(tmp_path, monkeypatch):
    """A run killed with SIGKILL cannot remove its lock file: the next run into that output
    takes it over and removes it as it ends; a lock another run holds refuses it. The temporary
    folder's locks (3,062 had piled up on a busy machine) are swept by a run that used one:
    those no process holds go, locked first as a run's own."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold, remove_killed_builds
    from cliplab.output_lock import check_not_held, holding_outputs

    out = tmp_path / "out"
    lock = tmp_path / ".out.cliplab-lock"
    killed = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline() == "held\n"
    with holding_outputs(), pytest.raises(ConfigError, match=f"pid {killed.pid}"):
        hold(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdin.close()
    killed.stdout.close()
    assert lock.read_text(encoding="utf-8").startswith(f"pid {killed.pid} on ")  # left behind
    check_not_held(out)  # a killed run's folder is not said to be written (--resume auto)
    remove_killed_builds(out)  # not taken for a half-built output
    assert lock.exists()
    with holding_outputs():
        hold(out)
        assert lock.read_text(encoding="utf-8").startswith(f"pid {os.getpid()} on ")
    assert list(tmp_path.iterdir()) == []

    import cliplab.output_lock as output_lock
    monkeypatch.setattr(output_lock, "_beside_lock", lambda *args: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    locks = tmp_path / "tmp" / f"cliplab-locks-{os.getuid()}"
    locks.mkdir(mode=0o700)
    for i in range(5):  # left by killed runs
        (locks / f"{i:024d}.lock").write_text("pid 1")
    alive = open(locks / "alive-run.lock", "w")  # another run's, held
    fcntl.flock(alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (locks / "not-a-lock.txt").write_text("kept")
    with holding_outputs():
        hold(tmp_path / "out")
    assert sorted(p.name for p in locks.iterdir()) == ["alive-run.lock", "not-a-lock.txt"]
    other = open(locks / "alive-run.lock")
    with pytest.raises(BlockingIOError):  # still the file the other run holds
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.close()
    alive.close()


def test_a_killed_runs_lock_inside_a_folder_keeps_it_no_output(tiny_model_dir, suite, tmp_path,
                                                                capsys):
    """A killed run into OUT/sub leaves OUT/.sub.cliplab-lock (its lock, beside its output):
    `ls` hides it, yet it made OUT "hold other files" for eval --overwrite (and index's,
    curate's) and a new run refused a folder holding one. No process holds it: it is cliplab's
    and refuses nothing; a lock a live run holds still refuses, naming that run's output."""
    import signal
    import subprocess
    import sys

    from cliplab.errors import ConfigError
    from cliplab.output_folder import hold
    from cliplab.output_lock import holding_outputs
    from cliplab.runs import check_no_foreign_files, check_run_out

    out = tmp_path / "res"
    assert main(_eval(tiny_model_dir, suite, out)) == 0
    killed = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out / "sub")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline() == "held\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdin.close()
    killed.stdout.close()
    assert (out / ".sub.cliplab-lock").is_file()
    capsys.readouterr()
    assert main(_eval(tiny_model_dir, suite, out, "--overwrite")) == 0
    assert "results.json" in {p.name for p in out.iterdir()}
    capsys.readouterr()

    folder = tmp_path / "X"  # a folder for a new run, holding only a killed eval's lock
    folder.mkdir()
    (folder / ".eval.cliplab-lock").write_text("pid 999999 on vm", encoding="utf-8")
    with holding_outputs():
        check_run_out(folder)
    (folder / ".notes.cliplab-lock").write_text("the user's notes", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"holds \.notes\.cliplab-lock, which no cliplab run"):
        check_no_foreign_files(folder)  # named so, but not a lock: the user's file
    (folder / ".notes.cliplab-lock").unlink()

    live = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder / "eval")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline() == "held\n"
        inside = (f"another cliplab run (pid {live.pid}) writes {folder / 'eval'} inside it; "
                  "wait for it to end, or choose another --out")
        with holding_outputs(), pytest.raises(ConfigError) as refused:
            hold(folder)
            check_no_foreign_files(folder)
        assert str(refused.value) == f"--out {folder}: {inside}"
        assert main(_eval(tiny_model_dir, suite, folder, "--overwrite")) == 2
        assert _one_line(capsys) == f"--out {folder}: {inside}"
    finally:
        live.communicate("")
    assert list(folder.iterdir()) == []  # the live run took the killed one's over, removed it


def test_a_folder_holding_only_a_killed_runs_lock_is_empty(tiny_model_dir, suite, tmp_path,
                                                            capsys):
    """A folder holding only a killed run's lock looks empty to `ls`, yet eval (without
    --overwrite) called it "not empty" and report said it "holds other files (e.g.
    .sub.cliplab-lock)". An empty lock file is no killed run's (a run between making it and
    writing its holder, or the user's): it is not taken for one."""
    from cliplab.output_lock import is_left_lock

    res = tmp_path / "res"
    assert main(_eval(tiny_model_dir, suite, res)) == 0
    for name in ("E", "R"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".sub.cliplab-lock").write_text("pid 999999 on vm", encoding="utf-8")
    assert main(_eval(tiny_model_dir, suite, tmp_path / "E")) == 0
    assert (tmp_path / "E" / "results.json").is_file()
    assert main(["report", "--inputs", str(res / "results.json"), "--out", str(tmp_path / "R"),
                 "--no-progress"]) == 0
    assert (tmp_path / "R" / "report.md").is_file()
    capsys.readouterr()
    (tmp_path / "F").mkdir()
    (tmp_path / "F" / ".sub.cliplab-lock").write_bytes(b"")
    assert not is_left_lock(tmp_path / "F" / ".sub.cliplab-lock")
    assert main(_eval(tiny_model_dir, suite, tmp_path / "F")) == 2
    assert "is not empty" in _one_line(capsys)


def test_an_output_built_beside_needs_its_parent_writable(tiny_model_dir, run, tmp_path,
                                                          monkeypatch, capsys):
    """merge, export, convert, curate and index build beside --out and rename: an empty,
    writable --out in a parent that takes no new entries passed the check, and merge ran in
    full before failing."""
    import os

    import cliplab.output_folder as output_folder

    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(output_folder.os, "access",
                        lambda path, mode: Path(path) != parent and real(path, mode))
    assert main(_merge([run, tiny_model_dir], parent / "out")) == 2
    assert _one_line(capsys) == (f"--out {parent / 'out'}: cannot write in {parent}, where it "
                                 "is built before it is renamed into place (a read-only file "
                                 "system, or no permission); choose another folder")
    assert main(["export", str(tiny_model_dir), "--format", "onnx", "--out",
                 str(parent / "out")]) == 2
    assert "where it is built before it is renamed into place" in _one_line(capsys)


def test_without_fcntl_every_command_runs_and_overwrites_unheld(tmp_path):
    """Windows has no fcntl (nor os.getuid, O_NOFOLLOW): cliplab must still import and run,
    without the hold; an --overwrite then swaps the new output in."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fcntl'] = None\n"
            "from cliplab.cli import main\n"
            "for extra in ([], ['--overwrite']):\n"
            f"    main(['data', 'shard', '--data', 'shapes', '--out', {str(tmp_path / 'out')!r},"
            " 'data.n=20', '--no-progress', *extra])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 20 samples" in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left beside


def test_swap_in_never_renames_a_folder_onto_an_existing_one(tmp_path, monkeypatch):
    """Windows refuses to rename a folder onto any existing folder, an empty one included."""
    import os

    from cliplab.output_folder import swap_in

    rename = os.replace

    def windows_replace(src, dst):
        if Path(dst).exists():
            raise PermissionError(f"[WinError 5] Access is denied: {dst}")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", windows_replace)
    out, work = tmp_path / "out", tmp_path / "out.partial"
    for content in ("old", "new"):
        work.mkdir()
        (work / "a.txt").write_text(content)
        swap_in(work, out)
    assert _tree(tmp_path) == {"out/a.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def work_still_open(src, dst):  # Windows: a file under work is still open
        if Path(src) == work:
            raise PermissionError(f"[WinError 32] in use: {src}")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", work_still_open)
    work.mkdir()
    with pytest.raises(PermissionError):
        swap_in(work, out)
    assert _tree(out) == {"a.txt": b"new"}  # the output it was to replace is back in place


def test_an_out_the_same_folder_as_an_input_by_another_spelling_is_refused(tmp_path, monkeypatch):
    """On macOS' and Windows' case-insensitive file systems `Photos` is `photos`: the checks
    compare folders by identity on disk, not by spelling (stood for here by a samefile that
    folds case, as such a file system answers)."""
    import os

    from cliplab.errors import ConfigError
    from cliplab.output_folder import check_apart_from_inputs

    photos = tmp_path / "photos"
    photos.mkdir()
    real_samefile = os.path.samefile

    def case_insensitive(a, b):
        return str(a).lower() == str(b).lower() and Path(str(a).lower()).exists() or \
            real_samefile(a, b)

    monkeypatch.setattr(os.path, "samefile", case_insensitive)
    for out, how in ((tmp_path / "Photos", "is"), (tmp_path / "Photos" / "shards", "lies inside")):
        with pytest.raises(ConfigError, match=f"--out {out} {how} the input {photos}"):
            check_apart_from_inputs(out, [photos])
    check_apart_from_inputs(tmp_path / "Photos2", [photos])  # another folder is fine
    # eval's cache beside its results, and a run's checkpoints, by any spelling
    from cliplab.cli.evaluate import _check_cache_apart_from_results
    from cliplab.errors import CliplabError

    with pytest.raises(CliplabError, match="--cache-dir .* lies inside --out"):
        _check_cache_apart_from_results(str(tmp_path / "Photos" / "cache"), photos)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("out: run\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lies inside the checkpoints of the run folder"):
        check_apart_from_inputs(run / "Checkpoints" / "x", [])


def test_an_out_named_with_bytes_that_are_no_utf8_is_held_and_written(tiny_model_dir, tmp_path):
    """The output's lock is named by a hash of its path's bytes: a name in Latin-1 (lone
    surrogates in Python) was a traceback before any work; FAISS takes such a path too."""
    from cliplab.serve.index import SearchIndex

    shards, index = tmp_path / os.fsdecode(b"o\xff1"), tmp_path / os.fsdecode(b"i\xff2")
    assert main(["data", "shard", "--source", "shapes", "data.n=4", "--out", str(shards),
                 "--no-progress"]) == 0
    assert (shards / "00000.tar").is_file()
    assert main(["index", "--model", str(tiny_model_dir), "--data", "shapes", "data.n=4",
                 "--out", str(index), "--no-progress"]) == 0
    assert (index / "meta.sqlite").is_file()
    assert SearchIndex(index).store.count() == 4


def test_a_long_out_name_is_built_beside_under_a_name_that_fits(run, tiny_model_dir, tmp_path,
                                                               capsys):
    """A legal --out name of 250 bytes: OUT.partial and .OUT.partial-XXXXXXXX beside it were
    past the 255-byte file-name limit, a traceback from index, curate and merge."""
    name = "L" * 250
    recipe = Path(__file__).parents[1] / "configs" / "curate" / "basic.yaml"
    for argv in (["index", "--model", str(tiny_model_dir), "--data", "shapes", "data.n=4"],
                 ["curate", "--config", str(recipe), "data.n=8"],
                 ["merge", "--method", "uniform", "--models", str(tiny_model_dir), str(run)]):
        out = tmp_path / argv[0] / name
        out.parent.mkdir()
        assert main([*argv, "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
        assert [p.name for p in out.parent.iterdir()] == [name]
    assert main(["merge", "--method", "uniform", "--models", str(tiny_model_dir), str(run),
                 "--out", str(tmp_path / "merge" / name), "--overwrite", "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "merge").iterdir()] == [name]


def test_the_folders_beside_a_long_out_fit_and_are_found_again(tmp_path):
    """The shortened names are the same each time (a killed index or curate resumes from its
    OUT.partial; a killed merge's hidden folder is removed by the next run)."""
    from cliplab.output_folder import built_beside, partial_path, remove_killed_builds

    out = tmp_path / ("é" * 127)  # 254 bytes
    out.mkdir()
    work = partial_path(out)
    assert work == partial_path(out) and work.name.endswith(".partial")
    assert len(os.fsencode(work.name)) == 255 and work.name.isprintable()
    work.mkdir()
    with built_beside(out) as build:
        assert len(os.fsencode(build.name)) == 255
        killed = build.with_name(build.name[:-8] + "ab12cd_9")  # as a killed build leaves it
        killed.mkdir()
    remove_killed_builds(out)
    assert not killed.exists() and work.is_dir() and out.is_dir()
